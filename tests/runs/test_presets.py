"""Named recipes: each builds a valid TrainConfig with the documented settings, and layers between
the defaults and a config file / the flags."""

import argparse

import pytest

from maestro_lod.commands.train import build_config
from maestro_lod.data import DATASETS
from maestro_lod.errors import ConfigError
from maestro_lod.models import MODELS
from maestro_lod.runs.presets import METHOD_OPTIONS, PRESETS, preset
from maestro_lod.training.train_config import TrainConfig, config_keys

CIFAR = {"data": "cifar10", "epochs": 300, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
         "weight_decay": 1e-4, "schedule": "multistep", "milestones": [0.5, 0.75], "gamma": 0.1}
DOCUMENTED = {
    "lenet5-mnist5k": {"model": "lenet5", "data": "mnist5k", "batch_size": 64, "optimizer": "sgd", "lr": 0.01,
                       "momentum": 0.9, "epochs": 30, "lambda_gl": 1e-3, "eps_ps": 1e-3},
    "lenet5-mnist": {"model": "lenet5", "data": "mnist"},
    "resnet18-cifar10": {"model": "resnet18", **CIFAR},
    "vgg19-cifar10": {"model": "vgg19", **CIFAR},
    "transformer-reverse": {"model": "transformer", "data": "reverse", "optimizer": "adamw", "schedule": "noam"},
    "char-lm-pydoc": {"model": "char-lm", "data": "pydoc-text", "optimizer": "adamw", "schedule": "cosine"},
}


def _args(**values):
    return argparse.Namespace(force=False, **values)


def test_the_documented_presets_are_all_there():
    assert PRESETS.names() == sorted(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_valid_config_with_its_values(name):
    options = preset(name)
    assert set(options) <= config_keys()
    config = TrainConfig.from_dict(options)
    flat = config.to_dict()  # the method's options in the flat layout of config.json
    for key, value in options.items():
        assert flat[key] == value, key
    for key, value in DOCUMENTED[name].items():
        assert flat[key] == value, key
    MODELS.lookup(config.model)
    DATASETS.lookup(config.data)
    # what the preset leaves out keeps the defaults
    default = TrainConfig(method=config.method).to_dict()
    for key in default:
        if key not in options:
            assert flat[key] == default[key], key


def test_the_defaults_are_the_lenet5_mnist5k_recipe():
    assert TrainConfig.from_dict(preset("lenet5-mnist5k")) == TrainConfig()


def test_cifar_presets_change_the_defaults_where_the_paper_does():
    config, default = TrainConfig.from_dict(preset("resnet18-cifar10")), TrainConfig()
    assert (config.lr, default.lr) == (0.1, 0.01)
    assert (config.weight_decay, default.weight_decay) == (1e-4, 0.0)
    assert (config.schedule, config.milestones, default.milestones) == ("multistep", [0.5, 0.75], [0.9])
    assert config.threads is None and default.threads == 1
    options = config.method_options
    assert options.lambda_gl == 5e-4 and options.eps_ps == 1e-5 and config.bn_recal_batches == 50


def test_unknown_preset_names_it_and_lists_the_known_ones():
    with pytest.raises(ConfigError) as caught:
        preset("resnet50-imagenet")
    message = str(caught.value)
    assert "unknown preset 'resnet50-imagenet'" in message
    assert all(name in message for name in PRESETS)


def test_preset_returns_a_copy():
    options = preset("resnet18-cifar10")
    options["milestones"].append(0.9)
    options["lr"] = 5.0
    assert preset("resnet18-cifar10")["milestones"] == [0.5, 0.75]
    assert preset("resnet18-cifar10")["lr"] == 0.1


def test_flags_override_a_config_file_which_overrides_the_preset(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 0.003\nepochs = 3\n[factorize]\nmin_rank = 2\n')
    config = build_config(_args(preset="transformer-reverse", config=str(toml), epochs=2,
                                **{"factorize.rank": 0.5}))
    assert config.epochs == 2  # flag over file over preset (15)
    assert config.lr == 0.003  # file over preset (2e-3)
    assert config.betas == [0.9, 0.98] and config.schedule == "noam" and config.warmup_steps == 100  # preset
    assert config.factorize == {"min_rank": 2, "rank": 0.5}  # tables merge key by key
    assert config.seed == TrainConfig().seed  # nobody set it: the default
    assert build_config(_args(preset="lenet5-mnist")).data == "mnist"


def test_a_preset_can_be_registered():
    name = "tiny-test-preset"
    PRESETS.add(name, {"model": "mlp", "data": "digits", "epochs": 1})
    try:
        assert TrainConfig.from_dict(preset(name)).model == "mlp"
        with pytest.raises(ConfigError, match="already registered"):
            PRESETS.add(name, {})
    finally:
        del PRESETS[name]


@pytest.mark.parametrize("name,methods", sorted(METHOD_OPTIONS.items()))
def test_a_presets_method_options_build_a_valid_config_of_that_method(name, methods):
    assert name in PRESETS
    for method, options in methods.items():
        config = TrainConfig.from_dict({**preset(name, method), "method": method})
        flat = config.to_dict()
        assert all(flat[key] == value for key, value in options.items())


def test_the_char_lm_preset_samples_40_percent_of_each_batch_for_maestro_only(tmp_path):
    assert preset("char-lm-pydoc", "maestro")["sampled_batch"] == 0.4
    assert "sampled_batch" not in preset("char-lm-pydoc")  # the shared recipe, as benchmarks build tasks from it
    assert build_config(_args(preset="char-lm-pydoc")).method_options.sampled_batch == 0.4
    for ablation in ("maestro-no-shrink", "maestro-full"):
        assert build_config(_args(preset="char-lm-pydoc", method=ablation)).method_options.sampled_batch == 1.0
    assert build_config(_args(preset="char-lm-pydoc", method="dense")).method == "dense"
    # a flag or a config file sets it over the preset
    assert build_config(_args(preset="char-lm-pydoc", sampled_batch=0.5)).method_options.sampled_batch == 0.5
    toml = tmp_path / "run.toml"
    toml.write_text("sampled_batch = 1.0\n")
    assert build_config(_args(preset="char-lm-pydoc", config=str(toml))).method_options.sampled_batch == 1.0


def test_a_conflict_with_a_presets_method_option_names_the_preset():
    with pytest.raises(ConfigError, match=r"sampled_batch=0.4 comes from --preset char-lm-pydoc"):
        build_config(_args(preset="char-lm-pydoc", full_pass=False))
    config = build_config(_args(preset="char-lm-pydoc", full_pass=False, sampled_batch=1.0))
    assert config.method_options.full_pass is False
    with pytest.raises(ConfigError, match=r"^lr=-1") as caught:  # another option's error is its own
        build_config(_args(preset="char-lm-pydoc", full_pass=False, lr=-1.0))
    assert "preset" not in str(caught.value)
