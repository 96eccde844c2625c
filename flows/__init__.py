"""Prefect flows: training (the DAG, the registry step, the push) and the drift check, their deployments, the local
Prefect server, and the repair of records a killed run left open. Flow names are Prefect's keys for deployments and
runs: defined once, here."""

TRAINING_FLOW = "conveyor-training"
MONITORING_FLOW = "conveyor-monitoring"
