"""Running a PMGD cluster: local launcher and job client."""
