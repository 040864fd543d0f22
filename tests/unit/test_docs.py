"""The docs point only at files a clone has, and stay short enough to read (issue 30: README ≤ 200 lines,
docs/ARCHITECTURE.md ≤ 250)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Repository paths as docs write them: `pipeline/core/gate.py`, docs/GUIDE.md, [text](decisions/0004-the-gate.md)
PATH = re.compile(
    r"(?<![\w./-])((?:docs|pipeline|tests|dags|plugins|devstack|bench|scripts|profiles|deploy|requirements)"
    r"/[\w./-]*\w)"
)
PLACEHOLDERS = {"profiles/P.yaml"}  # "profiles/<name>.yaml" written with a letter
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _docs() -> list[Path]:
    out = subprocess.check_output(["git", "ls-files", "*.md"], cwd=ROOT, text=True).split()
    return [ROOT / f for f in out if (ROOT / f).exists()]


def test_every_path_a_doc_names_exists():
    missing = []
    for doc in _docs():
        text = doc.read_text(encoding="utf-8")
        for m in PATH.finditer(text):
            rel = m.group(1).rstrip(".")
            if "*" in rel or rel in PLACEHOLDERS:
                continue
            module = rel.rsplit(".", 1)[0] + ".py"  # devstack/code_deps.STAGE_MODULES: an attribute of a module
            if not (ROOT / rel).exists() and not (ROOT / module).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {rel}")
        for m in LINK.finditer(text):
            target = m.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(ROOT)}: link {target}")
    assert missing == []


def test_the_newcomers_pages_stay_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200
    assert len((ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines()) <= 250
    for record in (ROOT / "docs" / "decisions").glob("*.md"):
        text = record.read_text(encoding="utf-8")
        assert all(h in text for h in ("## Context", "## Decision", "## Consequences")), record.name
