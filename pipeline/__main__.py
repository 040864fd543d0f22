"""Command line: ``python -m pipeline <stage> [options]``; one subcommand per DVC stage plus helpers.

A :class:`PipelineError` (bad params, unreachable S3/MLflow, failed validation) prints one
``error: ...`` line and exits with code 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.core import settings
from pipeline.core.errors import PipelineError
from pipeline.stages import paths


def _params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=Path, default=paths.PARAMS, help="params file (default params.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="sync the landing prefix into data/raw")
    _params(p)
    p.add_argument("--raw-dir", type=Path, default=paths.RAW_DIR)
    p.add_argument("--manifest", type=Path, default=paths.MANIFEST)
    p.add_argument("--rejects", type=Path, default=paths.INGEST_REJECTS)

    p = sub.add_parser("validate", help="Great Expectations rules; quarantine bad files")
    _params(p)
    p.add_argument("--raw-dir", type=Path, default=paths.RAW_DIR)
    p.add_argument("--manifest", type=Path, default=paths.MANIFEST)
    p.add_argument("--rejects", type=Path, default=paths.INGEST_REJECTS)
    p.add_argument("--validated", type=Path, default=paths.VALIDATED)
    p.add_argument("--quarantine", type=Path, default=paths.QUARANTINE)
    p.add_argument("--report", type=Path, default=paths.VALIDATION_REPORT)
    p.add_argument("--docs-dir", type=Path, default=None, help="write GX Data Docs (HTML) here")

    p = sub.add_parser("label_exclusions", help="the champion's flagged label issues, to leave out of train/val")
    _params(p)
    p.add_argument("--out", type=Path, default=paths.LABEL_EXCLUSIONS)

    p = sub.add_parser("split", help="stratified, duplicate-aware train/val/test split")
    _params(p)
    p.add_argument("--validated", type=Path, default=paths.VALIDATED)
    p.add_argument("--split", type=Path, default=paths.SPLIT)
    p.add_argument("--report", type=Path, default=paths.SPLIT_REPORT)
    p.add_argument(
        "--exclusions",
        type=Path,
        default=paths.LABEL_EXCLUSIONS,
        help="images to leave out of train/val (written by stage label_exclusions; a missing file lists "
        "none unless data.exclude_label_issues is true)",
    )

    p = sub.add_parser("train", help="train one bag member, or one entry of `backbones`")
    _params(p)
    p.add_argument("--split", type=Path, default=paths.SPLIT)
    p.add_argument("--raw-dir", type=Path, default=paths.RAW_DIR)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--member", type=int, help="bag member = its seed")
    who.add_argument("--backbone", help="a key of `backbones` (seed 0, whole train split)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=paths.IMAGE_CACHE)
    p.add_argument("--ckpt-dir", type=Path, default=paths.CHECKPOINTS)

    p = sub.add_parser("evaluate", help="score the members and the bag on the test split")
    _params(p)
    p.add_argument("--split", type=Path, default=paths.SPLIT)
    p.add_argument("--raw-dir", type=Path, default=paths.RAW_DIR)
    p.add_argument("--models-dir", type=Path, default=paths.MODELS_DIR)
    p.add_argument("--metrics", type=Path, default=paths.METRICS)
    p.add_argument("--reports-dir", type=Path, default=paths.EVAL_REPORTS)
    p.add_argument("--cache-dir", type=Path, default=paths.IMAGE_CACHE)

    p = sub.add_parser("label_issues", help="rank train/val images by label quality (cleanlab, out-of-bag)")
    _params(p)
    p.add_argument("--split", type=Path, default=paths.SPLIT)
    p.add_argument("--raw-dir", type=Path, default=paths.RAW_DIR)
    p.add_argument("--models-dir", type=Path, default=paths.MODELS_DIR)
    p.add_argument("--issues", type=Path, default=paths.LABEL_ISSUES)
    p.add_argument("--metrics", type=Path, default=paths.LABEL_ISSUES_METRICS)
    p.add_argument("--grid", type=Path, default=paths.LABEL_ISSUES_GRID)
    p.add_argument("--cache-dir", type=Path, default=paths.IMAGE_CACHE)

    p = sub.add_parser("register", help="log to MLflow, register the bag, gate, set aliases")
    _params(p)
    p.add_argument("--split", type=Path, default=paths.SPLIT)
    p.add_argument("--raw-dir", type=Path, default=paths.RAW_DIR)
    p.add_argument("--models-dir", type=Path, default=paths.MODELS_DIR)
    p.add_argument("--metrics", type=Path, default=paths.METRICS)
    p.add_argument("--reports-dir", type=Path, default=paths.REPORTS_DIR)
    p.add_argument("--decision", type=Path, default=paths.DECISION)

    default_model = "models:/<registry.model_name of PIPELINE_PROFILE, or PIPELINE_MODEL_NAME>@champion"
    p = sub.add_parser("predict", help="classify a folder or S3 prefix of photos into a CSV")
    p.add_argument(
        "--model", default=None, help=f"MLflow model URI or a local models/ folder (default {default_model})"
    )
    p.add_argument("--input", required=True, help="folder or s3://bucket/prefix/ of images")
    p.add_argument("--out", type=Path, required=True, help="CSV: id,label,confidence,error,prob_<class>...")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average over the symmetries the model was trained with (default: as registered, model.tta)",
    )

    p = sub.add_parser("submission", help="write the DACON submission.csv for a test folder")
    p.add_argument("--model", default=None, help=f"MLflow model URI (default {default_model})")
    p.add_argument("--dacon-dir", type=Path, required=True, help="holds test/, test.csv, sample_submission.csv")
    p.add_argument("--out", type=Path, default=Path("submission.csv"))
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average over the symmetries the model was trained with (default: as registered, model.tta)",
    )

    p = sub.add_parser("workspace", help="create/refresh the DVC workspace for a profile")
    p.add_argument("--profile", default="cpu-demo")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    p.add_argument("--git", action="store_true", help="make it a Git repository too, for `dvc exp run`")

    p = sub.add_parser("profile", help="apply a profile to this clone's params.yaml; DVC remote from the environment")
    p.add_argument("name", help="full (the committed recipe), or a profiles/<name>.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    p.add_argument(
        "--no-lock",
        action="store_true",
        help="do not write dvc.lock from the newest version registered with these params",
    )

    p = sub.add_parser("reproduce", help="a workspace at a registered version's exact inputs, every hash checked")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--version", required=True, help="the version to reproduce")
    p.add_argument("--dir", type=Path, default=None, help="workspace (default .local/reproduce/<model>-v<N>)")
    p.add_argument("--retrain", action="store_true", help="run the stages again and compare weighted F1")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="largest weighted-F1 difference --retrain accepts (default 0: bit for bit, as on a CPU)",
    )

    p = sub.add_parser("audit", help="what differs between two registered versions")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("version_a")
    p.add_argument("version_b")

    p = sub.add_parser("rollback", help="move alias champion back to an earlier version")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--to", required=True, help="the version to serve again")
    p.add_argument("--reason", required=True, help="why (recorded as a tag)")

    p = sub.add_parser("review-export", help="a version's label-issue suspects as a Label Studio import file")
    p.add_argument("--model", required=True, help="registered model name")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", default=None, help="the version whose label_issues.csv to export")
    which.add_argument("--alias", default="champion", help="or the version this alias points at (default champion)")
    p.add_argument("--top", type=int, default=None, help="only the K highest-ranked flagged photos")
    p.add_argument("--out", type=Path, required=True, help="tasks JSON; the labeling config goes beside it")
    p.add_argument(
        "--url-expiry",
        type=int,
        default=7 * 24 * 3600,
        help="seconds the presigned image URLs stay valid (default and maximum: 7 days)",
    )
    p.add_argument(
        "--predictions",
        default="",
        metavar="S3_PREFIX",
        help="also export the batch DAG's unsure photos under this prefix (e.g. s3://landing/incoming/)",
    )
    p.add_argument("--below", type=float, default=0.5, help="unsure = confidence below this (default 0.5)")

    p = sub.add_parser("relabel", help="apply a Label Studio export to the landing bucket (dry run by default)")
    p.add_argument("--from", dest="export", type=Path, required=True, help="Label Studio JSON export")
    p.add_argument("--apply", action="store_true", help="move the objects (default: print the plan only)")
    p.add_argument(
        "--landing-uri",
        default="",
        metavar="S3_URI",
        help="the landing prefix rows must name (default: data.landing_uri of ./params.yaml)",
    )

    p = sub.add_parser("summary", help="print the last run's outcome and machine-readable lines")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--profile", default="")
    return parser


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd in ("predict", "submission") and args.model is None:
        from pipeline.adapters.workspace import default_model_uri

        args.model = default_model_uri()
    if cmd in ("ingest", "label_exclusions", "validate", "split", "train", "evaluate", "label_issues", "register"):
        from pipeline.core.config import load_config

        cfg = load_config(args.params)
    if cmd == "ingest":
        from pipeline.stages.ingest import run_ingest

        print(json.dumps(run_ingest(cfg, args.raw_dir, args.manifest, args.rejects)))
    elif cmd == "validate":
        from pipeline.stages.validate import run_validate

        report = run_validate(
            cfg, args.raw_dir, args.manifest, args.rejects, args.validated, args.quarantine, args.report, args.docs_dir
        )
        print(json.dumps({k: report[k] for k in ("validated", "quarantined", "fingerprint")}))
    elif cmd == "label_exclusions":
        from pipeline.stages.label_exclusions import run_label_exclusions

        print(json.dumps(run_label_exclusions(cfg, args.out)))
    elif cmd == "split":
        from pipeline.stages.split import run_split

        run_split(cfg, args.validated, args.split, args.report, args.exclusions)
    elif cmd == "train":
        from pipeline.stages.train import run_train

        if args.backbone:
            run_train(
                cfg.for_backbone(args.backbone),
                args.split,
                args.raw_dir,
                0,
                args.out_dir,
                args.cache_dir,
                args.ckpt_dir,
                name=f"backbone_{args.backbone}",
            )
        else:
            run_train(cfg, args.split, args.raw_dir, args.member, args.out_dir, args.cache_dir, args.ckpt_dir)
    elif cmd == "evaluate":
        from pipeline.stages.evaluate import run_evaluate

        run_evaluate(cfg, args.split, args.raw_dir, args.models_dir, args.metrics, args.reports_dir, args.cache_dir)
    elif cmd == "label_issues":
        from pipeline.stages.label_issues import run_label_issues

        print(
            json.dumps(
                run_label_issues(
                    cfg, args.split, args.raw_dir, args.models_dir, args.issues, args.metrics, args.grid, args.cache_dir
                )
            )
        )
    elif cmd == "register":
        from pipeline.stages.register import run_register

        print(
            json.dumps(
                run_register(
                    cfg,
                    args.split,
                    args.raw_dir,
                    args.models_dir,
                    args.metrics,
                    args.reports_dir,
                    args.decision,
                    params_fp=args.params,
                )
            )
        )
    elif cmd == "predict":
        from pipeline.commands.predict import run_predict

        print(json.dumps(run_predict(args.model, args.input, args.out, args.tta), ensure_ascii=False))
    elif cmd == "submission":
        from pipeline.commands.predict import run_submission

        print(json.dumps(run_submission(args.model, args.dacon_dir, args.out, args.tta), ensure_ascii=False))
    elif cmd == "workspace":
        from pipeline.adapters.workspace import default_workspace, prepare_workspace
        from pipeline.core.config import parse_set

        print(prepare_workspace(args.dir or default_workspace(), args.profile, parse_set(args.set), git=args.git))
    elif cmd == "profile":
        from pipeline.commands.profile import print_profile

        return print_profile(args.name, args.set, take_lock=not args.no_lock)
    elif cmd == "reproduce":
        from pipeline.commands.reproduce import run_reproduce

        return run_reproduce(args.model, args.version, args.dir, args.retrain, args.tolerance)
    elif cmd == "audit":
        from pipeline.commands.audit import print_diff

        return print_diff(args.model, args.version_a, args.version_b)
    elif cmd == "rollback":
        from pipeline.commands.audit import rollback

        print(json.dumps(rollback(args.model, args.to, args.reason), ensure_ascii=False))
    elif cmd == "review-export":
        from pipeline.commands.review_export import run_review_export

        if args.top is not None and args.top < 1:
            raise PipelineError(f"--top must be at least 1, got {args.top}")
        print(
            json.dumps(
                run_review_export(
                    args.model,
                    args.version,
                    args.alias,
                    args.top,
                    args.out,
                    args.url_expiry,
                    args.predictions,
                    args.below,
                ),
                ensure_ascii=False,
            )
        )
    elif cmd == "relabel":
        from pipeline.commands.relabel import landing_uri_of, run_relabel

        code, summary = run_relabel(args.export, args.apply, args.landing_uri or landing_uri_of(Path("params.yaml")))
        print(json.dumps(summary, ensure_ascii=False))
        return code
    elif cmd == "summary":
        from pipeline.commands.summary import print_summary

        return print_summary(args.dir)
    return 0


# glibc's malloc hands large activation buffers back to the kernel after each use and faults them in again: up to
# half of a CPU training or inference step at 224 px (docs/BENCHMARKS.md, "Allocator"). These thresholds keep the
# memory. glibc reads them only at process start, so `python -m pipeline` re-executes itself once with them set;
# every stage (dvc repro, Airflow, Docker, torchrun) starts this way. A GLIBC_TUNABLES of your own is kept as is;
# PIPELINE_MALLOC=default skips this.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def reexec_with_tuned_malloc() -> None:
    """Replace this process with itself under :data:`MALLOC_TUNABLES` (glibc only; no-op once set)."""
    import platform

    if "GLIBC_TUNABLES" in os.environ or settings.malloc() != "tuned" or platform.libc_ver()[0] != "glibc":
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    os.execve(sys.executable, [sys.executable, "-m", "pipeline", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=settings.log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).debug("malloc: GLIBC_TUNABLES=%s", os.environ.get("GLIBC_TUNABLES", ""))
    for noisy in ("great_expectations", "botocore", "urllib3", "alembic", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A stage's output ends up in a log file (DVC, Airflow): MLflow's per-file download bars are 40 lines of noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    try:
        from pipeline.adapters.credentials import use_local_account

        use_local_account()
        return _run(args)
    except PipelineError as exc:
        # run_stage reads this line back: "error (transient):" marks a failure worth retrying.
        print(f"error{' (transient)' if exc.transient else ''}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    reexec_with_tuned_malloc()
    sys.exit(main())
