# Project image: the pinned venv of pyproject.toml + requirements/constraints.txt (same as `make venv`).
FROM python:3.11.7-slim-bookworm
WORKDIR /opt/pipeline
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY pipeline/ pipeline/
RUN pip install --no-cache-dir -c requirements/constraints.txt -e .
COPY dags/ dags/
COPY plugins/ plugins/
COPY profiles/ profiles/
COPY dvc.yaml params.yaml ./
ENV PIPELINE_HOME=/opt/pipeline AIRFLOW__CORE__DAGS_FOLDER=/opt/pipeline/dags AIRFLOW__CORE__LOAD_EXAMPLES=False
