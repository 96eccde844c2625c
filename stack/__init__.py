"""Processes on this machine: the production stack (PostgreSQL, S3, MLflow, Prefect, worker, server, Prometheus) and
the drift demo, which starts a server, a worker and Prefect to show the monitoring loop. The top floor below the CLI:
it may import every package."""
