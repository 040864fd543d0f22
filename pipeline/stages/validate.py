"""Stage ``validate``: decode every ingested file, check it with Great Expectations, quarantine failures.

    python -m pipeline validate --params params.yaml --raw-dir data/raw --manifest data/manifest.csv \
        --rejects data/ingest_rejects.csv --validated data/validated.csv \
        --quarantine data/quarantine.csv --report reports/validation.json --docs-dir reports/data_docs

Per-file rules (in a GX suite over the decoded-file table) send a file to the quarantine with a
reason; identical bytes or near-identical pictures (equal difference hash) under two classes
quarantine every copy. Dataset rules (no images, missing expected classes when strict, too few
images per class, too large a quarantined share) fail the stage, so the DAG stops before training
and the champion stays.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from pipeline.core.config import Config
from pipeline.core.errors import ValidationFailed
from pipeline.core.images import check_decode
from pipeline.core.io import read_csv, write_csv, write_json
from pipeline.stages.ingest import MANIFEST_FIELDS, fingerprint

_logger = logging.getLogger(__name__)

VALIDATED_FIELDS = MANIFEST_FIELDS + ["dhash"]
QUARANTINE_FIELDS = ["source_key", "path", "class_name", "reason"]


def _decode_one(args: tuple[str, int]) -> tuple[str, str]:
    path, max_pixels = args
    try:
        return check_decode(path, max_pixels), ""
    except ValueError as exc:
        return "", str(exc)


def decode_table(raw_dir: Path, rows: list[dict[str, str]], max_pixels: int) -> pd.DataFrame:
    """One row per manifest entry with decode result, size and perceptual hash (decoded on every core)."""
    todo = [(str(raw_dir / r["path"]), max_pixels) for r in rows if not r.get("header_error")]
    workers = min(os.cpu_count() or 1, 8)
    if workers > 1 and len(todo) > 200:
        with ProcessPoolExecutor(workers) as pool:
            results = iter(list(pool.map(_decode_one, todo, chunksize=64)))
    else:
        results = iter([_decode_one(t) for t in todo])
    records = []
    for row in rows:
        rec = dict(row)
        rec["decode_error"] = row.get("header_error") or None
        rec["dhash"] = ""
        if not rec["decode_error"]:
            rec["dhash"], error = next(results)
            rec["decode_error"] = error or None
        for col in ("width", "height", "bytes"):
            rec[col] = int(rec[col]) if str(rec.get(col, "")).isdigit() else 0
        records.append(rec)
    columns = list(MANIFEST_FIELDS) + ["decode_error", "dhash"]
    return pd.DataFrame.from_records(records, columns=columns)


def _suite_rules(cfg: Config) -> list[tuple[str, object]]:
    """(reason, GX expectation) pairs; a row failing one is quarantined with that reason."""
    import great_expectations as gx

    v = cfg.validate
    return [
        ("not a decodable image", gx.expectations.ExpectColumnValuesToBeNull(column="decode_error")),
        (
            f"format not in {list(v.allowed_formats)}",
            gx.expectations.ExpectColumnValuesToBeInSet(column="format", value_set=list(v.allowed_formats)),
        ),
        (
            f"width below validate.min_side={v.min_side}",
            gx.expectations.ExpectColumnValuesToBeBetween(column="width", min_value=v.min_side),
        ),
        (
            f"height below validate.min_side={v.min_side}",
            gx.expectations.ExpectColumnValuesToBeBetween(column="height", min_value=v.min_side),
        ),
        (
            f"more than validate.max_bytes={v.max_bytes}",
            gx.expectations.ExpectColumnValuesToBeBetween(column="bytes", min_value=1, max_value=v.max_bytes),
        ),
    ]


def run_expectations(cfg: Config, table: pd.DataFrame, docs_dir: Path | None) -> dict[int, list[str]]:
    """Run the GX suite over ``table``; return failing row index -> reasons. Writes Data Docs if asked."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # keep task logs readable
    if docs_dir is not None:
        ctx.add_data_docs_site(
            site_name="local",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    batch_def = (
        ctx.data_sources.add_pandas("landing")
        .add_dataframe_asset("files")
        .add_batch_definition_whole_dataframe("all_files")
    )
    rules = _suite_rules(cfg)
    suite = ctx.suites.add(gx.ExpectationSuite(name="per_file_rules"))
    for _, expectation in rules:
        suite.add_expectation(expectation)
    vdef = ctx.validation_definitions.add(gx.ValidationDefinition(name="files", data=batch_def, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="docs")] if docs_dir is not None else []
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(name="validate_files", validation_definitions=[vdef], actions=actions, result_format="COMPLETE")
    )
    result = checkpoint.run(batch_parameters={"dataframe": table})
    failures: dict[int, list[str]] = defaultdict(list)
    reason_of = {type(exp).__name__ + str(getattr(exp, "column", "")): reason for reason, exp in rules}
    # Keyed by expectation type + column because results come back in the suite's order of its own.
    for vres in result.run_results.values():
        for res in vres.results:
            cfg_ = res.expectation_config
            key = cfg_.type
            key = "".join(part.capitalize() for part in key.split("_")) + str(cfg_.kwargs.get("column", ""))
            reason = reason_of.get(key, key)
            for idx in res.result.get("unexpected_index_list") or []:
                failures[int(idx)].append(reason)
    return failures


def _cross_class_matches(table: pd.DataFrame, ok: pd.Series, column: str) -> dict[int, int]:
    """Rows whose ``column`` value is shared with a row of another class: index -> that row's index."""
    by_value: dict[str, list[int]] = defaultdict(list)
    for idx in table.index[ok]:
        if table.at[idx, column]:
            by_value[table.at[idx, column]].append(idx)
    out = {}
    for idxs in by_value.values():
        for i in idxs:
            others = [j for j in idxs if table.at[j, "class_name"] != table.at[i, "class_name"]]
            if others:
                out[i] = others[0]
    return out


def label_conflicts(table: pd.DataFrame, ok: pd.Series) -> dict[int, str]:
    """Rows whose picture also appears under another class: index -> reason naming the other key.

    Identical bytes (sha256) first; then near-duplicates (equal difference hash, other bytes), which the
    split would otherwise group together: one picture cannot teach two labels, and a group spanning two
    classes cannot be filed under either. Every copy is quarantined, as no rule can tell which label is right.
    """
    key = table["source_key"]
    out = {i: f"label conflict: same bytes as {key[j]}" for i, j in _cross_class_matches(table, ok, "sha256").items()}
    for i, j in _cross_class_matches(table, ok, "dhash").items():
        # A row with a same-bytes conflict already has its reason; any other-class match here has other bytes.
        out.setdefault(
            i,
            f"label conflict: near-duplicate of {key[j]} (same difference hash) "
            f"under class {table.at[j, 'class_name']}",
        )
    return out


def dataset_problems(cfg: Config, counts: Counter, n_total: int, n_quarantined: int) -> list[str]:
    problems = []
    if not counts:
        problems.append("no valid images at all under " + cfg.data.landing_uri)
    expected = set(cfg.data.expected_classes)
    if cfg.data.strict_classes and expected:
        missing, extra = sorted(expected - set(counts)), sorted(set(counts) - expected)
        if missing:
            problems.append(f"expected classes missing (data.strict_classes): {missing}")
        if extra:
            problems.append(f"unexpected classes (data.strict_classes): {extra}")
    small = {c: n for c, n in counts.items() if n < cfg.validate.min_images_per_class}
    if small:
        problems.append(f"classes below validate.min_images_per_class={cfg.validate.min_images_per_class}: {small}")
    share = n_quarantined / n_total if n_total else 0.0
    if share > cfg.validate.max_quarantine_share:
        problems.append(
            f"{n_quarantined}/{n_total} objects quarantined ({share:.1%}) > "
            f"validate.max_quarantine_share={cfg.validate.max_quarantine_share:.0%}"
        )
    return problems


def run_validate(
    cfg: Config,
    raw_dir: Path,
    manifest_fp: Path,
    rejects_fp: Path,
    validated_fp: Path,
    quarantine_fp: Path,
    report_fp: Path,
    docs_dir: Path | None = None,
) -> dict:
    """Validate the ingested files; write the validated list, the quarantine and a JSON report."""
    rows = read_csv(manifest_fp)
    table = decode_table(raw_dir, rows, cfg.validate.max_pixels)
    failures = run_expectations(cfg, table, docs_dir) if len(table) else {}
    ok = pd.Series([i not in failures for i in table.index], index=table.index, dtype=bool)
    for idx, reason in label_conflicts(table, ok).items():
        failures[idx].append(reason)
    rejects = read_csv(rejects_fp)
    quarantine = [{"source_key": r["source_key"], "path": "", "class_name": "", "reason": r["reason"]} for r in rejects]
    validated = []
    for idx, rec in table.iterrows():
        reasons = failures.get(idx)
        if reasons:
            detail = rec["decode_error"] if "not a decodable image" in reasons else ""
            text = "; ".join(reasons) + (f" ({detail})" if detail else "")
            quarantine.append(
                {"source_key": rec["source_key"], "path": rec["path"], "class_name": rec["class_name"], "reason": text}
            )
        else:
            validated.append({k: rec[k] for k in VALIDATED_FIELDS})
    counts = Counter(r["class_name"] for r in validated)
    n_total = len(rows) + len(rejects)
    problems = dataset_problems(cfg, counts, n_total, len(quarantine))
    report = {
        "files": len(rows),
        "validated": len(validated),
        "quarantined": len(quarantine),
        "class_counts": dict(sorted(counts.items())),
        "fingerprint": fingerprint(validated),
        "problems": problems,
        "passed": not problems,
    }
    write_csv(validated_fp, validated, VALIDATED_FIELDS)
    write_csv(quarantine_fp, quarantine, QUARANTINE_FIELDS)
    write_json(report_fp, report)  # a DVC metrics file: escaped JSON, or DVC calls the Korean names binary
    _logger.info("validate: %d validated, %d quarantined (%s)", len(validated), len(quarantine), quarantine_fp)
    if problems:
        raise ValidationFailed(
            "dataset rules failed, training will not start:\n  - "
            + "\n  - ".join(problems)
            + f"\n(quarantine: {quarantine_fp}, report: {report_fp})"
        )
    return report
