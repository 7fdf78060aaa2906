"""The trainer's process strategy (:mod:`maestro_lod.training.distributed`) and precision
(:mod:`maestro_lod.training.precision`): the single process and float32 change nothing (a step is a
plain PyTorch step), a gradient scaler's gradients are unscaled before the group-lasso gradient is
added and before clipping, and the scaler's state continues through a checkpoint.

The trainer is driven for one optimisation step where a step is checked: one batch holding the
whole (small) training set, plain SGD without momentum.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from conftest import ONE_STEP_LR, digits_mlp, one_step_config
from torch.utils.data import DataLoader, Subset

import maestro_lod as ml
from maestro_lod.training import Trainer, load_checkpoint, save_checkpoint
from maestro_lod.training.distributed import DataParallel, Distributed, GlobalBatchSampler, Shard
from maestro_lod.training.precision import (AutocastPrecision, Precision, ScaledPrecision, build_precision,
                                            float16_mixed)

LR = ONE_STEP_LR
SCALE = 2.0 ** 12




def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _update(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}


def _scaled(trainer: Trainer, **options) -> ScaledPrecision:
    """A gradient scaler on the CPU around the trainer's float32 forward passes (the scaling path
    of ``amp``, with exact float32 numbers: scaling by a power of two loses nothing)."""
    trainer.precision = ScaledPrecision(torch.amp.GradScaler("cpu", init_scale=SCALE, **options), trainer.precision)
    return trainer.precision


# ------------------------------------------------------------------------- the single process
def test_the_single_process_changes_nothing(digits):
    one = Distributed()
    assert (one.world_size, one.rank, one.is_main, one.enabled) == (1, 0, True, False)
    assert type(Distributed.from_env("cpu")) is Distributed  # no torchrun environment in the tests
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        assert one.process_device(device) == device
    assert one.eval_shard(digits.val) is digits.val

    loader = one.train_loader(digits.train, 32, torch.Generator().manual_seed(5))
    plain = DataLoader(digits.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(5))
    for _ in range(2):  # two epochs: the generator moves on alike
        for (x, y), (px, py) in zip(loader, plain, strict=True):
            assert torch.equal(x, px) and torch.equal(y, py)
    assert one.global_items(loader, 3, 17) == 17

    model = digits_mlp()
    model(torch.randn(4, 64)).sum().backward()
    before = _snapshot(model)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    numbers = torch.tensor([1.5, 1.0, 0.5, 3.0, 4.0])
    assert one.reduce_step(model.parameters(), numbers, loader, 0, 3) is numbers
    assert one.reduce_sum(numbers, torch.device("cpu")) is numbers
    assert one.all_reduce_sum(numbers) is numbers
    one.broadcast_module(model)
    one.broadcast_buffers(model)
    one.after_shrink(model, 1)
    one.check_same({"a": 1}, "anything")
    assert one.gather(7) == [7]
    one.close()
    assert torch.equal(numbers, torch.tensor([1.5, 1.0, 0.5, 3.0, 4.0]))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and torch.equal(p.grad, grads[name]), name
    assert one.comm_time == 0.0


def test_data_parallel_shares_the_batches_and_the_validation_items():
    """What a process of two does without touching the process group."""
    rank1 = DataParallel(2, 1, local_rank=1)
    assert (rank1.world_size, rank1.rank, rank1.is_main, rank1.enabled) == (2, 1, False, True)
    assert rank1.process_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert rank1.process_device(torch.device("cpu")) == torch.device("cpu")
    items = list(range(11))
    shard = rank1.eval_shard(items)
    assert isinstance(shard, Shard) and [shard[i] for i in range(len(shard))] == [1, 3, 5, 7, 9]
    loader = rank1.train_loader(items, 2, torch.Generator().manual_seed(0))
    assert isinstance(loader.batch_sampler, GlobalBatchSampler)
    assert [len(b) for b in loader] == [2, 2, 1]  # global batches of 4, 4, 3 items
    assert rank1.global_items(loader, 0, 2) == 4 and rank1.global_items(loader, 2, 1) == 3


# --------------------------------------------------------------------------------- precisions
def test_float32_changes_nothing():
    precision = Precision()
    assert build_precision(False, torch.device("cpu")).__class__ is Precision and precision.scaler is None
    with pytest.raises(ml.ConfigError, match="amp=true needs a CUDA device, but the run uses cpu"):
        build_precision(True, torch.device("cpu"))
    inputs, targets = torch.randn(8, 64), torch.randint(0, 10, (8,))
    models = [digits_mlp(), digits_mlp()]
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR) for m in models]
    F.cross_entropy(models[0](inputs), targets).backward()
    optimizers[0].step()
    with precision.autocast():
        loss = F.cross_entropy(models[1](inputs), targets)
    assert loss.dtype == torch.float32
    precision.backward(loss)
    precision.unscale_(optimizers[1])
    precision.step(optimizers[1])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert precision.state_dict() is None
    precision.load_state_dict({"scale": 2.0})  # another precision's state: ignored


def test_autocast_precisions_run_the_forward_passes_in_their_dtype():
    model, inputs = digits_mlp(), torch.randn(4, 64)
    with AutocastPrecision("cpu").autocast():
        assert model(inputs).dtype == torch.bfloat16
    half = float16_mixed("cpu", torch.amp.GradScaler("cpu", init_scale=SCALE))
    with half.autocast():
        assert model(inputs).dtype == torch.float16
    assert half.state_dict()["scale"] == SCALE


def test_a_trainer_step_with_one_process_in_float32_is_a_plain_pytorch_step(digits):
    data = Subset(digits.train, range(64))
    config = one_step_config(method="dense")
    trainer = Trainer(digits_mlp(), data, data, config, distributed=Distributed())
    assert type(trainer.precision) is Precision and trainer.scaler is None
    model = copy.deepcopy(trainer.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
    inputs, targets = next(iter(DataLoader(data, batch_size=64, shuffle=True,
                                           generator=torch.Generator().manual_seed(config.seed))))
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    trainer.train_epoch()
    for (name, got), want in zip(trainer.model.named_parameters(), model.parameters()):
        assert torch.equal(got, want), name


# ---------------------------------------------------------------------- the gradient scaler
def test_setting_a_scaler_wraps_the_forward_passes_of_the_precision(digits):
    data = Subset(digits.train, range(64))
    trainer = Trainer(ml.factorize(digits_mlp()), data, data, one_step_config())
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    trainer.scaler = scaler
    assert isinstance(trainer.precision, ScaledPrecision) and trainer.scaler is scaler
    assert type(trainer.precision.inner) is Precision
    trainer.scaler = torch.amp.GradScaler("cpu")  # replaces the scaler, keeps the forward passes
    assert type(trainer.precision.inner) is Precision and trainer.scaler is not scaler
    trainer.scaler = None
    assert type(trainer.precision) is Precision


def test_the_scaled_gradients_are_unscaled_before_the_group_lasso_gradient_is_added(digits):
    """With λ > 0, a step with a scaler makes the update a step without one makes (the scale is a
    power of two: the scaled gradients are exact); a penalty added to scaled gradients would be
    divided by the scale."""
    data = Subset(digits.train, range(64))
    updates = []
    for scaled in (False, True):
        trainer = Trainer(ml.factorize(digits_mlp()), data, data, one_step_config(lambda_gl=0.05),
                          sampler=ml.SingleLayerSampler(0))
        if scaled:
            precision = _scaled(trainer)
        before = _snapshot(trainer.model)
        trainer.train_epoch()
        updates.append(_update(before, trainer.model))
    assert precision.scaler.get_scale() == SCALE  # no overflow: the step was taken
    for name, delta in updates[1].items():
        torch.testing.assert_close(delta, updates[0][name], rtol=1e-6, atol=1e-9, msg=name)


def test_the_scaled_gradients_are_unscaled_before_clipping(digits):
    """Clipping bounds the true gradient: the update's norm is lr·clip with a scaler too (clipping
    the scaled gradient, then unscaling, would leave lr·clip / scale)."""
    data = Subset(digits.train, range(64))
    clip = 1e-3
    trainer = Trainer(ml.factorize(digits_mlp()), data, data, one_step_config(lambda_gl=0.05, grad_clip=clip))
    _scaled(trainer)
    before = _snapshot(trainer.model)
    trainer.train_epoch()
    norm = torch.linalg.vector_norm(torch.cat([d.flatten() for d in _update(before, trainer.model).values()]))
    assert norm.item() == pytest.approx(LR * clip, rel=1e-4)


def test_the_scaler_state_continues_through_a_checkpoint(digits, tmp_path):
    data = Subset(digits.train, range(64))
    config = one_step_config(epochs=2, batch_size=16)

    def make(scaled: bool = True) -> Trainer:
        trainer = Trainer(ml.factorize(digits_mlp()), data, data, config)
        if scaled:  # the scale doubles after every step without overflow
            _scaled(trainer, growth_interval=1)
        return trainer

    full = make()
    full.fit()
    interrupted = make()
    interrupted.train_epoch()
    state = interrupted.state_dict()
    assert state["scaler"] == interrupted.scaler.state_dict() and state["scaler"]["scale"] == SCALE * 2 ** 4
    save_checkpoint(tmp_path / "run.st", state)

    saved = load_checkpoint(tmp_path / "run.st")
    assert saved["scaler"] == state["scaler"]
    resumed = make()
    resumed.load_state_dict(saved)
    assert resumed.scaler.state_dict() == state["scaler"]
    resumed.fit()
    assert resumed.scaler.state_dict() == full.scaler.state_dict()
    assert full.scaler.get_scale() == SCALE * 2 ** 8
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key

    plain = make(scaled=False)  # float32 writes no scaler state and ignores a stored one
    assert plain.state_dict()["scaler"] is None
    plain.load_state_dict(saved)
    assert plain.scaler is None
