# Project image for docker-compose.yaml (MLflow server and every Airflow role): the pinned dependency tree of
# pyproject.toml + requirements/constraints.txt (what `make venv` installs) plus the `celery` extra for the
# compose stack (apache-airflow-providers-celery, psycopg2-binary, asyncpg, redis).
#
# torch: the torch==2.14.1 wheel on PyPI for Linux x86_64 is the CUDA build; it pulls the nvidia-* CUDA 13
# wheels pinned in constraints.txt (several GB). So one image serves the CPU containers (torch runs on the CPU
# when no GPU is visible) and airflow-worker-gpu (needs the NVIDIA driver + NVIDIA Container Toolkit on the host,
# and a driver new enough for CUDA 13). A CPU-only image would need torch from PyTorch's own CPU wheel index
# (`2.14.1+cpu`), which this project does not pin.
# The official image by default; compose passes PIPELINE_PYTHON_IMAGE for a stand-in on a machine without a registry.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The runtime user; the code and the installed packages stay root-owned (read-only to it).
RUN groupadd --system --gid 50000 pipeline \
 && useradd --system --uid 50000 --gid pipeline --create-home --home-dir /home/pipeline --shell /bin/bash pipeline

WORKDIR /opt/pipeline
RUN python -m pip install "pip==25.3"

# Dependencies first, against a stub package, so that a code change does not reinstall them. The editable install
# maps the `pipeline` package to /opt/pipeline/pipeline, where the real code is copied next.
# (README.md, which pyproject names, is a stub here and copied below: a README edit must not reinstall torch.)
COPY pyproject.toml ./
COPY requirements/ requirements/
RUN mkdir pipeline && touch pipeline/__init__.py README.md \
 && pip install -c requirements/constraints.txt -e '.[celery]'

COPY README.md ./
COPY pipeline/ pipeline/
COPY dags/ dags/
COPY plugins/ plugins/
COPY profiles/ profiles/
COPY dvc.yaml params.yaml ./
# `python -m devstack accounts-init` (compose's accounts-init service) and MLflow's basic-auth config.
COPY devstack/ devstack/
COPY deploy/mlflow-auth.ini deploy/

# Mount points of the compose file's named volumes: a new volume takes this ownership, so the user can write.
RUN mkdir -p /opt/airflow /var/lib/pipeline /var/lib/mlflow-auth \
 && chown pipeline:pipeline /opt/airflow /var/lib/pipeline /var/lib/mlflow-auth

ENV PIPELINE_HOME=/opt/pipeline \
    PIPELINE_LOCAL=/var/lib/pipeline \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/pipeline/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/pipeline/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    NO_ALBUMENTATIONS_UPDATE=1 \
    GIT_PYTHON_REFRESH=quiet

USER pipeline
EXPOSE 8080 5000
# No ENTRYPOINT: docker-compose.yaml gives each service its full command (`airflow ...`, `mlflow server ...`).
CMD ["airflow", "version"]
