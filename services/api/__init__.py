"""The REST API service (issue 4): jobs, persistence, metrics, dashboard."""
