"""The operator's view of the wallpaper-defect pipeline, inside Airflow's UI (Airflow 3.1+ plugin API).

* **"Defect models"** in the navigation (an external view): a FastAPI app that the api-server mounts at
  ``/defect-models``. Each registered model with its ``champion``, ``challenger`` and ``previous_champion``, the
  newest versions with gate decision, weighted F1 and the DAG run that made each; the last five training runs'
  landing prefix and quarantine counts by reason; the data watch's last fingerprint and when it fired.
* **Pages behind the task links** of ``dags/defect_training.py`` (the links themselves are resolved in the worker,
  see ``pipeline.adapters.orchestration.linked_task``): ``/validation/<dag>/<run>`` (that run's quarantine list,
  ``/data_docs/…`` its Great Expectations Data Docs) and ``/member/<dag>/<run>`` (redirect to a nested MLflow run).

Airflow does not authenticate plugin apps: every route here depends on Airflow's own ``get_user`` (the UI's
``_token`` cookie or a ``Bearer`` token) and on read access to DAG runs, so anonymous callers get 401 and an
auditor's read-only account sees everything. Every route is a GET; nothing here writes.

Check it: ``airflow plugins`` lists ``defect_models``; ``tests/integration/test_operator_view.py``.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import logging
from pathlib import Path
from urllib.parse import quote

from airflow.api_fastapi.core_api.security import DagAccessEntity, requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from pipeline.adapters import orchestration as orc

_logger = logging.getLogger(__name__)
TRAINING_DAG = "defect_training"
MAX_VERSIONS = 10  # per model on the page
RECENT_RUNS = 5  # training runs with their quarantine counts
CAN_READ_RUNS = [Depends(requires_access_dag("GET", DagAccessEntity.RUN))]
# Served files are the pipeline's records of uploaded data (Data Docs print what validate found, unescaped). From
# Airflow's origin they run in a sandbox without scripts: an opaque origin that cannot read Airflow's cookies or
# storage, run script (GX's own or its CDNs', which would pass the page's data to third parties; an injected one),
# submit forms or navigate the operator's tab. GX renders its pages on the server: only the "failed only" filter
# and a "show more" toggle need script (tests/security, the Chromium check).
FILE_HEADERS = {
    "Content-Security-Policy": "sandbox allow-popups; default-src 'none'; script-src 'none'; "
    "style-src 'unsafe-inline' https:; font-src https:; img-src data: https:; "
    "connect-src 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

app = FastAPI(title="Defect models", dependencies=CAN_READ_RUNS)


# --- reading Airflow's own records (this process is the api-server) ---------------------------------------------


def _xcom(dag_id: str, run_id: str, task_id: str, key: str):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(run_id=run_id, key=key, task_ids=task_id, dag_ids=dag_id).with_only_columns(
                XComModel.value
            )
        ).first()
    return None if row is None else XComModel.deserialize_value(row)


def _recent_training_runs(limit: int) -> list[dict]:
    """The newest training runs (by ``run_after``), each with its landing prefix and its validate XCom."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        runs = session.scalars(
            select(DagRun).where(DagRun.dag_id == TRAINING_DAG).order_by(DagRun.run_after.desc()).limit(limit)
        ).all()
        found = [
            {
                "run_id": r.run_id,
                "state": str(r.state),
                "run_after": r.run_after,
                "landing_uri": (r.conf or {}).get("landing_uri")  # started by hand, or by the data watch:
                or next(((e.extra or {}).get("landing_uri", "") for e in r.consumed_asset_events), ""),
            }
            for r in runs
        ]
    for run in found:
        run["report"] = _xcom(TRAINING_DAG, run["run_id"], "validate", orc.VALIDATION_KEY)
    return found


def _watch_events(limit: int = 5) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent.timestamp, AssetEvent.extra, AssetEvent.source_run_id)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.name == orc.LANDING_DATA.name)
            .order_by(AssetEvent.timestamp.desc())
            .limit(limit)
        ).all()
    return [{"timestamp": ts, "extra": extra or {}, "source_run_id": src} for ts, extra, src in rows]


def _watched_fingerprints() -> dict[str, str]:
    """Prefix -> the last fingerprint the data watch emitted: the Asset's state store, and for prefixes the watch has
    not looked at since the upgrade, the Variable an older version kept."""
    import json

    from airflow.models import Variable
    from airflow.models.asset import AssetModel
    from airflow.models.asset_state_store import AssetStateStoreModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    legacy, key = orc.fingerprint_key("watch", ""), orc.state_key("")
    with create_session() as session:
        found = {
            v.key[len(legacy) :]: v.val
            for v in session.scalars(select(Variable).where(Variable.key.like(legacy + "%")))
        }
        rows = session.execute(
            select(AssetStateStoreModel.key, AssetStateStoreModel.value)
            .join(AssetModel, AssetModel.id == AssetStateStoreModel.asset_id)
            .where(AssetModel.name == orc.LANDING_DATA.name, AssetStateStoreModel.key.like(key + "%"))
        ).all()
    for k, value in rows:
        try:
            value = json.loads(value)
        except ValueError:
            pass
        found[k[len(key) :]] = str(value)
    return found


# --- pages --------------------------------------------------------------------------------------------------------


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str) -> HTMLResponse:
    style = (
        "body{font-family:'Noto Sans CJK KR','NanumGothic',system-ui,sans-serif;margin:1.5rem;color:#222}"
        "table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
        "text-align:left;vertical-align:top;word-break:keep-all}th{background:#f3f3f3}.promoted{color:#176c2c}"
        ".rejected{color:#a61b1b}code{font-size:90%}.nw{white-space:nowrap}"
    )
    return HTMLResponse(
        f"<!doctype html><html lang='ko'><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{style}</style></head><body><h1>{_e(title)}</h1>{body}</body></html>"
    )


def _airflow_run_link(dag_id: str, run_id: str) -> str:
    if not dag_id or not run_id:
        return "–"
    href = f"{orc.airflow_ui_base()}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
    return f"<a href='{_e(href)}' target='_top'>{_e(run_id)}</a>"


def models_section(models: list[dict]) -> str:
    """Registered models: aliases, then the newest versions (gate, weighted F1, per-class F1, the DAG run)."""
    if not models:
        return "<p>No registered model yet.</p>"
    parts = []
    for m in models:
        aliases = ", ".join(f"<b>{_e(a)}</b> → v{_e(v)}" for a, v in sorted(m["aliases"].items())) or "none"
        rows = []
        for v in m["versions"]:
            t = v["tags"]
            gate = t.get("gate", "unfinished")
            per_class = json.loads(t["per_class_f1"]) if t.get("per_class_f1") else {}
            # One unbreakable "class F1" per entry, joined by " · ": a class name may hold a comma (창틀,문틀수정)
            classes = " · ".join(f"<span class='nw'>{_e(k)} {float(f):.2f}</span>" for k, f in per_class.items())
            here = [a for a, ver in m["aliases"].items() if ver == v["version"]]
            rows.append(
                f"<tr><td><a href='{_e(v['url'])}' target='_blank'>v{_e(v['version'])}</a> "
                f"{_e(' '.join(here))}</td><td class='{_e(gate)}'>{_e(gate)}</td>"
                f"<td>{_e(t.get('weighted_f1', '–'))}</td><td>{_e(t.get('gate_reason', ''))}</td>"
                f"<td>{classes}</td><td>{_airflow_run_link(v['airflow_dag_id'], v['airflow_run_id'])}</td>"
                "</tr>"
            )
        parts.append(
            f"<h2>{_e(m['name'])}</h2><p>aliases: {aliases}</p><table><tr><th>version</th><th>gate</th>"
            "<th>weighted F1</th><th>reason</th><th>per-class F1</th><th>DAG run</th></tr>" + "".join(rows) + "</table>"
        )
    return "".join(parts)


def quarantine_section(report: dict | None, dag_id: str, run_id: str) -> str:
    if not report:
        return "<p>This run's validate task wrote no quarantine report (it has not run, or ingest failed).</p>"
    counts = "".join(f"<tr><td>{_e(r)}</td><td>{n}</td></tr>" for r, n in report["by_reason"].items())
    link = f"validation/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"
    return (
        f"<p>{report['quarantined']} of {_e(report.get('files', '?'))} files quarantined "
        f"(<a href='{_e(link)}'>the list</a>).</p>"
        + (f"<table><tr><th>reason</th><th>files</th></tr>{counts}</table>" if counts else "")
    )


def recent_runs_section(runs: list[dict]) -> str:
    """One row per recent training run: its state, landing prefix and quarantine counts by reason (the data watch's
    own runs and hand-started ones side by side, so one run never hides another's quarantine)."""
    if not runs:
        return "<p>No training run yet.</p>"
    rows = []
    for run in runs:
        report = run.get("report")
        if not report:
            counts = "no quarantine report (validate has not run, or ingest failed)"
        else:
            link = f"validation/{quote(TRAINING_DAG, safe='')}/{quote(run['run_id'], safe='')}"
            reasons = "; ".join(f"{_e(r)}: {n}" for r, n in report["by_reason"].items())
            counts = f"<a href='{_e(link)}'>{report['quarantined']} of {_e(report.get('files', '?'))}</a>" + (
                f" ({reasons})" if reasons else ""
            )
        rows.append(
            f"<tr><td>{_airflow_run_link(TRAINING_DAG, run['run_id'])}</td><td>{_e(run['state'])}</td>"
            f"<td>{_e(run.get('landing_uri') or '–')}</td><td>{counts}</td></tr>"
        )
    return (
        "<table><tr><th>DAG run</th><th>state</th><th>landing prefix</th><th>quarantined (by reason)</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def watch_section(events: list[dict], fingerprints: dict[str, str]) -> str:
    rows = "".join(
        f"<tr><td>{_e(e['timestamp'])}</td><td>{_e(e['extra'].get('landing_uri', ''))}</td>"
        f"<td><code>{_e(str(e['extra'].get('fingerprint', ''))[:16])}</code></td>"
        f"<td>{_e(e['extra'].get('objects', ''))}</td></tr>"
        for e in events
    )
    last = "".join(
        f"<tr><td>{_e(uri)}</td><td><code>{_e(fp[:16])}</code></td></tr>" for uri, fp in sorted(fingerprints.items())
    )
    return (
        "<h3>Last events on the Asset <code>landing_data</code></h3>"
        + (
            f"<table><tr><th>fired at (UTC)</th><th>prefix</th><th>fingerprint</th><th>objects</th></tr>{rows}</table>"
            if rows
            else "<p>The data watch has not fired yet.</p>"
        )
        + "<h3>Last processed fingerprint per prefix</h3>"
        + (f"<table><tr><th>prefix</th><th>fingerprint</th></tr>{last}</table>" if last else "<p>none</p>")
    )


@app.get("/", response_class=HTMLResponse)
def overview() -> HTMLResponse:
    from pipeline.adapters import tracking

    try:
        models = models_section(tracking.registered_models_overview(MAX_VERSIONS))
    except Exception as exc:  # MLflow away: the Airflow half of the page still helps
        models = f"<p>MLflow registry unreachable: {_e(exc)}</p>"
    body = (
        f"<h2>Registered models</h2>{models}<h2>Last {RECENT_RUNS} training runs: quarantine</h2>"
        f"{recent_runs_section(_recent_training_runs(RECENT_RUNS))}"
        f"<h2>Data watch</h2>{watch_section(_watch_events(), _watched_fingerprints())}"
    )
    return _page("Defect models", body)


def _sha256(fp: Path) -> str:
    return hashlib.sha256(fp.read_bytes()).hexdigest()


def _validation_file(dag_id: str, run_id: str, rel: str | None) -> Path:
    """The quarantine list (``rel`` None) or a Data Docs file that this run's validate task wrote: from the
    workspace while it still holds the bytes the XCom describes, else from the copy in this DAG run's MLflow parent
    run (``archived_in``); never another run's. 410 when neither has it (a run from before the copies)."""
    report = _xcom(dag_id, run_id, "validate", orc.VALIDATION_KEY)
    if not report:
        raise HTTPException(404, f"run {run_id} of {dag_id} has no validation report")
    docs = Path(report["data_docs"]).resolve()
    fp = Path(report["quarantine"]) if rel is None else (docs / rel).resolve()
    if rel is not None and docs not in fp.parents:
        raise HTTPException(404, "not a Data Docs file")
    # The Data Docs are checked through their index page: GX rewrites the whole folder on every run.
    check, want = (
        (fp, report["quarantine_sha256"]) if rel is None else (docs / "index.html", report["data_docs_sha256"])
    )
    if fp.is_file() and check.is_file() and _sha256(check) == want:
        return fp
    if report.get("archived_in"):
        return _archived(
            report["archived_in"], fp.name if rel is None else f"data_docs/{rel}", want if rel is None else None
        )
    if not fp.is_file():
        raise HTTPException(404, f"{fp.name} is not in the workspace any more")
    raise HTTPException(410, "the workspace has moved on: a later run replaced this run's validation files")


def archive_cache() -> Path:
    """The api-server's own cache folder (0700, this user's; a folder someone else made is refused): copies fetched
    from MLflow are served from here, so nobody else may plant or change them."""
    import os
    import stat
    import tempfile

    root = Path(tempfile.gettempdir()) / f"defect-models-archive-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    st = root.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise HTTPException(500, f"{root} is not a private folder of this user: refusing to serve from it")
    return root


def _archived(mlflow_run: str, rel: str, sha256: str | None) -> Path:
    """``validation/<rel>`` of a parent run, fetched from MLflow once into a local cache (artifacts never change)."""
    import os
    import re
    import tempfile

    from pipeline.adapters import tracking

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", mlflow_run):  # a folder name below the cache, never a path
        raise HTTPException(404, "not an MLflow run id")
    cache = archive_cache() / mlflow_run
    fp = cache / tracking.VALIDATION_ARTIFACTS / rel
    if not fp.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            try:
                got = tracking.archived_validation_file(mlflow_run, rel, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - MLflow away or the copy missing: say which, never guess
                raise HTTPException(
                    502, f"this run's copy in MLflow run {mlflow_run} could not be read: {exc}"
                ) from None
            fp.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, fp)
    if sha256 is not None and _sha256(fp) != sha256:
        raise HTTPException(410, f"MLflow run {mlflow_run} holds another quarantine list than this run wrote")
    return fp


@app.get("/validation/{dag_id}/{run_id}", response_class=HTMLResponse)
def validation(dag_id: str, run_id: str) -> HTMLResponse:
    report = _xcom(dag_id, run_id, "validate", orc.VALIDATION_KEY)
    body = quarantine_section(report, dag_id, run_id).replace("href='validation/", "href='../../validation/")
    if report:
        try:
            fp = _validation_file(dag_id, run_id, None)
            rows = list(csv.DictReader(io.StringIO(fp.read_text(encoding="utf-8"))))
            body += (
                "<table><tr><th>class</th><th>object</th><th>reason</th></tr>"
                + "".join(
                    f"<tr><td>{_e(r['class_name'])}</td><td>{_e(r['source_key'])}</td><td>{_e(r['reason'])}</td></tr>"
                    for r in rows
                )
                + "</table>"
            )
        except HTTPException as exc:
            body += f"<p>The list itself: {_e(exc.detail)}.</p>"
        if report.get("data_docs_sha256"):
            body += f"<p><a href='{_e(quote(run_id, safe=''))}/data_docs/index.html'>Data Docs</a></p>"
    return _page(f"Validation of {run_id}", body)


@app.get("/validation/{dag_id}/{run_id}/data_docs/{rel:path}")
def data_docs(dag_id: str, run_id: str, rel: str) -> FileResponse:
    return FileResponse(_validation_file(dag_id, run_id, rel), headers=FILE_HEADERS)


@app.get("/member/{dag_id}/{run_id}")
def member(dag_id: str, run_id: str, role: str, name: str) -> RedirectResponse:
    """The nested run of one backbone or bag member of this DAG run (``register`` logs it) → the MLflow UI."""
    from pipeline.adapters import tracking

    for parent in tracking.runs_of_dag_run(dag_id, run_id):
        # A run in which DVC found everything up to date logged no new models: they hang under the run that did.
        for parent_id in (parent.info.run_id, parent.data.tags.get("registered_in_run")):
            child = tracking.nested_run(parent_id, role, name) if parent_id else None
            if child is not None:
                return RedirectResponse(tracking.run_ui_url(child.info.run_id), status_code=307)
    raise HTTPException(
        404,
        f"no MLflow run {name!r} ({role}) under run {run_id} of {dag_id} yet: register logs "
        "it, so it appears once register has run",
    )


class DefectModelsPlugin(AirflowPlugin):
    name = "defect_models"
    fastapi_apps = [{"app": app, "url_prefix": orc.PLUGIN_PREFIX, "name": "Defect models"}]
    external_views = [
        {
            "name": "Defect models",
            "href": orc.PLUGIN_PREFIX.lstrip("/") + "/",
            "destination": "nav",
            "url_route": "defect-models",
        }
    ]
    # The links are evaluated by the workers and read back by the api-server from XCom (see the module docstring);
    # listing them here only shows them in `airflow plugins` (their `operators` list is empty, so they attach to
    # no other operator).
    operator_extra_links = [cls() for cls in orc.link_classes()]
