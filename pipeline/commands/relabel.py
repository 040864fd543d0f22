"""Apply a Label Studio export of a ``review-export`` file to the landing bucket: move relabelled photos.

    python -m pipeline relabel --from label-studio-export.json            # dry run: print the plan
    python -m pipeline relabel --from label-studio-export.json --apply    # move, and log every move

The landing URI is ``--landing-uri`` (default: ``data.landing_uri`` of ./params.yaml), never the export's: a row
naming another bucket or prefix is refused, so an edited export cannot move objects anywhere else (the DVC
remote's bucket, say).

The export is Label Studio's JSON export (a list of tasks, each with its ``annotations``). For each task whose
chosen class (the ``label`` choices of its non-cancelled annotations) differs from the class folder of its landing
key, the photo is copied to ``<prefix>/<chosen class>/<file>`` and the old key deleted, so the data watch sees
the change and the pipeline retrains. The class folder keeps the spelling it has in the bucket (NFD or NFC), so
ingest never sees two folders for one class.

A task of ``review-export --predictions`` (``source: prediction``) names an unlabelled photo outside the prefix
(``incoming/``): it moves into the chosen class folder, and its ``.prediction.json`` sidecar is deleted. Such a
key must hold a photo the batch DAG classified (its sidecar exists), so no other object can be taken.

A row is refused, with its reason, and nothing of it moves, when: the task is not from ``review-export`` (no
landing key), its annotations disagree, the chosen class is not a class folder under the landing prefix, the
key is missing, the object changed since the export (ETag), the target key exists holding other bytes, or
another row already claims the key or the target. Where ETags cannot tell (a multipart upload's ETag is not its
content's MD5, and a copy may get another), both objects are read and their bytes compared: a photo is deleted only
after a byte-identical copy exists. The other rows still apply; the exit code is 1 when any row
was refused (also in a dry run, so an export can be checked first).

With ``--apply`` every reviewed row (moved, kept, refused) is written as one JSON line to
``s3://<landing bucket>/relabel-log/<UTC time>-<id>.jsonl`` (rewritten after each row, so a crash leaves the
lines of what was done). Running the same export again is safe: a move that was copied but not yet deleted is
finished, one already done is reported as done.
"""

from __future__ import annotations

import json
import logging
import secrets
import unicodedata
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pipeline.commands.predict import is_output_key
from pipeline.commands.review_export import FROM_NAME
from pipeline.core.errors import PipelineError, StorageError

_logger = logging.getLogger(__name__)
LOG_PREFIX = "relabel-log/"
REQUIRED = ("landing_bucket", "landing_prefix", "landing_key", "etag")


@dataclass
class Row:
    """One task of the export and what relabel makes of it."""

    task: str  # Label Studio's task id (or the position in the export)
    action: str = ""  # move | keep | unreviewed | moved | resumed | done | refused
    reason: str = ""
    bucket: str = ""
    prefix: str = ""  # the landing prefix the key lives under
    key: str = ""
    etag: str = ""
    size: int = 0  # bytes of the source when checked
    given: str = ""  # the class folder of the key (NFC)
    chosen: str = ""
    target: str = ""
    source: str = ""  # "prediction": an unlabelled photo of the batch DAG, outside the landing prefix
    meta: dict = field(default_factory=dict)  # model, version, rank: carried into the log


def _refuse(row: Row, reason: str) -> Row:
    row.action, row.reason = "refused", reason
    return row


def chosen_classes(task: dict) -> list[str]:
    """The distinct classes the task's non-cancelled annotations chose (``label`` choices), in order."""
    out: list[str] = []
    for ann in task.get("annotations") or []:
        if not isinstance(ann, dict) or ann.get("was_cancelled"):
            continue
        for item in ann.get("result") or []:
            if isinstance(item, dict) and item.get("from_name") == FROM_NAME and item.get("type") == "choices":
                for choice in (item.get("value") or {}).get("choices") or []:
                    name = unicodedata.normalize("NFC", str(choice))
                    if name not in out:
                        out.append(name)
    return out


def parse_task(task, position: int) -> Row:
    """What the export says about one task; refusals that need no S3 (malformed rows) are decided here."""
    from pipeline.stages.ingest import safe_relative_key

    if not isinstance(task, dict):
        return _refuse(Row(task=f"#{position}"), "not a Label Studio task (not a JSON object)")
    row = Row(task=str(task.get("id", f"#{position}")))
    data = task.get("data")
    if not isinstance(data, dict):
        return _refuse(row, "task has no data")
    missing = [k for k in REQUIRED if not isinstance(data.get(k), str) or not data.get(k)]
    if missing:
        return _refuse(row, f"not from review-export: data lacks {', '.join(missing)}")
    row.bucket, row.key, row.etag = data["landing_bucket"], data["landing_key"], data["etag"]
    row.meta = {k: data[k] for k in ("model", "model_version", "rank", "confidence") if k in data}
    row.prefix = prefix = data["landing_prefix"]
    row.source = "prediction" if data.get("source") == "prediction" else ""
    if prefix and not prefix.endswith("/"):
        return _refuse(row, f"landing_prefix {prefix!r} does not end with '/'")
    if row.source:  # an unlabelled photo: it joins the landing prefix under the chosen class
        if row.key.startswith(prefix):
            return _refuse(row, "a prediction's photo is already under the landing prefix")
        parsed = safe_relative_key(f"unlabelled/{row.key.rsplit('/', 1)[-1]}")
    elif not row.key.startswith(prefix):
        return _refuse(row, f"landing key is not under the landing prefix {prefix!r}")
    else:
        parsed = safe_relative_key(row.key[len(prefix) :])
    if isinstance(parsed, str):
        return _refuse(row, f"landing key is not <class>/<file> under the prefix: {parsed}")
    row.given = "" if row.source else parsed[0]
    chosen = chosen_classes(task)
    if not chosen:
        row.action = "unreviewed"
        return row
    if len(chosen) > 1:
        return _refuse(row, f"annotations disagree: {' vs '.join(chosen)}")
    row.chosen = chosen[0]
    if row.chosen == row.given:
        row.action = "keep"
    else:
        row.action = "move"
    return row


def landing_uri_of(params_fp: Path) -> str:
    """``data.landing_uri`` of a params file (relabel's default landing URI)."""
    import yaml

    try:
        uri = ((yaml.safe_load(params_fp.read_text(encoding="utf-8")) or {}).get("data") or {}).get("landing_uri")
    except (OSError, yaml.YAMLError, AttributeError):
        uri = None
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise PipelineError(f"no data.landing_uri in {params_fp}: pass --landing-uri s3://bucket/prefix/")
    return uri


def load_export(fp: Path) -> list:
    try:
        tasks = json.loads(fp.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{fp} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{fp} is not a JSON file: {exc}") from None
    if not isinstance(tasks, list):
        raise PipelineError(f"{fp} is not a Label Studio JSON export (a list of tasks)")
    return tasks


def class_folders(bucket: str, prefix: str) -> dict[str, str]:
    """NFC class name -> the folder's spelling in the bucket, for every class folder under the prefix."""
    from pipeline.adapters import storage

    folders: dict[str, str] = {}
    for obj in storage.list_objects(f"s3://{bucket}/{prefix}"):
        parts = obj.key[len(prefix) :].split("/")
        if len(parts) == 2 and parts[0] and parts[1]:
            folders.setdefault(unicodedata.normalize("NFC", parts[0]), parts[0])
    return folders


def _is_copy_of(bucket: str, copy, original) -> bool:
    """``copy`` holds ``original``'s bytes: equal single-part ETags (the content's MD5) say so; otherwise (a
    multipart ETag, or a copy whose ETag differs) the bytes are read and compared. Sizes alone never count."""
    if copy.etag == original.etag and "-" not in original.etag:
        return True
    if copy.size != original.size:
        return False
    from pipeline.adapters import storage

    return storage.get_bytes(f"s3://{bucket}/{copy.key}") == storage.get_bytes(f"s3://{bucket}/{original.key}")


def check(row: Row, folders: dict[str, str], claimed: set[str]) -> Row:
    """The S3 checks of one ``move`` row, just before it is applied; decides move, resumed, done or refused."""
    from pipeline.adapters import storage

    if row.chosen not in folders:
        return _refuse(row, f"unknown class {row.chosen!r}: no such class folder under the landing prefix")
    if row.source == "prediction":
        from pipeline.commands.predict import SIDECAR_SUFFIX

        if storage.head(row.bucket, f"{row.key}{SIDECAR_SUFFIX}") is None:
            return _refuse(row, "not a photo the batch DAG classified (no prediction sidecar next to it)")
    row.target = f"{row.prefix}{folders[row.chosen]}/{row.key.rsplit('/', 1)[-1]}"
    if row.target in claimed:
        return _refuse(row, f"another row of this export already moves a photo to {row.target}")
    source, target = storage.head(row.bucket, row.key), storage.head(row.bucket, row.target)
    if target is not None:
        if source is None and target.etag == row.etag:
            row.action = "done"  # moved by an earlier run of this export
            return row
        if source is None or source.etag != row.etag or not _is_copy_of(row.bucket, target, source):
            return _refuse(row, f"target key exists: {row.target}")
        row.size = source.size
        row.action = "resumed"  # an earlier run copied it and stopped before the delete
        return row
    if source is None:
        return _refuse(row, "missing key: the object is not in the bucket any more")
    if source.etag != row.etag:
        return _refuse(row, f"key changed since export (ETag {row.etag} then, {source.etag} now)")
    row.size = source.size
    return row


def apply_move(row: Row) -> Row:
    """Copy (only while the source's ETag is the exported one), check the copy, then delete the source."""
    from pipeline.adapters import storage

    if row.action == "move":
        try:
            copied = storage.copy(row.bucket, row.key, row.target, if_etag=row.etag)
        except StorageError as exc:
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                return _refuse(row, "key changed since export (while moving)")
            raise
        if not _is_copy_of(row.bucket, copied, storage.ObjectInfo(row.key, row.etag, row.size)):
            storage.delete(row.bucket, row.target)
            return _refuse(row, f"the copy at {row.target} does not match the source (ETag {copied.etag}); undone")
        row.action = "moved"
    storage.delete(row.bucket, row.key)
    if row.source == "prediction":  # the batch DAG's result for a photo that is no longer there
        from pipeline.commands.predict import SIDECAR_SUFFIX

        storage.delete(row.bucket, f"{row.key}{SIDECAR_SUFFIX}")
    if row.action == "resumed":
        row.reason = "finished a move an earlier run had copied but not deleted"
    return row


class MoveLog:
    """The JSON lines of one ``--apply`` run, rewritten after each row into the landing bucket."""

    def __init__(self, export_fp: Path, bucket: str):
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.bucket, self.key = bucket, f"{LOG_PREFIX}{stamp}-{secrets.token_hex(4)}.jsonl"
        self.export = export_fp.name
        self.lines: list[str] = []

    def add(self, row: Row) -> None:
        from pipeline.adapters import storage

        record = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "export": self.export,
            **{k: v for k, v in asdict(row).items() if k != "meta"},
            **row.meta,
        }
        self.lines.append(json.dumps(record, ensure_ascii=False))
        storage.put_bytes(self.bucket, self.key, ("\n".join(self.lines) + "\n").encode("utf-8"))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def plan_line(row: Row) -> str:
    if row.action in ("move", "moved", "resumed", "done"):
        given = row.given or "unlabelled"
        return f"{row.action.upper():9} task {row.task}: {row.key} -> {row.target}  ({given} -> {row.chosen})"
    if row.action == "keep":
        return f"KEEP      task {row.task}: {row.key} (class {row.given} confirmed)"
    if row.action == "unreviewed":
        return f"SKIP      task {row.task}: {row.key} (no annotation)"
    return f"REFUSED   task {row.task}: {row.key or '-'}: {row.reason}"


def run_relabel(export_fp: Path, apply: bool, landing_uri: str, out=print) -> tuple[int, dict]:
    """Check every row against ``landing_uri``, apply the valid moves when ``apply``; returns (exit code,
    summary)."""
    from pipeline.adapters.storage import parse_s3_uri

    bucket, prefix = parse_s3_uri(landing_uri)
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    rows = [parse_task(t, i) for i, t in enumerate(load_export(export_fp), 1)]
    seen: set[str] = set()
    for row in rows:
        if row.action == "refused":
            continue
        if row.bucket != bucket:
            _refuse(row, f"landing bucket {row.bucket!r} is not the landing URI's ({bucket!r})")
        elif row.prefix != prefix:
            _refuse(row, f"landing prefix {row.prefix!r} is not the landing URI's ({prefix!r})")
        elif row.source and (row.key.startswith(LOG_PREFIX) or is_output_key(row.key)):
            _refuse(row, "a prediction row may not name the relabel log or the batch results")
        elif row.key in seen:
            _refuse(row, "the export holds this landing key twice")
        seen.add(row.key)
    folders = {p: class_folders(bucket, p) for p in {r.prefix for r in rows if r.action == "move"}}
    log = MoveLog(export_fp, bucket) if apply else None
    claimed: set[str] = set()
    for row in rows:
        if row.action == "move":
            check(row, folders[row.prefix], claimed)
            if row.action != "refused":
                claimed.add(row.target)
                if apply and row.action in ("move", "resumed"):
                    apply_move(row)
        if log is not None and row.action != "unreviewed":
            log.add(row)
        out(plan_line(row))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.action] = counts.get(row.action, 0) + 1
    summary = {"applied": apply, "rows": len(rows), **dict(sorted(counts.items())), "log": log.uri if log else ""}
    return (1 if counts.get("refused") else 0), summary
