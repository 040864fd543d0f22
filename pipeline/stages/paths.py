"""Where each stage reads and writes, relative to the DVC workspace (the clone's root or ``.local/workspace``).

The one source of these paths for Python: the CLI defaults (``python -m pipeline <stage>``), the DAG, the summary.
``dvc.yaml`` spells them again (DVC reads no Python); ``tests/unit/test_layout.py`` proves the two agree.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
RAW_DIR = Path("data/raw")
MANIFEST = Path("data/manifest.csv")
INGEST_REJECTS = Path("data/ingest_rejects.csv")
VALIDATED = Path("data/validated.csv")
QUARANTINE = Path("data/quarantine.csv")
VALIDATION_REPORT = Path("reports/validation.json")
DATA_DOCS = Path("reports/data_docs")
LABEL_EXCLUSIONS = Path("data/label_exclusions.csv")  # the champion's flagged images, left out of train/val
SPLIT = Path("data/split.csv")
SPLIT_REPORT = Path("reports/split.json")
MODELS_DIR = Path("models")
METRICS = Path("metrics/eval.json")
REPORTS_DIR = Path("reports")
EVAL_REPORTS = Path("reports/eval")
LABEL_ISSUES = Path("reports/label_issues.csv")  # every train/val image ranked by label quality
LABEL_ISSUES_METRICS = Path("reports/label_issues.json")
LABEL_ISSUES_GRID = Path("reports/label_issues.png")
DECISION = Path("registry/decision.json")
IMAGE_CACHE = Path(".cache/images")  # decoded-image cache shared by train and evaluate (not a DVC output)
CHECKPOINTS = Path(".cache/checkpoints")  # per-epoch resume checkpoints (deleted when a member finishes)


def member_dirs(seeds, models_dir: Path) -> list[Path]:
    """The bag's member folders, one per seed (``bag.seeds``), as the ``train`` stage writes them."""
    return [models_dir / f"member_{seed}" for seed in seeds]


def backbone_dirs(names, models_dir: Path) -> dict[str, Path]:
    """The ``backbone`` stage's outputs that exist (a workstation may run the bag without them)."""
    return {
        name: models_dir / "backbones" / name
        for name in names
        if (models_dir / "backbones" / name / "model.pt").exists()
    }
