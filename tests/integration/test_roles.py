"""Roles, enforced by the real servers: MLflow's basic-auth app and Airflow's simple auth manager
(devstack/accounts.py).

Each row is one HTTP request (or one of our commands) as one account, against the session's private stack; the test
prints the table (account x action -> status) and checks every status. The accounts are the stack's own, generated
by tests/conftest.py's `stack_env` into the stack's accounts.json, exactly as `make services-up` makes them.
"""

from __future__ import annotations

import base64
import json
import secrets
import urllib.error
import urllib.request
from urllib.parse import quote, urlencode

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.integration
MODEL = "roles-check"  # a registered model of this test's own, so the champion of the DAG tests never moves


def _http(
    method: str, url: str, body: dict | None = None, *, basic: tuple[str, str] | None = None, bearer: str | None = None
) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if basic:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    req = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _said(out, text: str) -> str:
    """What a failed command said, for the table: the expected words, or its last line (a traceback counts)."""
    if text in out.stderr and "Traceback" not in out.stderr:
        return "refused … (HTTP " + text.rsplit("(HTTP ", 1)[1]
    return (out.stderr.strip().splitlines() or ["(nothing)"])[-1][:60]


class Table:
    def __init__(self, title: str):
        self.title, self.rows = title, []

    def add(self, who: str, action: str, status: int | str, expected: int | str) -> None:
        self.rows.append((who, action, status, expected))

    def render(self) -> str:
        width = max(len(r[1]) for r in self.rows)
        lines = [self.title, f"{'account':<10} {'action':<{width}}  status  expected"]
        lines += [f"{w:<10} {a:<{width}}  {s!s:<6}  {e}" for w, a, s, e in self.rows]
        return "\n".join(lines)

    def check(self) -> None:
        print("\n" + self.render())
        wrong = [r for r in self.rows if r[2] != r[3]]
        assert not wrong, "\n" + self.render()


@pytest.fixture(scope="module")
def accounts_of_stack(stack):
    from devstack import accounts

    return {name: (name, pw) for name, pw in accounts.passwords(stack.root).items()}


def test_mlflow_roles_auditor_reads_everything_and_changes_nothing(stack, stack_env, accounts_of_stack):
    from mlflow import MlflowClient

    base, who = stack.mlflow_url, accounts_of_stack
    api = f"{base}/api/2.0/mlflow"
    table = Table("MLflow (basic-auth app)")
    # The pipeline account registers two versions and promotes the second, over REST (its row in the table); its
    # runs come from the MLflow client, which takes the account from MLFLOW_TRACKING_USERNAME/PASSWORD.
    client = MlflowClient()
    experiment = client.create_experiment("roles-check")
    runs = []
    for i in (1, 2):
        run_id = client.create_run(experiment).info.run_id
        client.log_text(run_id, f"model card {i}\n", "model/card.md")
        client.set_terminated(run_id)
        runs.append(run_id)
    pipeline = who["pipeline"]
    table.add(
        "pipeline",
        "POST create registered model",
        _http("POST", f"{api}/registered-models/create", {"name": MODEL}, basic=pipeline)[0],
        200,
    )
    for run_id in runs:
        table.add(
            "pipeline",
            "POST create model version",
            _http(
                "POST",
                f"{api}/model-versions/create",
                {"name": MODEL, "source": f"runs:/{run_id}/model", "run_id": run_id},
                basic=pipeline,
            )[0],
            200,
        )
    v1, v2 = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))[-2:]
    for v in (v1, v2):  # what the register stage writes last; `rollback` moves champion only to such versions
        gate_tag = {"name": MODEL, "version": v.version, "key": "gate", "value": "promoted"}
        table.add(
            "pipeline",
            "POST set tag gate",
            _http("POST", f"{api}/model-versions/set-tag", gate_tag, basic=pipeline)[0],
            200,
        )
    table.add(
        "pipeline",
        "POST set alias champion",
        _http(
            "POST",
            f"{api}/registered-models/alias",
            {"name": MODEL, "alias": "champion", "version": v2.version},
            basic=pipeline,
        )[0],
        200,
    )

    exp_id = client.get_run(v2.run_id).info.experiment_id
    artifact = f"{base}/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{v2.run_id}/artifacts/model/card.md"
    version_url = f"{api}/model-versions/get?{urlencode({'name': MODEL, 'version': v2.version})}"
    search_url = f"{api}/model-versions/search?{urlencode({'filter': 'name = ' + repr(MODEL)})}"
    set_alias = {"name": MODEL, "alias": "champion", "version": v1.version}
    set_tag = {"name": MODEL, "version": v2.version, "key": "audited", "value": "yes"}

    for name, auth in (("anonymous", None), ("wrong pw", ("auditor", secrets.token_hex(8)))):
        table.add(name, "GET model version", _http("GET", version_url, basic=auth)[0], 401)
        table.add(name, "GET run artifact", _http("GET", artifact, basic=auth)[0], 401)
        table.add(
            name, "POST set alias", _http("POST", f"{api}/registered-models/alias", set_alias, basic=auth)[0], 401
        )

    status, body = _http("GET", version_url, basic=who["auditor"])
    table.add("auditor", "GET model version", status, 200)
    assert json.loads(body)["model_version"]["aliases"] == ["champion"]
    table.add("auditor", "GET search versions", _http("GET", search_url, basic=who["auditor"])[0], 200)
    status, body = _http("GET", artifact, basic=who["auditor"])
    table.add("auditor", "GET run artifact", status, 200)
    assert body == b"model card 2\n"
    table.add(
        "auditor",
        "POST set alias",
        _http("POST", f"{api}/registered-models/alias", set_alias, basic=who["auditor"])[0],
        403,
    )
    table.add(
        "auditor",
        "POST set version tag",
        _http("POST", f"{api}/model-versions/set-tag", set_tag, basic=who["auditor"])[0],
        403,
    )
    table.add(
        "auditor",
        "DELETE alias",
        _http("DELETE", f"{api}/registered-models/alias", {"name": MODEL, "alias": "champion"}, basic=who["auditor"])[
            0
        ],
        403,
    )
    table.add(
        "auditor",
        "DELETE version",
        _http("DELETE", f"{api}/model-versions/delete", {"name": MODEL, "version": v1.version}, basic=who["auditor"])[
            0
        ],
        403,
    )
    table.add(
        "auditor",
        "POST log metric on run",
        _http(
            "POST",
            f"{api}/runs/log-metric",
            {"run_id": v2.run_id, "key": "x", "value": 1, "timestamp": 0},
            basic=who["auditor"],
        )[0],
        403,
    )

    # Our commands take the account from MLflow's own variables: the auditor's rollback is refused by the server.
    env = {**stack_env, "MLFLOW_TRACKING_USERNAME": "auditor", "MLFLOW_TRACKING_PASSWORD": who["auditor"][1]}
    out = run_cli(
        ["pipeline", "rollback", "--model", MODEL, "--to", v1.version, "--reason", "roles test"], env, timeout=300
    )
    table.add("auditor", "python -m pipeline rollback", f"exit {out.returncode}", "exit 2")
    table.add(
        "auditor",
        "  its message",
        _said(out, "refused the rollback for account auditor (HTTP 403)"),
        "refused … (HTTP 403)",
    )
    table.add(
        "auditor",
        "  champion after it",
        f"v{client.get_model_version_by_alias(MODEL, 'champion').version}",
        f"v{v2.version}",
    )
    table.add(
        "auditor",
        "  rollback tags on the target",
        "set" if "rollback_by" in client.get_model_version(MODEL, v1.version).tags else "none",
        "none",
    )
    # Without an account at all (no password in the environment, no accounts file): one clear line, 401.
    anon = {
        **stack_env,
        "MLFLOW_TRACKING_USERNAME": "",
        "MLFLOW_TRACKING_PASSWORD": "",
        "PIPELINE_LOCAL": str(stack.root / "no-accounts-here"),
    }
    out = run_cli(["pipeline", "audit", "--model", MODEL, v1.version, v2.version], anon, timeout=300)
    table.add("anonymous", "python -m pipeline audit", f"exit {out.returncode}", "exit 2")
    table.add(
        "anonymous", "  its message", _said(out, "refused account (anonymous) (HTTP 401)"), "refused … (HTTP 401)"
    )
    # The auditor's audit works (reads only).
    out = run_cli(["pipeline", "audit", "--model", MODEL, v1.version, v2.version], env, timeout=300)
    table.add("auditor", "python -m pipeline audit", f"exit {out.returncode}", "exit 0")

    # The engineer sets aliases (rollback) on the registered models.
    table.add(
        "engineer",
        "POST set alias (another)",
        _http(
            "POST", f"{api}/registered-models/alias", {**set_alias, "alias": "engineer-check"}, basic=who["engineer"]
        )[0],
        200,
    )
    env = {**stack_env, "MLFLOW_TRACKING_USERNAME": "engineer", "MLFLOW_TRACKING_PASSWORD": who["engineer"][1]}
    out = run_cli(
        ["pipeline", "rollback", "--model", MODEL, "--to", v1.version, "--reason", "roles test"], env, timeout=300
    )
    table.add("engineer", "python -m pipeline rollback", f"exit {out.returncode}", "exit 0")
    table.add(
        "engineer",
        "  champion after it",
        f"v{client.get_model_version_by_alias(MODEL, 'champion').version}",
        f"v{v1.version}",
    )
    table.add(
        "engineer",
        "  tag rollback_account",
        client.get_model_version(MODEL, v1.version).tags.get("rollback_account", "-"),
        "engineer",
    )
    table.check()


def test_airflow_roles_auditor_views_engineer_triggers(airflow_api, stack, accounts_of_stack):
    base, who = f"http://127.0.0.1:{stack.airflow_port}", accounts_of_stack
    dag = "defect_data_watch"
    table = Table("Airflow (simple auth manager)")

    def token(name: str) -> str:
        user, pw = who[name]
        status, body = _http("POST", f"{base}/auth/token", {"username": user, "password": pw})
        table.add(name, "POST /auth/token", status, 201)
        return json.loads(body).get("access_token", "") if status in (200, 201) else ""

    runs_url = f"{base}/api/v2/dags/{quote(dag)}/dagRuns"
    # An empty prefix: the watch lists it, finds nothing and ends; nothing trains.
    trigger = {"logical_date": None, "conf": {"landing_uri": "s3://landing/roles-empty/", "settle_seconds": 0}}
    table.add("anonymous", "GET dag runs", _http("GET", runs_url)[0], 401)
    table.add("anonymous", "POST trigger DAG", _http("POST", runs_url, trigger)[0], 401)
    status, _ = _http("POST", f"{base}/auth/token", {"username": "auditor", "password": secrets.token_hex(8)})
    table.add("wrong pw", "POST /auth/token", status, 401)

    auditor = token("auditor")
    table.add("auditor", "GET dag runs", _http("GET", runs_url, bearer=auditor)[0], 200)
    table.add("auditor", "POST trigger DAG", _http("POST", runs_url, trigger, bearer=auditor)[0], 403)
    table.add(
        "auditor",
        "PATCH pause DAG",
        _http("PATCH", f"{base}/api/v2/dags/{quote(dag)}", {"is_paused": True}, bearer=auditor)[0],
        403,
    )
    engineer = token("engineer")
    status, body = _http("POST", runs_url, trigger, bearer=engineer)
    table.add("engineer", "POST trigger DAG", status, 200)
    table.check()
    run = airflow_api.wait_run(dag, json.loads(body)["dag_run_id"], timeout=300)
    assert run["state"] == "success", run  # the engineer's run ran (as the pipeline's tasks do)
