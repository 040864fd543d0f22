"""Static checks of docker-compose.yaml and the Dockerfile. There is no Docker engine here, so nothing is started.

* The file is valid against the Compose Specification JSON schema (vendored as compose_spec.json; its source and
  version are in docs/DEPLOY.md), after ``${VAR...}`` interpolation as ``docker compose config`` does it.
* Images pinned, a health check on every service, credentials only as ``${VAR:?message}``, ports on 127.0.0.1.
* The commands are those of the embedded setup (devstack/services.py), and queue ``gpu`` goes to the GPU worker.
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from devstack import services
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

SCHEMA_FILE = Path(__file__).with_name("compose_spec.json")
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PROJECT_IMAGE = f"wallpaper-defect-pipeline:{PROJECT_VERSION}"
CREDENTIAL_WORDS = ("PASSWORD", "SECRET", "KEY", "TOKEN")

# Compose's interpolation: `$$` is a literal `$`; ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error},
# ${NAME?error}, ${NAME:+alt}, ${NAME+alt} and $NAME.
INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_]\w*))"
)
REQUIRED_VAR = re.compile(r"\$\{[A-Za-z_]\w*:\?[^}]+\}")  # ${NAME:?message}, the only form allowed for secrets
# scheme://user:password@ where the password is an interpolation (it may hold spaces) or a literal.
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@]*:(?P<password>\$\{[^}]*\}|[^\s/@]*)@")

# Compose service -> its role in devstack.services.airflow_role_args.
AIRFLOW_ROLE_OF_SERVICE = {
    "airflow-apiserver": "airflow-api-server",
    "airflow-scheduler": "airflow-scheduler",
    "airflow-dag-processor": "airflow-dag-processor",
    "airflow-triggerer": "airflow-triggerer",
}
WORKER_QUEUE = {"airflow-worker": "default", "airflow-worker-gpu": "gpu"}
HEALTHCHECK_HAS = {
    "postgres": "pg_isready",
    "redis": "redis-cli ping",
    "airflow-apiserver": "/api/v2/monitor/health",
    "airflow-scheduler": "airflow jobs check --job-type SchedulerJob --local",
    "airflow-dag-processor": "airflow jobs check --job-type DagProcessorJob --local",
    "airflow-triggerer": "airflow jobs check --job-type TriggererJob --local",
    "airflow-worker": "celery --app airflow.providers.celery.executors.celery_executor.app inspect ping "
    '-d "celery@$${HOSTNAME}"',
    "airflow-worker-gpu": "celery --app airflow.providers.celery.executors.celery_executor.app inspect ping "
    '-d "celery@$${HOSTNAME}"',
}


def load_compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def strings(node):
    """Every string value in a YAML tree (keys excluded, as compose does not interpolate them)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def interpolations(doc: dict) -> list[re.Match]:
    return [m for s in strings(doc) for m in INTERPOLATION.finditer(s) if not m["escaped"]]


def interpolate(node, env: dict[str, str]):
    def substitute(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name, op, arg = m["name"] or m["bare"], m["op"], m["arg"]
        value, is_set = env.get(name, ""), name in env
        if op in (":?", "?") and not (value if op == ":?" else is_set):
            raise ValueError(f"required variable {name} is missing: {arg}")
        if op == ":-":
            return value or arg
        if op == "-":
            return value if is_set else arg
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if is_set else ""
        return value

    if isinstance(node, str):
        return INTERPOLATION.sub(substitute, node)
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    return node


def dummy_env(doc: dict) -> dict[str, str]:
    return {m["name"] or m["bare"]: "dummy0123456789abcdef" for m in interpolations(doc)}


def schema_errors(doc: dict) -> list[str]:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft7Validator.check_schema(schema)  # the spec is draft-07 (its "$schema" URL lacks the '#')
    resolved = interpolate(doc, dummy_env(doc))
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(resolved)
    ]


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):  # the `- KEY=value` form
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def credential_problems(doc: dict) -> list[str]:
    """Secrets appear only as ${VAR:?message}: in credential-named variables, in URLs and after --*pass* flags."""
    problems = []
    for m in interpolations(doc):
        name = m["name"] or m["bare"]
        if any(word in name.upper() for word in CREDENTIAL_WORDS) and (m["op"] != ":?" or not m["arg"]):
            problems.append(f"{m[0]}: a credential must be ${{{name}:?message}} (no default, no empty check)")
    for name, svc in doc["services"].items():
        for key, value in environment(svc).items():
            if any(word in key.upper() for word in CREDENTIAL_WORDS) and not REQUIRED_VAR.fullmatch(str(value)):
                problems.append(f"{name}: environment {key} is not a ${{VAR:?message}} interpolation")
        # A process's arguments are public (ps, /proc/*/cmdline, docker inspect): no secret in a command line, not
        # even as an interpolation; it travels in the environment and the program (or its entrypoint) reads it.
        for field in ("command", "entrypoint"):
            for text in strings(svc.get(field) or []):
                for m in INTERPOLATION.finditer(text):
                    if not m["escaped"] and any(w in (m["name"] or m["bare"] or "").upper() for w in CREDENTIAL_WORDS):
                        problems.append(f"{name}: {field} puts {m[0]} on the command line")
                if URL_PASSWORD.search(text) or re.search(r"(^|\s)--?\w*(pass|secret|token)\w*", text, re.I):
                    problems.append(f"{name}: {field} passes a password flag or URL: {text[:60]}")
    for s in strings(doc):
        for m in URL_PASSWORD.finditer(s):
            if not REQUIRED_VAR.fullmatch(m["password"]):
                problems.append(f"a URL holds a password that is not a ${{VAR:?message}} interpolation: {s}")
    return problems


def airflow_services(doc: dict) -> dict[str, dict]:
    return {name: svc for name, svc in doc["services"].items() if name.startswith("airflow-")}


def worker_queues(svc: dict) -> set[str]:
    command = svc.get("command", [])
    if "--queues" not in command:
        return set()
    return set(command[command.index("--queues") + 1].split(","))


# (a) the Compose Specification ---------------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification():
    assert schema_errors(load_compose()) == []


def _unknown_top_level_key(doc):
    doc["servicez"] = {}


def _misspelt_service_key(doc):
    doc["services"]["redis"]["healthckeck"] = doc["services"]["redis"].pop("healthcheck")


def _depends_on_wrong_type(doc):
    doc["services"]["mlflow"]["depends_on"] = 42


def _gpu_capabilities_not_a_list(doc):
    doc["services"]["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"


@pytest.mark.parametrize(
    "mutate", [_unknown_top_level_key, _misspelt_service_key, _depends_on_wrong_type, _gpu_capabilities_not_a_list]
)
def test_schema_check_rejects_an_invalid_file(mutate):
    doc = copy.deepcopy(load_compose())
    mutate(doc)
    assert schema_errors(doc)


def test_a_missing_required_variable_stops_interpolation():
    doc = load_compose()
    env = dummy_env(doc)
    del env["POSTGRES_PASSWORD"]
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        interpolate(doc, env)


# (b) pinned images ---------------------------------------------------------------------------------------------


def test_every_image_is_pinned_to_a_version_tag():
    doc = load_compose()
    official = {"postgres": "postgres:", "redis": "redis:", "seaweedfs": "chrislusf/seaweedfs:"}
    for name, svc in doc["services"].items():
        image = interpolate(svc.get("image", ""), {})  # the defaults: what a user with a registry pulls
        if name in official:  # a variable (a machine without a registry sets a stand-in), the official default
            assert svc["image"].startswith("${PIPELINE_") and image.startswith(official[name]), (name, svc["image"])
        m = re.fullmatch(r"[a-z0-9][a-z0-9._/-]*:(?P<tag>[\w][\w.-]*)", image)
        assert m and re.search(r"\d", m["tag"]) and "latest" not in m["tag"], (name, image)
    built = {name: svc["image"] for name, svc in doc["services"].items() if "build" in svc}
    assert list(built.values()) == [PROJECT_IMAGE], "exactly one service builds the project image"
    project_image_users = {name for name, svc in doc["services"].items() if svc["image"] == PROJECT_IMAGE}
    assert project_image_users == {"mlflow", "accounts-init", *airflow_services(doc)}


# (c) health checks ---------------------------------------------------------------------------------------------


def test_every_service_has_a_health_check():
    for name, svc in load_compose()["services"].items():
        check = svc.get("healthcheck", {})
        assert not check.get("disable") and check.get("test"), name
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (name, test)
        if name in HEALTHCHECK_HAS:
            assert HEALTHCHECK_HAS[name] in " ".join(test[1:]), (name, test)


# (d) credentials -----------------------------------------------------------------------------------------------


def test_credentials_are_required_variables_never_literals_or_defaults():
    assert credential_problems(load_compose()) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda doc: doc["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="airflow"),
        lambda doc: doc["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-pw}"),
        lambda doc: doc["services"]["mlflow"]["command"].extend(
            ["--backend-store-uri", "postgresql://mlflow:${MLFLOW_DB_PASSWORD:?x}@postgres/m"]
        ),
        lambda doc: doc["services"]["redis"].__setitem__(
            "command", ["redis-server", "--requirepass", "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}"]
        ),
    ],
    ids=["literal", "default", "url-in-command", "flag"],
)
def test_credential_check_catches_a_leak(mutate):
    doc = copy.deepcopy(load_compose())
    mutate(doc)
    assert credential_problems(doc)


def test_env_example_lists_every_required_variable_with_an_empty_value():
    required = {m["name"] for m in interpolations(load_compose()) if m["op"] == ":?"}
    lines = [line for line in (ROOT / ".env.example").read_text().splitlines() if line and not line.startswith("#")]
    example = dict(line.split("=", 1) for line in lines)
    assert set(example) == required
    assert all(value == "" for value in example.values())


# (e) published ports -------------------------------------------------------------------------------------------


def test_published_ports_bind_loopback_only():
    for name, svc in load_compose()["services"].items():
        assert svc.get("network_mode") != "host", name
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)
                assert re.fullmatch(r"127\.0\.0\.1:\d+:\d+", interpolate(str(port), {})), (name, port)


def test_every_airflow_role_mounts_the_plugins_folder_where_airflow_looks_for_it():
    """The operator's view (plugins/defect_models.py): the api-server serves its page, every role can import its
    link classes; mounted at the image's AIRFLOW__CORE__PLUGINS_FOLDER, read-only."""
    folder = re.search(r"AIRFLOW__CORE__PLUGINS_FOLDER=(\S+)", (ROOT / "Dockerfile").read_text()).group(1)
    for name, svc in load_compose()["services"].items():
        if name.startswith("airflow-"):
            assert f"./plugins:{folder}:ro" in svc.get("volumes", []), name


def test_volumes_are_named_and_the_only_bind_mount_is_the_read_only_postgres_init_script():
    doc = load_compose()
    for name, svc in doc["services"].items():
        for volume in svc.get("volumes", []):
            source, target, *mode = volume.split(":")
            if source == "./plugins":  # the Airflow plugin folder, read-only (next test)
                assert mode == ["ro"], (name, volume)
            elif source.startswith((".", "/")):
                assert source.startswith("./deploy/") and mode == ["ro"], (name, volume)
                assert (ROOT / source).is_file(), (name, volume)
            else:
                assert source in doc["volumes"], (name, volume)


# (f) commands = the embedded setup's ---------------------------------------------------------------------------


def test_airflow_role_commands_match_the_embedded_setup():
    doc = load_compose()
    roles = services.airflow_role_args("0.0.0.0", 8080)
    assert set(AIRFLOW_ROLE_OF_SERVICE.values()) == set(roles) == set(services.AIRFLOW_ROLES)
    for name, role in AIRFLOW_ROLE_OF_SERVICE.items():
        assert doc["services"][name]["command"] == ["airflow", *roles[role]], name
    assert interpolate(doc["services"]["airflow-apiserver"]["ports"], {}) == ["127.0.0.1:8080:8080"]


def test_celery_worker_commands_match_the_embedded_worker_but_split_its_queues():
    """Embedded: one worker takes `default,gpu`. Compose: the same command, one queue per worker service."""
    doc = load_compose()
    embedded = services.CELERY_WORKER_ARGS
    queues_at = embedded.index("--queues") + 1
    for name, queue in WORKER_QUEUE.items():
        expected = [*embedded[:queues_at], queue, *embedded[queues_at + 1 :]]
        assert doc["services"][name]["command"] == ["airflow", *expected], name
    assert set(WORKER_QUEUE.values()) == set(embedded[queues_at].split(","))


def test_mlflow_command_matches_the_embedded_server_on_postgres():
    doc = load_compose()
    command = doc["services"]["mlflow"]["command"]
    backend = doc["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]  # not an argument: see (d)
    assert command == ["mlflow", *services.mlflow_server_args(None, "0.0.0.0", 5000)]
    url = urlsplit(interpolate(backend, dummy_env(doc)))
    assert (url.scheme, url.username, url.hostname, url.path) == (
        "postgresql+psycopg2",
        "mlflow",
        "postgres",
        "/mlflow",
    )  # psycopg 3 is not installed
    assert interpolate(doc["services"]["mlflow"]["ports"], {}) == ["127.0.0.1:5000:5000"]


def test_airflow_init_runs_what_migrate_airflow_runs():
    """migrate_airflow's `airflow` sub-commands (its list literals) are airflow-init's `&&`-joined commands."""
    tree = ast.parse(inspect.getsource(services.migrate_airflow))
    embedded = [
        [elt.value for elt in node.elts]
        for node in ast.walk(tree)
        if isinstance(node, ast.List)
        and node.elts
        and all(isinstance(elt, ast.Constant) and isinstance(elt.value, str) for elt in node.elts)
    ]
    assert ["db", "migrate"] in embedded and any(cmd[:2] == ["pools", "set"] for cmd in embedded)
    shell, flags, script = load_compose()["services"]["airflow-init"]["command"]
    assert shell == "bash" and flags.startswith("-")
    assert [shlex.split(part) for part in script.split("&&")] == [["airflow", *cmd] for cmd in embedded]


def test_pool_and_buckets_are_the_pipelines():
    doc = load_compose()
    init_script = doc["services"]["airflow-init"]["command"][-1]
    assert f"airflow pools set {_dag_constant('POOL').value} 1 " in init_script
    assert f"-bucket={','.join(services.BUCKETS)}" in doc["services"]["seaweedfs"]["command"]


def _dag_constant(name: str):
    tree = ast.parse((ROOT / "dags" / "defect_training.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node.value
    raise AssertionError(f"{name} not found in dags/defect_training.py")


def test_airflow_services_share_one_celery_configuration():
    doc = load_compose()
    envs = {name: environment(svc) for name, svc in airflow_services(doc).items()}
    assert set(envs) == {"airflow-init", *AIRFLOW_ROLE_OF_SERVICE, *WORKER_QUEUE}
    shared = (
        "AIRFLOW__CORE__EXECUTOR",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CELERY__BROKER_URL",
        "AIRFLOW__CELERY__RESULT_BACKEND",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__CORE__FERNET_KEY",
        "PIPELINE_GPU_QUEUE",
    )
    for key in shared:
        assert len({env.get(key) for env in envs.values()}) == 1 and envs["airflow-init"].get(key), key
    env = envs["airflow-init"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


# (g) the training queue and the GPU ----------------------------------------------------------------------------


def test_gpu_queue_is_consumed_only_by_the_gpu_worker_which_reserves_a_gpu(monkeypatch):
    from pipeline.adapters import orchestration

    doc = load_compose()
    assert ast.unparse(_dag_constant("GPU_QUEUE")) == "orc.gpu_queue()"
    monkeypatch.delenv("PIPELINE_GPU_QUEUE", raising=False)
    assert orchestration.gpu_queue() == "gpu"
    queue = interpolate(environment(doc["services"]["airflow-worker-gpu"])["PIPELINE_GPU_QUEUE"], {})
    assert queue == "gpu"  # by default; deploy/stack.sh routes to "default" where no GPU worker runs
    consumers = {name for name, svc in airflow_services(doc).items() if queue in worker_queues(svc)}
    assert consumers == {"airflow-worker-gpu"}
    devices = doc["services"]["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in doc["services"]["airflow-worker"]


# The image -----------------------------------------------------------------------------------------------------


def test_dockerfile_pins_its_base_installs_the_constraints_and_drops_root():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", dockerfile, re.M)
    build_args = load_compose()["services"]["mlflow"]["build"]["args"]
    assert interpolate(build_args["PYTHON_IMAGE"], {}).startswith("python:3.11.")
    assert "pip install -c requirements/constraints.txt -e '.[celery]'" in dockerfile
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["celery"]
    pins = {line.strip().lower() for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines()}
    assert all(pin.lower() in pins for pin in extra), extra
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".local", ".git", "data", "models", ".env"} <= ignored


# (h) accounts and roles (devstack/accounts.py) ------------------------------------------------------------------


def test_mlflow_runs_the_basic_auth_app_with_the_embedded_config():
    from devstack import accounts

    doc = load_compose()
    env = environment(doc["services"]["mlflow"])
    assert doc["services"]["mlflow"]["command"][1:4] == ["server", "--app-name", "basic-auth"]
    config = env["MLFLOW_AUTH_CONFIG_PATH"]
    assert (
        config.startswith("/opt/pipeline/")
        and "COPY deploy/mlflow-auth.ini deploy/" in (ROOT / "Dockerfile").read_text()
    )
    text = (ROOT / config.removeprefix("/opt/pipeline/")).read_text()
    body = "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))
    database = re.search(r"^database_uri = (\S+)$", body, re.M).group(1)
    assert body == accounts.mlflow_auth_ini(database)  # default READ, admin = the service account, no password
    assert "password" not in body
    auth_dir = str(Path(database.removeprefix("sqlite:///")).parent)
    assert f"mlflow-auth:{auth_dir}" in doc["services"]["mlflow"]["volumes"]


def test_accounts_are_the_embedded_stacks_with_passwords_from_env():
    from devstack import accounts

    doc = load_compose()
    common = doc["x-airflow-common"]["environment"]
    assert common["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == accounts.airflow_users(accounts.DEFAULT_ACCOUNTS)
    assert common["MLFLOW_TRACKING_USERNAME"] == accounts.SERVICE_ACCOUNT  # the DAG tasks' account
    init = environment(doc["services"]["accounts-init"])
    assert set(init) == {"MLFLOW_TRACKING_URI", *(f"{n.upper()}_ACCOUNT_PASSWORD" for n in accounts.DEFAULT_ACCOUNTS)}
    service_pw = init["PIPELINE_ACCOUNT_PASSWORD"]
    assert common["MLFLOW_TRACKING_PASSWORD"] == service_pw
    assert environment(doc["services"]["mlflow"])["MLFLOW_AUTH_ADMIN_PASSWORD"] == service_pw
    assert doc["services"]["accounts-init"]["command"] == ["python", "-m", "devstack", "accounts-init"]
    assert "airflow-home:/opt/airflow" in doc["services"]["accounts-init"]["volumes"]
    for name in AIRFLOW_ROLE_OF_SERVICE:
        depends = doc["services"][name]["depends_on"]
        assert depends["accounts-init"] == {"condition": "service_completed_successfully"}, name
