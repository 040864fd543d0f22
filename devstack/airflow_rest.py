"""A small client for Airflow 3's public REST API (``/api/v2``), used to drive and watch a running scheduler.

Authenticates with the simple auth manager's ``POST /auth/token`` (the admin password `make ui` prints).
Only what the event-loop demo and its test need: unpause, trigger, list runs and task states, asset events.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from urllib.parse import quote, urlencode

from pipeline.core.errors import PipelineError


class AirflowAPI:
    def __init__(self, base_url: str, username: str, password: str):
        self.base = base_url.rstrip("/")
        body = json.dumps({"username": username, "password": password}).encode()
        answer = self._call("POST", "/auth/token", body, auth=False)
        self.token = answer["access_token"]

    def _call(self, method: str, path: str, body: bytes | None = None, auth: bool = True) -> dict:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        # Reads are safe to repeat. A write that got HTTP 5xx from the embedded SQLite DB was rolled back (the
        # lock wait fails before the endpoint writes), so it is repeated too.
        attempts = 4
        for attempt in range(attempts):
            req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    raw = resp.read()
                return json.loads(raw) if raw else {}
            except urllib.error.HTTPError as exc:
                if exc.code >= 500 and attempt + 1 < attempts:
                    time.sleep(2**attempt)
                    continue
                raise PipelineError(f"Airflow API {method} {path}: HTTP {exc.code} {exc.read()[:500]!r}") from None
            except OSError as exc:
                raise PipelineError(f"Airflow API at {self.base} unreachable: {exc}") from None
        raise AssertionError("unreachable")

    def get(self, path: str, **query) -> dict:
        return self._call("GET", path + (f"?{urlencode(query, doseq=True)}" if query else ""))

    def unpause(self, dag_id: str) -> None:
        self._call("PATCH", f"/api/v2/dags/{quote(dag_id)}", json.dumps({"is_paused": False}).encode())

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        body = json.dumps({"logical_date": None, "conf": conf or {}}).encode()
        return self._call("POST", f"/api/v2/dags/{quote(dag_id)}/dagRuns", body)["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{quote(dag_id)}/dagRuns", order_by="-run_after", limit=100)["dag_runs"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        """task_id (``task_id[i]`` for mapped tasks) -> state."""
        tis = self.get(f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances", limit=200)[
            "task_instances"
        ]
        return {
            (t["task_id"] if t.get("map_index", -1) < 0 else f"{t['task_id']}[{t['map_index']}]"): t["state"]
            for t in tis
        }

    def asset_events(self) -> list[dict]:
        return self.get("/api/v2/assets/events", order_by="-timestamp", limit=100)["asset_events"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float, poll: float = 3.0) -> dict:
        """Block until the run ends (success/failed); returns the run; raises after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}")
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(poll)
        raise PipelineError(f"{dag_id} run {run_id} did not finish within {timeout:.0f} s")

    def wait_new_run(
        self, dag_id: str, known: set[str], timeout: float, poll: float = 3.0, landing_uri: str | None = None
    ) -> dict | None:
        """The first run of ``dag_id`` not in ``known`` that appears within ``timeout`` seconds, else None.

        With ``landing_uri``: the first such run started by an Asset event for that prefix (a run another
        prefix's event started is not it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fresh = [r for r in self.runs(dag_id) if r["dag_run_id"] not in known]
            if landing_uri is not None:
                fresh = [r for r in fresh if landing_uri in self.upstream_landing_uris(dag_id, r["dag_run_id"])]
            if fresh:
                return fresh[-1]
            time.sleep(poll)
        return None

    def upstream_landing_uris(self, dag_id: str, run_id: str) -> set[str]:
        """The landing prefixes of the Asset events that started this run (empty for a run started otherwise)."""
        path = f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/upstreamAssetEvents"
        return {(e.get("extra") or {}).get("landing_uri") for e in self.get(path)["asset_events"]} - {None}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value"):
        path = (
            f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}"
            f"/xcomEntries/{quote(key)}"
        )
        return self.get(path, deserialize="true").get("value")


def watch_and_follow(
    api: AirflowAPI,
    landing_uri: str,
    settle_seconds: int = 5,
    copies: int = 1,
    timeout: float = 3600,
    quiet_seconds: float = 45,
) -> dict:
    """Trigger ``defect_data_watch`` ``copies`` times at once; follow any training run the Asset event starts.

    Returns what happened, with timings: watch runs and how many emitted, Asset events for this prefix,
    training runs started (and the first one's state, duration and registry decision).
    """

    def events_for_prefix() -> int:
        return sum(1 for e in api.asset_events() if (e.get("extra") or {}).get("landing_uri") == landing_uri)

    known = {r["dag_run_id"] for r in api.runs("defect_training")}
    events_before = events_for_prefix()
    t0 = time.monotonic()
    conf = {"landing_uri": landing_uri, "settle_seconds": settle_seconds}
    ids = [api.trigger("defect_data_watch", conf) for _ in range(copies)]
    for run_id in ids:
        api.wait_run("defect_data_watch", run_id, timeout)
    watch_s = time.monotonic() - t0
    emitted = sum(api.task_states("defect_data_watch", i).get("emit_if_new") == "success" for i in ids)
    out = {
        "watch_runs": len(ids),
        "watch_s": round(watch_s, 1),
        "emitted": emitted,
        "asset_events": events_for_prefix() - events_before,
        "training_runs": 0,
    }
    first = api.wait_new_run(
        "defect_training", known, timeout=120 if emitted else quiet_seconds, landing_uri=landing_uri
    )
    if first is not None:
        started = time.monotonic()
        run = api.wait_run("defect_training", first["dag_run_id"], timeout)
        out.update(
            training_state=run["state"],
            training_s=round(time.monotonic() - started, 1),
            training_run_type=run.get("run_type"),
            decision=api.xcom("defect_training", first["dag_run_id"], "register")
            if run["state"] == "success"
            else None,
        )
        if run["state"] != "success":  # which task, so a failure in CI names its cause
            out["task_states"] = api.task_states("defect_training", first["dag_run_id"])
        time.sleep(min(quiet_seconds, 15))  # a second run would have been created by now
    out["training_runs"] = len([r for r in api.runs("defect_training") if r["dag_run_id"] not in known])
    return out
