"""The operator's view without servers: what validate publishes for its links, and what the page renders.

The same pieces under a running api-server: tests/integration/test_operator_view.py.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def _workspace(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "reports" / "data_docs").mkdir(parents=True)
    (tmp_path / "reports" / "data_docs" / "index.html").write_text("<html>docs</html>", encoding="utf-8")
    (tmp_path / "reports" / "validation.json").write_text(json.dumps({"files": 40}), encoding="utf-8")
    rows = [
        "source_key,path,class_name,reason",
        "l/곰팡이/a.png,곰팡이/a.png,곰팡이,not a decodable image",
        "l/곰팡이/b.png,곰팡이/b.png,곰팡이,not a decodable image",
        '"l/창틀,문틀수정/c.png","창틀,문틀수정/c.png","창틀,문틀수정",label conflict: same bytes as l/오염/d.png',
        # several rules broken at once, as validate writes them: counted under the first
        '"l/오염/e.png","오염/e.png","오염","not a decodable image; format not in [\'PNG\']; width below '
        "validate.min_side=16 (UnidentifiedImageError: cannot identify image file 'data/raw/오염/e.png')\"",
    ]
    (tmp_path / "data" / "quarantine.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tmp_path


def test_validation_summary_counts_reasons_without_file_names_and_pins_the_files(tmp_path):
    from pipeline.adapters import orchestration as orc

    ws = _workspace(tmp_path)
    s = orc.validation_summary(str(ws))
    assert s["quarantined"] == 4 and s["files"] == 40
    assert s["by_reason"] == {"not a decodable image": 3, "label conflict": 1}
    assert s["quarantine_sha256"] == hashlib.sha256((ws / "data" / "quarantine.csv").read_bytes()).hexdigest()
    assert s["data_docs_sha256"] == hashlib.sha256(b"<html>docs</html>").hexdigest()
    json.dumps(s)  # an XCom: plain JSON
    assert orc.validation_summary(str(tmp_path / "nothing")) is None  # validate never ran: no links


def test_member_links_name_the_nested_run_register_logs():
    from pipeline.adapters import orchestration as orc

    assert orc.member_run_name("backbone", {"ws": "/w", "name": "test_resnet"}) == ("backbone", "backbone-test_resnet")
    assert orc.member_run_name("train", {"ws": "/w", "member": 3}) == ("bag_member", "member_3")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    import importlib.util
    import os

    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    spec = importlib.util.spec_from_file_location("defect_models_under_test", ROOT / "plugins" / "defect_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plugin_declares_a_nav_view_an_app_and_only_get_routes(plugin):
    p = plugin.DefectModelsPlugin
    assert p.fastapi_apps[0]["url_prefix"] == "/defect-models"
    assert p.external_views[0]["href"] == "defect-models/" and p.external_views[0]["destination"] == "nav"
    methods = {
        m
        for r in plugin.app.routes
        if hasattr(r, "methods")
        and r.path.startswith(("/", "/validation"))
        and not r.path.startswith(("/docs", "/openapi", "/redoc"))
        for m in r.methods
    }
    assert methods <= {"GET", "HEAD"}, methods
    assert plugin.app.router.dependencies, "every route needs Airflow's login"


def test_page_renders_hangul_escapes_html_and_links_each_version_to_its_dag_run(plugin):
    models = [
        {
            "name": "m<x>",
            "aliases": {"champion": "2", "challenger": "3"},
            "versions": [
                {
                    "version": "3",
                    "url": "http://mlflow/#/models/m/versions/3",
                    "run_id": "r3",
                    "airflow_dag_id": "defect_training",
                    "airflow_run_id": "manual__2026-11-26T20:00:00+00:00",
                    "tags": {
                        "gate": "rejected",
                        "weighted_f1": "0.400000",
                        "gate_reason": "P = 0.1 < 0.9",
                        "per_class_f1": json.dumps({"곰팡이": 0.5, "창틀,문틀수정": 0.25}, ensure_ascii=False),
                    },
                },
                {
                    "version": "2",
                    "url": "http://mlflow/#/models/m/versions/2",
                    "run_id": "r2",
                    "airflow_dag_id": "",
                    "airflow_run_id": "",
                    "tags": {"gate": "promoted", "weighted_f1": "0.900000"},
                },
            ],
        }
    ]
    html = plugin.models_section(models)
    # each class with its F1 unbroken, joined so that the comma inside 창틀,문틀수정 separates nothing
    assert "<span class='nw'>곰팡이 0.50</span> · <span class='nw'>창틀,문틀수정 0.25</span>" in html
    assert "m&lt;x&gt;" in html and "<x>" not in html
    assert "class='rejected'" in html and "class='promoted'" in html
    assert "/dags/defect_training/runs/manual__2026-11-26T20%3A00%3A00%2B00%3A00" in html
    assert "<b>champion</b> → v2" in html and "<b>challenger</b> → v3" in html
    q = plugin.quarantine_section(
        {"quarantined": 3, "files": 40, "by_reason": {"not a decodable image": 2, "label conflict": 1}},
        "defect_training",
        "run 1",
    )
    assert "3 of 40 files" in q and "<td>not a decodable image</td><td>2</td>" in q


def test_recent_runs_show_each_runs_prefix_and_quarantine_counts(plugin):
    runs = [
        {"run_id": "asset_triggered__1", "state": "running", "landing_uri": "s3://landing/new/", "report": None},
        {
            "run_id": "manual__2",
            "state": "success",
            "landing_uri": "s3://landing/곰팡이/",
            "report": {"quarantined": 1, "files": 25, "by_reason": {"not a decodable image": 1}},
        },
    ]
    html = plugin.recent_runs_section(runs)
    assert html.count("<tr>") == 3  # header + one row per run: the newest run does not hide the one before
    assert "s3://landing/new/" in html and "no quarantine report" in html
    assert "s3://landing/곰팡이/" in html and "1 of 25</a> (not a decodable image: 1)" in html
    assert "validation/defect_training/manual__2" in html
    assert "No training run yet" in plugin.recent_runs_section([])


def test_watch_section_shows_when_the_data_watch_fired_and_the_fingerprint(plugin):
    from datetime import datetime

    events = [
        {
            "timestamp": datetime(2026, 11, 26, 20, 0, tzinfo=UTC),
            "source_run_id": "w1",
            "extra": {"landing_uri": "s3://landing/곰팡이/", "fingerprint": "ab" * 32, "objects": 25},
        }
    ]
    html = plugin.watch_section(events, {"s3://landing/곰팡이/": "ab" * 32})
    assert "2026-11-26 20:00:00+00:00" in html and "s3://landing/곰팡이/" in html and "abababababababab" in html
    assert "<td>25</td>" in html
    assert "has not fired yet" in plugin.watch_section([], {})


def test_an_older_runs_validation_files_come_from_its_mlflow_copy_once_the_workspace_moved_on(
    plugin, tmp_path, monkeypatch
):
    import tempfile

    from fastapi import HTTPException

    from pipeline.adapters import orchestration as orc
    from pipeline.adapters import tracking

    (tmp_path / "ws").mkdir()
    ws = _workspace(tmp_path / "ws")
    report = orc.validation_summary(str(ws))
    archive = {
        "quarantine.csv": (ws / "data" / "quarantine.csv").read_bytes(),
        "data_docs/index.html": b"<html>docs</html>",
    }
    fetched = []

    def download(run_id, rel, dst):  # what archive_validation logged into the parent run
        fetched.append((run_id, rel))
        if run_id == "down":
            raise tracking.TrackingError("cannot reach the MLflow server")
        fp = dst / tracking.VALIDATION_ARTIFACTS / rel
        fp.parent.mkdir(parents=True, exist_ok=True)
        fp.write_bytes(archive[rel])
        return fp

    monkeypatch.setattr(tracking, "archived_validation_file", download)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    xcom = {}
    monkeypatch.setattr(plugin, "_xcom", lambda dag_id, run_id, task_id, key: xcom.get(run_id))
    xcom["old"] = {**report, "archived_in": "r-old"}
    xcom["before-copies"] = {**report, "archived_in": ""}
    xcom["down"] = {**report, "archived_in": "down"}

    # the workspace still holds this run's files: served from there, MLflow not asked
    assert plugin._validation_file("d", "old", None) == ws / "data" / "quarantine.csv" and not fetched
    # a later run rewrote them
    (ws / "data" / "quarantine.csv").write_text("source_key,path,class_name,reason\n", encoding="utf-8")
    (ws / "reports" / "data_docs" / "index.html").write_text("<html>newer run</html>", encoding="utf-8")
    for rel, want in ((None, archive["quarantine.csv"]), ("index.html", archive["data_docs/index.html"])):
        got = plugin._validation_file("d", "old", rel)
        assert got.read_bytes() == want and ws not in got.parents
    assert fetched == [("r-old", "quarantine.csv"), ("r-old", "data_docs/index.html")]
    plugin._validation_file("d", "old", None)
    assert len(fetched) == 2  # cached: artifacts never change
    with pytest.raises(HTTPException) as gone:  # a run from before the copies: the workspace alone, moved on
        plugin._validation_file("d", "before-copies", None)
    assert gone.value.status_code == 410
    with pytest.raises(HTTPException) as away:  # MLflow unreachable is said as such, never "gone"
        plugin._validation_file("d", "down", "index.html")
    assert away.value.status_code == 502 and "cannot reach" in away.value.detail
    archive["quarantine.csv"] = b"another list"  # a copy that is not the list this run wrote is never shown
    xcom["other"] = {**report, "archived_in": "r-other"}
    with pytest.raises(HTTPException) as other:
        plugin._validation_file("d", "other", None)
    assert other.value.status_code == 410
