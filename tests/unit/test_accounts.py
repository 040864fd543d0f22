"""The stack's accounts file (devstack/accounts.py) and how our commands pick their MLflow account
(pipeline/adapters/credentials.py). No server here: tests/integration/test_roles.py runs the roles against the real
MLflow and Airflow."""

from __future__ import annotations

import stat

import pytest

from devstack import accounts
from pipeline.adapters import credentials
from pipeline.core.errors import PipelineError, ServiceError

pytestmark = pytest.mark.unit


def test_accounts_are_generated_once_into_files_only_the_owner_reads(tmp_path):
    created = accounts.ensure(tmp_path)
    assert set(created) == {"pipeline", "engineer", "auditor"}
    assert len(set(created.values())) == 3 and all(len(pw) >= 20 for pw in created.values())
    for fp in (accounts.passwords_file(tmp_path), accounts.roles_file(tmp_path)):
        assert stat.S_IMODE(fp.stat().st_mode) == 0o600, fp
    assert accounts.passwords(tmp_path) == created
    assert accounts.ensure(tmp_path) == {}  # a second start makes none and keeps the passwords
    assert accounts.passwords(tmp_path) == created
    assert "auditor2" not in accounts.roles(tmp_path)


def test_the_notice_shows_passwords_only_when_they_were_just_made(tmp_path):
    created = accounts.ensure(tmp_path)
    first = accounts.notice(created, tmp_path)
    assert all(pw in first for pw in created.values()) and "shown this once" in first
    later = accounts.notice(accounts.ensure(tmp_path), tmp_path)
    assert not any(pw in later for pw in created.values())
    assert "pipeline (pipeline), engineer (engineer), auditor (auditor)" in later


def test_add_user_gives_a_new_password_and_refuses_duplicates_and_unknown_roles(tmp_path):
    accounts.ensure(tmp_path)
    pw = accounts.add("auditor2", "auditor", tmp_path)
    assert accounts.password("auditor2", tmp_path) == pw and accounts.roles(tmp_path)["auditor2"] == "auditor"
    with pytest.raises(ServiceError, match="already exists"):
        accounts.add("auditor2", "auditor", tmp_path)
    with pytest.raises(ServiceError, match="role 'root' is not one of pipeline, engineer, auditor"):
        accounts.add("eve", "root", tmp_path)
    with pytest.raises(ServiceError, match="account name"):
        accounts.add("a:b", "auditor", tmp_path)  # ':' and ',' would break Airflow's users list
    env = accounts.airflow_env(tmp_path)
    assert (
        env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "pipeline:admin,engineer:op,auditor:viewer,auditor2:viewer"
    )
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == str(accounts.passwords_file(tmp_path))
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == (
        "pipeline",
        accounts.password("pipeline", tmp_path),
    )


def test_commands_take_the_account_from_mlflows_variables_or_the_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_LOCAL", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert credentials.use_local_account() is None  # no file: anonymous (the server answers 401)
    made = accounts.ensure(tmp_path)
    assert credentials.use_local_account() == "pipeline"  # the file's service account by default
    assert credentials.os.environ["MLFLOW_TRACKING_PASSWORD"] == made["pipeline"]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "auditor")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    assert credentials.use_local_account() == "auditor"
    assert credentials.os.environ["MLFLOW_TRACKING_PASSWORD"] == made["auditor"]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "theirs")  # MLflow's own variables win over the file
    assert credentials.use_local_account() == "someone"
    assert credentials.os.environ["MLFLOW_TRACKING_PASSWORD"] == "theirs"
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(PipelineError, match="'someone' is not an account in .*accounts.json"):
        credentials.use_local_account()


def test_mlflow_server_env_keeps_the_password_out_of_the_config_file(tmp_path):
    accounts.ensure(tmp_path)
    env = accounts.mlflow_server_env(tmp_path)
    text = (tmp_path / "mlflow-auth.ini").read_text()
    assert accounts.password("pipeline", tmp_path) not in text and "default_permission = READ" in text
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == accounts.password("pipeline", tmp_path)
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / "mlflow-auth.ini")
