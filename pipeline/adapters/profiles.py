"""``params.yaml`` = the committed recipe ⊕ ``profiles/<profile>.yaml`` ⊕ overrides, for a clone and a workspace.

    python -m pipeline profile test --set data.landing_uri=s3://landing/tiny/   # the clone's one profile step
    python -m pipeline profile full                                           # back to the committed recipe

The clone is a DVC project whose committed ``params.yaml`` is the full GPU recipe. :func:`apply_profile` edits
that file in place the way ``dvc exp run -S`` does (comments, order and quoting kept), so ``git diff params.yaml``
shows exactly the profile, ``dvc exp run -S key=value`` still has the last word, and the file records which
profile it carries (a ``profile`` key the recipe never has). An orchestrated workspace gets the same values
(:func:`merged_params`), so its ``dvc.lock`` and a clone's agree for the same profile and data.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import yaml

from pipeline.core.config import REPLACED_WHOLE, config_from_dict, deep_merge, parse_set, read_yaml
from pipeline.core.errors import ConfigError


def recipe_text(home: Path) -> str:
    """The committed recipe: ``home/params.yaml``, or git HEAD's copy of it when a profile has been applied there.

    Only a generated file carries a ``profile`` key (:func:`apply_profile`, workspaces); the committed recipe has
    none. So a checkout used as a workstation still gives Airflow's runs the recipe, not its last profile.
    """
    fp = home / "params.yaml"
    applied = read_yaml(fp).get("profile")
    if applied is None:
        return fp.read_text(encoding="utf-8")
    proc = subprocess.run(["git", "-C", str(home), "show", "HEAD:params.yaml"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(
            f"{fp} has profile {applied!r} applied and {home} has no git history to restore the "
            "recipe from; restore the committed params.yaml (`git checkout params.yaml`)"
        )
    if "profile" in (yaml.safe_load(proc.stdout) or {}):
        raise ConfigError(
            f"the params.yaml committed in {home} carries a profile; commit the full recipe instead "
            "(`python -m pipeline profile full`, then commit params.yaml)"
        )
    return proc.stdout


def recipe_params(home: Path) -> dict:
    return yaml.safe_load(recipe_text(home)) or {}


def merged_params(home: Path, profile: str, overrides: dict) -> dict:
    """Recipe ⊕ ``profiles/<profile>.yaml`` (its ``backbones`` replace the recipe's) ⊕ overrides, validated."""
    params = recipe_params(home)
    if profile not in ("", "full"):
        prof_fp = home / "profiles" / f"{profile}.yaml"
        if not prof_fp.exists():
            known = sorted(p.stem for p in (home / "profiles").glob("*.yaml"))
            raise ConfigError(f"unknown profile {profile!r}; known: full, {', '.join(known)}")
        params = deep_merge(params, read_yaml(prof_fp), replace=REPLACED_WHOLE)
    params = deep_merge(params, overrides)
    params["profile"] = profile or "full"
    config_from_dict(params)  # fail here, naming the key, before any stage runs
    return params


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """Nested params as dotted keys (an empty mapping stays one value), as DVC records them in dvc.lock."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_profile(home: Path, profile: str, overrides: dict | None = None) -> list[str]:
    """Make ``home/params.yaml`` the recipe ⊕ profile ⊕ overrides, editing it in place as ``dvc exp run -S`` does
    (comments and order kept); ``full`` without overrides writes the committed recipe back byte for byte.

    Returns ``key: recipe value -> new value`` lines, what ``git diff params.yaml`` will show.
    """
    from ruamel.yaml import YAML

    text = recipe_text(home)
    recipe = yaml.safe_load(text) or {}
    merged = merged_params(home, profile, overrides or {})
    flat_recipe, flat_new = flatten(recipe), flatten({k: v for k, v in merged.items() if k != "profile"})
    changes = [
        f"{k}: {flat_recipe[k]!r} -> {v!r}" if k in flat_recipe else f"{k}: (absent) -> {v!r}"
        for k, v in flat_new.items()
        if flat_recipe.get(k, object()) != v
    ]
    changes += [f"{k}: {v!r} -> (absent)" for k, v in flat_recipe.items() if k not in flat_new]
    fp = home / "params.yaml"
    if profile in ("", "full") and not overrides:
        if fp.read_text(encoding="utf-8") != text:
            fp.write_text(text, encoding="utf-8")
        return []
    rt = YAML()
    rt.width, rt.preserve_quotes = 4096, True  # lines and quotes as written: the diff shows only the profile
    doc = rt.load(text)
    _update_doc(doc, {k: v for k, v in merged.items() if k != "profile"})
    doc.insert(
        0,
        "profile",
        merged["profile"],
        comment="applied by `python -m pipeline profile`; `python -m pipeline profile full` restores the recipe",
    )
    buf = io.StringIO()
    rt.dump(doc, buf)
    tmp = fp.with_name(f".{fp.name}.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    tmp.replace(fp)
    return changes


def _update_doc(doc, new: dict, top: bool = True) -> None:
    """Set ``new``'s values into the ruamel mapping ``doc``; mappings merge, except :data:`REPLACED_WHOLE`."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    def plain(v):
        if isinstance(v, dict):
            m = CommentedMap((k, plain(x)) for k, x in v.items())
            if not v:
                m.fa.set_flow_style()
            return m
        if isinstance(v, (list, tuple)):
            seq = CommentedSeq(plain(x) for x in v)
            seq.fa.set_flow_style()
            return seq
        return v

    for key, value in new.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict) and value and not (top and key in REPLACED_WHOLE):
            _update_doc(doc[key], value, top=False)
        elif key not in doc or doc[key] != value:
            doc[key] = plain(value)


# What a trigger's `set` may change: how the model is trained, and the registered model's name. Not the gate
# (`registry.f1_floor`, `min_delta`, `confidence`, `min_test_images`: the service account's promotion rule) or the
# experiment, not where data comes from (`data.landing_uri` is its own Param), not the decode guards
# (`validate.max_pixels`, `max_bytes`, `allowed_formats`). Committed profiles may change anything.
TRIGGER_SETTABLE = (
    "model.",
    "train.",
    "bag.",
    "backbones.",
    "label_issues.",
    "split.",
    "data.exclude_label_issues",
    "data.expected_classes",
    "data.strict_classes",
    "validate.min_side",
    "registry.model_name",
)


def _dotted(node: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        out += _dotted(value, path + ".") if isinstance(value, dict) and value else [path]
    return out


def check_trigger_set(overrides: dict) -> dict:
    """``overrides`` (from a trigger's `set`) when every key is in :data:`TRIGGER_SETTABLE`; else a ConfigError
    naming the first key that is not."""
    for key in _dotted(overrides):
        if not any(key == allowed or key.startswith(allowed) for allowed in TRIGGER_SETTABLE):
            raise ConfigError(
                f"set: {key} cannot be changed from a trigger (allowed: "
                f"{', '.join(a.rstrip('.') for a in TRIGGER_SETTABLE)}); change it in a profile"
            )
    return overrides


def form_overrides(form: dict) -> dict:
    """The training DAG's Params (a form in the UI) as a params override mapping; `set` is held to
    :data:`TRIGGER_SETTABLE`."""
    overrides: dict = {"data": {"landing_uri": form["landing_uri"]}}
    if form.get("epochs"):
        overrides["train"] = {"epochs": int(form["epochs"])}
    if form.get("bag_size"):
        overrides["bag"] = {"seeds": list(range(int(form["bag_size"])))}
    if form.get("backbone"):
        overrides["model"] = {"backbone": form["backbone"]}
    return deep_merge(overrides, check_trigger_set(parse_set(list(form.get("set") or []))))
