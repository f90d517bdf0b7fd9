"""Services of the PMGD cluster: broadcaster, evaluator, API, the in-process engine and the CLI."""
