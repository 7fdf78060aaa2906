"""The checkpoint encoding is unambiguous, reads the previous format, and a loaded trainer state is
checked against the run it is meant to continue."""

import json

import pytest
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from maestro_lod import FactorizeConfig, factorize
from maestro_lod.errors import CheckpointError
from maestro_lod.shrinking import shrink_
from maestro_lod.training import TrainConfig, Trainer, load_checkpoint, save_checkpoint
from maestro_lod.training.checkpoint import check_trainer_state


def test_keys_with_dots_and_nested_keys_do_not_collide(tmp_path):
    x, y = torch.ones(2), torch.zeros(3)
    save_checkpoint(tmp_path / "c.safetensors", {"a.b": x, "a": {"b": y}})
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(loaded["a.b"], x) and torch.equal(loaded["a"]["b"], y)


def test_any_dict_key_round_trips(tmp_path):
    state = {"__tensor__": "just a string", "t": {"d": [1, {"l": None}]}, "x": {"__tensor__": torch.arange(3)}}
    save_checkpoint(tmp_path / "c.safetensors", state)
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert loaded["__tensor__"] == "just a string" and loaded["t"] == {"d": [1, {"l": None}]}
    assert torch.equal(loaded["x"]["__tensor__"], torch.arange(3))


def test_the_previous_format_is_still_read(tmp_path):
    skeleton = {"model": {"w": {"__tensor__": "model.w"}}, "epoch": 3}
    metadata = {"maestro_lod": json.dumps({"format": 1, "state": skeleton})}
    (tmp_path / "old.safetensors").write_bytes(safetensors_bytes({"model.w": torch.ones(2, 2)}, metadata=metadata))
    loaded = load_checkpoint(tmp_path / "old.safetensors")
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2, 2))


@pytest.mark.parametrize("document, message", [
    ({"format": 9, "state": {}}, "has format 9"),
    ({"format": 2, "state": {"d": {"w": {"t": "missing"}}}}, "refers to a tensor 'missing'"),
    ({"format": 2, "state": {"x": 1, "y": 2}}, "malformed"),
    ({"format": 2}, "holds no state"),
])
def test_malformed_skeletons_are_checkpoint_errors(tmp_path, document, message):
    metadata = {"maestro_lod": json.dumps(document)}
    (tmp_path / "c.safetensors").write_bytes(safetensors_bytes({"x": torch.zeros(1)}, metadata=metadata))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "c.safetensors")


def test_too_deep_structures_are_refused_both_ways(tmp_path):
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(TypeError, match="nested more than"):
        save_checkpoint(tmp_path / "c.safetensors", {"x": deep})
    assert not (tmp_path / "c.safetensors").exists()


def _trainer(data, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return Trainer(model, data.train, data.val, TrainConfig.from_dict(dict(epochs=2, batch_size=256, bn_recal_batches=0, **options)))


def test_a_shrunk_state_fits_a_fresh_model_and_a_grown_one_does_not(digits):
    trainer = _trainer(digits)
    trainer.train_epoch()
    shrink_(trainer.model, 1e9, trainer.optimizer)  # every layer to its minimum rank
    state = trainer.state_dict()
    fresh = _trainer(digits)
    check_trainer_state(state, fresh.model, epochs=2)  # smaller along the rank: fine
    fresh.load_state_dict(state)

    grown = dict(state, model=dict(state["model"]))
    grown["model"]["1.up"] = torch.zeros(32, 40)
    grown["model"]["1.down"] = torch.zeros(40, 64)
    with pytest.raises(CheckpointError, match=r"does not fit this run: tensor '1.up'"):
        check_trainer_state(grown, _trainer(digits).model, epochs=2)


def test_a_dense_state_is_checked_against_the_dense_model(digits):
    trainer = _trainer(digits, method="dense")
    state = trainer.state_dict()
    check_trainer_state(state, _trainer(digits, method="dense").model, epochs=2)
    other = factorize(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                      FactorizeConfig())
    with pytest.raises(CheckpointError, match="missing: 1.down, 1.up"):
        check_trainer_state(state, other, epochs=2)
