"""The production stack on one machine: PostgreSQL, S3 (boto3), MLflow, Prefect, worker, server, Prometheus."""
