"""The operator's view (plugins/defect_models.py) under a real, running Airflow api-server and scheduler.

Two training runs of the test profile on tiny data with Hangul class names: a good recipe (a first champion:
promoted) and a crippled one (rejected); then the data watch fires on the same prefix. Then, through the REST API, every linked task instance's extra links,
each followed to a 200 from MLflow or the plugin, and each pointing at *this* DAG run's objects; the "Defect
models" page logged in (both versions, Hangul, the DAG runs) and anonymous (401); nothing on it writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urljoin

import pytest

from tests.integration.helpers import MODEL, png_bytes

pytestmark = pytest.mark.integration

CLASSES = {"곰팡이": (150, 0, 0), "창틀,문틀수정": (0, 150, 0), "오염": (0, 0, 150)}
LINKED = {
    "start_tracking": {"MLflow run"},
    "finish_tracking": {"MLflow run"},
    "register": {"MLflow model version"},
    "validate": {"Quarantine", "Data Docs"},
    "backbone": {"MLflow member run"},
    "train": {"MLflow member run"},
}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a 3xx comes back as an HTTPError: _get decides where to go
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _auditor() -> tuple[str, str]:
    """The stack's read-only account: MLflow's UI sits behind MLflow's own login (devstack/accounts.py)."""
    from devstack import accounts

    return "auditor", accounts.password("auditor")


def _get(
    url: str, token: str | None = None, method: str = "GET", basic: tuple[str, str] | None = None
) -> tuple[int, str, str]:
    """(status, final URL after redirects, body) of one request; HTTP errors are answers too. A redirect (the
    plugin's /member link into the MLflow UI) is followed as the auditor: the Airflow token means nothing there."""
    import base64

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if basic:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with _OPENER.open(req, timeout=60) as resp:
            return resp.status, resp.geturl(), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        if exc.code in (301, 302, 303, 307, 308):
            return _get(urljoin(url, exc.headers["Location"]), basic=_auditor())
        return exc.code, url, exc.read().decode("utf-8", "replace")


def _run_training(api, conf: dict) -> str:
    run_id = api.trigger("defect_training", conf)
    run = api.wait_run("defect_training", run_id, timeout=1500)
    assert run["state"] == "success", (run, api.task_states("defect_training", run_id))
    return run_id


def _links(api, run_id: str) -> dict[str, dict]:
    """task_id (``task_id[i]`` when mapped) → {link name: URL or None}, for every task instance of the run."""
    out = {}
    tis = api.get(f"/api/v2/dags/defect_training/dagRuns/{run_id}/taskInstances", limit=200)["task_instances"]
    for ti in tis:
        path = f"/api/v2/dags/defect_training/dagRuns/{run_id}/taskInstances/{ti['task_id']}/links"
        links = api.get(path, **({"map_index": ti["map_index"]} if ti["map_index"] >= 0 else {}))["extra_links"]
        out[ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")] = links
    return out


def _mlflow_target(url: str):
    """The MLflow object a UI link names: ('run', run) or ('version', version)."""
    from mlflow import MlflowClient

    fragment = unquote(url.split("#", 1)[1])
    parts = fragment.strip("/").split("/")
    if parts[0] == "models":
        return "version", MlflowClient().get_model_version(parts[1], parts[3])
    assert parts[0] == "experiments" and parts[2] == "runs", url
    return "run", MlflowClient().get_run(parts[3])


def _belongs_to(run, dag_run_id: str) -> bool:
    """An MLflow run is this DAG run's parent run, or nested under it."""
    from mlflow import MlflowClient

    tags = run.data.tags
    if "mlflow.parentRunId" in tags:
        tags = MlflowClient().get_run(tags["mlflow.parentRunId"]).data.tags
    return tags.get("airflow_run_id") == dag_run_id


@pytest.fixture()
def aliases_restored(stack):
    """The session's shared model keeps the aliases it had: this test's runs (Hangul classes) may promote a version
    that the later tests of the session (prediction on the tiny colour classes) must not meet as champion."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        before = dict(client.get_registered_model(MODEL).aliases)
    except MlflowException:  # no such model yet
        before = {}
    yield
    try:
        now = dict(client.get_registered_model(MODEL).aliases)
    except MlflowException:
        return
    for alias in set(now) - set(before):
        client.delete_registered_model_alias(MODEL, alias)
    for alias, version in before.items():
        client.set_registered_model_alias(MODEL, alias, version)


def test_links_and_the_defect_models_page_under_a_running_api_server(
    airflow_api, aliases_restored, stack, stack_env, s3
):
    from mlflow import MlflowClient

    from tests.conftest import GOOD_TINY_RECIPE

    base = f"http://127.0.0.1:{stack.airflow_port}"
    listed = subprocess.run(
        [sys.executable, "-m", "airflow", "plugins", "--output", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, **stack_env},
        timeout=300,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "defect_models" in listed.stdout and "/defect-models" in listed.stdout, listed.stdout[-2000:]

    for c_i, (cls, tint) in enumerate(CLASSES.items()):
        for i in range(8):
            s3.put_object(
                Bucket="landing", Key=f"view/{cls}/{i:03d}.png", Body=png_bytes(5000 + c_i * 100 + i, tint=tint)
            )
    s3.put_object(Bucket="landing", Key="view/곰팡이/broken.png", Body=b"not a png")  # one quarantined file
    conf = {"landing_uri": "s3://landing/view/", "profile": "test"}
    good = _run_training(airflow_api, {**conf, "set": GOOD_TINY_RECIPE})
    bad = _run_training(airflow_api, {**conf, "set": [*GOOD_TINY_RECIPE, "train.lr=1.0e-9"]})
    decisions = {r: airflow_api.xcom("defect_training", r, "register") for r in (good, bad)}
    assert decisions[bad]["gate"] == "rejected", decisions

    bearer = airflow_api.token
    for run_id in (good, bad):
        links = _links(airflow_api, run_id)
        for task, names in links.items():
            expected = LINKED.get(task.split("[")[0], set())
            assert set(names) == expected, (task, names)
            for name, url in names.items():
                assert url, (run_id, task, name)  # every link of a finished run resolves
                if url.startswith("/"):  # a page of the plugin on this api-server
                    status, final, body = _get(urljoin(base, url), bearer)
                    assert status == 200, (task, name, url, status, body[:500])
                    if "#/" in final:  # /member redirects into the MLflow UI
                        kind, target = _mlflow_target(final)
                        assert kind == "run" and _belongs_to(target, run_id), (task, final)
                        assert target.data.tags["role"] in ("backbone", "bag_member")
                    else:
                        assert run_id in unquote(url)
                    if name == "Quarantine":
                        assert "broken.png" in body and "not a decodable image" in body and "곰팡이" in body
                else:  # the MLflow UI: the page answers, and the object it names is this DAG run's
                    assert _get(url, basic=_auditor())[0] == 200, url  # the auditor follows every link
                    assert _get(url)[0] == 401, url  # MLflow's UI is behind its own login
                    kind, target = _mlflow_target(url)
                    if kind == "version":
                        assert target.version == decisions[run_id]["model_version"], (url, decisions[run_id])
                        target = MlflowClient().get_run(target.run_id)
                    assert _belongs_to(target, run_id), (task, name, url)

    # The data watch fires on the same prefix: its Asset event (fingerprint, when) shows on the page. The training
    # run the event starts is the tiny profile's default recipe; whatever its gate says, the checks above stand.
    # One more broken photo first, so that run's validate rewrites the workspace's quarantine list and Data Docs.
    from devstack.airflow_rest import watch_and_follow

    s3.put_object(Bucket="landing", Key="view/오염/broken2.png", Body=b"not a png either")
    watched = watch_and_follow(airflow_api, "s3://landing/view/", settle_seconds=2, timeout=900)
    assert watched["emitted"] == 1 and watched["training_state"] == "success", watched
    # The older runs' links still answer with their own files: from the copies in their MLflow parent runs. The
    # run the watch started (ours, or first a scheduled watch's on another prefix) has rewritten the shared
    # workspace's list since, so the workspace no longer holds what these runs recorded.
    for run_id in (good, bad):
        report = airflow_api.xcom("defect_training", run_id, "validate", "validation_report")
        rewritten = hashlib.sha256(Path(report["quarantine"]).read_bytes()).hexdigest()
        assert rewritten != report["quarantine_sha256"], report
        links = _links(airflow_api, run_id)["validate"]
        status, _, body = _get(urljoin(base, links["Quarantine"]), bearer)
        assert status == 200 and "broken.png" in body and "broken2.png" not in body, (run_id, status, body[-2000:])
        status, _, body = _get(urljoin(base, links["Data Docs"]), bearer)
        assert status == 200 and "</html>" in body, (run_id, status, body[:500])
        archived = {a.path for a in MlflowClient().list_artifacts(report["archived_in"], "validation")}
        assert archived == {"validation/quarantine.csv", "validation/data_docs"}, archived
    event = next(
        e for e in airflow_api.asset_events() if (e.get("extra") or {}).get("landing_uri") == "s3://landing/view/"
    )

    status, _, page = _get(f"{base}/defect-models/", bearer)
    assert status == 200, page[:1000]
    assert MODEL in page and "promoted" in page and "rejected" in page, page[:3000]
    assert decisions[good]["model_version"] in page and decisions[bad]["model_version"] in page
    assert "곰팡이" in page and "창틀,문틀수정" in page  # Hangul class names in per-class F1 and quarantine
    # The recent runs' quarantine counts: each run its own row (a scheduled watch run may start a newer one).
    recent = page.split("training runs: quarantine</h2>", 1)[1].split("<h2>", 1)[0]
    rows = {run_id: next((r for r in recent.split("<tr>") if f">{run_id}</a>" in r), "") for run_id in (good, bad)}
    assert all("not a decodable image: 1" in r and "s3://landing/view/" in r for r in rows.values()), rows
    assert event["extra"]["fingerprint"][:16] in page and "s3://landing/view/" in page
    last = page.split("Last processed fingerprint per prefix</h3>", 1)[1].split("</table>", 1)[0]
    assert "s3://landing/view/" in last and event["extra"]["fingerprint"][:16] in last, last  # the asset state store
    fired = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    assert str(fired) in page and "has not fired yet" not in page, (event, page[-2000:])  # when it fired
    assert good in unquote(page) and bad in unquote(page)  # each version names the DAG run that made it
    # Behind Airflow's login, and read-only.
    assert _get(f"{base}/defect-models/")[0] == 401
    assert _get(f"{base}/defect-models/validation/defect_training/{good}")[0] == 401
    assert _get(f"{base}/defect-models/", bearer, method="POST")[0] == 405

    hold = os.environ.get("OPERATOR_VIEW_HOLD")  # a file path: keep the stack up for screenshots until it is deleted
    if hold:
        from devstack import accounts

        Path(hold).write_text(
            json.dumps(
                {
                    "base": base,
                    "password": accounts.password("pipeline"),
                    "runs": [good, bad],
                    "mlflow": os.environ["MLFLOW_TRACKING_URI"],
                }
            )
        )
        deadline = time.monotonic() + 900
        while Path(hold).exists() and time.monotonic() < deadline:
            time.sleep(2)
