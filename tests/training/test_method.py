"""The MAESTRO method itself, pinned down through the trainer: each test names one part of the recipe
and fails when that part is broken (the sampled pass, the distillation target, the detached teacher,
the group-lasso gradient after unscaling, clipping, recalibration, shrinking by tail importance,
the safe use of prefix reuse, layers at rank 0).

The trainer is driven for exactly one optimisation step where a step is checked: one batch holding
the whole (small) training set, plain SGD without momentum, so the update is ``-lr · gradient``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ONE_STEP_LR, SmallConvNet, digits_mlp, one_step_config
from torch import nn
from torch.utils.data import Subset

import maestro_lod as ml
from maestro_lod.layers import low_rank_layers
from maestro_lod.models import build_model
from maestro_lod.training import TrainConfig, Trainer
from maestro_lod.training.step_macs import rank_cost_scales

LR = ONE_STEP_LR




def _lowering_seed(model: nn.Module) -> int:
    """A seed whose first single-layer draw lowers the rank of a layer (not a full-rank draw)."""
    layers = list(ml.low_rank_layers(model))
    for seed in range(100):
        draw = ml.SingleLayerSampler(seed).draw(layers)
        if all(rank < dict(layers)[name].rank for name, rank in draw.items()):
            return seed
    raise AssertionError("no seed below 100 draws a lower rank")


def _batch(data, count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    items = [data[i] for i in range(count)]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def _expected_maestro_gradients(model: nn.Module, sampler: ml.SingleLayerSampler, inputs, targets, lambda_gl=0.0):
    """∇ of CE(full, y) + CE(sampled, softmax(full).detach()) (+ λ·HGL), written out by hand."""
    model = copy.deepcopy(model)
    full = model(inputs)
    loss = F.cross_entropy(full, targets)
    with ml.sampled_ranks(model, sampler):
        sampled = model(inputs)
        loss = loss + F.cross_entropy(sampled, full.softmax(-1).detach())
        if lambda_gl:
            loss = loss + lambda_gl * ml.group_lasso(model)
        loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _update(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("reuse", ["auto", "off"])
def test_a_step_is_the_full_pass_plus_one_lower_rank_sub_model_distilled_from_it(digits, reuse):
    data = Subset(digits.train, range(64))
    model = ml.factorize(digits_mlp())
    seed = _lowering_seed(model)
    expected = _expected_maestro_gradients(model, ml.SingleLayerSampler(seed), *_batch(data))
    trainer = Trainer(model, data, data, one_step_config(reuse_prefix=reuse), sampler=ml.SingleLayerSampler(seed))
    lowered = []
    for _, layer in ml.low_rank_layers(trainer.model):
        layer.register_forward_pre_hook(lambda module, args: lowered.append(module.effective_rank < module.rank))
    before = _snapshot(trainer.model)
    trainer.train_epoch()
    assert sum(lowered) == 1, "exactly one layer call runs at a lower rank: the sampled sub-model"
    for name, delta in _update(before, trainer.model).items():
        torch.testing.assert_close(delta, -LR * expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_suffix_sampler_reuses_the_layers_before_its_first_draw(digits):
    """With ``sampler="suffix"``, the sampled pass starts at the first drawn layer: the layers
    before it run once per step (in the full pass) and the update is that of the plain formula."""
    data = Subset(digits.train, range(64))
    model = ml.factorize(digits_mlp())
    layers = list(ml.low_rank_layers(model))
    seed = next(s for s in range(100) if next(iter(ml.SuffixSampler(s).draw(layers))) != layers[0][0])
    expected = _expected_maestro_gradients(model, ml.SuffixSampler(seed), *_batch(data))
    trainer = Trainer(model, data, data, one_step_config(), sampler=ml.SuffixSampler(seed))
    trained = list(ml.low_rank_layers(trainer.model))
    first, factors = trained[0][1], trained[0][1].factors
    in_sampled_pass = []  # computations of the first layer while a draw is applied (a replay computes nothing)

    def counted():
        if any(layer.active_rank is not None for _, layer in trained):
            in_sampled_pass.append(1)
        return factors()

    first.factors = counted
    before = _snapshot(trainer.model)
    trainer.train_epoch()
    assert not in_sampled_pass, "the first layer runs in the full pass only"
    for name, delta in _update(before, trainer.model).items():
        torch.testing.assert_close(delta, -LR * expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_group_lasso_gradient_is_added_after_unscaling_the_mixed_precision_gradients(digits):
    data = Subset(digits.train, range(64))
    model = ml.factorize(digits_mlp())
    seed = _lowering_seed(model)
    expected = _expected_maestro_gradients(model, ml.SingleLayerSampler(seed), *_batch(data), lambda_gl=0.05)
    trainer = Trainer(model, data, data, one_step_config(lambda_gl=0.05), sampler=ml.SingleLayerSampler(seed))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)  # the AMP path, on the CPU
    before = _snapshot(trainer.model)
    trainer.train_epoch()
    for name, delta in _update(before, trainer.model).items():
        torch.testing.assert_close(delta, -LR * expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_clipping_bounds_the_whole_update(digits):
    data = Subset(digits.train, range(64))
    clip = 1e-3
    trainer = Trainer(ml.factorize(digits_mlp()), data, data, one_step_config(lambda_gl=0.05, grad_clip=clip))
    before = _snapshot(trainer.model)
    trainer.train_epoch()
    norm = torch.linalg.vector_norm(torch.cat([d.flatten() for d in _update(before, trainer.model).values()]))
    assert norm.item() == pytest.approx(LR * clip, rel=1e-4)


def test_without_recalibration_the_same_training_evaluates_with_the_full_passes_statistics(digits):
    """Recalibration changes no weight, and the sampled passes leave the running averages alone, so
    with ``bn_recal_batches = 0`` they are those of the full passes (as in dense training)."""
    data = Subset(digits.train, range(256))
    trainers = {}
    for batches in (0, 3):
        config = TrainConfig.from_dict(dict(epochs=2, batch_size=64, lr=0.05, lambda_gl=5e-3, eps_ps=0.2,
                                            bn_recal_batches=batches))
        torch.manual_seed(0)
        trainers[batches] = Trainer(SmallConvNet(), data, digits.val, config)
        trainers[batches].train_epoch()
    plain, recalibrated = trainers[0].model, trainers[3].model
    for (name, p), (_, q) in zip(plain.named_parameters(), recalibrated.named_parameters()):
        assert torch.equal(p, q), name
    norms = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [norm.num_batches_tracked.item() for norm in norms] == [len(data) // 64] * 2  # one per full pass
    recalibrated_norms = [m for m in recalibrated.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not torch.equal(norms[0].running_mean, recalibrated_norms[0].running_mean)


def test_recalibration_sets_batchnorm_statistics_to_those_of_the_current_ranks(digits):
    config = TrainConfig.from_dict(dict(epochs=1, batch_size=128, lr=0.05, lambda_gl=5e-3, eps_ps=0.2, bn_recal_batches=3))
    torch.manual_seed(0)
    trainer = Trainer(SmallConvNet(), digits.train, digits.val, config)
    initial = sum(ml.rank_pattern(trainer.model).values())
    trainer.train_epoch()
    assert sum(ml.rank_pattern(trainer.model).values()) < initial  # the epoch shrank the model first
    reference = copy.deepcopy(trainer.model).train()
    norms = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    with torch.no_grad():
        for index, (inputs, _) in enumerate(trainer._recalibration_batches(1)):
            if index == config.bn_recal_batches:
                break
            reference(inputs)
    trained = [m for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d)]
    for got, want in zip(trained, norms):
        torch.testing.assert_close(got.running_mean, want.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.running_var, want.running_var, rtol=1e-5, atol=1e-6)


def test_shrinking_cuts_at_the_first_tail_importance_not_the_first_small_rank():
    layer = ml.LowRankLinear.from_dense(nn.Linear(6, 6))
    with torch.no_grad():
        layer.truncate_(4)
        scale = torch.tensor([1.0, 1e-4, 1.0, 1e-4])  # rank 2 is tiny on its own, but ranks 2..4 are not
        layer.up.copy_(torch.eye(6, 4) * scale)
        layer.down.copy_(torch.eye(4, 6) * scale[:, None])
    assert ml.shrink_(layer, 1e-3) == {"": (4, 3)}


def test_the_trainer_shrinks_every_layer_whose_tail_importance_is_below_eps(digits):
    data = Subset(digits.train, range(64))
    trainer = Trainer(ml.factorize(digits_mlp()), data, data, one_step_config(eps_ps=1e6))
    trainer.train_epoch()
    assert set(ml.rank_pattern(trainer.model).values()) == {1}  # everything down to min_rank


class _FunctionalDropoutNet(nn.Module):
    """Dropout called in forward, invisible to a scan of the modules."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(F.dropout(torch.relu(self.fc1(x.flatten(1))), 0.3, self.training))


class _LSTMNet(nn.Module):
    """An LSTM with dropout between its layers (a leaf module whose randomness a scan cannot see)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.lstm(x.flatten(1).reshape(-1, 8, 8))[0][:, -1])


@pytest.mark.parametrize("model, reused", [(_FunctionalDropoutNet, False), (_LSTMNet, False), (digits_mlp, True)])
def test_prefix_reuse_is_used_only_for_models_that_run_deterministically(digits, model, reused):
    data = Subset(digits.train, range(64))
    trainer = Trainer(ml.factorize(model()), data, data, one_step_config())
    state = torch.get_rng_state()
    step = trainer.method.build_step(trainer)
    assert (step.reuse is not None) == reused
    assert torch.equal(torch.get_rng_state(), state), "the check must not change the run's random numbers"
    trainer.train_epoch()
    assert all(not m._forward_hooks for m in trainer.model.modules()), "no hooks outside a step"


def test_a_layer_at_rank_zero_trains_and_outputs_its_bias(digits):
    data = Subset(digits.train, range(64))
    model = ml.factorize(digits_mlp())
    ml.truncate_(model, {"3": 0})
    trainer = Trainer(model, data, data, one_step_config(lambda_gl=1e-3))
    trainer.train_epoch()
    layer = dict(ml.low_rank_layers(trainer.model))["3"]
    assert layer.rank == 0 and torch.isfinite(torch.tensor(trainer.history[-1].train_loss))
    torch.testing.assert_close(layer(torch.randn(5, 24)), layer.bias.detach().expand(5, 16))


def test_lambda_epochs_scales_the_group_lasso_with_the_run_length(digits):
    base = {"model": "mlp", "data": "digits", "epochs": 4, "lambda_gl": 1e-3, "device": "cpu"}
    for extra, expected in (({}, 1e-3), ({"lambda_epochs": 12}, 3e-3), ({"lambda_epochs": 12, "warmup_epochs": 2}, 6e-3)):
        trainer = Trainer(build_model("mlp", digits), digits.train, digits.val, TrainConfig.from_dict({**base, **extra}))
        assert trainer.method.scheduler.lam == pytest.approx(expected, rel=1e-12), extra


def test_group_weights_by_macs_weigh_the_convolutions_by_params_the_wide_layers(digits):
    model = ml.factorize(build_model("lenet5", digits, padding=2))
    names = [name for name, _ in low_rank_layers(model)]
    example = digits.val[0][0][None]
    by_macs = dict(zip(names, rank_cost_scales(model, example, names, "macs")))
    by_params = dict(zip(names, rank_cost_scales(model, example, names, "params")))
    assert sum(by_macs.values()) == pytest.approx(len(names)) and sum(by_params.values()) == pytest.approx(len(names))
    assert by_macs["conv1"] > by_macs["fc1"] and by_params["fc1"] > by_params["conv1"]
    layers = dict(low_rank_layers(model))
    width = {name: sum(layers[name].dense_shape()[:2]) for name in names}  # m + n: one rank's parameters
    assert by_params["fc1"] / by_params["fc3"] == pytest.approx(width["fc1"] / width["fc3"], rel=1e-12)
    assert rank_cost_scales(model, example, names, "uniform") is None
