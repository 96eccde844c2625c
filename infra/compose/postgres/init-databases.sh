#!/bin/sh
# PostgreSQL's first start (an empty data volume) runs this from /docker-entrypoint-initdb.d: one database and one
# owner per service, so MLflow and Prefect never share tables or credentials. Later starts skip it (the volume holds
# the cluster); to change a password afterwards use ALTER ROLE, or start from an empty volume.
# Passwords come from the environment (infra/.env); psql's :'var' quoting keeps them out of the SQL text.
set -eu

for service in mlflow prefect; do
    case "$service" in
        mlflow) password="${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}" ;;
        prefect) password="${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set}" ;;
    esac
    psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
        -v name="$service" -v password="$password" <<'SQL'
CREATE ROLE :"name" LOGIN PASSWORD :'password';
CREATE DATABASE :"name" OWNER :"name";
SQL
done
