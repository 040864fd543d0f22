"""Airflow scaled out with the CeleryExecutor on one machine, without Docker.

The roles of the production setup (docker-compose.yaml) as plain processes: a private PostgreSQL (Airflow's
metadata DB and Celery's result backend) and Redis (Celery's broker) from the distribution's packages
(``scripts/install-system-deps.sh``), Airflow's api-server, scheduler, dag-processor and triggerer, and one
Celery worker that consumes the queues ``default`` and ``gpu`` (services.CELERY_WORKER_ARGS). Every listener binds
127.0.0.1; PostgreSQL and Redis live in temporary folders with passwords generated per start and are deleted by
``down()``. The CeleryExecutor test tier (tests/celery) drives it; SeaweedFS S3 and MLflow come from
``devstack.services`` as usual.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from devstack import accounts, services
from pipeline.core.errors import ServiceError

_logger = logging.getLogger(__name__)

CELERY_WORKER = "airflow-celery-worker"
# Stop order: the scheduler first (nothing new gets queued), the api-server last (running tasks report to it).
STOP_ORDER = ("airflow-scheduler", CELERY_WORKER, "airflow-triggerer", "airflow-dag-processor", "airflow-api-server")
PYTHON_MODULES = {
    "airflow.providers.celery": "apache-airflow-providers-celery",
    "psycopg2": "psycopg2-binary",
    "asyncpg": "asyncpg",
    "redis": "redis",
}
PG_OS_USER = "postgres"


def postgres_bindir() -> Path | None:
    """Debian's /usr/lib/postgresql/<version>/bin (the newest), else the folder of an ``initdb`` on PATH."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        return Path(max(found, key=lambda p: [int(n) for n in re.findall(r"\d+", p)])).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def runuser_bin() -> str:
    """``runuser`` lives in /usr/sbin, which a non-login PATH (cron, CI) often lacks."""
    return shutil.which("runuser") or next(
        (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if Path(p).exists()), "runuser"
    )


def redis_server_bin() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)), None
    )


def missing_requirements() -> list[str]:
    """What this stack needs and this machine lacks: system binaries and Python packages (empty = all there)."""
    missing = []
    if postgres_bindir() is None:
        missing.append("PostgreSQL server binaries (apt-get install postgresql; `make system-deps`)")
    if redis_server_bin() is None:
        missing.append("redis-server (apt-get install redis-server; `make system-deps`)")
    if os.geteuid() == 0 and postgres_bindir() is not None:
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            missing.append(f"the `{PG_OS_USER}` OS user (PostgreSQL refuses to run as root)")
    for module, package in PYTHON_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(f"Python package {package} (pip install -e '.[celery]'; `make venv`)")
    return missing


def _run(cmd: list[str], what: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
    if out.returncode != 0:
        raise ServiceError(
            f"{what} failed (exit {out.returncode}): {' '.join(cmd[:4])} …\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
    return out


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on ``host:port``: ``initdb`` into a temporary folder, ``pg_ctl`` start/stop.

    As root, the server and its tools run as the ``postgres`` OS user (through ``runuser``); otherwise as the
    current user. Passwords (SCRAM) are generated per start; the database and its owner are both ``airflow``.
    """

    port: int
    host: str = "127.0.0.1"
    db: str = "airflow"
    user: str = "airflow"
    password: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    root: Path | None = None

    @property
    def sqlalchemy_url(self) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@{self.host}:{self.port}/{self.db}"

    @property
    def celery_result_backend(self) -> str:
        # The driver spelled out: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed.
        return f"db+postgresql+psycopg2://{self.user}:{self.password}@{self.host}:{self.port}/{self.db}"

    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return [runuser_bin(), "-u", PG_OS_USER, "--", *cmd] if os.geteuid() == 0 else cmd

    def start(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise ServiceError("PostgreSQL is not installed (scripts/install-system-deps.sh installs it)")
        if services.port_busy(self.host, self.port):
            raise ServiceError(f"port {self.port} on {self.host} is busy; PostgreSQL cannot start there")
        # Under /tmp itself: the postgres user must be able to reach the folder (pytest's are root-only).
        self.root = Path(tempfile.mkdtemp(prefix="pipeline-postgres-"))
        superuser_pw = secrets.token_hex(16)
        pwfile = self.root / "pwfile"
        pwfile.write_text(superuser_pw + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(PG_OS_USER)
            for path in (self.root, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        _run(
            self._as_owner(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                ]
            ),
            "initdb",
        )
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(
                f"\n# devstack.celery_stack\nlisten_addresses = '{self.host}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
            )
        _logger.info("starting PostgreSQL on %s:%d (%s)", self.host, self.port, self.data)
        _run(
            self._as_owner(
                [str(bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "90", "start"]
            ),
            "pg_ctl start",
            timeout=120,
        )
        import psycopg2
        from psycopg2 import sql

        con = psycopg2.connect(
            host=self.host,
            port=self.port,
            user="postgres",
            password=superuser_pw,
            dbname="postgres",
            connect_timeout=10,
        )
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(self.user), sql.Literal(self.password)
                    )
                )
                cur.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(self.db), sql.Identifier(self.user))
                )
        finally:
            con.close()

    def connect(self):
        import psycopg2

        return psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=self.db, connect_timeout=10
        )

    def stop(self, keep_log: Path | None = None) -> None:
        """Fast shutdown (clients are disconnected), then the folder is deleted; ``keep_log`` gets the log."""
        if self.root is None:
            return
        bindir = postgres_bindir()
        pidfile = self.data / "postmaster.pid"
        if pidfile.exists() and bindir is not None:
            out = subprocess.run(
                self._as_owner([str(bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"]),
                capture_output=True,
                text=True,
                timeout=90,
                stdin=subprocess.DEVNULL,
            )
            if out.returncode != 0:
                _logger.warning("pg_ctl stop failed: %s", out.stderr.strip())
        if pidfile.exists():  # pg_ctl failed: an immediate shutdown of the postmaster and its children
            try:
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGQUIT)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and _alive(pid):
                    time.sleep(0.3)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            except (ValueError, IndexError, ProcessLookupError):
                pass
        if keep_log is not None and self.logfile.exists():
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.logfile, keep_log)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Redis:
    """A private redis-server on ``host:port``: no persistence, a password generated per start.

    The password goes into a mode-600 config file rather than the command line (where ``ps`` would show it).
    """

    port: int
    host: str = "127.0.0.1"
    password: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    root: Path | None = None

    @property
    def broker_url(self) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    def start(self, stack: services.Stack) -> None:
        binary = redis_server_bin()
        if binary is None:
            raise ServiceError("redis-server is not installed (scripts/install-system-deps.sh installs it)")
        if services.port_busy(self.host, self.port):
            raise ServiceError(f"port {self.port} on {self.host} is busy; Redis cannot start there")
        self.root = Path(tempfile.mkdtemp(prefix="pipeline-redis-"))
        conf = self.root / "redis.conf"
        conf.touch(mode=0o600)
        conf.write_text(f"requirepass {self.password}\n")
        cmd = [
            binary,
            str(conf),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            "--dir",
            str(self.root),
            "--daemonize",
            "no",
        ]
        _logger.info("starting Redis on %s:%d", self.host, self.port)
        services._spawn(stack, "redis", cmd, dict(os.environ))
        services._wait(stack, "redis", self.ping, timeout=30)

    def ping(self) -> bool:
        import redis

        try:
            return bool(
                redis.Redis(
                    host=self.host, port=self.port, password=self.password, socket_connect_timeout=1, socket_timeout=2
                ).ping()
            )
        except redis.RedisError:
            return False

    def stop(self, stack: services.Stack) -> None:
        services.stop(stack, "redis")
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


@dataclass
class CeleryStack:
    """S3 + MLflow (devstack.services) + PostgreSQL + Redis + Airflow with the CeleryExecutor and one worker."""

    stack: services.Stack
    pg_port: int = 5432
    redis_port: int = 6379
    pg: Postgres = field(init=False)
    redis: Redis = field(init=False)
    jwt_secret: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)
    api_secret_key: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)

    def __post_init__(self) -> None:
        self.pg = Postgres(self.pg_port, host=self.stack.host)
        self.redis = Redis(self.redis_port, host=self.stack.host)

    def airflow_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment every Airflow process (and so every task) gets."""
        env = dict(os.environ if base is None else base)
        env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.pg.sqlalchemy_url,
                "AIRFLOW__CELERY__BROKER_URL": self.redis.broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": self.pg.celery_result_backend,
                # Celery keeps the worker's name and the queue of each task in the result table (celery_taskmeta):
                # how the tests prove which worker ran what.
                "AIRFLOW__CELERY__EXTRA_CELERY_CONFIG": '{"result_extended": true}',
                # Redis redelivers a task not acknowledged within this time (Airflow warns when it is unset).
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": services.airflow_execution_url(self.stack),
                # The scheduler signs each task's token and the api-server checks it: one secret for all processes.
                "AIRFLOW__API_AUTH__JWT_SECRET": self.jwt_secret,
                "AIRFLOW__API__SECRET_KEY": self.api_secret_key,
                "AIRFLOW__API__HOST": self.stack.host,
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                # The accounts (UI/REST users and their roles) and the tasks' MLflow account: devstack/accounts.py.
                **accounts.airflow_env(self.stack.root),
            }
        )
        for sqlite_only in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"):
            env.pop(sqlite_only, None)
        return env

    def migrate(self) -> None:
        """Create Airflow's schema in PostgreSQL and the pool the training DAG needs."""
        env = self.airflow_env()
        airflow = services._bin("airflow")
        _logger.info("migrating Airflow's metadata DB in PostgreSQL")
        _run([airflow, "db", "migrate"], "airflow db migrate", timeout=600, env=env, cwd=self.stack.root)
        _run(
            [airflow, "pools", "set", "dvc_workspace", "1", "one dvc repro per DVC workspace"],
            "airflow pools set",
            env=env,
            cwd=self.stack.root,
        )

    def start_airflow(self, timeout: float = 300) -> None:
        if services.port_busy(self.stack.host, self.stack.airflow_port):
            raise ServiceError(f"port {self.stack.airflow_port} on {self.stack.host} is busy")
        airflow = services._bin("airflow")
        env = self.airflow_env()
        commands = {
            name: [airflow, *args]
            for name, args in services.airflow_role_args(self.stack.host, self.stack.airflow_port).items()
        }
        commands[CELERY_WORKER] = [airflow, *services.CELERY_WORKER_ARGS]
        for name, cmd in commands.items():
            services._spawn(self.stack, name, cmd, env)
        _logger.info("starting Airflow (CeleryExecutor) on http://%s:%d", self.stack.host, self.stack.airflow_port)
        services._wait(self.stack, "airflow-api-server", lambda: services.airflow_healthy(self.stack), timeout)
        services._wait(self.stack, CELERY_WORKER, lambda: bool(self.worker_nodes()), timeout)

    def worker_nodes(self) -> dict[str, list[str]]:
        """Celery node name -> queues it consumes, as the workers answer over the broker."""
        from celery import Celery

        app = Celery(broker=self.redis.broker_url)
        try:
            answer = app.control.inspect(timeout=2).active_queues() or {}
        except Exception:  # broker not ready yet
            return {}
        finally:
            app.close()
        return {node: sorted(q["name"] for q in queues) for node, queues in answer.items()}

    def up(self) -> None:
        """Start everything (S3, MLflow, PostgreSQL, Redis, migrate, Airflow roles and worker); on failure, stop."""
        try:
            services.up(self.stack, airflow=False)
            self.pg.start()
            self.redis.start(self.stack)
            self.migrate()
            self.start_airflow()
        except BaseException:
            self.down()
            raise

    def down(self) -> list[str]:
        """Stop everything, also what only half started; returns the errors met on the way (never raises)."""
        errors = []
        for name in STOP_ORDER:
            try:
                services.stop(self.stack, name)
            except Exception as exc:
                errors.append(f"stop {name}: {exc}")
        for step, fn in (
            ("redis", lambda: self.redis.stop(self.stack)),
            ("postgres", lambda: self.pg.stop(keep_log=self.stack.logfile("postgres"))),
            ("mlflow", lambda: services.stop(self.stack, "mlflow")),
            ("seaweedfs", lambda: services.stop(self.stack, "seaweedfs")),
        ):
            try:
                fn()
            except Exception as exc:
                errors.append(f"stop {step}: {exc}")
        return errors
