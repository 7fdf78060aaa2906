"""Ablations and baselines as strategies of the one loop: each runs end to end and resumes exactly;
Pufferfish keeps the right layers dense at the right ranks; Cuttlefish's stable rank and
stabilisation rule; the SVD budget; training MACs against a hand count."""

import math

import pytest
import torch
from conftest import SmallConvNet, resume_matches_uninterrupted
from torch import nn
from torch.utils.data import Subset, TensorDataset

import maestro_lod as ml
from maestro_lod.baselines import energy_rank, scaled_epochs, stabilised, stable_rank
from maestro_lod.baselines.cuttlefish import ema
from maestro_lod.baselines.layer_choice import CUTTLEFISH_DENSE, PUFFERFISH_DENSE, kept_dense
from maestro_lod.data import TaskData
from maestro_lod.errors import ConfigError
from maestro_lod.models import build_model
from maestro_lod.training import TrainConfig, Trainer

CASES = {
    "maestro-no-shrink": dict(epochs=3, eps_ps=0.5, lambda_gl=5e-3),
    "maestro-full": dict(epochs=3, eps_ps=0.2, lambda_gl=5e-3),
    "pufferfish": dict(epochs=3, dense_share=0.34),
    "cuttlefish": dict(epochs=4, stable_reference_epochs=4, stable_window=2, stable_min_epoch=2,
                       stable_tolerance=50.0),
    "svd": dict(epochs=3, svd_finetune_epochs=1, svd_energy=0.9),
}


def _small(digits, n=256):
    return Subset(digits.train, range(n)), Subset(digits.val, range(n))


def _trainer(digits, config):
    torch.manual_seed(config.seed)
    train, val = _small(digits)
    return Trainer(SmallConvNet(), train, val, config)


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_runs_and_resumes_exactly(digits, tmp_path, method):
    config = TrainConfig.from_dict(dict(model="small", data="digits", batch_size=64, method=method, **CASES[method]))
    full, resumed = resume_matches_uninterrupted(lambda: _trainer(digits, config), tmp_path / "ck.safetensors")
    assert full.summary()["method"] == method and full.factorized
    assert resumed.summary()["train_macs"] == full.summary()["train_macs"] > 0


def test_ablations_differ_from_maestro_as_named(digits):
    no_shrink = _trainer(digits, TrainConfig.from_dict(dict(method="maestro-no-shrink", epochs=1, eps_ps=1e5, batch_size=128)))
    no_shrink.fit()
    assert no_shrink.history[-1].ranks == no_shrink.initial_ranks
    full = _trainer(digits, TrainConfig.from_dict(dict(method="maestro-full", epochs=1, eps_ps=1e5, batch_size=128)))
    full.fit()
    assert full.history[-1].train_loss_sampled == 0.0  # no sampled sub-model
    assert full.history[-1].train_penalty > 0  # the group lasso acts
    assert set(full.history[-1].ranks.values()) == {1}  # and shrinking does


def _vision(shape, classes=10):
    empty = TensorDataset(torch.zeros(1, *shape), torch.zeros(1, dtype=torch.long))
    return TaskData("synthetic", "classification", empty, empty, classes, shape, None, None, "test images")


def _pufferfish(model_name, data, **options):
    model = build_model(model_name, data, **options)
    empty = data.train
    config = TrainConfig.from_dict(dict(model=model_name, method="pufferfish", epochs=4, dense_share=0.0, threads=None))
    return Trainer(model, empty, empty, config)


def test_pufferfish_keeps_the_paper_layers_dense_on_resnet18():
    trainer = _pufferfish("resnet18", _vision((3, 8, 8)), width=8)
    ranks = ml.rank_pattern(trainer.model)
    convs = [n for n, m in build_model("resnet18", _vision((3, 8, 8)), width=8).named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    dense = [n for n in convs if n.startswith(("stem", "layer1")) or "shortcut" in n or n == "fc"]
    assert set(ranks) == set(convs) - set(dense) and ranks  # exactly the others are factorised
    layers = dict(ml.low_rank_layers(trainer.model))
    assert all(rank == math.ceil(layers[n].max_rank / 4) for n, rank in ranks.items())
    assert ranks["layer4.1.conv2"] == 16  # 64 channels · 9 → full rank 64, at 1/4


def test_pufferfish_on_vgg19_keeps_nine_convs_and_the_classifier_and_cuts_the_head_to_128():
    data = _vision((3, 32, 32))
    trainer = _pufferfish("vgg19", data)
    ranks = ml.rank_pattern(trainer.model)
    convs = [n for n, m in trainer.model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9 and "classifier.4" not in ranks
    assert ranks["classifier.0"] == ranks["classifier.2"] == 128
    assert len([n for n in ranks if n.startswith("features")]) == 7


def test_pufferfish_on_transformer_keeps_first_encoder_and_decoder_layer():
    from maestro_lod.data import load_data
    data = load_data("reverse")
    model = build_model("transformer", data)
    kept = kept_dense("transformer", model, PUFFERFISH_DENSE)
    assert "transformer.encoder.layers.0.self_attn" in kept and "transformer.decoder.layers.0.multihead_attn" in kept
    assert "generator" in kept and not any(".layers.1." in n for n in kept)
    factorised = ml.factorize(model, ml.FactorizeConfig(rank=0.25, exclude_modules=kept))
    ranks = ml.rank_pattern(factorised)
    assert ranks["transformer.encoder.layers.1.self_attn.q_proj"] == 32  # d_model 128 at 1/4
    assert not any(".layers.0." in n for n in ranks)


def test_pufferfish_warm_up_then_fresh_optimiser(digits):
    trainer = _trainer(digits, TrainConfig.from_dict(dict(method="pufferfish", epochs=4, dense_share=0.5, batch_size=128)))
    first = trainer.optimizer
    trainer.fit()
    phases = [r.phase for r in trainer.history]
    assert phases == ["dense-warmup", "dense-warmup", "pufferfish", "pufferfish"]
    assert trainer.optimizer is not first
    assert trainer.history[-1].train_loss_sampled == 0.0 and trainer.history[-1].train_penalty == 0.0
    assert set(trainer.initial_ranks) == {"conv2", "fc1"}  # SmallConvNet: first and last kept dense
    assert trainer.history[-1].ranks == trainer.initial_ranks  # no shrinking
    with pytest.raises(ConfigError, match="leaves no factorised epoch"):
        TrainConfig.from_dict(dict(method="pufferfish", epochs=2, dense_share=1.0))


def test_stable_rank_is_the_floor_of_the_energy_over_the_top_singular_value():
    u, _ = torch.linalg.qr(torch.randn(6, 6))
    v, _ = torch.linalg.qr(torch.randn(5, 5))
    sigma = torch.tensor([2.0, 2.0, 1.0, 0.5, 0.0])
    w = u[:, :5] @ torch.diag(sigma) @ v.T
    assert stable_rank(w.unsqueeze(0)) == 2  # (4 + 4 + 1 + 0.25) / 4 = 2.31
    assert stable_rank(torch.eye(4).unsqueeze(0)) == 4
    assert stable_rank(torch.outer(torch.ones(3), torch.ones(7)).unsqueeze(0)) == 1


def test_stabilisation_rule_on_synthetic_histories():
    rule = dict(window=11, ema_window=15, min_epoch=15)
    flat = [40.0] * 20
    assert stabilised(flat, 20, tolerance=0.1, **rule)
    assert not stabilised(flat[:14], 14, tolerance=0.1, **rule)  # never before epoch 15
    falling = [100.0 - 2 * t for t in range(20)]  # EMA falls about 2 per epoch once warmed up
    assert not stabilised(falling, 20, tolerance=0.1, **rule)
    assert not stabilised(falling, 20, tolerance=0.5, **rule)
    slopes = [abs(b - a) for a, b in zip(ema(falling, 2 / 16)[-11:-1], ema(falling, 2 / 16)[-10:])]
    assert stabilised(falling, 20, tolerance=sum(slopes) / 10 + 1e-9, **rule)
    assert ema([0.0, 16.0], 2 / 16) == [0.0, 2.0]
    settling = [50.0 + 30 * 0.5 ** t for t in range(60)]  # the EMA lags: settles long after the series
    assert not stabilised(settling[:15], 15, tolerance=0.1, **rule)
    assert not stabilised(settling[:25], 25, tolerance=0.1, **rule)
    assert stabilised(settling, 60, tolerance=0.1, **rule)
    assert scaled_epochs(15, 300, 300) == 15 and scaled_epochs(15, 600, 300) == 15
    assert scaled_epochs(15, 30, 300) == 2 and scaled_epochs(11, 100, 300) == 4


def test_cuttlefish_tracks_stable_ranks_and_factorises_at_the_scaled_rank(digits):
    config = TrainConfig.from_dict(dict(method="cuttlefish", epochs=6, stable_reference_epochs=30, stable_tolerance=1e6,
                         batch_size=128))
    trainer = _trainer(digits, config)
    method = trainer.method
    assert method.counts(config) == (2, 3, 3)  # 11, 15, 15 scaled by 6/30, at least 2
    assert set(method.history) == {"conv2", "fc1"}  # SmallConvNet: first and last layer kept dense
    trainer.fit()
    switch = 3  # every layer stable at the first epoch the rule may fire
    assert [r.phase for r in trainer.history] == ["full-rank"] * switch + ["cuttlefish"] * (6 - switch)
    for name, ranks in method.history.items():
        assert len(ranks) == switch
        expected = min(method.full[name], math.ceil(ranks[-1] * method.full[name] / method.initial[name]))
        assert trainer.initial_ranks[name] == expected
    assert not trainer.history[-1]["cuttlefish_forced"] and trainer.history[-1]["stable_layers"] == 2
    strict = _trainer(digits, config.replace(stable_min_epoch=100))  # scaled to 20 > 6 epochs
    strict.fit()  # nothing settles: factorised before the last epoch at the current estimates
    assert [r.phase for r in strict.history][-1] == "cuttlefish" and strict.history[-1]["cuttlefish_forced"]
    assert [r.phase for r in strict.history].count("cuttlefish") == 1


def test_cuttlefish_keeps_stem_and_layer1_of_resnet18_and_four_convs_of_vgg19():
    resnet = build_model("resnet18", _vision((3, 8, 8)), width=8)
    kept = kept_dense("resnet18", resnet, CUTTLEFISH_DENSE)
    assert kept == ["stem.0"] + [n for n, _ in resnet.named_modules() if n.startswith("layer1.") and n.endswith(
        ("conv1", "conv2"))] + ["fc"]
    vgg = build_model("vgg19", _vision((3, 32, 32)))
    kept = kept_dense("vgg19", vgg, CUTTLEFISH_DENSE)
    convs = [n for n, m in vgg.named_modules() if isinstance(m, nn.Conv2d)]
    assert kept == convs[:4] + ["classifier.4"]


def test_svd_energy_and_uniform_budgets(digits):
    u, _ = torch.linalg.qr(torch.randn(8, 8))
    w = u @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5, 0.1, 0.1, 0.1])) @ u.T
    total = 16 + 4 + 1 + 1 + 0.25 + 0.03
    assert energy_rank(w.unsqueeze(0), 16 / total) == 1
    assert energy_rank(w.unsqueeze(0), 20 / total) == 2
    assert energy_rank(w.unsqueeze(0), 20.5 / total) == 3
    assert energy_rank(w.unsqueeze(0), 21.5 / total) == 4
    for energy in (0.5, 0.9, 0.99):
        trainer = _trainer(digits, TrainConfig.from_dict(dict(method="svd", epochs=1, svd_energy=energy, batch_size=128)))
        dense = {}
        truncate = trainer.method.after_steps

        def snapshot(trainer_, epoch, truncate=truncate, dense=dense):  # the weights the truncation sees
            dense.update({n: m.weight.detach().clone() for n, m in trainer_.model.named_modules()
                          if isinstance(m, (nn.Linear, nn.Conv2d))})
            truncate(trainer_, epoch)

        trainer.method.after_steps = snapshot
        trainer.fit()
        for name, layer in ml.low_rank_layers(trainer.model):
            matrix = dense[name].reshape(dense[name].shape[0], -1)
            squares = torch.linalg.svdvals(matrix) ** 2
            kept = squares[:layer.rank].sum() / squares.sum()
            assert kept >= energy - 1e-5  # meets the budget
            assert layer.rank == 1 or squares[:layer.rank - 1].sum() / squares.sum() < energy  # and no more
            approximation = layer.dense_weight().detach().reshape(matrix.shape)
            assert (torch.linalg.matrix_norm(approximation - matrix) ** 2).item() == pytest.approx(
                squares[layer.rank:].sum().item(), rel=1e-3, abs=1e-6)  # truncated SVD: Eckart–Young
    uniform = _trainer(digits, TrainConfig.from_dict(dict(method="svd", epochs=2, svd_finetune_epochs=1, rank_ratio=0.5,
                                           batch_size=128)))
    uniform.fit()
    assert uniform.initial_ranks == {"conv1": 4, "conv2": 8, "fc1": 16, "fc2": 5}
    assert [r.phase for r in uniform.history] == ["dense", "svd-finetune"]


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)  # 8×8 → 4×8×8, full rank 4 (9 inputs)
        self.fc = nn.Linear(4 * 16, 10)

    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def test_training_macs_match_a_hand_count(digits):
    train = Subset(digits.train, range(100))  # batches of 64 and 36
    dense = Trainer(_Tiny(), train, train, TrainConfig(method="dense", epochs=1, batch_size=64))
    dense.fit()
    forward = 64 * 4 * 9 + 64 * 10  # conv: 64 positions × 4 out × 9 in; fc: 64 × 10
    assert dense.history[0]["train_macs"] == 3 * 100 * forward
    config = TrainConfig.from_dict(dict(epochs=1, batch_size=64, sampler="fixed", sample_fraction=0.5, reuse_prefix="off",
                         eps_ps=0.0, lambda_gl=0.0))
    maestro = Trainer(ml.factorize(_Tiny()), train, train, config)
    maestro.fit()
    # factorised conv rank 4: 64·4·9 (down) + 64·4·4 (up); fc rank 10: 10·64 + 10·10
    full = 64 * 4 * (9 + 4) + 10 * (64 + 10)
    sampled = 64 * 2 * (9 + 4) + 5 * (64 + 10)  # the fixed sampler halves every rank
    assert maestro.history[0]["train_macs"] == 3 * 100 * (full + sampled)
    assert maestro.summary()["train_macs"] == maestro.history[0]["train_macs"]
    alone = Trainer(ml.factorize(_Tiny()), train, train, config.replace(full_pass=False))
    alone.fit()
    assert alone.history[0]["train_macs"] == 3 * 100 * sampled
