"""Independent numeric checks of the method's load-bearing details: each test recomputes, by hand,
a number the library produces (BatchNorm statistics after recalibration, the greedy search's choice,
the orientation of a merged export, the balance of the SVD split, the detached teacher)."""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SmallConvNet
from torch import nn
from torch.utils.data import TensorDataset

import maestro_lod as ml
from maestro_lod.engine.passes import soft_loss
from maestro_lod.engine.reuse import PrefixReuse
from maestro_lod.engine.search import calibration_batches, greedy_front, materialize
from maestro_lod.functional import rank_importance, svd_split
from maestro_lod.layers import LowRankLinear
from maestro_lod.sampling import RankSampler
from maestro_lod.training.loop import Trainer
from maestro_lod.training.steps import MaestroStep
from maestro_lod.training.train_config import TrainConfig


# ---------------------------------------------------------------------------------------- helpers
def _batchnorms(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


@torch.no_grad()
def _expected_statistics(model, input_batches):
    """Per BatchNorm layer, the cumulative average over ``input_batches`` of the batch mean and the
    unbiased batch variance of the layer's input, with ``model`` (a copy) in training mode so that
    every BatchNorm normalises with its batch's statistics, as recalibration does."""
    work = copy.deepcopy(model).train()
    seen = {name: [] for name, _ in _batchnorms(work)}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].double()))
             for name, m in _batchnorms(work)]
    try:
        for inputs in input_batches:
            work(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0),
                   torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in xs]).mean(0), len(xs))
            for name, xs in seen.items()}


@torch.no_grad()
def _mean_cross_entropy(model, batches):
    model.eval()
    total = sum(F.cross_entropy(model(x).double(), y, reduction="sum") for x, y in batches)
    return float(total) / sum(len(y) for _, y in batches)


def _with_statistics(model, statistics):
    result = copy.deepcopy(model)
    for name, bn in _batchnorms(result):
        mean, var, _ = statistics[name]
        bn.running_mean.copy_(mean.float())
        bn.running_var.copy_(var.float())
    return result.eval()


# -------------------------------------------------------------- a. BatchNorm recalibration (loop)
def test_after_an_epoch_the_evaluated_batchnorm_statistics_are_those_of_the_current_ranks(one_thread):
    torch.manual_seed(0)
    train = TensorDataset(torch.randn(48, 1, 8, 8) * 2 + 0.5, torch.randint(0, 10, (48,)))
    val = TensorDataset(torch.randn(24, 1, 8, 8) * 2 + 0.5, torch.randint(0, 10, (24,)))
    # one batch per epoch: the recalibration set is the whole training set, in any order
    config = TrainConfig.from_dict({"epochs": 1, "batch_size": 48, "eval_batch_size": 24, "bn_recal_batches": 4,
                                    "device": "cpu", "lr": 0.01, "eps_ps": 0.25, "lambda_gl": 1e-4, "reference": "none"})
    model = ml.factorize(SmallConvNet())
    before = ml.rank_pattern(model)
    trainer = Trainer(model, train, val, config)
    record = trainer.train_epoch()
    trainer.close()
    after = ml.rank_pattern(trainer.model)
    assert after != before  # shrinking changed the ranks: the statistics must be of the shrunk model
    assert after["conv1"] < before["conv1"] and after["fc1"] < before["fc1"]

    expected = _expected_statistics(trainer.model, [train.tensors[0]])
    for name, bn in _batchnorms(trainer.model):
        mean, var, _ = expected[name]
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-4, atol=1e-5, msg=name)
        assert int(bn.num_batches_tracked) == 1
        assert bn.momentum == 0.1  # the training momentum is back
    # and the recorded validation loss is that of the model with these statistics
    reference = _with_statistics(trainer.model, expected)
    assert record.val_loss == pytest.approx(_mean_cross_entropy(reference, [val.tensors]), rel=1e-5)


# ------------------------------------------------------------ a. BatchNorm recalibration (search)
def test_every_front_point_scores_the_model_with_statistics_recomputed_at_its_ranks():
    torch.manual_seed(0)
    model = ml.factorize(SmallConvNet())
    with torch.no_grad():  # trained statistics that describe other data than the calibration set
        model.train()
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8) * 0.5 - 1.0)
    data = TensorDataset(torch.randn(64, 1, 8, 8) + 0.3, torch.randint(0, 10, (64,)))
    calibration = calibration_batches(data, size=64, batch_size=32)
    front = greedy_front(model, calibration, cost="macs", step=0.5)
    assert len(front.points) > 5
    trained_loss = _mean_cross_entropy(copy.deepcopy(model), calibration)
    assert front.points[0].calibration_loss == pytest.approx(trained_loss, rel=1e-5)  # trained statistics kept
    for point in front.points[1:]:
        truncated = copy.deepcopy(model)
        ml.truncate_(truncated, point.ranks)
        expected = _expected_statistics(truncated, [x for x, _ in calibration])
        loss = _mean_cross_entropy(_with_statistics(truncated, expected), calibration)
        assert point.calibration_loss == pytest.approx(loss, rel=1e-5), point.index
    # the model materialised at a point carries those statistics too
    point = front.points[len(front.points) // 2]
    materialised = materialize(model, point, calibration)
    truncated = copy.deepcopy(model)
    ml.truncate_(truncated, point.ranks)
    expected = _expected_statistics(truncated, [x for x, _ in calibration])
    for name, bn in _batchnorms(materialised):
        assert expected[name][2] == 2
        torch.testing.assert_close(bn.running_mean.double(), expected[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), expected[name][1], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- b. the greedy search's choice
def test_the_first_search_round_keeps_the_removal_with_the_smallest_loss_increase_per_mac():
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    inputs = torch.randn(128, 20)
    with torch.no_grad():
        targets = dense(inputs).argmax(-1)  # labels the dense model fits: removals cost accuracy
    # rank 6 is below every layer's merge point (r·(m+n) < m·n), so each removal saves m+n MACs
    model = ml.factorize(dense, ml.FactorizeConfig(rank=6))
    calibration = [(inputs, targets)]
    front = greedy_front(model, calibration, cost="macs", step=0.25)

    example = inputs[:1]
    base_loss = _mean_cross_entropy(copy.deepcopy(model), calibration)
    base_macs = ml.count_macs(ml.export(model), example)
    assert front.points[0].calibration_loss == pytest.approx(base_loss, rel=1e-6)
    assert front.points[0].macs == base_macs
    candidates = {}
    for name, layer in ml.low_rank_layers(model):
        ranks = {**ml.rank_pattern(model), name: layer.rank - max(1, int(0.25 * layer.rank))}
        truncated = copy.deepcopy(model)
        ml.truncate_(truncated, ranks)
        saved = base_macs - ml.count_macs(ml.export(truncated), example)
        loss = _mean_cross_entropy(truncated, calibration)
        candidates[name] = ((loss - base_loss) / saved, ranks, loss, base_macs - saved)
    assert {name: c[3] for name, c in candidates.items()} == {  # m+n saved per removed rank
        "0": base_macs - 36, "2": base_macs - 32, "4": base_macs - 26}
    ratios = sorted(c[0] for c in candidates.values())
    assert ratios[1] - ratios[0] > 1e-3 * abs(ratios[0])  # a clear best: the test tells best from the rest
    best = min(candidates, key=lambda n: candidates[n][0])
    worst = max(candidates, key=lambda n: candidates[n][0])
    assert best != worst
    _, ranks, loss, macs = candidates[best]
    assert front.points[1].ranks == ranks
    assert front.points[1].calibration_loss == pytest.approx(loss, rel=1e-6)
    assert front.points[1].macs == macs


# ------------------------------------------------------------- c. a square merged Linear on export
@pytest.mark.parametrize("rank, merge", [(12, "auto"), (6, "auto"), (3, "always")])
def test_a_square_linear_is_exported_merged_with_weight_up_times_down(rank, merge):
    torch.manual_seed(1)
    layer = LowRankLinear.from_dense(nn.Linear(12, 12), rank=rank)
    with torch.no_grad():  # trained factors: no longer an SVD of anything symmetric or orthogonal
        layer.up.add_(0.2 * torch.randn_like(layer.up))
        layer.down.add_(0.2 * torch.randn_like(layer.down))
    model = nn.Sequential(layer, nn.Tanh())
    weight = (layer.up @ layer.down).detach()
    assert (weight - weight.T).abs().max() > 0.1  # transposing would change it
    assert layer.merge_saves_params() == (rank >= 6)  # 6·(12+12) = 12·12: the merge point
    exported = ml.export(model, merge=merge)
    merged = exported[0]
    assert type(merged) is nn.Linear and (merged.in_features, merged.out_features) == (12, 12)
    torch.testing.assert_close(merged.weight.detach(), weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(merged.bias.detach(), layer.bias.detach())
    x = torch.randn(5, 12) * torch.linspace(0.1, 3.0, 12)  # no symmetry in the inputs either
    with torch.no_grad():
        expected = torch.tanh(x @ weight.T + layer.bias)
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ d. the balanced SVD split
@pytest.mark.parametrize("shape, rank", [((9, 6), 6), ((7, 11), 4), ((2, 5, 8), 3), ((12, 12), 12)])
def test_svd_split_gives_both_factors_root_singular_value_norms_per_rank(shape, rank):
    torch.manual_seed(2)
    weight = torch.randn(shape, dtype=torch.float64) * torch.linspace(0.2, 4.0, shape[-1], dtype=torch.float64)
    up, down = svd_split(weight, rank)
    sigma = torch.linalg.svdvals(weight)[..., :rank]
    up_norms = up.norm(dim=-2)  # column b of up
    down_norms = down.norm(dim=-1)  # row b of down
    torch.testing.assert_close(up_norms, down_norms, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(up_norms, sigma.sqrt(), rtol=1e-10, atol=1e-12)
    # orthogonal columns / rows: the importance of rank b is the sum of the singular values from b on
    if weight.dim() == 2:
        tail = sigma.flip(-1).cumsum(-1).flip(-1)
        torch.testing.assert_close(rank_importance(up, down), tail, rtol=1e-10, atol=1e-12)
    # and the product is the best rank-r approximation
    best = torch.linalg.svd(weight, full_matrices=False)
    p, s, qh = best
    torch.testing.assert_close(up @ down, p[..., :rank] @ torch.diag_embed(s[..., :rank]) @ qh[..., :rank, :],
                               rtol=1e-10, atol=1e-10)


def test_a_factorised_layer_starts_with_balanced_factors():
    torch.manual_seed(4)
    linear = nn.Linear(10, 7)
    layer = LowRankLinear.from_dense(linear, rank=5)
    sigma = torch.linalg.svdvals(linear.weight.detach().double())[:5]
    torch.testing.assert_close(layer.up.detach().double().norm(dim=0), sigma.sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.down.detach().double().norm(dim=1), sigma.sqrt(), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------- e. the detached teacher
@pytest.mark.parametrize("masked", [False, True])
def test_distillation_loss_sends_no_gradient_to_the_teacher(masked):
    torch.manual_seed(5)
    logits = torch.randn(6, 9, requires_grad=True)
    teacher = torch.randn(6, 9, requires_grad=True)
    targets = torch.randint(0, 9, (6,))
    loss = soft_loss(logits, teacher, targets, masked)
    grad_logits, grad_teacher = torch.autograd.grad(loss, (logits, teacher), allow_unused=True)
    assert grad_teacher is None or torch.count_nonzero(grad_teacher) == 0
    # the student's gradient is (softmax(student) − softmax(teacher)) / positions
    expected = (logits.softmax(-1) - teacher.softmax(-1)).detach() / 6
    torch.testing.assert_close(grad_logits, expected, rtol=1e-5, atol=1e-7)
    # an undetached teacher would get a gradient of this size: the check above can fail
    undetached = F.cross_entropy(logits, teacher.softmax(-1))
    (leak,) = torch.autograd.grad(undetached, teacher)
    assert leak.abs().max() > 1e-3


class _LastLayerHalf(RankSampler):
    """Deterministic draw: the last low-rank layer at half its rank (the others at full rank), so
    the first layers form a prefix the sampled pass may reuse."""

    def draw(self, layers):
        name, layer = layers[-1]
        return {name: layer.rank // 2}


def _hand_gradients(model, inputs, targets, detach):
    """Gradients of CE(full, y) + CE(sampled, softmax(full)) with the teacher detached or not."""
    reference = copy.deepcopy(model)
    full = reference(inputs)
    *_, (_, last) = ml.low_rank_layers(reference)
    last.active_rank = last.rank // 2
    sampled = reference(inputs)
    last.active_rank = None
    teacher = full.softmax(-1)
    loss = F.cross_entropy(full, targets) + F.cross_entropy(sampled, teacher.detach() if detach else teacher)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in reference.named_parameters()}


@pytest.mark.parametrize("reuse", [True, False])
def test_maestro_step_gradients_are_those_of_a_detached_teacher(reuse):
    torch.manual_seed(6)
    model = ml.factorize(nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                                       nn.Linear(12, 10)))
    inputs, targets = torch.randn(32, 1, 4, 4), torch.randint(0, 10, (32,))
    expected_loss, expected = _hand_gradients(model, inputs, targets, detach=True)
    _, leaked = _hand_gradients(model, inputs, targets, detach=False)
    # the teacher's gradient is not negligible: it moves every full-pass parameter
    assert max((leaked[n] - expected[n]).abs().max() for n in expected) > 1e-3

    step = MaestroStep(model, list(ml.low_rank_layers(model)), _LastLayerHalf(0), contextlib.nullcontext,
                       reuse=PrefixReuse(model) if reuse else None)
    numbers = step(inputs, targets, lambda loss: loss.backward())
    step.close()
    assert step.passes == [{}, {"5": 5}]
    assert float(numbers[0]) == pytest.approx(float(expected_loss), rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert math.isfinite(float(numbers[2]))
