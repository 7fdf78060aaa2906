"""The family file: one safetensors holding the trained factors and the front, from which every
point is rebuilt by slicing the leading ranks, equal to ``materialize`` of that point."""

import json

import pytest
import torch
from safetensors import safe_open

import maestro_lod as ml
from maestro_lod import cli
from maestro_lod.deploy import (Front, calibration_batches, greedy_front, load_family, load_family_front,
                                materialize, save_family)
from maestro_lod.deploy.family import FAMILY_METADATA_KEY
from maestro_lod.errors import CheckpointError, ConfigError
from maestro_lod.models import build_model

from conftest import SmallConvNet


def _lenet(data):
    return build_model("lenet5", data, padding=2)


def _fresh_lenet(data):
    """A factorised LeNet-5 whose weights have nothing to do with the trained one's."""
    return ml.factorize(_lenet(data), ml.FactorizeConfig(init="random", seed=123))


@pytest.fixture(scope="module")
def shrunk(digits):
    """A factorised LeNet-5 cut below full rank (as shrinking leaves it) and its front."""
    torch.manual_seed(0)
    model = ml.factorize(_lenet(digits)).eval()
    ml.truncate_(model, {name: max(1, rank - 3) for name, rank in ml.rank_pattern(model).items()})
    calibration = calibration_batches(digits.train, 256, 256)
    return model, calibration, greedy_front(model, calibration, "params", step=0.5)


def test_points_from_the_family_equal_materialize(shrunk, digits, tmp_path):
    model, _, front = shrunk
    path = tmp_path / "family.safetensors"
    size = save_family(model, front, path)
    assert size == path.stat().st_size
    x = torch.stack([digits.val[i][0] for i in range(32)])
    chosen = [front.points[len(front.points) // 3], front.points[-2]]
    assert chosen[0].ranks != chosen[1].ranks != front.trained.ranks
    for point in chosen:
        expected = materialize(model, point)
        loaded = load_family(path, lambda: _fresh_lenet(digits), point.index)
        assert ml.rank_pattern(loaded) == point.ranks
        with torch.no_grad():
            assert torch.equal(loaded(x), expected(x))
    trained = load_family(path, _fresh_lenet(digits), 0)  # a model instance works as well as a builder
    with torch.no_grad():
        assert torch.equal(trained(x), model(x))


def test_family_holds_the_trained_factors_once(shrunk, tmp_path):
    model, _, front = shrunk
    path = tmp_path / "family.safetensors"
    save_family(model, front, path)
    with safe_open(str(path), framework="pt") as file:
        keys = set(file.keys())
        info = json.loads(file.metadata()[FAMILY_METADATA_KEY])
        assert file.get_tensor("conv1.down").shape == model.conv1.down.shape
    assert keys == set(model.state_dict())
    assert [p["ranks"] for p in info["front"]["points"]] == [p.ranks for p in front.points]
    stored = load_family_front(path)
    assert isinstance(stored, Front) and stored.select(params=0.5).ranks == front.select(params=0.5).ranks


def test_batchnorm_points_keep_their_own_statistics(digits, tmp_path):
    torch.manual_seed(0)
    model = ml.factorize(SmallConvNet()).eval()
    calibration = calibration_batches(digits.train, 256, 128)
    front = greedy_front(model, calibration, step=0.5)
    path = tmp_path / "family.safetensors"
    with pytest.raises(ConfigError, match="BatchNorm"):
        save_family(model, front, path)
    save_family(model, front, path, calibration)
    x = torch.stack([digits.val[i][0] for i in range(16)])
    for point in (front.points[len(front.points) // 2], front.points[-1]):
        expected = materialize(model, point, calibration)
        loaded = load_family(path, lambda: ml.factorize(SmallConvNet()), point.index)
        assert torch.equal(loaded.bn2.running_var, expected.bn2.running_var)
        assert not torch.equal(loaded.bn2.running_var, model.bn2.running_var)
        with torch.no_grad():
            assert torch.equal(loaded(x), expected(x))


def test_bad_inputs_are_refused(shrunk, digits, tmp_path):
    model, _, front = shrunk
    path = tmp_path / "family.safetensors"
    with pytest.raises(ConfigError, match="point 0"):
        save_family(ml.factorize(_lenet(digits)), front, path)  # not the model the front was built from
    save_family(model, front, path)
    with pytest.raises(ConfigError, match="index"):
        load_family(path, _fresh_lenet(digits), len(front.points))
    with pytest.raises(ConfigError, match="factorised"):
        load_family(path, _lenet(digits), 1)  # a dense model
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(CheckpointError, match="not a family file"):
        load_family(other, _fresh_lenet(digits), 0)


def test_compress_writes_the_family_and_reports_its_size(tmp_path, digits, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--data", "digits", "--model-option", "padding=2", "--batch-size", "128", "--quiet",
                     "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["compress", str(run), "--calibration-size", "256", "--latency-batch", "4", "--quiet",
                     "--target", "params=0.6", "--target", "params=0.3", "--formats", "safetensors"]) == 0
    printed = capsys.readouterr().out
    front = Front.load(run / "front.json")
    family = front.metadata["family"]
    assert family["file"] == "family.safetensors" and family["bytes"] == (run / "family.safetensors").stat().st_size
    separate = sum((run / f"params-{v}" / "model.safetensors").stat().st_size for v in ("0.6", "0.3"))
    assert family["separate"]["safetensors"] == separate
    assert "family.safetensors" in printed
    point = front.select(params=0.3)
    loaded = load_family(run / "family.safetensors", lambda: ml.factorize(_lenet(digits)), point.index)
    assert ml.rank_pattern(loaded) == point.ranks
    assert cli.main(["compress", str(run), "--calibration-size", "256", "--latency-batch", "4", "--quiet",
                     "--out", str(tmp_path / "bare"), "--no-family"]) == 0
    assert not (tmp_path / "bare" / "family.safetensors").exists()
