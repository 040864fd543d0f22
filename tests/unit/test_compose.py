"""Static checks of docker-compose.yaml (no Docker engine here): pinned images, health checks, no secret literals."""
import re

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def test_compose_services_are_pinned_checked_and_secret_free():
    text = (ROOT / "docker-compose.yaml").read_text()
    compose = yaml.safe_load(text)
    assert {"seaweedfs", "mlflow", "airflow"} <= set(compose["services"])
    for name, svc in compose["services"].items():
        assert "healthcheck" in svc, name
        image = svc.get("image", "")
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), (name, image)
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        for key, value in svc.get("environment", {}).items():
            if "SECRET" in key or "PASSWORD" in key or "ACCESS_KEY" in key:
                assert str(value).startswith("${"), (name, key)
