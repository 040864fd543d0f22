"""Command line of the local-stack harness (what ``make demo`` calls besides the pipeline's own commands).

    python -m devstack demo-data --landing-uri s3://landing/elpv/
    python -m devstack run-dag defect_training --conf '{"profile": "cpu-demo"}'
    python -m devstack code-deps [--check]
    python -m devstack add-user auditor2 --role auditor
    python -m devstack accounts-init      # docker-compose's one-shot service (passwords from .env)

The services have their own entry point: ``python -m devstack.services up|status|ui|down``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pipeline.core import settings
from pipeline.core.errors import PipelineError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-data", help="put the ELPV demo data into the landing bucket (idempotent)")
    p.add_argument("--landing-uri", default="s3://landing/elpv/")
    p.add_argument("--limit-per-class", type=int, default=0)
    p = sub.add_parser("run-dag", help="run a DAG once with `airflow dags test`, failing if it fails")
    p.add_argument("dag_id")
    p.add_argument("--conf", default="{}")
    p = sub.add_parser(
        "add-user",
        help="add an account (role pipeline, engineer or auditor) to the local stack; "
        "prints its generated password once",
    )
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=("pipeline", "engineer", "auditor"))
    sub.add_parser(
        "accounts-init",
        help="docker-compose: the accounts from <NAME>_ACCOUNT_PASSWORD into "
        "Airflow's passwords file and MLflow (MLFLOW_TRACKING_URI)",
    )
    sub.add_parser(
        "code-deps", help="write each stage's code deps into dvc.yaml (see devstack/code_deps.py)", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=settings.log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["code-deps"]:
        from devstack.code_deps import main as code_deps

        return code_deps(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo-data":
            from devstack.demo_data import upload_demo_data

            print(json.dumps(upload_demo_data(args.landing_uri, args.limit_per_class)))
        elif args.command == "run-dag":
            from devstack.rundag import run_dag
            from pipeline.adapters.credentials import use_local_account

            use_local_account()  # the DAG's tasks run in `airflow dags test`: the service account by default
            return run_dag(args.dag_id, args.conf)
        elif args.command == "accounts-init":
            from pathlib import Path

            from devstack import accounts

            home = Path(os.environ.get("AIRFLOW_HOME", "/opt/airflow"))
            accounts.init_from_env(
                home / "simple_auth_manager_passwords.json.generated",
                os.environ.get("MLFLOW_TRACKING_URI", "http://mlflow:5000"),
            )
        elif args.command == "add-user":
            return _add_user(args.name, args.role)
        return 0
    except PipelineError as exc:
        print(f"error{' (transient)' if exc.transient else ''}: {exc}", file=sys.stderr)
        return 2


def _add_user(name: str, role: str) -> int:
    from devstack import accounts, services

    stack = services.Stack.from_env()
    secret = accounts.add(name, role, stack.root)
    if services.mlflow_healthy(stack):
        accounts.sync_mlflow(stack.mlflow_url, stack.root)
        where = f"created in MLflow at {stack.mlflow_url}"
    else:
        where = "MLflow is not running: `make services-up` creates it there"
    print(
        f"account {name} ({role}): password {secret}  (shown this once; kept in "
        f"{accounts.passwords_file(stack.root)}, mode 600)"
    )
    print(f"{where}; Airflow reads its users when the api-server starts: `make services-down && make ui`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
