#!/bin/bash
# One PostgreSQL server, two databases: `airflow` (Airflow metadata + Celery results) and `mlflow` (tracking and
# registry). Each has its own login role that owns it. Mounted by docker-compose.yaml into
# /docker-entrypoint-initdb.d/, so the postgres image runs it once, on the first start with an empty data volume;
# changing the passwords in .env later does not change them here (use ALTER ROLE ... PASSWORD, or a new volume).
set -euo pipefail
: "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"

# psql substitutes :'var' as a quoted literal, so the passwords are never spliced into SQL text by the shell.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v airflow_password="$AIRFLOW_DB_PASSWORD" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
