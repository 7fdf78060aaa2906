"""Training options: validation by name, TOML files, presets, stored references, LR schedules."""

import json

import pytest

from maestro_lod.training import TrainConfig, read_toml
from maestro_lod.runs.presets import preset
from maestro_lod.training.optim import lr_factor
from maestro_lod.runs.reference import stored_reference


def test_config_round_trips_and_defaults_are_the_benchmark_recipe():
    config = TrainConfig()
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    recipe = preset("lenet5-mnist5k")
    assert all(getattr(config, key) == value for key, value in recipe.items())


@pytest.mark.parametrize("changes, message", [
    ({"method": "lora"}, "method='lora'"),
    ({"lr": 0}, "lr=0"),
    ({"epochs": 0}, "epochs=0"),
    ({"milestones": [0.75, 0.5]}, "milestones"),
    ({"schedule": "noam"}, "warmup_steps > 0"),
    ({"nesterov": True, "momentum": 0.0}, "nesterov"),
    ({"warmup_epochs": 30}, "warmup_epochs=30"),
    ({"sample_fraction": 1.5}, "sample_fraction=1.5"),
    ({"factorize": {"rank": -2}}, "rank=-2"),
    ({"amp": "yes"}, "amp='yes'"),
])
def test_config_rejects_bad_values_by_name(changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TrainConfig(**changes)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown training option.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="unknown FactorizeConfig key.*ranks"):
        TrainConfig(factorize={"ranks": 3})


def test_read_toml(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('epochs = 3\nlr = 0.05\n[factorize]\nexclude_modules = ["fc3"]\n')
    assert read_toml(good) == {"epochs": 3, "lr": 0.05, "factorize": {"exclude_modules": ["fc3"]}}
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("epochs = 3\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match="unknown option.*learning_rate"):
        read_toml(unknown)
    broken = tmp_path / "broken.toml"
    broken.write_text("epochs = = 3\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        read_toml(broken)
    with pytest.raises(ValueError, match="cannot read config file"):
        read_toml(tmp_path / "missing.toml")


def test_preset_and_reference_lookup():
    assert preset("resnet18-cifar10")["lr"] == 0.1
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset("nope")
    stored = stored_reference(TrainConfig())
    assert stored is not None and 0.9 < stored.accuracy < 1.0 and "median" in stored.source
    assert stored_reference(TrainConfig(epochs=5)) is None


# --------------------------------------------------------------------------------------- schedules
def test_schedules_per_step():
    steps = 10
    multistep = lr_factor(TrainConfig(epochs=4, schedule="multistep", milestones=[0.5, 0.75]), steps)
    assert [multistep(s) for s in (0, 19, 20, 29, 30, 39)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    noam = lr_factor(TrainConfig(epochs=4, schedule="noam", warmup_steps=10), steps)
    assert noam(9) == pytest.approx(1.0) and noam(4) == pytest.approx(0.5) and noam(39) == pytest.approx(0.5)
    cosine = lr_factor(TrainConfig(epochs=4, schedule="cosine", warmup_steps=4), steps)
    assert cosine(1) == pytest.approx(0.5) and cosine(3) == pytest.approx(1.0) and cosine(39) < 0.01
