"""Checkpoints without pickle and exact resumption of interrupted runs."""

import pytest
import torch
from conftest import SmallConvNet
from safetensors import safe_open

from maestro_lod.training import TrainConfig, Trainer, load_checkpoint, save_checkpoint

TIME_KEYS = ("train_time", "epoch_time")


def test_checkpoint_round_trip_without_pickle(tmp_path):
    state = {"weights": {"a.b": torch.randn(3, 4), "empty": torch.zeros(0, 5)}, "step": torch.tensor(3.0),
             "rng": torch.get_rng_state(), "history": [{"epoch": 1, "loss": 0.5, "none": None}], "flag": True}
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["weights"]["a.b"], state["weights"]["a.b"])
    assert loaded["weights"]["empty"].shape == (0, 5) and loaded["step"].item() == 3.0
    assert torch.equal(loaded["rng"], state["rng"]) and loaded["history"] == state["history"] and loaded["flag"] is True
    with safe_open(str(path), framework="pt") as file:  # plain safetensors: readable without this package
        assert "weights.a.b" in file.keys()
    with pytest.raises(TypeError, match="cannot store a object"):
        save_checkpoint(path, {"bad": object()})
    assert torch.equal(load_checkpoint(path)["weights"]["a.b"], state["weights"]["a.b"])  # old file intact
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")


RESUME_CASES = {
    "sgd-bn-recalibration": dict(epochs=4, lr=0.05, lambda_gl=5e-3, eps_ps=0.2, bn_recal_batches=3),
    "adamw-cosine-dense-warmup": dict(epochs=4, optimizer="adamw", lr=3e-3, schedule="cosine", warmup_steps=5,
                                      warmup_epochs=1, lambda_gl=5e-3, eps_ps=0.2, sampler="independent",
                                      weight_decay=0.01),
}


def _trainer(digits, config):
    torch.manual_seed(config.seed)
    return Trainer(SmallConvNet(), digits.train, digits.val, config)


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resumed_run_matches_uninterrupted_run_exactly(digits, tmp_path, case):
    config = TrainConfig.from_dict(dict(model="small", data="digits", batch_size=128, **RESUME_CASES[case]))
    full = _trainer(digits, config)
    full.fit()
    ranks = [r["total_rank"] for r in full.history]  # shrinking before and after the interruption
    assert ranks[3] < ranks[2] <= ranks[1] < sum(full.initial_ranks.values())

    interrupted = _trainer(digits, config)
    for _ in range(2):
        interrupted.train_epoch()
    save_checkpoint(tmp_path / "ck.safetensors", interrupted.state_dict())
    del interrupted
    torch.manual_seed(123)  # the resumed process starts from unrelated global RNG states
    resumed = _trainer(digits, config)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ck.safetensors"))
    resumed.fit()

    assert full.model.state_dict().keys() == resumed.model.state_dict().keys()
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    strip = lambda history: [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in history]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    for a, b in zip(full.optimizer.state.values(), resumed.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_load_state_dict_refuses_a_different_recipe(digits):
    trainer = _trainer(digits, TrainConfig(epochs=1, batch_size=256))
    state = trainer.state_dict()
    other = _trainer(digits, TrainConfig(epochs=1, batch_size=256, lr=0.5))
    with pytest.raises(ValueError, match="differs in: lr"):
        other.load_state_dict(state)
