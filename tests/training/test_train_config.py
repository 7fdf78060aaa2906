"""Training options: validation by name, TOML files, presets, stored references, LR schedules."""

import json
from pathlib import Path

import pytest

from maestro_lod.baselines import CuttlefishConfig, PufferfishConfig, SvdConfig
from maestro_lod.training import METHODS, MaestroConfig, MethodConfig, TrainConfig, read_toml
from maestro_lod.runs.presets import preset
from maestro_lod.training.optim import lr_factor
from maestro_lod.runs.reference import stored_reference


def test_config_round_trips_and_defaults_are_the_benchmark_recipe():
    config = TrainConfig()
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    recipe = preset("lenet5-mnist5k")
    assert all(config.to_dict()[key] == value for key, value in recipe.items())


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
        TrainConfig.from_dict(changes)


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


# --------------------------------------------------------------------------- method options, layouts
DATA = Path(__file__).resolve().parents[1] / "fixtures"


def test_a_config_json_of_the_flat_layout_loads_and_round_trips():
    saved = json.loads((DATA / "config-flat.json").read_text())  # written before options moved per method
    config = TrainConfig.from_dict(saved)
    assert config.method_options == MaestroConfig(lambda_gl=0.002, sampler="single")  # written before the default changed
    assert config.model == "mlp" and config.epochs == 1 and config.reference == "none"
    written = config.to_dict()
    added = {key: written.pop(key) for key in set(written) - set(saved)}  # options added since: their defaults
    assert added == {"lambda_epochs": None, "group_weights": "uniform", "sampled_batch": 1.0,
                     "sampled_weight": 1.0}
    assert written == {key: value for key, value in saved.items() if key in written}
    assert TrainConfig.from_dict(config.to_dict()) == config
    pufferfish = TrainConfig.from_dict({**saved, "method": "pufferfish", "rank_ratio": 0.5})
    assert pufferfish.method_options == PufferfishConfig(rank_ratio=0.5)
    assert "lambda_gl" not in pufferfish.to_dict() and pufferfish.to_dict()["dense_share"] == 0.25


def test_toml_files_load_in_the_flat_and_the_nested_layout(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text('method = "svd"\nepochs = 3\nlambda_gl = 1e-3\nsvd_energy = 0.9\nsvd_finetune_epochs = 1\n')
    nested = tmp_path / "nested.toml"
    nested.write_text('method = "svd"\nepochs = 3\n[method_options]\nsvd_energy = 0.9\nsvd_finetune_epochs = 1\n')
    expected = TrainConfig(method="svd", epochs=3, method_options=SvdConfig(svd_energy=0.9, svd_finetune_epochs=1))
    assert TrainConfig.from_dict(read_toml(flat)) == TrainConfig.from_dict(read_toml(nested)) == expected


@pytest.mark.parametrize("table, error, message", [
    ({"method_options": {"rank_ratio": 0.5}}, ValueError, "unknown MaestroConfig option.*rank_ratio"),
    ({"lambda_gl": 0.1, "method_options": {"eps_ps": 0.1}}, ValueError, "both flat"),
    ({"method": "dense", "target": "params=0.3"}, ValueError, "needs method='maestro', not 'dense'"),
    ({"method": "dense", "lambda_gl": -1}, ValueError, "lambda_gl=-1"),
    ({"method": "pufferfish", "method_options": MaestroConfig()}, TypeError, "must be a PufferfishConfig"),
    ({"sample_fraction": 0}, ValueError, r"sample_fraction=0 must be a number in \(0, 1\]"),
])
def test_method_options_are_checked_by_their_own_class(table, error, message):
    with pytest.raises(error, match=message):
        TrainConfig.from_dict(table)


def test_each_method_declares_its_options_and_is_named_once():
    assert TrainConfig(method="dense").method_options == MethodConfig()
    assert TrainConfig(method="cuttlefish").method_options == CuttlefishConfig()
    assert TrainConfig(method="maestro-full").method_options == MaestroConfig()
    assert all(METHODS[name].name == name for name in METHODS)
    config = TrainConfig(method_options=MaestroConfig(lambda_gl=0.01))
    assert config.replace(epochs=3).method_options.lambda_gl == 0.01
    assert config.replace(eps_ps=0.1).method_options == MaestroConfig(lambda_gl=0.01, eps_ps=0.1)
    assert config.replace(method="dense").method_options == MethodConfig()
