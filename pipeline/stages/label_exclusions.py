"""Stage ``label_exclusions``: the images the champion's label-issue report flagged, to leave out of the next training.

    python -m pipeline label_exclusions --params params.yaml --out data/label_exclusions.csv

With ``data.exclude_label_issues: true`` it reads the registry's current champion (``registry.model_name``, alias
``champion``), takes the rows its run artifact ``reports/label_issues.csv`` flags, adds each image's sha256 from the
same run's ``split.csv``, and writes them to ``data/label_exclusions.csv``: path, sha256, given and suggested class,
label quality, source version and run. ``split`` then drops those images from train and val (never from test, never
from storage). The file is a DVC output, so its md5 sits in ``dvc.lock`` and in the version's lineage.

With the flag off (the default) the file is written with its header only and MLflow is never contacted. No
champion yet: the same empty file, and a log line. A registry that cannot be read fails the stage
(:class:`~pipeline.adapters.tracking.TrackingError`, transient, retried): it never turns into "nothing to exclude".
Like ``ingest``, the stage asks the outside world every run (``always_changed`` in dvc.yaml); ``split`` reruns
only when the file's content changes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.io import write_csv

_logger = logging.getLogger(__name__)
FIELDS = ["path", "sha256", "given_class", "suggested_class", "label_quality", "source_version", "source_run"]


def exclusion_rows(
    issues: list[dict[str, str]], split_rows: list[dict[str, str]], source_version: str, source_run: str
) -> list[dict[str, str]]:
    """The flagged *train* rows of a ``label_issues.csv`` with each image's sha256 from the split it was scored on.

    Flagged val images stay: val picks the best epoch and fits the temperature, and a yardstick that drops
    whatever disagrees with the model would flatter it.

    A flagged path missing from ``split_rows`` gets an empty sha256, which ``split`` never matches (fails open
    towards training on the image, never towards dropping an image we cannot identify).
    """
    sha = {r["path"]: r.get("sha256", "") for r in split_rows}
    out = []
    for r in issues:
        if str(r.get("issue", "")).strip().lower() != "true" or r.get("split", "train") != "train":
            continue
        out.append(
            {
                "path": r["path"],
                "sha256": sha.get(r["path"], ""),
                "given_class": r["given_class"],
                "suggested_class": r["suggested_class"],
                "label_quality": r["label_quality"],
                "source_version": source_version,
                "source_run": source_run,
            }
        )
    return sorted(out, key=lambda e: e["path"])


def run_label_exclusions(cfg: Config, out_fp: Path) -> dict:
    """Write ``out_fp``; returns a summary (enabled, champion version, rows)."""
    if not cfg.data.exclude_label_issues:
        write_csv(out_fp, [], FIELDS)
        _logger.info("label_exclusions: data.exclude_label_issues is false; nothing excluded")
        return {"enabled": False, "champion_version": None, "n_excluded": 0}
    from pipeline.adapters import tracking  # only here: with the flag off, no MLflow import and no server needed

    report = tracking.champion_label_issues(cfg.registry.model_name)
    if report is None:
        write_csv(out_fp, [], FIELDS)
        _logger.info("label_exclusions: %s has no champion yet; nothing excluded", cfg.registry.model_name)
        return {"enabled": True, "champion_version": None, "n_excluded": 0}
    rows = exclusion_rows(report.issues, report.split_rows, report.version, report.run_id)
    write_csv(out_fp, rows, FIELDS)
    no_sha = sum(1 for r in rows if not r["sha256"])
    _logger.info(
        "label_exclusions: %d images flagged by %s v%s (run %s) leave train/val%s",
        len(rows),
        cfg.registry.model_name,
        report.version,
        report.run_id,
        f"; {no_sha} without a sha256 in its split.csv will not match" if no_sha else "",
    )
    return {"enabled": True, "champion_version": report.version, "n_excluded": len(rows)}
