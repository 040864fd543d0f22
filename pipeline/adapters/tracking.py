"""Everything that talks to MLflow: runs, the bag pyfunc, the registry, aliases and tags.

The tracking server comes from ``MLFLOW_TRACKING_URI`` (the Makefile points it at the embedded
server on 127.0.0.1:5000), the account from MLflow's own ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``
or, when no password is set, from the local stack's accounts file (:func:`use_local_account`). The training core
never imports this module.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.adapters.credentials import account, refused, use_local_account
from pipeline.core import settings
from pipeline.core.errors import PipelineError
from pipeline.core.names import encode_key

_logger = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the `pipeline` package
# What a registered model ships as code: the torch-only core and the pyfunc wrapper, nothing else
# (no stages, no Airflow/DVC adapters, no local-stack harness). tests/integration checks the artifact's file list.
MODEL_CODE = ("__init__.py", "core", "adapters/__init__.py", "adapters/serving.py")


class TrackingError(PipelineError):
    """The MLflow server is unreachable or refused a request."""

    transient = True


class NotInRegistry(PipelineError):
    """The registry itself answered that the model, version, alias or run does not exist (final, not retried)."""


def is_missing(exc: MlflowException) -> bool:
    """The registry's own "no such thing": a missing resource, or an alias it reports as not found."""
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        exc.error_code == "INVALID_PARAMETER_VALUE" and "not found" in exc.message
    )


@contextmanager
def registry_errors(what: str):
    """One mapping of MLflow failures for every registry read: the registry's "no such thing" →
    :class:`NotInRegistry`; a refused account → :class:`PipelineError` naming it; anything else (a 5xx, a
    connection that fails after the probe) → :class:`TrackingError`, transient. An outage never reads as "not found".
    """
    try:
        yield
    except MlflowException as exc:
        first = exc.message.splitlines()[0][:300] if exc.message else type(exc).__name__
        if is_missing(exc):
            raise NotInRegistry(f"{what} not found in the registry at {mlflow.get_tracking_uri()} ({first})") from None
        if refused(exc) in (401, 403):
            raise PipelineError(f"{what}: the MLflow server refused account {account()} ({first})") from None
        raise TrackingError(f"cannot read {what} at {mlflow.get_tracking_uri()}: {first}") from None
    except (OSError, ConnectionError) as exc:
        raise TrackingError(
            f"cannot read {what}: cannot reach the MLflow server at {mlflow.get_tracking_uri()} ({type(exc).__name__})"
        ) from None


def connect(experiment: str) -> MlflowClient:
    client = connect_registry()
    mlflow.set_experiment(experiment)
    return client


def connect_registry() -> MlflowClient:
    """A client for the tracking server, checked once so an unreachable server gives one clear line."""
    use_local_account()
    uri = mlflow.get_tracking_uri()
    client = MlflowClient()
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:
        if refused(exc) == 401:
            raise PipelineError(
                f"the MLflow server at {uri} refused account {account()} (HTTP 401): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or run where "
                "PIPELINE_LOCAL holds the stack's accounts.json)"
            ) from None
        raise TrackingError(
            f"cannot reach the MLflow server at {uri} ({type(exc).__name__}); is it running? "
            "`make services-up` starts the embedded one; MLFLOW_TRACKING_URI selects another"
        ) from None
    return client


def version_by_candidate(client: MlflowClient, name: str, candidate_id: str):
    """The registered version built from exactly these model files, if any (makes register idempotent)."""
    try:  # an unreachable server raises: never guess "not registered" (that would register twice)
        with registry_errors(f"versions of {name}"):
            versions = client.search_model_versions(f"name = {_literal(name)}")
    except NotInRegistry:
        return None
    for v in versions:
        if v.tags.get("candidate_id") == candidate_id:
            return v
    return None


OWNER_TAG = "pipeline_experiment"


def claim_model(client: MlflowClient, name: str, experiment: str) -> None:
    """Refuse to register into a model this pipeline does not own. The service account is MLflow's admin, and a
    trigger may pick ``registry.model_name``: without this, a run could take over another team's model. A new
    name is created here with the owner tag; a model from before the tag is adopted when every version of it
    carries the gate's decision (only the register stage writes those)."""
    try:
        with registry_errors(f"registered model {name}"):
            model = client.get_registered_model(name)
    except NotInRegistry:
        with registry_errors(f"registered model {name}"):
            client.create_registered_model(name, tags={OWNER_TAG: experiment})
        return
    owner = model.tags.get(OWNER_TAG)
    if owner is None:
        with registry_errors(f"versions of {name}"):
            versions = client.search_model_versions(f"name = {_literal(name)}")
        if versions and all(v.tags.get("gate") for v in versions):  # an empty model proves nothing
            client.set_registered_model_tag(name, OWNER_TAG, experiment)
            return
    if owner != experiment:
        raise PipelineError(
            f"registered model {name!r} belongs to {owner or 'no pipeline'} (tag {OWNER_TAG}), not "
            f"to experiment {experiment!r}: registry.model_name must name a new model or one of "
            "this pipeline's own"
        )


def version_by_alias(client: MlflowClient, name: str, alias: str):
    """The version ``alias`` points at; None only when the registry says there is none.

    "None" is a decision (the gate promotes a first champion), so only the registry's own answer counts: no
    such model (``RESOURCE_DOES_NOT_EXIST``) or no such alias (``INVALID_PARAMETER_VALUE``, "alias … not
    found"). Anything else, an unreachable server included, is a :class:`TrackingError` (transient): the
    stage fails and is retried, and no alias moves.
    """
    try:  # anything but the registry's own answer raises: never guess "no champion" (that would promote any candidate)
        with registry_errors(f"alias {alias} of {name}"):
            return client.get_model_version_by_alias(name, alias)
    except NotInRegistry:
        return None


@dataclass(frozen=True)
class ChampionReport:
    """The champion's label-issue report and the split it was scored on (stage ``label_exclusions``)."""

    version: str
    run_id: str
    issues: list[dict[str, str]]  # rows of its run artifact reports/label_issues.csv
    split_rows: list[dict[str, str]]  # rows of its run artifact split.csv (path -> sha256)


LABEL_ISSUES_ARTIFACT = "reports/label_issues.csv"  # register logs reports/ (and data/split.csv at the root)
SPLIT_ARTIFACT = "split.csv"


def champion_label_issues(name: str) -> ChampionReport | None:
    """The label-issue report of ``name``'s champion; None only when the registry says there is no champion.

    Fails closed: an unreachable server, a refused request or a failed download is a :class:`TrackingError`
    (the stage fails and is retried), never "no exclusions". A champion registered before the label_issues stage
    existed has no report: that is the registry's own answer, so it gives an empty report and a warning.
    """
    from pipeline.core.io import read_csv

    client = connect_registry()
    champion = version_by_alias(client, name, "champion")
    if champion is None:
        return None
    version, run_id = str(champion.version), champion.run_id
    try:
        listed = {a.path for a in client.list_artifacts(run_id, "reports")}
    except Exception as exc:
        raise TrackingError(
            f"cannot list the artifacts of {name} v{version} (run {run_id}) at "
            f"{mlflow.get_tracking_uri()} ({type(exc).__name__})"
        ) from None
    if LABEL_ISSUES_ARTIFACT not in listed:
        _logger.warning(
            "%s v%s (run %s) has no %s (registered before the label_issues stage): nothing to exclude",
            name,
            version,
            run_id,
            LABEL_ISSUES_ARTIFACT,
        )
        return ChampionReport(version, run_id, [], [])
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for artifact in (LABEL_ISSUES_ARTIFACT, SPLIT_ARTIFACT):
            try:
                files[artifact] = Path(
                    mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tmp)
                )
            except Exception as exc:
                raise TrackingError(
                    f"cannot download {artifact} of {name} v{version} (run {run_id}) from "
                    f"{mlflow.get_tracking_uri()} ({type(exc).__name__})"
                ) from None
        return ChampionReport(version, run_id, read_csv(files[LABEL_ISSUES_ARTIFACT]), read_csv(files[SPLIT_ARTIFACT]))


# Mappings keyed by data (class names) are logged as one JSON-valued param each: readable in the UI, and a valid
# key whatever the names hold. Every other key part goes through names.encode_key (config field names and
# timm backbone names pass unchanged).
JSON_PARAMS = frozenset({"train.flip_policy"})
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value


def config_params(cfg_dict: dict) -> dict[str, str]:
    """The params a run logs for a resolved config (``Config.to_dict()``): dotted keys MLflow accepts."""
    return {k: v[:MAX_PARAM_VALUE] for k, v in _flatten(cfg_dict).items()}


def trained_params(meta: dict) -> dict[str, str]:
    """The params of one trained network's nested run: its ``meta.json`` less the class list, dicts as JSON."""
    return {encode_key(k): _param_value(v)[:MAX_PARAM_VALUE] for k, v in meta.items() if k != "class_names"}


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{encode_key(str(k))}"
        if isinstance(v, dict) and v and key not in JSON_PARAMS:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = _param_value(v)
    return out


def _param_value(v) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (list, tuple, dict)) else str(v)


def _finite(metrics: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _log_params(client: MlflowClient, run_id: str, cfg_dict: dict) -> None:
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in config_params(cfg_dict).items()]
    for i in range(0, len(params), 90):  # the server caps one batch at 100 params
        client.log_batch(run_id, params=params[i : i + 90])


def open_pipeline_run(experiment: str, cfg_dict: dict, run_name: str, tags: dict[str, str]) -> str:
    """The parent run of one pipeline execution, opened when the execution starts; returns its id.

    The DAG passes the id to the stages as ``PIPELINE_PARENT_RUN_ID``; ``register`` logs into it.
    """
    client = connect(experiment)
    exp = client.get_experiment_by_name(experiment)
    run = client.create_run(exp.experiment_id, run_name=run_name, tags=tags)
    _log_params(client, run.info.run_id, cfg_dict)
    return run.info.run_id


def close_pipeline_run(run_id: str, status: str, tags: dict[str, str]) -> None:
    """End the parent run with ``FINISHED`` or ``FAILED`` and a few outcome tags."""
    client = connect_registry()
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v)[:5000])
    client.set_terminated(run_id, status=status)


def log_candidate(
    *,
    cfg_dict: dict,
    candidate_id: str,
    metrics: dict,
    member_dirs: list[Path],
    artifact_paths: list[Path],
    dataset_frame,
    dataset_source: str,
    lineage: dict[str, str],
    input_example,
    model_name: str,
    backbone_dirs: dict[str, Path] | None = None,
    parent_run_id: str | None = None,
    calibration_fp: Path | None = None,
    artifact_texts: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Log into the execution's parent run (``parent_run_id``, or a new one): config, metrics, artifacts
    (``artifact_texts``: artifact path -> exact text, e.g. the stored ``lineage/dvc.lock``), lineage, a nested run
    per backbone and per bag member; register the bag (with ``calibration_fp`` as its ``calibration`` artifact, so
    served confidences are calibrated). Returns (run_id, version)."""
    from mlflow.models import infer_signature

    from pipeline.adapters.serving import CALIBRATION_ARTIFACT, BagModel

    start = (
        mlflow.start_run(run_id=parent_run_id)
        if parent_run_id
        else mlflow.start_run(run_name=f"pipeline-{candidate_id[:8]}")
    )
    with start as run:
        mlflow.set_tag("candidate_id", candidate_id)
        _log_params(MlflowClient(), run.info.run_id, cfg_dict)
        mlflow.log_metrics({f"test_{k}": v for k, v in _finite(metrics).items()})
        mlflow.log_metrics({f"val_{k}": v for k, v in _finite(metrics.get("val", {})).items()})
        for group in ("members", "backbones"):
            for who, scores in metrics.get(group, {}).items():
                mlflow.log_metrics({f"test_{encode_key(who)}_{k}": v for k, v in _finite(scores).items()})
        for path in artifact_paths:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            elif path.exists():
                mlflow.log_artifact(str(path))
        for artifact_file, text in (artifact_texts or {}).items():
            mlflow.log_text(text, artifact_file)
        dataset = mlflow.data.from_pandas(dataset_frame, source=dataset_source, name="split", targets="class_name")
        mlflow.log_input(dataset, context="training", tags=lineage)
        for name, d in (backbone_dirs or {}).items():
            _log_trained(d, f"backbone-{name}", "backbone", metrics.get("backbones", {}).get(name, {}))
        for d in member_dirs:
            _log_trained(d, d.name, "bag_member", metrics.get("members", {}).get(d.name, {}))
        output = input_example.assign(
            label=["x"] * len(input_example), confidence=[0.5] * len(input_example), error=[""] * len(input_example)
        )[["label", "confidence", "error"]]
        artifacts = {d.name: str(d) for d in member_dirs}
        if calibration_fp is not None and calibration_fp.exists():
            artifacts[CALIBRATION_ARTIFACT] = str(calibration_fp)
        with tempfile.TemporaryDirectory() as code_root:
            info = mlflow.pyfunc.log_model(
                name="bag",
                python_model=BagModel(),
                artifacts=artifacts,
                code_paths=[str(model_code(Path(code_root)))],
                signature=infer_signature(input_example, output, params={"tta": True}),
                input_example=input_example,
                pip_requirements=_requirements(),
            )
        # The version is created with its candidate tag in one request: a retry after a crash finds it by that
        # tag and finishes it, instead of registering a second version of the same files.
        registered = mlflow.register_model(
            info.model_uri, model_name, await_registration_for=120, tags={"candidate_id": candidate_id}
        )
        return run.info.run_id, str(registered.version)


def model_code(root: Path) -> Path:
    """Copy :data:`MODEL_CODE` into ``root/pipeline`` (the folder MLflow ships as the model's code)."""
    dst = root / "pipeline"
    for rel in MODEL_CODE:
        src = PACKAGE_DIR / rel
        if src.is_dir():
            shutil.copytree(src, dst / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _log_trained(model_dir: Path, run_name: str, role: str, test_scores: dict) -> None:
    """A nested run for one trained network: its settings, per-epoch metrics, test scores and files."""
    meta = json.loads((model_dir / "meta.json").read_text(encoding="utf-8"))
    history = json.loads((model_dir / "history.json").read_text())
    with mlflow.start_run(run_name=run_name, nested=True, tags={"role": role}):
        mlflow.log_params(trained_params(meta))
        for row in history:
            step = int(row["epoch"])
            mlflow.log_metrics({k: v for k, v in _finite(row).items() if k != "epoch"}, step=step)
        mlflow.log_metrics({f"test_{k}": v for k, v in _finite(test_scores).items()})
        # Settings and curves only: the weights live once in the registered bag (and in the DVC cache).
        for name in ("meta.json", "history.json"):
            mlflow.log_artifact(str(model_dir / name), artifact_path="model_files")


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{p}=={version(p)}"
        for p in (
            "torch",
            "torchvision",
            "timm",
            "pillow",
            "numpy",
            "pandas",
            "mlflow",
            "scikit-learn",
            "PyYAML",
            "tqdm",
        )
    ]


def log_files(client: MlflowClient, run_id: str, files: list[Path], artifact_path: str) -> None:
    """Upload local files into ``artifact_path`` of a run (an existing file of the same name is replaced)."""
    for fp in files:
        if fp.exists():
            client.log_artifact(run_id, str(fp), artifact_path)


VALIDATION_ARTIFACTS = "validation"  # a DAG run's quarantine list and Data Docs, in its parent run


def archive_validation(run_id: str, quarantine: Path, data_docs: Path) -> None:
    """This DAG run's quarantine list and GX Data Docs into its parent run (``validation/``): the workspace holds
    only the newest run's files, the run keeps its own for the operator's view (``plugins/defect_models.py``)."""
    client = connect_registry()
    client.log_artifact(run_id, str(quarantine), VALIDATION_ARTIFACTS)
    if data_docs.is_dir():
        client.log_artifacts(run_id, str(data_docs), f"{VALIDATION_ARTIFACTS}/data_docs")


def archived_validation_file(run_id: str, rel: str, dst: Path) -> Path:
    """``validation/<rel>`` of parent run ``run_id`` (see :func:`archive_validation`) into folder ``dst``."""
    connect_registry()
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{VALIDATION_ARTIFACTS}/{rel}", dst_path=str(dst)
            )
        )
    except MlflowException as exc:
        raise TrackingError(
            f"run {run_id}: {VALIDATION_ARTIFACTS}/{rel}: {exc.message.splitlines()[0][:300]}"
        ) from None


MODEL_URI_SCHEMES = ("models:/", "runs:/")


def load_bag(uri: str, device=None):
    """The bag behind an MLflow model URI (``models:/…`` or ``runs:/…``), rebuilt from its files without
    unpickling anything (:func:`pipeline.adapters.serving.load_bag_files`). Files are downloaded to a temporary
    folder and gone when this returns; the weights stay in memory."""
    from pipeline.adapters.serving import load_bag_files

    if not uri.startswith(MODEL_URI_SCHEMES):
        raise PipelineError(f"model URI {uri!r}: only models:/name@alias, models:/name/N or runs:/<run>/<path>")
    with tempfile.TemporaryDirectory(prefix="bag-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except MlflowException as exc:
            raise TrackingError(f"cannot download model {uri}: {exc.message.splitlines()[0]}") from None
        try:
            return load_bag_files(Path(local), device)
        except ValueError as exc:
            raise PipelineError(f"{uri} is not a bag model from this pipeline: {exc}") from None


def resolve_model_uri(uri: str) -> tuple[str, str, str]:
    """``models:/name@alias`` or ``models:/name/N`` → (name, version, run_id); other URIs → ("", "", "")."""
    if not uri.startswith("models:/"):
        return "", "", ""
    ref = uri[len("models:/") :].strip("/")
    client = connect_registry()
    with registry_errors(f"model {uri}"):
        if "@" in ref:
            name, alias = ref.split("@", 1)
            v = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = ref.rpartition("/")
            v = client.get_model_version(name, number)
    return v.name, str(v.version), v.run_id or ""


def finish_version(
    client: MlflowClient, name: str, version: str, tags: dict[str, str], description: str, promote: bool
) -> str | None:
    """Tag and describe ``version``, then switch aliases. Returns the previous champion's version, if any."""
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    client.update_model_version(name, version, description=description)
    previous = version_by_alias(client, name, "champion")
    if promote:
        if previous is not None and previous.version != version:
            client.set_registered_model_alias(name, "previous_champion", previous.version)
        # One alias write is the switch: readers see the old champion or the new one, never neither.
        client.set_registered_model_alias(name, "champion", version)
    else:
        client.set_registered_model_alias(name, "challenger", version)
    return previous.version if previous is not None else None


def git_commit(home: str | None) -> str:
    """HEAD of the checkout, ``-dirty`` when tracked files other than ``params.yaml`` and ``dvc.lock`` differ
    (a profile or ``dvc exp run -S`` edits those two, and the version stores both itself)."""
    import subprocess

    home = home or str(settings.home())
    try:
        sha = subprocess.run(
            ["git", "-C", home, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                home,
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(exclude)params.yaml",
                ":(exclude)dvc.lock",
            ],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def get_version(name: str, version: str):
    """One registered version (tags, run id), or a :class:`PipelineError` naming what is missing."""
    client = connect_registry()
    with registry_errors(f"model {name!r} version {version}"):
        return client.get_model_version(name, str(version))


def versions_tagged(name: str, key: str, value: str) -> list:
    """Versions of ``name`` whose tag ``key`` equals ``value``, newest first (none when the model is unknown)."""
    client = connect_registry()
    try:
        with registry_errors(f"versions of {name}"):
            versions = client.search_model_versions(f"name = {_literal(name)}")
    except NotInRegistry:
        return []
    return sorted((v for v in versions if v.tags.get(key) == value), key=lambda v: -int(v.version))


def download_artifact(run_id: str, path: str, dst: Path) -> Path:
    """Artifact ``path`` of run ``run_id`` into folder ``dst``; a missing one is a :class:`PipelineError`."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))
    except Exception as exc:
        raise PipelineError(
            f"run {run_id} has no artifact {path} ({type(exc).__name__}); the version was "
            "registered before lineage was stored, or its artifacts were deleted"
        ) from None


# --- the operator's view: links into the MLflow UI (Airflow extra links, the "Defect models" page) -------------


def ui_base() -> str:
    """The MLflow UI as a browser reaches it: ``PIPELINE_MLFLOW_UI_URL``, else the tracking server itself."""
    return (settings.mlflow_ui_url() or mlflow.get_tracking_uri()).rstrip("/")


def version_ui_url(name: str, version: str) -> str:
    from urllib.parse import quote

    return f"{ui_base()}/#/models/{quote(name, safe='')}/versions/{quote(str(version), safe='')}"


def run_ui_url(run_id: str) -> str:
    """The run's page (MLflow's UI addresses a run through its experiment, so the server is asked for it)."""
    try:
        run = connect_registry().get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"run {run_id}: {exc.message.splitlines()[0]}") from None
    return f"{ui_base()}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def runs_of_dag_run(dag_id: str, run_id: str) -> list:
    """MLflow parent runs that ``start_tracking`` opened for one Airflow DAG run (tags, newest first)."""
    client = connect_registry()
    filt = f"tags.airflow_dag_id = {_literal(dag_id)} and tags.airflow_run_id = {_literal(run_id)}"
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=filt,
        order_by=["attributes.start_time DESC"],
        max_results=5,
    )


def nested_run(parent_run_id: str, role: str, run_name: str):
    """The nested run ``run_name`` with tag ``role`` under ``parent_run_id``, or None (not logged yet)."""
    client = connect_registry()
    parent = client.get_run(parent_run_id)
    filt = (
        f"tags.mlflow.parentRunId = {_literal(parent_run_id)} and tags.role = {_literal(role)} "
        f"and attributes.run_name = {_literal(run_name)}"
    )
    found = client.search_runs([parent.info.experiment_id], filter_string=filt, max_results=1)
    return found[0] if found else None


def registered_models_overview(max_versions: int) -> list[dict]:
    """Each registered model: its aliases and its newest versions with their tags and the run's Airflow ids."""
    client = connect_registry()
    out = []
    for model in client.search_registered_models(order_by=["name ASC"]):
        versions = sorted(
            client.search_model_versions(f"name = {_literal(model.name)}"), key=lambda v: -int(v.version)
        )[:max_versions]
        rows = []
        for v in versions:
            try:
                run_tags = client.get_run(v.run_id).data.tags if v.run_id else {}
            except MlflowException:
                run_tags = {}
            rows.append(
                {
                    "version": v.version,
                    "tags": dict(v.tags),
                    "run_id": v.run_id,
                    "airflow_dag_id": run_tags.get("airflow_dag_id", ""),
                    "airflow_run_id": run_tags.get("airflow_run_id", ""),
                    "url": version_ui_url(model.name, v.version),
                }
            )
        aliases = client.get_registered_model(model.name).aliases  # a search result may leave them out
        out.append({"name": model.name, "aliases": dict(aliases or {}), "versions": rows})
    return out


def _literal(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter, quotes included. MLflow's parser has no escapes
    (a backslash stays in the value): a value with ``'`` goes in double quotes; one with both kinds is refused."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise PipelineError(f"{value!r} holds both quote characters: an MLflow search cannot name it")


def run_params(run_id: str) -> dict[str, str]:
    """The params a run logged (e.g. ``data.landing_uri`` of the pipeline run behind a version)."""
    client = connect_registry()
    with registry_errors(f"run {run_id}"):
        return dict(client.get_run(run_id).data.params)
