"""Any class name survives as an MLflow key and as a file name: ``names.encode_key`` and the params tracking logs.

The validators are MLflow's own (``mlflow.utils.validation``), so a key passing here is one the server accepts.
"""

from __future__ import annotations

import json
import random

import pytest
from mlflow.utils import validation

from pipeline.core.config import config_from_dict
from pipeline.core.names import decode_key, encode_key

pytestmark = pytest.mark.unit

COMMA = "창틀,문틀수정"  # the DACON class whose comma MLflow refuses in a key
NAMES = [
    COMMA,
    "a/b",
    "a b",
    "곰팡이",
    "",
    ".",
    "..",
    "-",
    "--",
    "a.",
    " a ",
    "CON",
    "nul",
    "lpt1",
    "Crack",
    "crack",
    "a:b",
    "a\\b",
    'q"<>|?*',
    "tab\there",
    "new\nline",
    "100%",
    "member_0",
    "\ud800",
    "😀🧱",
]
WINDOWS_FORBIDDEN = set('<>:"/\\|?*') | {chr(i) for i in range(32)}


def random_names(n: int = 300, seed: int = 0) -> list[str]:
    """Strings of any code points (lone surrogates included), 0–12 long, drawn reproducibly."""
    rng = random.Random(seed)
    pools = [(0, 0x7F), (0xAC00, 0xD7A3), (0xD800, 0xDFFF), (0, 0x10FFFF)]  # ASCII, Hangul, surrogates, anything
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(0, 12))))
    return out


def mlflow_accepts(key: str) -> None:
    """Raise unless MLflow takes ``key`` as a param, metric and tag key (its POSIX and its Windows rules)."""
    validation._validate_param_name(key)
    validation._validate_metric_name(key)
    validation._validate_tag_name(key)
    validation._validate_length_limit("key", validation.MAX_ENTITY_KEY_LENGTH, key)


@pytest.mark.parametrize("windows", [False, True])
def test_encoding_round_trips_and_mlflow_accepts_the_key(windows, monkeypatch):
    monkeypatch.setattr(validation, "is_windows", lambda: windows)  # MLflow on Windows also refuses ':'
    for name in NAMES + random_names():
        key = encode_key(name)
        assert decode_key(key) == name, ascii(name)
        mlflow_accepts(key)


def test_plain_names_read_as_they_are_and_the_comma_class_is_escaped():
    assert [encode_key(n) for n in ("member_0", "efficientnet_lite0", "seed")] == [
        "member_0",
        "efficientnet_lite0",
        "seed",
    ]
    assert encode_key(COMMA) == "-ec-b0-bd-ed-8b-80-2c-eb-ac-b8-ed-8b-80-ec-88-98-ec-a0-95"
    assert encode_key("a/b") == "a-2fb" and encode_key("a b") == "a-20b"


def test_the_old_flattened_key_is_what_mlflow_refuses():
    """The failure this encoding fixes: MLflow's own validator on the key the old code built."""
    with pytest.raises(Exception, match="Names may only contain"):
        validation._validate_param_name(f"train.flip_policy.{COMMA}")


def test_encoded_names_are_distinct_safe_file_names(tmp_path):
    """Each name is one file on any OS: no separator or Windows-forbidden character, no reserved device name,
    no trailing dot or space, and distinct names stay distinct on case-insensitive file systems."""
    names = sorted(set(NAMES + random_names()))
    keys = [encode_key(n) for n in names]
    assert len({k.lower() for k in keys}) == len(names)
    for key in keys:
        assert not set(key) & WINDOWS_FORBIDDEN and key not in (".", "..") and key[-1] not in ". "
        assert key.split(".")[0].lower() not in {
            "con",
            "prn",
            "aux",
            "nul",
            *(f"com{i}" for i in range(10)),
            *(f"lpt{i}" for i in range(10)),
        }
        assert len(key.encode()) <= 255
        (tmp_path / key).write_text("x")
    listed = sorted(p.name for p in tmp_path.iterdir())
    assert listed == sorted(keys)
    assert sorted(decode_key(k) for k in listed) == names


@pytest.mark.parametrize("bad", ["A", "a.b", "a,b", "-2", "-zz", "-ff", "-ec-b0"])
def test_decoding_refuses_what_encoding_never_makes(bad):
    with pytest.raises(ValueError, match="not an encoded name"):
        decode_key(bad)


def test_tracking_params_for_any_flip_policy_pass_mlflow_validation():
    """The params a run logs (``tracking.config_params``, as ``_log_params`` builds them) for class names with a
    comma and a slash: every key valid, and the policy readable back from one JSON value."""
    from pipeline.adapters import tracking

    policy = {COMMA: "h", "a/b": "v"}
    cfg = config_from_dict(
        {
            "data": {"landing_uri": "s3://x/", "expected_classes": [COMMA, "a/b"]},
            "train": {"flip_policy": policy},
            "backbones": {"efficientnet_lite0": {"img_size": 160}},
        }
    )
    params = tracking.config_params(cfg.to_dict())
    for key in params:
        validation._validate_param_name(key)
        validation._validate_length_limit("Param key", validation.MAX_ENTITY_KEY_LENGTH, key)
    assert json.loads(params["train.flip_policy"]) == policy
    assert json.loads(params["data.expected_classes"]) == [COMMA, "a/b"]
    assert params["backbones.efficientnet_lite0.img_size"] == "160"  # plain names keep readable keys


def test_nested_run_params_of_a_trained_network_pass_mlflow_validation():
    from pipeline.adapters import tracking

    meta = {
        "backbone": "efficientnet_lite0",
        "class_names": [COMMA, "a/b"],
        "flips": {COMMA: "h", "a/b": "none"},
        "mean": [0.5, 0.5, 0.5],
        "best_val_weighted_f1": None,
    }
    params = tracking.trained_params(meta)
    for key in params:
        validation._validate_param_name(key)
    assert "class_names" not in params and json.loads(params["flips"]) == meta["flips"]
