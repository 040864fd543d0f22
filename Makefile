# Two commands matter: `make demo` and `make test`. Everything else is a building block.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV        ?= .venv
PY          := $(CURDIR)/$(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# Defaults for the embedded stack (documented in README; override them in your shell).
export PIPELINE_LOCAL        ?= $(CURDIR)/.local
export AWS_DEFAULT_REGION    ?= us-east-1
export S3_PORT               ?= 8333
export MLFLOW_PORT           ?= 5000
export AWS_ENDPOINT_URL      ?= http://127.0.0.1:$(S3_PORT)
export MLFLOW_TRACKING_URI   ?= http://127.0.0.1:$(MLFLOW_PORT)
# S3 keys: yours when AWS_ACCESS_KEY_ID is set; else random keys for the embedded SeaweedFS, made once per checkout
# in .local/credentials.mk (mode 600, never committed). `make credentials` prints export lines for your shell.
LOCAL_CREDENTIALS := $(PIPELINE_LOCAL)/credentials.mk
ifeq ($(origin AWS_ACCESS_KEY_ID),undefined)
ifneq ($(MAKECMDGOALS),gpu-check)
include $(LOCAL_CREDENTIALS)
endif
endif
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
export PIPELINE_HOME         := $(CURDIR)
export AIRFLOW_HOME          ?= $(PIPELINE_LOCAL)/airflow
export AIRFLOW__CORE__DAGS_FOLDER    := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES  := False
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__API__HOST            := 127.0.0.1
export NO_ALBUMENTATIONS_UPDATE := 1
export GIT_PYTHON_REFRESH := quiet
export DVC_NO_ANALYTICS := 1

LANDING_URI ?= s3://landing/elpv/
PROFILE     ?= cpu-demo
# What the scheduled DAGs use when new data starts them (no form): the watched prefix and the profile.
export PIPELINE_LANDING_URI ?= $(LANDING_URI)
export PIPELINE_PROFILE     ?= $(PROFILE)

.PHONY: help credentials venv services-up services-down ui demo demo-data profile lint test bench bench-serve bench-loop \
	bench-label-noise bench-quality label-studio-roundtrip gpu-check clean
help:
	@echo "make demo          fresh clone -> services -> ELPV data -> training DAG -> registered model"
	@echo "make test          ruff (make lint), then the full test suite (what CI runs)"
	@echo "make services-up   start SeaweedFS S3 (:$(S3_PORT)) and MLflow (:$(MLFLOW_PORT)); migrate Airflow's DB"
	@echo "make services-down stop them"
	@echo "make ui            also start Airflow (api-server :8080, scheduler, dag-processor, triggerer) on 127.0.0.1"
	@echo "make profile       PROFILE=P: params.yaml = recipe + profiles/P.yaml here, for dvc repro in this clone"
	@echo "make bench         benchmarks in bench/, results to docs/BENCHMARKS.md"
	@echo "make bench-serve   serving load test of the champion (after make demo)"
	@echo "make bench-loop    timed event loop under a running scheduler (private stack, ~15 min)"
	@echo "make label-studio-roundtrip  review-export -> real Label Studio (own venv) -> relabel, private stack"
	@echo "make bench-label-noise  seeded label noise on ELPV: finder precision/recall, F1 noisy/excluded/clean"
	@echo "make bench-quality the recipe's ablation on ELPV against the old demo and a plain timm fine-tune (~1.5 h)"
	@echo "make gpu-check     GPU smoke run + train-step benchmark of the full recipe (tiny on a CPU; GPU_CHECK_OUT=dir)"

$(LOCAL_CREDENTIALS):
	@mkdir -p $(dir $@)
	@umask 077 && $(PYTHON_BOOT) -c 'import secrets; print("AWS_ACCESS_KEY_ID := local-" + secrets.token_hex(6)); \
	  print("AWS_SECRET_ACCESS_KEY := " + secrets.token_hex(24))' > $@.tmp && mv $@.tmp $@
	@echo "generated local S3 credentials in $@" >&2

credentials:
	@echo "export AWS_ACCESS_KEY_ID=$(AWS_ACCESS_KEY_ID) AWS_SECRET_ACCESS_KEY=$(AWS_SECRET_ACCESS_KEY)"
	@echo "export AWS_ENDPOINT_URL=$(AWS_ENDPOINT_URL) MLFLOW_TRACKING_URI=$(MLFLOW_TRACKING_URI)"

# The venv is built once and reused; it is rebuilt only when the pins change.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==25.3"
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[test,celery]'
	@touch $@

venv: $(VENV)/.installed

services-up: venv
	$(PY) -m devstack.services up

services-down:
	@if [ -x $(PY) ]; then $(PY) -m devstack.services down; fi

demo-data: services-up
	$(PY) -m devstack demo-data --landing-uri $(LANDING_URI)

demo: demo-data
	$(PY) -m devstack run-dag defect_training --conf '{"landing_uri": "$(LANDING_URI)", "profile": "$(PROFILE)"}'
	$(PY) -m pipeline summary --profile $(PROFILE)

ui: venv
	$(PY) -m devstack.services ui

# The clone's profile step (README, "Workstation"): params.yaml = committed recipe + profiles/$(PROFILE).yaml, edited
# in place (PROFILE=full restores the recipe); the DVC remote's URL and endpoint from the environment into
# .dvc/config.local. Then `dvc pull`, `dvc repro`, `dvc exp run` work in this folder.
profile: venv
	$(PY) -m pipeline profile $(PROFILE)

# PostgreSQL and Redis from Debian's packages for tests/celery (skips what is installed; needs root or sudo).
.PHONY: system-deps
system-deps:
	scripts/install-system-deps.sh

# ruff (settings in pyproject.toml): formatting and lint, first, because they take seconds.
lint: venv
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test: venv lint system-deps
	$(PY) -m pytest tests --durations=30

bench: venv
	$(PY) -m bench

bench-serve: venv
	$(PY) -m bench serve

bench-loop: venv
	$(PY) -m bench event-loop

# The relabelling loop against the real Label Studio from PyPI (installed once into .local/label-studio-venv).
label-studio-roundtrip: venv
	$(PY) -m devstack.label_studio_roundtrip

bench-label-noise: venv
	nice -n 5 $(PY) -m bench label-noise

# Rows run one after another, each in its own process; results.json under .local/bench/quality keeps finished rows.
bench-quality: venv
	$(PY) -m bench.quality

# A bare GPU box has python3 with torch + timm and no venv (nor pip access): use .venv when there is one, never
# build it, and read no S3 credentials. bench/gpu_check.py imports nothing of MLflow, Airflow, DVC or boto3.
GPU_CHECK_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_CHECK_PY) -m bench.gpu_check $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT))

# The production compose stack on this machine (docs/DEPLOY.md; issue 29). docker-engine: dockerd + the Compose
# plugin (root); images-offline: stand-ins for the registry images and the project image, for a machine without a
# registry (their PIPELINE_*_IMAGE lines go to .local/offline-images.env, which stack-up reads).
.PHONY: docker-engine images-offline stack-up stack-down stack-ps
docker-engine:
	deploy/docker-engine.sh

images-offline: venv docker-engine
	@mkdir -p .local
	deploy/offline-images.sh > .local/offline-images.env.tmp && mv .local/offline-images.env.tmp .local/offline-images.env

stack-up: venv docker-engine
	deploy/stack.sh up

stack-down:
	deploy/stack.sh down

stack-ps:
	deploy/stack.sh ps

clean: services-down
	rm -rf .local
