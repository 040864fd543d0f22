"""Command line of the local-stack harness (what ``make demo`` calls besides the pipeline's own commands).

    python -m devstack demo-data --landing-uri s3://landing/elpv/
    python -m devstack run-dag defect_training --conf '{"profile": "cpu-demo"}'
    python -m devstack code-deps [--check]

The services have their own entry point: ``python -m devstack.services up|status|ui|down``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

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
    sub.add_parser("code-deps", help="write each stage's code deps into dvc.yaml (see devstack/code_deps.py)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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

            return run_dag(args.dag_id, args.conf)
        return 0
    except PipelineError as exc:
        print(f"error{' (transient)' if exc.transient else ''}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
