"""Loading and saving weight files safely: atomic writes, a recorded SHA-256, ``weights_only=True``.

Every ``.pt`` this project reads goes through :func:`load`. A file that is truncated, altered since its
checksum was recorded, or holds Python objects besides tensors (a pickle that could run code) is refused with
a :class:`CheckpointError` naming the file and the reason; it is never half-loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path

import torch

from pipeline.core.errors import CheckpointError
from pipeline.core.io import sha256_file


def save(obj, path: Path) -> str:
    """``torch.save`` to a temporary file, fsync, then rename: a reader sees the old file or the new one.
    Returns the new file's SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


def load(source: Path | bytes, what: str = "checkpoint", expected_sha256: str | None = None):
    """``torch.load(..., weights_only=True)`` of a file (or bytes), refusing anything suspicious.

    ``expected_sha256`` (recorded when the file was written, e.g. in ``meta.json``) catches a file that still
    parses but is not the one that was written.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise CheckpointError(f"{what} {name} does not exist")
    if expected_sha256:
        actual = hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else sha256_file(Path(source))
        if actual != expected_sha256:
            raise CheckpointError(
                f"{what} {name} is corrupt or was altered: its SHA-256 is {actual[:16]}…, "
                f"{expected_sha256[:16]}… was recorded when it was written; refusing to load it"
            )
    try:
        return torch.load(
            io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu", weights_only=True
        )
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{what} {name} holds Python objects besides tensors, which could run code when "
                f"loaded; refusing it (weights_only=True: {first[:200]})"
            ) from None
        raise CheckpointError(
            f"{what} {name} cannot be read ({first[:200]}): truncated or not a PyTorch file; refusing to load it"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{what} {name} cannot be read ({first[:200]}): truncated or not a PyTorch file; refusing to load it"
        ) from None


def load_state_into(model: torch.nn.Module, state: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with one readable line when the tensors do not fit the model."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} is not a state dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{what} does not fit the model: {str(exc).splitlines()[0][:300]}") from None
