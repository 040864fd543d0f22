"""Command line: ``python -m pipeline <stage> [options]``; one subcommand per DVC stage plus helpers.

A :class:`PipelineError` (bad params, unreachable S3/MLflow, failed validation) prints one
``error: ...`` line and exits with code 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.errors import PipelineError


def _params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="sync the landing prefix into data/raw")
    _params(p)
    p.add_argument("--raw-dir", type=Path, default=Path("data/raw"))
    p.add_argument("--manifest", type=Path, default=Path("data/manifest.csv"))
    p.add_argument("--rejects", type=Path, default=Path("data/ingest_rejects.csv"))

    p = sub.add_parser("validate", help="Great Expectations rules; quarantine bad files")
    _params(p)
    p.add_argument("--raw-dir", type=Path, default=Path("data/raw"))
    p.add_argument("--manifest", type=Path, default=Path("data/manifest.csv"))
    p.add_argument("--rejects", type=Path, default=Path("data/ingest_rejects.csv"))
    p.add_argument("--validated", type=Path, default=Path("data/validated.csv"))
    p.add_argument("--quarantine", type=Path, default=Path("data/quarantine.csv"))
    p.add_argument("--report", type=Path, default=Path("reports/validation.json"))
    p.add_argument("--docs-dir", type=Path, default=None, help="write GX Data Docs (HTML) here")

    p = sub.add_parser("split", help="stratified, duplicate-aware train/val/test split")
    _params(p)
    p.add_argument("--validated", type=Path, default=Path("data/validated.csv"))
    p.add_argument("--split", type=Path, default=Path("data/split.csv"))
    p.add_argument("--report", type=Path, default=Path("reports/split.json"))

    p = sub.add_parser("train", help="train one bag member, or one entry of `backbones`")
    _params(p)
    p.add_argument("--split", type=Path, default=Path("data/split.csv"))
    p.add_argument("--raw-dir", type=Path, default=Path("data/raw"))
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--member", type=int, help="bag member = its seed")
    who.add_argument("--backbone", help="a key of `backbones` (seed 0, whole train split)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/images"))
    p.add_argument("--ckpt-dir", type=Path, default=Path(".cache/checkpoints"))

    p = sub.add_parser("evaluate", help="score the members and the bag on the test split")
    _params(p)
    p.add_argument("--split", type=Path, default=Path("data/split.csv"))
    p.add_argument("--raw-dir", type=Path, default=Path("data/raw"))
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--metrics", type=Path, default=Path("metrics/eval.json"))
    p.add_argument("--reports-dir", type=Path, default=Path("reports/eval"))
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/images"))

    p = sub.add_parser("register", help="log to MLflow, register the bag, gate, set aliases")
    _params(p)
    p.add_argument("--split", type=Path, default=Path("data/split.csv"))
    p.add_argument("--raw-dir", type=Path, default=Path("data/raw"))
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--metrics", type=Path, default=Path("metrics/eval.json"))
    p.add_argument("--reports-dir", type=Path, default=Path("reports"))
    p.add_argument("--decision", type=Path, default=Path("registry/decision.json"))

    default_model = "models:/" + os.environ.get("PIPELINE_MODEL_NAME", "wallpaper-defect-classifier") + "@champion"
    p = sub.add_parser("predict", help="classify a folder or S3 prefix of photos into a CSV")
    p.add_argument("--model", default=default_model,
                   help=f"MLflow model URI or a local models/ folder (default {default_model})")
    p.add_argument("--input", required=True, help="folder or s3://bucket/prefix/ of images")
    p.add_argument("--out", type=Path, required=True, help="CSV: id,label,confidence,error,prob_<class>...")
    p.add_argument("--tta", action="store_true", help="average over the flips each class allows")

    p = sub.add_parser("submission", help="write the DACON submission.csv for a test folder")
    p.add_argument("--model", default=default_model, help=f"MLflow model URI (default {default_model})")
    p.add_argument("--dacon-dir", type=Path, required=True, help="holds test/, test.csv, sample_submission.csv")
    p.add_argument("--out", type=Path, default=Path("submission.csv"))
    p.add_argument("--tta", action="store_true", help="average over the flips each class allows")

    p = sub.add_parser("demo-data", help="put the ELPV demo data into the landing bucket (idempotent)")
    p.add_argument("--landing-uri", default="s3://landing/elpv/")
    p.add_argument("--limit-per-class", type=int, default=0)

    p = sub.add_parser("workspace", help="create/refresh the DVC workspace for a profile")
    p.add_argument("--profile", default="cpu-demo")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    p.add_argument("--git", action="store_true", help="make it a Git repository too, for `dvc exp run`")

    p = sub.add_parser("run-dag", help="run a DAG once with `airflow dags test`, failing if it fails")
    p.add_argument("dag_id")
    p.add_argument("--conf", default="{}")

    p = sub.add_parser("audit", help="what differs between two registered versions")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("version_a")
    p.add_argument("version_b")

    p = sub.add_parser("rollback", help="move alias champion back to an earlier version")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--to", required=True, help="the version to serve again")
    p.add_argument("--reason", required=True, help="why (recorded as a tag)")

    p = sub.add_parser("summary", help="print the last run's outcome and machine-readable lines")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--profile", default="")
    return parser


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd in ("ingest", "validate", "split", "train", "evaluate", "register"):
        from pipeline.config import load_config

        cfg = load_config(args.params)
    if cmd == "ingest":
        from pipeline.ingest import run_ingest

        print(json.dumps(run_ingest(cfg, args.raw_dir, args.manifest, args.rejects)))
    elif cmd == "validate":
        from pipeline.validate import run_validate

        report = run_validate(cfg, args.raw_dir, args.manifest, args.rejects, args.validated, args.quarantine,
                              args.report, args.docs_dir)
        print(json.dumps({k: report[k] for k in ("validated", "quarantined", "fingerprint")}))
    elif cmd == "split":
        from pipeline.split import run_split

        run_split(cfg, args.validated, args.split, args.report)
    elif cmd == "train":
        from pipeline.train import run_train

        if args.backbone:
            run_train(cfg.for_backbone(args.backbone), args.split, args.raw_dir, 0, args.out_dir, args.cache_dir,
                      args.ckpt_dir, name=f"backbone_{args.backbone}")
        else:
            run_train(cfg, args.split, args.raw_dir, args.member, args.out_dir, args.cache_dir, args.ckpt_dir)
    elif cmd == "evaluate":
        from pipeline.evaluate import run_evaluate

        run_evaluate(cfg, args.split, args.raw_dir, args.models_dir, args.metrics, args.reports_dir, args.cache_dir)
    elif cmd == "register":
        from pipeline.register import run_register

        print(json.dumps(run_register(cfg, args.split, args.raw_dir, args.models_dir, args.metrics,
                                      args.reports_dir, args.decision)))
    elif cmd == "predict":
        from pipeline.predict import run_predict

        print(json.dumps(run_predict(args.model, args.input, args.out, args.tta), ensure_ascii=False))
    elif cmd == "submission":
        from pipeline.predict import run_submission

        print(json.dumps(run_submission(args.model, args.dacon_dir, args.out, args.tta), ensure_ascii=False))
    elif cmd == "demo-data":
        from pipeline.demo_data import upload_demo_data

        print(json.dumps(upload_demo_data(args.landing_uri, args.limit_per_class)))
    elif cmd == "workspace":
        from pipeline.config import parse_set
        from pipeline.workspace import default_workspace, prepare_workspace

        print(prepare_workspace(args.dir or default_workspace(), args.profile, parse_set(args.set), git=args.git))
    elif cmd == "run-dag":
        return _run_dag(args.dag_id, args.conf)
    elif cmd == "audit":
        from pipeline.audit import print_diff

        return print_diff(args.model, args.version_a, args.version_b)
    elif cmd == "rollback":
        from pipeline.audit import rollback

        print(json.dumps(rollback(args.model, args.to, args.reason), ensure_ascii=False))
    elif cmd == "summary":
        from pipeline.summary import print_summary

        return print_summary(args.dir)
    return 0


_SHOW = ("[DAG TEST] starting", "pipeline.", "error", "ERROR", "DagRun Finished", "Exception:", "]   - ")


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failed\w*|Interrupt): ")  # a traceback's last line
_STRUCTLOG = re.compile(r"^\S+T(\d\d:\d\d:\d\d)\S* \[\s*\w+\s*\] (.*)$")
_TRAILER = re.compile(r"\s+\[[\w.]+\] loc=\S+.*$")


def _compact(line: str) -> str:
    """Airflow's structlog line -> ``HH:MM:SS message`` (the full line stays in the log file)."""
    m = _STRUCTLOG.match(line.rstrip())
    if not m:
        return line.rstrip()[:300]
    msg = _TRAILER.sub("", m.group(2))
    msg = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ", "", msg)
    return f"{m.group(1)} {msg}"[:300]


def _run_dag(dag_id: str, conf: str) -> int:
    """``airflow dags test`` with its full log in a file; the console gets task starts, our stage lines, errors."""
    import time

    try:
        json.loads(conf)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"--conf is not valid JSON: {exc}") from None
    log_dir = Path(os.environ.get("PIPELINE_LOCAL", ".local")) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_fp = log_dir / f"{dag_id}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    airflow = str(Path(sys.executable).parent / "airflow")
    print(f"running DAG {dag_id} with `airflow dags test` (full log: {log_fp})", flush=True)
    with open(log_fp, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([airflow, "dags", "test", dag_id, "--conf", conf], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if (any(s in line for s in _SHOW) or _EXC_LINE.match(line)) and "Skipping registering" not in line:
                print(_compact(line), flush=True)
        code = proc.wait()
    if code != 0:
        raise PipelineError(f"DAG {dag_id} failed (exit {code}); the lines above and {log_fp} say why")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "botocore", "urllib3", "alembic", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except PipelineError as exc:
        # run_stage reads this line back: "error (transient):" marks a failure worth retrying.
        print(f"error{' (transient)' if exc.transient else ''}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
