"""One optimisation step's pieces: the closed-form group-lasso gradient, reuse of the full pass's
prefix, and the masked distillation loss."""

import contextlib
import copy
import weakref

import pytest
import torch
from conftest import SmallConvNet
from torch import nn

import maestro_lod as ml
from maestro_lod.data import IGNORE_INDEX
from maestro_lod.regularization import GroupLassoGradient
from maestro_lod.engine.reuse import PrefixReuse, prefix_reuse_supported
from maestro_lod.training import MaestroConfig
from maestro_lod.training.steps import MaestroStep
from maestro_lod.engine.passes import soft_loss


@pytest.mark.parametrize("hierarchical", [True, False])
def test_closed_form_group_lasso_matches_autograd(hierarchical):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(24, 7))
    ml.factorize(model)
    layers = [layer for _, layer in ml.low_rank_layers(model)]
    with torch.no_grad():  # exactly zero trailing ranks: the subgradient must stay finite
        layers[-1].up[:, 4:] = 0
        layers[-1].down[4:] = 0
    (0.01 * ml.group_lasso(model, hierarchical)).backward()
    expected = [p.grad.clone() for layer in layers for p in (layer.up, layer.down)]
    model.zero_grad(set_to_none=True)
    value = GroupLassoGradient(layers, 0.01, hierarchical).add_to_grads_()
    assert value.item() == pytest.approx(0.01 * ml.group_lasso(model, hierarchical).item(), rel=1e-6)
    for want, (layer, p) in zip(expected, [(lay, p) for lay in layers for p in (lay.up, lay.down)]):
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-8)


def _grads_after_step(model, reuse, sampler_seed, inputs, targets):
    layers = list(ml.low_rank_layers(model))
    step = MaestroStep(model, layers, ml.SingleLayerSampler(sampler_seed), contextlib.nullcontext,
                       reuse=PrefixReuse(model) if reuse else None)
    model.zero_grad(set_to_none=True)
    numbers = step(inputs, targets, lambda loss: loss.backward())
    return numbers, {n: p.grad.clone() for n, p in model.named_parameters()}, step


def test_prefix_reuse_gives_the_same_gradients_and_skips_work():
    torch.manual_seed(0)
    model = ml.factorize(SmallConvNet())
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    replayed = 0
    for seed in range(8):  # draws across the layers, including full-rank draws
        plain_numbers, plain, _ = _grads_after_step(copy.deepcopy(model), False, seed, inputs, targets)
        reuse_numbers, reused, step = _grads_after_step(copy.deepcopy(model), True, seed, inputs, targets)
        torch.testing.assert_close(reuse_numbers, plain_numbers, rtol=1e-5, atol=1e-6)
        for name in plain:
            torch.testing.assert_close(reused[name], plain[name], rtol=1e-4, atol=1e-6)
        replayed += step.reuse.replayed + step.second_passes_skipped
        step.reuse.close()
    assert replayed > 0


def test_prefix_reuse_prefix_stops_at_the_first_changed_layer():
    model = ml.factorize(SmallConvNet())
    reuse = PrefixReuse(model)
    with reuse.recording():
        model(torch.randn(4, 1, 8, 8))
    assert [m for m, _ in reuse.prefix({model.conv1})] == []
    assert [m for m, _ in reuse.prefix({model.fc1})][:2] == [model.conv1, model.bn1]
    assert model.fc1 not in [m for m, _ in reuse.prefix({model.fc1})]
    reuse.close()
    assert not model.conv1._forward_hooks


def test_prefix_reuse_refuses_dropout_and_inplace_models():
    assert prefix_reuse_supported(SmallConvNet()) is None
    assert "dropout" in prefix_reuse_supported(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)))
    assert "in place" in prefix_reuse_supported(nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True)))


def test_soft_loss_ignores_padding_positions():
    logits, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[:, 3:] = IGNORE_INDEX
    masked = soft_loss(logits, teacher, targets, masked=True)
    expected = soft_loss(logits[:, :3], teacher[:, :3], targets[:, :3], masked=False)
    assert masked.item() == pytest.approx(expected.item(), rel=1e-6)


def test_masked_soft_loss_equals_the_mean_over_the_kept_positions_in_value_and_gradient():
    # float32, as soft_loss computes; the sum over positions runs in another order than the mean
    logits = torch.randn(3, 6, 11, requires_grad=True)
    teacher = torch.randn(3, 6, 11)
    targets = torch.randint(0, 11, (3, 6))
    targets[0, 4:], targets[2, :5] = IGNORE_INDEX, IGNORE_INDEX
    loss = soft_loss(logits, teacher, targets, masked=True)
    (grad,) = torch.autograd.grad(loss, logits)
    valid = targets != IGNORE_INDEX
    kept = logits.reshape(-1, 11)[valid.reshape(-1)]
    expected = torch.nn.functional.cross_entropy(kept, teacher.reshape(-1, 11)[valid.reshape(-1)].softmax(-1))
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
    assert grad[~valid].abs().sum() == 0  # the ignored positions learn nothing


def test_without_reuse_the_full_loss_is_backpropagated_before_the_sampled_pass():
    torch.manual_seed(0)
    model = ml.factorize(nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Dropout(0.2), nn.Linear(24, 10)))
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    reference = copy.deepcopy(model)
    torch.manual_seed(1)  # the dropout masks of both passes
    full = reference(inputs)
    with ml.sampled_ranks(reference, ml.SingleLayerSampler(3)):
        sampled = reference(inputs)
        (torch.nn.functional.cross_entropy(full, targets)
         + torch.nn.functional.cross_entropy(sampled, full.softmax(-1).detach())).backward()
    live, saved_at_backward = [0], []

    class Saved:  # what autograd keeps for backward, counted while it is alive
        def __init__(self, tensor):
            self.tensor = tensor
            live[0] += 1
            weakref.finalize(self, lambda: live.__setitem__(0, live[0] - 1))

    def backward(loss):
        saved_at_backward.append(live[0])
        loss.backward()

    step = MaestroStep(model, list(ml.low_rank_layers(model)), ml.SingleLayerSampler(3), contextlib.nullcontext)
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        numbers = step(inputs, targets, backward)
    # two backward calls; when the second ran, the full pass's saved tensors were already gone
    assert len(saved_at_backward) == 2 and 0 < saved_at_backward[1] <= saved_at_backward[0]
    assert numbers[0] == numbers[1] + numbers[2]
    for (name, p), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p.grad, want.grad), name  # two contributions added in either order: bit for bit


def test_training_macs_count_the_pairs_where_a_layer_runs_the_composed_product():
    from maestro_lod.training.step_macs import PassCost
    torch.manual_seed(0)
    model = ml.factorize(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64, 10)))
    x = torch.randn(1, 1, 8, 8)
    conv, fc = model[0], model[2]
    assert conv.composes(64) and not fc.composes(1)  # rank 4 over 64 positions: 64·4·13 > 36·(4 + 64)
    assert ml.count_macs(model, x) == 36 * (4 + 64) + 10 * (256 + 10)  # what runs
    cost = PassCost.measure(model, x)
    assert cost.forward_macs == 64 * 4 * (4 + 9) + 10 * (256 + 10)  # the pairs, as the paper counts
    assert cost.forward_of({"0": 2}) == 64 * 2 * (4 + 9) + 10 * (256 + 10)


def test_a_sampled_pass_on_part_of_the_batch_distils_those_examples_only():
    torch.manual_seed(0)
    model = ml.factorize(SmallConvNet())
    inputs, targets = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    reference = copy.deepcopy(model)
    full = reference(inputs)
    with ml.sampled_ranks(reference, ml.IndependentSampler(3)) as draw:
        assert any(rank < dict(ml.low_rank_layers(reference))[name].rank for name, rank in draw.items())
        sampled = reference(inputs[:3])  # ceil(0.25 · 10) examples
        loss_sampled = soft_loss(sampled, full[:3], targets[:3], False)
        (torch.nn.functional.cross_entropy(full, targets) + loss_sampled).backward()

    step = MaestroStep(model, list(ml.low_rank_layers(model)), ml.IndependentSampler(3), contextlib.nullcontext,
                       sampled_batch=0.25)
    numbers = step(inputs, targets, lambda loss: loss.backward())
    assert step.shares == [1.0, 0.3]
    assert numbers[2].item() == pytest.approx(loss_sampled.item(), rel=1e-5)
    for (name, p), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("reuse", [False, True])
def test_the_sampled_weight_scales_the_distillation_gradient_only(reuse):
    """``loss = CE(full, y) + w · CE(sampled, softmax(full))``: with and without prefix reuse (where
    the full loss is backpropagated separately or together with the sampled one)."""
    torch.manual_seed(0)
    model = ml.factorize(SmallConvNet())
    inputs, targets = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    reference = copy.deepcopy(model)
    full = reference(inputs)
    with ml.sampled_ranks(reference, ml.IndependentSampler(3)):
        loss_sampled = soft_loss(reference(inputs), full, targets, False)
        (torch.nn.functional.cross_entropy(full, targets) + 0.25 * loss_sampled).backward()

    step = MaestroStep(model, list(ml.low_rank_layers(model)), ml.IndependentSampler(3), contextlib.nullcontext,
                       reuse=PrefixReuse(model) if reuse else None, sampled_weight=0.25)
    numbers = step(inputs, targets, lambda loss: loss.backward())
    assert numbers[2].item() == pytest.approx(loss_sampled.item(), rel=1e-5)  # the unweighted part is logged
    for (name, p), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_sampled_pass_on_part_of_the_batch_is_counted_at_its_share():
    from maestro_lod.training.step_macs import PassCost
    model = ml.factorize(nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10)))
    cost = PassCost.measure(model, torch.randn(1, 1, 8, 8))
    full, lowered = cost.forward_macs, cost.forward_of({"1": 4})
    assert cost.step_macs([{}, {"1": 4}], 64) == 3 * 64 * (full + lowered)
    assert cost.step_macs([{}, {"1": 4}], 64, [1.0, 0.25]) == 3 * (64 * full + 16 * lowered)


def test_a_sampled_pass_on_part_of_the_batch_refuses_what_it_cannot_run():
    with pytest.raises(ml.ConfigError, match=r"sampled_batch=0 must be a number in \(0, 1\]"):
        MaestroConfig(sampled_batch=0)
    with pytest.raises(ml.ConfigError, match="sampled_batch=0.5 needs the full pass"):
        MaestroConfig(sampled_batch=0.5, full_pass=False)
    with pytest.raises(ml.ConfigError, match="sampled_batch=0.5 cannot reuse"):
        MaestroConfig(sampled_batch=0.5, reuse_prefix="on")
    model = ml.factorize(nn.Sequential(nn.Linear(4, 4)))
    step = MaestroStep(model, list(ml.low_rank_layers(model)), ml.IndependentSampler(0), contextlib.nullcontext,
                       sampled_batch=0.5)
    with pytest.raises(ValueError, match=r"outputs of shape \(6, 4\) for targets of shape \(3, 2\)"):
        step(torch.randn(6, 4), torch.zeros(3, 2, dtype=torch.long), lambda loss: loss.backward())  # flattened outputs


@pytest.mark.parametrize("sampled_batch", [1.0, 0.5])
def test_the_sampled_pass_leaves_batchnorm_statistics_to_the_full_model(sampled_batch):
    torch.manual_seed(0)
    model = ml.factorize(SmallConvNet())
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        reference(inputs)  # the full pass alone
    step = MaestroStep(model, list(ml.low_rank_layers(model)), ml.IndependentSampler(3), contextlib.nullcontext,
                       sampled_batch=sampled_batch)
    model.train()
    step(inputs, targets, lambda loss: loss.backward())
    assert step.passes[1]  # a sub-model ran through the BatchNorm layers
    for (name, got), (_, want) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(got, want), name


def test_a_stem_kept_dense_is_replayed_under_the_independent_sampler():
    """The independent sampler lowers the rank of almost every factorised layer in every step, so
    with the stem factorised the prefix is rarely reusable; kept dense (``keep_ends``), the stem and
    its BatchNorm come from the full pass in every step, with the same gradients as recomputing
    them."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    steps = 6
    for keep_ends in (False, True):
        model = ml.factorize(SmallConvNet(), ml.FactorizeConfig(keep_ends=keep_ends))
        assert ("conv1" in dict(ml.low_rank_layers(model))) is not keep_ends
        replaying_steps = 0
        for seed in range(steps):
            grads = []
            for reuse in (None, PrefixReuse(model)):
                step = MaestroStep(model, list(ml.low_rank_layers(model)), ml.IndependentSampler(seed),
                                   contextlib.nullcontext, reuse=reuse)
                model.zero_grad(set_to_none=True)
                step(inputs, targets, torch.Tensor.backward)
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            replaying_steps += reuse.replayed > 0
            for name in grads[0]:
                torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
        assert (replaying_steps == steps) is keep_ends
