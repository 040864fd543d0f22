"""The code each DVC stage runs, found by reading imports, written into ``dvc.yaml``'s ``deps``.

    python -m devstack code-deps           # rewrite the pipeline/ lines of every stage's deps in dvc.yaml
    python -m devstack code-deps --check   # exit 1 and name the stage when dvc.yaml lists other files

A stage runs ``python -m pipeline <stage>``: ``pipeline/__main__.py`` with its module-level imports, then the stage
module and, transitively, every ``pipeline`` module it imports anywhere (imports inside functions included, so the
list is a superset of what one run executes), plus the ``__init__.py`` of each package on the way. So editing any
byte of that code makes exactly the stages that run it out of date (``tests/unit/test_layout.py`` and the
integration test ``test_dvc_status_follows_code`` prove it).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# DVC stage (or foreach stage) -> the module its command runs.
STAGE_MODULES = {
    "ingest": "pipeline.stages.ingest",
    "label_exclusions": "pipeline.stages.label_exclusions",
    "validate": "pipeline.stages.validate",
    "split": "pipeline.stages.split",
    "backbone": "pipeline.stages.train",
    "train": "pipeline.stages.train",
    "evaluate": "pipeline.stages.evaluate",
    "label_issues": "pipeline.stages.label_issues",
    "register": "pipeline.stages.register",
}
ENTRY = "pipeline.__main__"


def module_file(name: str, root: Path = ROOT) -> Path | None:
    base = root / Path(*name.split("."))
    for fp in (base.with_suffix(".py"), base / "__init__.py"):
        if fp.is_file():
            return fp
    return None


def _imports(fp: Path, top_level_only: bool, root: Path = ROOT) -> set[str]:
    """``pipeline`` modules imported by ``fp`` (``from pipeline.x import y`` counts ``pipeline.x.y`` if a module)."""
    tree = ast.parse(fp.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "pipeline")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}", root))
    return out


def _with_packages(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(module: str, root: Path = ROOT) -> set[Path]:
    """Files of ``module`` and of every pipeline module it imports, transitively, with their packages' __init__."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        for part in _with_packages(name):
            if part in seen:
                continue
            seen.add(part)
            fp = module_file(part, root)
            if fp is not None:
                todo.extend(_imports(fp, top_level_only=False, root=root))
    return {module_file(n, root) for n in seen if module_file(n, root) is not None}


def stage_code(stage: str, root: Path = ROOT) -> list[str]:
    """Sorted repo-relative paths of the code ``python -m pipeline <stage>`` may run."""
    files = closure(STAGE_MODULES[stage], root)
    entry = module_file(ENTRY, root)
    files.add(entry)
    for name in _imports(entry, top_level_only=True, root=root):
        files |= closure(name, root)
    return sorted(p.relative_to(root).as_posix() for p in files)


_STAGE = re.compile(r"^  (\w+):\s*$")
_DEPS = re.compile(r"^(\s+)deps:\s*$")


def rewrite(text: str, root: Path = ROOT) -> str:
    """``dvc.yaml`` with each stage's ``pipeline/`` deps replaced by :func:`stage_code` (data deps untouched)."""
    out: list[str] = []
    stage = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _STAGE.match(line)
        if m:
            stage = m.group(1)
        d = _DEPS.match(line)
        out.append(line)
        i += 1
        if d and stage in STAGE_MODULES:
            item_indent = None
            while i < len(lines) and lines[i].lstrip().startswith("- "):
                item_indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
                if not lines[i].lstrip()[2:].startswith("pipeline/"):
                    out.append(lines[i])
                i += 1
            out.extend(f"{item_indent}- {fp}" for fp in stage_code(stage, root))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack code-deps", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when dvc.yaml is stale")
    parser.add_argument("--dvc-yaml", type=Path, default=ROOT / "dvc.yaml")
    args = parser.parse_args(argv)
    text = args.dvc_yaml.read_text(encoding="utf-8")
    new = rewrite(text)
    if args.check:
        if new != text:
            print(f"{args.dvc_yaml}: the code deps are stale; run `python -m devstack code-deps`", file=sys.stderr)
            return 1
        return 0
    args.dvc_yaml.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
