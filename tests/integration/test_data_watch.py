"""The data-watch DAG for real (SeaweedFS + `airflow dags test`): one event per new data, none for the same data,
none while an upload is still growing, one after a relabel moved a photo."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.conftest import run_cli
from tests.integration.helpers import png_bytes

pytestmark = pytest.mark.integration
URI = "s3://landing/watch/"

COUNT_EVENTS = """
import json
from airflow.models.asset import AssetEvent
from airflow.utils.session import create_session
with create_session() as s:
    print(json.dumps([e.extra for e in s.query(AssetEvent).all() if (e.extra or {}).get("landing_uri") == URI]))
"""


def _python(env, code: str) -> str:
    """Last line ``code`` prints, run against the stack's Airflow database."""
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def _asset_events(env, uri: str = URI) -> list[dict]:
    return json.loads(_python(env, COUNT_EVENTS.replace("URI", repr(uri))))


def _watch(env, settle: int = 1, checks: int = 2, uri: str = URI) -> None:
    conf = json.dumps({"landing_uri": uri, "settle_seconds": settle, "max_checks": checks})
    out = run_cli(["devstack", "run-dag", "defect_data_watch", "--conf", conf], env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_new_data_fires_once_same_data_never_growing_upload_waits_relabel_fires(stack, stack_env, s3, tmp_path):
    for i in range(3):
        s3.put_object(Bucket="landing", Key=f"watch/crack/{i}.png", Body=png_bytes(i))
    s3.put_object(Bucket="landing", Key="watch/mold/m0.png", Body=png_bytes(50))
    _watch(stack_env)
    events = _asset_events(stack_env)
    assert len(events) == 1 and events[0]["objects"] == 4 and len(events[0]["fingerprint"]) == 64

    _watch(stack_env)  # same data again
    assert len(_asset_events(stack_env)) == 1

    stop = threading.Event()

    def keep_uploading():
        i = 100
        while not stop.is_set():
            s3.put_object(Bucket="landing", Key=f"watch/crack/{i}.png", Body=png_bytes(i))
            i += 1
            time.sleep(0.5)

    writer = threading.Thread(target=keep_uploading)
    writer.start()
    try:
        _watch(stack_env, settle=2, checks=2)  # the prefix changes within every window: no event
    finally:
        stop.set()
        writer.join()
    assert len(_asset_events(stack_env)) == 1

    _watch(stack_env)  # the upload has finished: one new event with the new count
    events = _asset_events(stack_env)
    assert len(events) == 2 and events[1]["objects"] > 4 and events[1]["fingerprint"] != events[0]["fingerprint"]

    # A Label Studio export applied by `pipeline relabel` moves a photo to another class folder: new data, one event
    # (the training DAG is scheduled on it). The move log lands outside the watched prefix.
    key = "watch/crack/0.png"
    etag = s3.head_object(Bucket="landing", Key=key)["ETag"].strip('"')
    export = [
        {
            "id": 1,
            "data": {"landing_bucket": "landing", "landing_prefix": "watch/", "landing_key": key, "etag": etag},
            "annotations": [
                {
                    "result": [
                        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["mold"]}}
                    ]
                }
            ],
        }
    ]
    (tmp_path / "export.json").write_text(json.dumps(export))
    out = run_cli(
        [
            "pipeline",
            "relabel",
            "--from",
            str(tmp_path / "export.json"),
            "--apply",
            "--landing-uri",
            "s3://landing/watch/",
        ],
        stack_env,
    )
    assert out.returncode == 0 and "MOVED" in out.stdout, out.stdout + out.stderr[-2000:]
    _watch(stack_env)
    events = _asset_events(stack_env)
    assert len(events) == 3 and events[2]["objects"] == events[1]["objects"]
    assert events[2]["fingerprint"] != events[1]["fingerprint"]


def test_a_fingerprint_an_older_version_kept_in_a_variable_is_taken_over_once(stack, stack_env, s3):
    """The last fingerprint used to be an Airflow Variable; it now lives in the asset state store. A Variable
    holding today's data is taken over (no event, the Variable deleted), the same data stays quiet, new data fires."""
    from pipeline.adapters import storage
    from pipeline.adapters.watch import listing_fingerprint

    uri = "s3://landing/watch-old/"
    for i in range(2):
        s3.put_object(Bucket="landing", Key=f"watch-old/crack/{i}.png", Body=png_bytes(200 + i))
    key = f"defect_watch_last_fingerprint:{uri}"
    fingerprint = listing_fingerprint(storage.list_objects(uri, s3))
    _python(stack_env, f"from airflow.models import Variable; Variable.set({key!r}, {fingerprint!r}); print('ok')")
    get_var = f"from airflow.models import Variable; print(Variable.get({key!r}, default_var='gone'))"

    _watch(stack_env, uri=uri)
    assert _asset_events(stack_env, uri) == [] and _python(stack_env, get_var) == "gone"
    _watch(stack_env, uri=uri)  # the state store holds it now
    assert _asset_events(stack_env, uri) == []
    s3.put_object(Bucket="landing", Key="watch-old/crack/2.png", Body=png_bytes(202))
    _watch(stack_env, uri=uri)
    assert [e["objects"] for e in _asset_events(stack_env, uri)] == [3]
