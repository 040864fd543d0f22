"""The stack's accounts and what each may do, enforced by MLflow's basic-auth app and Airflow's simple auth manager.

Three roles (docs/RELIABILITY.md, "Roles"):

* ``pipeline`` — the service account: MLflow admin (experiments, runs, registered models, aliases), Airflow admin.
  The DAG tasks run as it (devstack gives the scheduler and workers its MLflow credentials).
* ``engineer`` — Airflow ``op`` (trigger DAGs, clear tasks); MLflow EDIT on every registered model (set aliases:
  ``python -m pipeline rollback``) and READ elsewhere.
* ``auditor`` — Airflow ``viewer``; MLflow READ (runs, versions, artifacts): every write is refused with 403.

Passwords are generated once per stack into ``<PIPELINE_LOCAL>/accounts.json`` (mode 600, ``{name: password}``,
the format of Airflow's simple-auth-manager passwords file, which points at it); the names' roles are in
``accounts-roles.json`` (no secrets). ``python -m devstack add-user NAME --role ROLE`` adds one.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.adapters.credentials import ACCOUNTS_FILE, local_root
from pipeline.core.errors import ServiceError

_logger = logging.getLogger(__name__)
ROLES_FILE = "accounts-roles.json"
# role -> (Airflow simple-auth-manager role, MLflow admin?, MLflow grants (resource_type, pattern, permission))
ROLES: dict[str, tuple[str, bool, tuple[tuple[str, str, str], ...]]] = {
    "pipeline": ("admin", True, ()),
    "engineer": ("op", False, (("registered_model", "*", "EDIT"),)),
    "auditor": ("viewer", False, ()),  # MLflow's default_permission (READ) is all it has
}
DEFAULT_ACCOUNTS = {"pipeline": "pipeline", "engineer": "engineer", "auditor": "auditor"}  # name -> role
SERVICE_ACCOUNT = "pipeline"  # also MLflow's admin_username: the auth app creates it on its first start


def passwords_file(root: Path | None = None) -> Path:
    return (root or local_root()) / ACCOUNTS_FILE


def roles_file(root: Path | None = None) -> Path:
    return (root or local_root()) / ROLES_FILE


def write_private(path: Path, data: dict) -> None:
    """``data`` as JSON, written atomically and readable by its owner only (mode 600, never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ServiceError(f"{path} is not valid JSON ({exc}); delete it to generate new accounts") from None


def passwords(root: Path | None = None) -> dict[str, str]:
    return _read(passwords_file(root))


def roles(root: Path | None = None) -> dict[str, str]:
    return _read(roles_file(root))


def password(name: str, root: Path | None = None) -> str:
    found = passwords(root).get(name)
    if found is None:
        raise ServiceError(
            f"no account {name!r} in {passwords_file(root)} (`make services-up` creates the stack's "
            "accounts; `python -m devstack add-user` adds one)"
        )
    return found


def add(name: str, role: str, root: Path | None = None) -> str:
    """Create account ``name`` with ``role`` in the local files; returns its new password."""
    if role not in ROLES:
        raise ServiceError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ServiceError(f"account name {name!r}: use letters, digits, '-', '_' or '.'")
    pw, rl = passwords(root), roles(root)
    if name in pw:
        raise ServiceError(f"account {name!r} already exists (role {rl.get(name, '?')})")
    pw[name] = secrets.token_urlsafe(18)
    rl[name] = role
    write_private(passwords_file(root), pw)
    write_private(roles_file(root), rl)
    return pw[name]


def ensure(root: Path | None = None) -> dict[str, str]:
    """Create the default accounts that are missing; returns {name: password} of those created now (else {})."""
    existing = passwords(root)
    return {name: add(name, role, root) for name, role in DEFAULT_ACCOUNTS.items() if name not in existing}


def notice(created: dict[str, str], root: Path | None = None) -> str:
    """The one-time notice (passwords shown only in the call that created them)."""
    if not created:
        return (
            f"accounts: {', '.join(f'{n} ({r})' for n, r in roles(root).items())}; passwords in "
            f"{passwords_file(root)} (mode 600)"
        )
    lines = [f"new accounts (shown this once; kept in {passwords_file(root)}, mode 600):"]
    lines += [f"  {name:<10} {roles(root)[name]:<9} {pw}" for name, pw in created.items()]
    return "\n".join(lines)


# MLflow -------------------------------------------------------------------------------------------------------------


def mlflow_auth_ini(database_uri: str) -> str:
    """MLflow's basic-auth config: everyone READ by default, the service account is the admin.

    The admin password is not here: the server takes it from MLFLOW_AUTH_ADMIN_PASSWORD (on its first start).
    A checked password is cached for 5 minutes: without it every request costs a scrypt hash (0.14 s of CPU on
    this 2-core machine); with one server worker a password change or deletion through the API applies at once.
    docker-compose uses the same text (deploy/mlflow-auth.ini; tests/unit/test_compose.py compares them).
    """
    return (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {SERVICE_ACCOUNT}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 300\n"
    )


def mlflow_server_env(root: Path) -> dict[str, str]:
    """Environment of the embedded `mlflow server --app-name basic-auth` (writes its config under ``root``)."""
    ini = root / "mlflow-auth.ini"
    ini.write_text(mlflow_auth_ini(f"sqlite:///{root / 'mlflow-auth.db'}"))
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password(SERVICE_ACCOUNT, root),
        # Flask's session/CSRF key; one worker, so a key per start is enough.
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(24),
    }


def _mlflow_call(base: str, method: str, path: str, body: dict, auth: tuple[str, str]) -> tuple[int, dict]:
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req = urllib.request.Request(
        base.rstrip("/") + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"message": raw[:300].decode(errors="replace")}
    except OSError as exc:
        raise ServiceError(f"MLflow at {base} unreachable while creating accounts: {exc}") from None


def sync_mlflow(
    base_url: str, root: Path | None = None, pw: dict[str, str] | None = None, rl: dict[str, str] | None = None
) -> None:
    """Make MLflow's users those of the accounts file (or ``pw``/``rl``), each with its role's rights.

    Idempotent: a user that exists gets the file's password again; a grant that exists is kept. The service account
    is MLflow's admin, created by the auth app itself from MLFLOW_AUTH_ADMIN_PASSWORD; it makes the others."""
    pw = passwords(root) if pw is None else pw
    rl = roles(root) if rl is None else rl
    admin = (SERVICE_ACCOUNT, pw[SERVICE_ACCOUNT])

    def call(method: str, path: str, body: dict, exists_ok: bool = False) -> dict:
        status, answer = _mlflow_call(base_url, method, path, body, admin)
        if status == 200 or (exists_ok and answer.get("error_code") == "RESOURCE_ALREADY_EXISTS"):
            return answer
        hint = (
            " (the service account's password differs from the one MLflow's admin was created with)"
            if status == 401
            else ""
        )
        raise ServiceError(
            f"MLflow {method} {path} for account {body.get('username')!r}: HTTP {status} "
            f"{answer.get('message', '')[:200]}{hint}"
        )

    for name, secret in pw.items():
        if name == SERVICE_ACCOUNT:
            continue
        _, is_admin, grants = ROLES[rl[name]]
        created = call("POST", "/api/2.0/mlflow/users/create", {"username": name, "password": secret}, True)
        if "user" not in created:
            call("PATCH", "/api/2.0/mlflow/users/update-password", {"username": name, "password": secret})
        if is_admin:
            call("PATCH", "/api/2.0/mlflow/users/update-admin", {"username": name, "is_admin": True})
        for rtype, pattern, perm in grants:
            call(
                "POST",
                "/api/3.0/mlflow/users/permissions/grant",
                {"username": name, "resource_type": rtype, "resource_id": pattern, "permission": perm},
                True,
            )


def init_from_env(passwords_path: Path, mlflow_url: str) -> None:
    """docker-compose's `accounts-init`: the default accounts with passwords from ``<NAME>_ACCOUNT_PASSWORD`` (.env),
    written to Airflow's passwords file (mode 600) and made in MLflow."""
    pw = {}
    for name in DEFAULT_ACCOUNTS:
        var = f"{name.upper()}_ACCOUNT_PASSWORD"
        if not os.environ.get(var):
            raise ServiceError(f"{var} is not set (.env)")
        pw[name] = os.environ[var]
    write_private(passwords_path, pw)
    sync_mlflow(mlflow_url, pw=pw, rl=dict(DEFAULT_ACCOUNTS))
    print(f"accounts {', '.join(pw)} in {passwords_path} and in MLflow at {mlflow_url}")


def airflow_users(rl: dict[str, str]) -> str:
    """[core] simple_auth_manager_users: ``name:airflow-role,...``."""
    return ",".join(f"{name}:{ROLES[role][0]}" for name, role in rl.items())


# Airflow ------------------------------------------------------------------------------------------------------------


def airflow_env(root: Path | None = None) -> dict[str, str]:
    """Environment of every Airflow process devstack starts: the simple auth manager's users and passwords file,
    and the service account's MLflow credentials for the tasks."""
    return {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": airflow_users(roles(root)),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file(root)),
        "MLFLOW_TRACKING_USERNAME": SERVICE_ACCOUNT,
        "MLFLOW_TRACKING_PASSWORD": password(SERVICE_ACCOUNT, root),
    }
