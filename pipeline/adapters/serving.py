"""The bag as one MLflow pyfunc: base64 ``image`` in, ``label`` + ``confidence`` out.

Input: a DataFrame with column ``image`` = base64 of an encoded image file (PNG/JPEG/...).
Output: a DataFrame with ``label`` (class name) and ``confidence`` (0..1), one row per input row.
A row whose image cannot be decoded gets ``label`` empty, ``confidence`` 0 and an ``error``; the
other rows are still predicted. Works with ``mlflow models serve -m models:/<name>@champion``.

``confidence`` is calibrated: the bag's temperature, fitted on the validation split by ``evaluate`` and shipped
as the model artifact ``calibration`` (``calibration.json``), rescales the averaged probabilities. The label is
the argmax of the raw probabilities, so calibration never changes it. A model registered before calibration
existed has no such artifact and serves its raw confidence.

The pipeline itself never unpickles a logged model (its ``python_model.pkl`` could be anyone's code):
:func:`load_bag_files` rebuilds the bag from the files alone, as :meth:`BagModel.load_context` does.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

_logger = logging.getLogger(__name__)
CALIBRATION_ARTIFACT = "calibration"  # key of the pyfunc artifact holding {"temperature": T, ...}


def encode_image_file(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def decode_rows(values) -> tuple[list, list[str]]:
    """Decode base64 images; returns (PIL images or None, error strings)."""
    from pipeline.core.config import MAX_PIXELS
    from pipeline.core.images import decode_rgb

    images, errors = [], []
    for value in values:
        try:
            data = base64.b64decode(value, validate=True) if isinstance(value, str) else bytes(value)
            images.append(decode_rgb(data, max_pixels=MAX_PIXELS))
            errors.append("")
        except (ValueError, TypeError, binascii.Error) as exc:
            images.append(None)
            errors.append(str(exc) or type(exc).__name__)
    return images, errors


def predict_frame(predictor, frame: pd.DataFrame) -> pd.DataFrame:
    """Labels, calibrated confidence and per-row errors. Rows are decoded one at a time and kept only at the bag's
    input sizes, so a request of many large photos (each up to ``MAX_PIXELS``) never holds them all decoded."""
    if "image" not in frame.columns:
        raise ValueError("input must have a column named 'image' holding base64-encoded image files")
    inputs, ok, errors = [], [], []
    for row, value in enumerate(frame["image"].tolist()):
        (image,), (error,) = decode_rows([value])
        errors.append(error)
        if image is not None:
            ok.append(row)
            inputs.append(predictor.input_arrays(image))
        del image
    labels = [""] * len(errors)
    conf = np.zeros(len(errors), dtype=np.float64)
    if ok:
        probs = predictor.predict_proba_arrays(predictor.stack_inputs(inputs))
        shown = predictor.calibrated(probs)
        for row, p, q in zip(ok, probs, shown):
            k = int(p.argmax())  # from the raw probabilities: the temperature only changes the confidence
            labels[row] = predictor.class_names[k]
            conf[row] = float(q[k])
    return pd.DataFrame({"label": labels, "confidence": conf, "error": errors})


def bag_from_artifacts(artifacts: dict[str, Path], device=None):
    """The bag from the pyfunc's artifact folders: every ``member_*`` (meta.json, weights checked against their
    SHA-256 and read ``weights_only``) and the optional calibration file."""
    from pipeline.core.inference import CPU, BagPredictor

    dirs = [artifacts[k] for k in sorted(artifacts) if k.startswith("member_")]
    if not dirs:
        raise ValueError("the model holds no member_* artifact: not a bag from this pipeline")
    predictor = BagPredictor.from_dirs(dirs, device or CPU)
    if CALIBRATION_ARTIFACT in artifacts:
        predictor.temperature = read_temperature(artifacts[CALIBRATION_ARTIFACT])
    return predictor


def load_bag_files(model_dir: Path, device=None):
    """The bag in a downloaded pyfunc folder, from its files alone: the artifact map in ``MLmodel`` (YAML), then
    :func:`bag_from_artifacts`. ``python_model.pkl`` and the shipped code are never loaded, so a crafted pickle
    logged by anyone with write access to an experiment runs nothing here."""
    import yaml

    root = model_dir.resolve()
    try:
        spec = yaml.safe_load((root / "MLmodel").read_text(encoding="utf-8")) or {}
        entries = spec["flavors"]["python_function"].get("artifacts") or {}
        artifacts = {str(k): (root / str(v["path"])).resolve() for k, v in entries.items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a pyfunc model folder ({type(exc).__name__}: {exc})") from None
    outside = sorted(k for k, p in artifacts.items() if not p.is_relative_to(root))
    if outside:
        raise ValueError(f"artifact paths leave the model folder: {outside}")
    return bag_from_artifacts(artifacts, device)


def read_temperature(calibration_fp: Path) -> float:
    """The temperature in ``calibration.json``; 1 (no change) when it is missing or not a positive number."""
    t = json.loads(calibration_fp.read_text(encoding="utf-8")).get("temperature", 1.0)
    if not isinstance(t, (int, float)) or not t > 0:
        _logger.warning("calibration file %s holds no usable temperature (%r); confidences stay raw", calibration_fp, t)
        return 1.0
    return float(t)


class BagModel(mlflow.pyfunc.PythonModel):
    """Loads every ``member_*`` artifact folder and averages their probabilities.

    Its one inference param, ``tta`` (default true), averages over the symmetries the members were trained with
    (``model.tta``). The device comes from ``PIPELINE_DEVICE`` (auto | cpu | cuda; default auto, a GPU
    when torch sees one).
    """

    def load_context(self, context):
        from pipeline.core.devices import env_device

        self.predictor = bag_from_artifacts({k: Path(v) for k, v in context.artifacts.items()}, env_device())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # params {"tta": false}: the plain photo only (faster); default: as evaluate and the gate scored it
        self.predictor.tta = bool((params or {}).get("tta", True))
        return predict_frame(self.predictor, model_input)
