"""One mapping of MLflow failures (issue 32, finding 11): the registry's own "not found" is final; an outage or a
5xx after the probe is transient (the task retries) and never reads as "not found"."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest
from mlflow import MlflowClient

from pipeline.adapters import tracking
from pipeline.commands import audit

pytestmark = pytest.mark.faults


class _Failing(http.server.BaseHTTPRequestHandler):
    """A real HTTP server in MLflow's place that answers every request 503, as a proxy in front of a dead MLflow."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "upstream down"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture()
def failing_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(autouse=True)
def _no_retries(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("PIPELINE_LOCAL", str(tmp_path / "no-stack"))


def test_the_registrys_not_found_is_final(local_registry):
    MlflowClient().create_registered_model("m")
    for call in (
        lambda: tracking.get_version("m", "7"),
        lambda: tracking.resolve_model_uri("models:/m@champion"),
        lambda: tracking.resolve_model_uri("models:/nope/1"),
    ):
        with pytest.raises(tracking.NotInRegistry) as err:
            call()
        assert not err.value.transient


@pytest.mark.parametrize("server", ["closed", "503"])
def test_an_outage_after_the_probe_is_transient_never_not_found(server, failing_server, monkeypatch):
    url = _closed_port() if server == "closed" else failing_server
    client = MlflowClient(url)
    calls = {
        "get_version": lambda: client.get_model_version("m", "1"),
        "alias": lambda: client.get_model_version_by_alias("m", "champion"),
        "run": lambda: client.get_run("0" * 32),
    }
    for what, call in calls.items():
        with pytest.raises(tracking.TrackingError) as err:
            with tracking.registry_errors(what):
                call()
        assert err.value.transient and "not in the registry" not in str(err.value), (what, err.value)
    with pytest.raises(tracking.TrackingError):  # audit compared {} params on any error and reported differences
        audit._run_params(client, "0" * 32)
    with pytest.raises(tracking.TrackingError):
        audit._version(client, "m", "1")
