"""Every DVC metrics file (``metrics:`` in dvc.yaml) is ASCII JSON, whatever the class names, and DVC takes it.

DVC calls a metrics file with UTF-8 bytes "binary" and fails the stage (../shared/FACTS.md), so validate, split,
evaluate and label_issues write escaped JSON (label_issues: tests/unit/test_label_issues.py); ``json.loads`` gives the Korean names back.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.core.config import config_from_dict
from pipeline.stages import paths
from tests.conftest import ROOT
from tests.integration.helpers import DACON_CLASSES, png_bytes

pytestmark = pytest.mark.unit

PARAMS = {
    "data": {"landing_uri": "s3://x/", "expected_classes": DACON_CLASSES, "strict_classes": True},
    "split": {"min_class_for_split": 5},
    "bag": {"seeds": [0], "bootstrap": False},
}


def test_the_metrics_files_are_the_ones_dvc_yaml_lists():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    listed = {m if isinstance(m, str) else next(iter(m)) for s in stages.values() for m in s.get("metrics", [])}
    assert listed == {
        p.as_posix() for p in (paths.VALIDATION_REPORT, paths.SPLIT_REPORT, paths.METRICS, paths.LABEL_ISSUES_METRICS)
    }


def ascii_json(fp: Path):
    data = fp.read_bytes()
    assert data.isascii(), f"{fp.name} holds non-ASCII bytes: DVC refuses it as metrics"
    return json.loads(data)


def write_landing(raw_dir: Path, per_class: int) -> list[dict[str, str]]:
    """``raw_dir/<class>/<i>.png`` for the 19 DACON classes, and their manifest rows (as ingest writes them)."""
    from pipeline.core.io import sha256_file

    rows = []
    for c_i, cls in enumerate(DACON_CLASSES):
        for i in range(per_class):
            fp = raw_dir / cls / f"{i}.png"
            fp.parent.mkdir(parents=True, exist_ok=True)
            fp.write_bytes(png_bytes(c_i * 100 + i, size=24))
            rows.append(
                {
                    "path": f"{cls}/{i}.png",
                    "class_name": cls,
                    "sha256": sha256_file(fp),
                    "bytes": str(fp.stat().st_size),
                    "width": "24",
                    "height": "24",
                    "mode": "RGB",
                    "format": "PNG",
                    "header_error": "",
                    "source_key": f"x/{cls}/{i}.png",
                    "etag": "",
                }
            )
    return rows


def test_validate_and_split_write_ascii_reports_for_korean_classes(tmp_path):
    from pipeline.core.io import write_csv
    from pipeline.stages.ingest import MANIFEST_FIELDS
    from pipeline.stages.split import run_split
    from pipeline.stages.validate import run_validate

    cfg = config_from_dict(PARAMS)
    write_csv(tmp_path / "manifest.csv", write_landing(tmp_path / "raw", per_class=3), MANIFEST_FIELDS)
    write_csv(tmp_path / "rejects.csv", [], ["source_key", "reason"])
    run_validate(
        cfg,
        tmp_path / "raw",
        tmp_path / "manifest.csv",
        tmp_path / "rejects.csv",
        tmp_path / "validated.csv",
        tmp_path / "quarantine.csv",
        tmp_path / "validation.json",
    )
    run_split(cfg, tmp_path / "validated.csv", tmp_path / "split.csv", tmp_path / "split.json")
    validation = ascii_json(tmp_path / "validation.json")
    assert validation["class_counts"] == {c: 3 for c in DACON_CLASSES} and validation["passed"]
    split = ascii_json(tmp_path / "split.json")
    assert {c for counts in split["counts"].values() for c in counts} == set(DACON_CLASSES)


def _member(models_dir: Path, img_size: int = 32) -> None:
    """A tiny untrained bag member over the 19 classes, saved as the train stage saves one."""
    import timm
    import torch

    from pipeline.core import checkpoints

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(DACON_CLASSES))
    out = models_dir / "member_0"
    sha = checkpoints.save(model.state_dict(), out / "model.pt")
    meta = {
        "backbone": "test_efficientnet",
        "img_size": img_size,
        "class_names": DACON_CLASSES,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "model_sha256": sha,
    }
    (out / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


def test_evaluate_writes_ascii_metrics_and_a_confusion_png_for_korean_classes(tmp_path):
    from pipeline.core.io import write_csv
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.split import SPLIT_FIELDS

    rows = [dict(r, split="test", group=str(i)) for i, r in enumerate(write_landing(tmp_path / "raw", 1))]
    write_csv(tmp_path / "split.csv", rows, SPLIT_FIELDS)
    _member(tmp_path / "models")
    run_evaluate(
        config_from_dict(PARAMS),
        tmp_path / "split.csv",
        tmp_path / "raw",
        tmp_path / "models",
        tmp_path / "eval.json",
        tmp_path / "eval",
    )
    metrics = ascii_json(tmp_path / "eval.json")
    assert metrics["n_test"] == len(DACON_CLASSES) and set(metrics["members"]) == {"member_0"}
    assert json.loads((tmp_path / "eval" / "confusion.json").read_text(encoding="utf-8"))["labels"] == DACON_CLASSES
    assert Image.open(io.BytesIO((tmp_path / "eval" / "confusion.png").read_bytes())).format == "PNG"


def test_dvc_takes_the_split_report_as_metrics_and_refuses_utf8(tmp_path):
    """The real split stage under ``dvc repro`` with Korean classes; a UTF-8 control stage shows DVC's refusal."""
    dvc = Path(sys.executable).parent / "dvc"
    if not dvc.exists():
        pytest.skip("dvc is not installed next to this interpreter")
    from pipeline.core.io import write_csv
    from pipeline.stages.validate import VALIDATED_FIELDS

    rows = [dict(r, dhash=r["sha256"][:16]) for r in write_landing(tmp_path / "raw", per_class=3)]
    write_csv(tmp_path / "validated.csv", rows, VALIDATED_FIELDS)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS, allow_unicode=True), encoding="utf-8")
    control = {"n": {DACON_CLASSES[14]: 1}}  # what the stages wrote before: UTF-8 JSON
    (tmp_path / "utf8.py").write_text(
        f"import json\nopen('utf8.json', 'w', encoding='utf-8').write(json.dumps({control!r}, ensure_ascii=False))\n",
        encoding="utf-8",
    )
    split_cmd = (
        f"{sys.executable} -m pipeline split --params params.yaml --validated validated.csv "
        "--split split.csv --report split.json"
    )
    stages = {
        "split": {"cmd": split_cmd, "deps": ["validated.csv"], "metrics": [{"split.json": {"cache": False}}]},
        "utf8_control": {"cmd": f"{sys.executable} utf8.py", "metrics": [{"utf8.json": {"cache": False}}]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}), encoding="utf-8")
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(ROOT))

    def dvc_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(dvc), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    assert dvc_run("init", "--no-scm", "-q").returncode == 0
    done = dvc_run("repro", "split")
    assert done.returncode == 0, done.stdout + done.stderr
    assert DACON_CLASSES[14] in ascii_json(tmp_path / "split.json")["counts"]["train"]
    refused = dvc_run("repro", "utf8_control")
    assert refused.returncode != 0 and "cannot be used as metrics" in refused.stdout + refused.stderr


def test_evaluate_scores_the_bag_on_val_as_well(tmp_path):
    """eval.json's ``val`` block is the bag's score on the val split (what recipes are chosen on, never test)."""
    import numpy as np
    from sklearn.metrics import f1_score

    from pipeline.core.data import build_cache, load_split
    from pipeline.core.inference import BagPredictor
    from pipeline.core.io import write_csv
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.split import SPLIT_FIELDS

    rows = [
        dict(r, split="val" if r["path"].endswith("1.png") else "test", group=str(i))
        for i, r in enumerate(write_landing(tmp_path / "raw", 2))
    ]
    write_csv(tmp_path / "split.csv", rows, SPLIT_FIELDS)
    _member(tmp_path / "models")
    args = (tmp_path / "split.csv", tmp_path / "raw", tmp_path / "models", tmp_path / "eval.json", tmp_path / "eval")
    run_evaluate(config_from_dict(PARAMS), *args)
    val = ascii_json(tmp_path / "eval.json")["val"]
    split = load_split(tmp_path / "split.csv")
    bag = BagPredictor.from_dirs([tmp_path / "models" / "member_0"])
    arrays = {s: build_cache(tmp_path / "raw", split.paths["val"], split.sha256["val"], s, None) for s in bag.sizes()}
    pred = np.argmax(bag.predict_proba_arrays(arrays), 1)
    assert val["n_val"] == len(DACON_CLASSES)
    assert val["weighted_f1"] == pytest.approx(f1_score(split.labels["val"], pred, average="weighted", zero_division=0))
