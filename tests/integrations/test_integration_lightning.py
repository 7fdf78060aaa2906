"""MAESTRO through Lightning: the callback, the loss helper, checkpoints, and parity with the repo's step."""

import copy
import contextlib

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

import maestro_lod as ml  # noqa: E402
from maestro_lod.data import load_data  # noqa: E402
from maestro_lod.errors import CheckpointError, ConfigError  # noqa: E402
from maestro_lod.integrations.lightning import MaestroCallback, maestro_loss  # noqa: E402
from maestro_lod.models import build_model  # noqa: E402
from maestro_lod.regularization import GroupLassoGradient  # noqa: E402
from maestro_lod.training import MaestroConfig  # noqa: E402
from maestro_lod.training.step_macs import rank_cost_scales  # noqa: E402
from maestro_lod.training.steps import MaestroStep  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # these small models train fastest on one thread


@pytest.fixture(scope="module")
def mnist():
    data = load_data("mnist5k")
    return data, torch.utils.data.Subset(data.train, range(256)), torch.utils.data.Subset(data.val, range(100))


class LeNet(pl.LightningModule):
    def __init__(self, data, lr=0.05, momentum=0.9, model="lenet5"):
        super().__init__()
        self.net = build_model(model, data)
        self.lr, self.momentum = lr, momentum

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return maestro_loss(self, x, y, F.cross_entropy)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def trainer(callback, **kwargs):
    options = dict(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(callbacks=[callback], **{**options, **kwargs})


def loader(dataset, batch_size=64):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


def test_two_epochs_shrink_log_and_resume_restores_ranks(mnist, tmp_path):
    data, train, val = mnist
    torch.manual_seed(0)
    module, callback = LeNet(data), MaestroCallback(lambda_gl=1e-2, eps_ps=0.05)
    fit = trainer(callback, default_root_dir=tmp_path)
    fit.fit(module, loader(train), loader(val))
    ranks = ml.rank_pattern(module)
    assert len(callback.shrinks) == 2
    assert ranks["net.fc1"] < 120 and ranks["net.fc2"] < 84
    metrics = fit.callback_metrics
    assert metrics["maestro/total_rank"] == sum(ranks.values())
    assert metrics["maestro/params"] == ml.count_params(module)
    assert metrics["maestro/macs"] > 0 and "maestro/loss_sampled" in metrics and "maestro/penalty" in metrics
    # the optimiser state was sliced with the factors
    state = fit.optimizers[0].state[module.net.fc1.up]["momentum_buffer"]
    assert state.shape == module.net.fc1.up.shape
    path = tmp_path / "last.ckpt"
    fit.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["maestro_ranks"] == ranks

    resumed, callback2 = LeNet(data), MaestroCallback(lambda_gl=1e-2, eps_ps=0.05, shrink_every=0)
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["ranks"] = ml.rank_pattern(pl_module)
            seen["momentum"] = trainer.optimizers[0].state[pl_module.net.fc1.up]["momentum_buffer"].clone()

    fit2 = pl.Trainer(callbacks=[callback2, Probe()], max_epochs=3, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    fit2.fit(resumed, loader(train), ckpt_path=path)
    assert seen["ranks"] == ranks
    torch.testing.assert_close(seen["momentum"], state)
    assert ml.rank_pattern(resumed) == ranks  # shrink_every=0: no further shrinking
    assert callback2.sampler.generator.get_state().tolist() != callback.sampler.generator.get_state().tolist()


@pytest.mark.parametrize("sampled_batch, sampled_weight", [(1.0, 1.0), (0.25, 0.5)])
@pytest.mark.parametrize("architecture, group_weights", [("lenet5", "uniform"), ("cnn4", "macs")])  # cnn4: BatchNorm
def test_one_step_equals_the_repo_maestro_step(mnist, sampled_batch, sampled_weight, architecture, group_weights):
    data, train, _ = mnist
    torch.manual_seed(1)
    module = LeNet(data, lr=0.1, momentum=0.0, model=architecture)
    reference = copy.deepcopy(module.net)
    options = MaestroConfig(lambda_gl=1e-2, eps_ps=0.0, sampler="single", sampled_batch=sampled_batch,
                            sampled_weight=sampled_weight, group_weights=group_weights)
    callback = MaestroCallback(shrink_every=0, seed=7, bn_recal_batches=0, config=options)
    trainer(callback, max_steps=1).fit(module, loader(train))

    model = ml.factorize(reference)
    layers = list(ml.low_rank_layers(model))
    x, y = next(iter(loader(train)))
    scales = rank_cost_scales(model, x[:1], [name for name, _ in layers], group_weights)
    assert (scales is None) == (group_weights == "uniform")
    step = MaestroStep(model, layers, ml.SingleLayerSampler(7), contextlib.nullcontext, masked=True,
                       penalty=GroupLassoGradient([layer for _, layer in layers], 1e-2, layer_scales=scales),
                       sampled_batch=sampled_batch, sampled_weight=sampled_weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    step(x, y, lambda loss: loss.backward())
    step.add_penalty_gradients_()
    optimizer.step()
    for (name, got), (_, want) in zip(module.net.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
    for (name, got), (_, want) in zip(module.net.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_mixed_precision_trains_shrinks_and_keeps_float32_factors(mnist):
    data, train, _ = mnist
    torch.manual_seed(0)
    module, callback = LeNet(data), MaestroCallback(lambda_gl=5e-2, eps_ps=0.05)
    outputs = set()
    module.net.fc3.register_forward_hook(lambda layer, x, y: outputs.add(y.dtype) if layer.training else None)
    fit = trainer(callback, precision="bf16-mixed")
    fit.fit(module, loader(torch.utils.data.Subset(train, range(128))))
    assert outputs == {torch.bfloat16}  # every training pass ran under autocast
    metrics = fit.callback_metrics
    for key in ("maestro/loss_full", "maestro/loss_sampled"):
        assert 0 < float(metrics[key]) < 10, key
    assert float(metrics["maestro/penalty"]) > 0
    ranks = ml.rank_pattern(module)
    assert len(callback.shrinks) == 2 and ranks["net.fc1"] < 120 and ranks["net.fc2"] < 84
    for name, layer in ml.low_rank_layers(module):
        for factor in (layer.up, layer.down):
            assert isinstance(factor, torch.nn.Parameter) and factor.dtype == torch.float32, name
    state = fit.optimizers[0].state[module.net.fc1.up]["momentum_buffer"]
    assert state.dtype == torch.float32 and state.shape == module.net.fc1.up.shape


def test_float16_with_a_loss_scaler_adds_the_group_lasso_to_unscaled_gradients(mnist):
    """Float16 autocast with a GradScaler (what "16-mixed" is on a GPU; on the CPU Lightning turns
    that flag into bf16, so the plugin is given explicitly): one step equals the float32 step.
    At λ = 1 the penalty is nearly all of the update, so a penalty added to the scaled gradients
    (and then divided by the scale) would make the steps differ completely."""
    from lightning.pytorch.plugins import MixedPrecision

    data, train, _ = mnist
    updates = {}
    for name, lambda_gl, options in (
            ("float32", 1.0, {}), ("no lasso", 0.0, {}),
            ("float16", 1.0, {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**12))]})):
        torch.manual_seed(1)
        module = LeNet(data, lr=0.1, momentum=0.0)
        start = ml.factorize(copy.deepcopy(module.net)).state_dict()
        callback = MaestroCallback(lambda_gl=lambda_gl, eps_ps=0.0, shrink_every=0, seed=7, bn_recal_batches=0)
        fit = trainer(callback, max_steps=1, **options)
        fit.fit(module, loader(train))
        if name == "float16":
            assert fit.strategy.precision_plugin.scaler.get_scale() == 2.0**12  # no overflow: the step was taken
        end = module.net.state_dict()
        updates[name] = torch.cat([(end[key] - start[key]).flatten() for key in start if key.endswith(("up", "down"))])
    reference = updates["float32"]
    assert (updates["no lasso"] - reference).norm() > 0.5 * reference.norm()
    assert (updates["float16"] - reference).norm() < 1e-3 * reference.norm()


def test_bad_input_names_the_value(mnist, tmp_path):
    data, train, _ = mnist
    with pytest.raises(ConfigError, match="'nope'"):
        MaestroCallback(sampler="nope")
    with pytest.raises(ConfigError, match=r"sample_fraction=1.5 must be a number in \(0, 1\]"):
        MaestroCallback(sampler="fixed", sample_fraction=1.5)
    with pytest.raises(ConfigError, match="seed=-1 must be an int"):
        MaestroCallback(seed=-1)
    with pytest.raises(TypeError, match="sampler_fraction"):  # a setting MaestroCallback does not have
        MaestroCallback(sampler_fraction=0.5)
    with pytest.raises(ConfigError, match="full_pass=False is not offered"):
        MaestroCallback(config=MaestroConfig(full_pass=False))
    with pytest.raises(ConfigError, match="reuse_prefix='on' is not offered"):
        MaestroCallback(config=MaestroConfig(reuse_prefix="on"))

    class Nothing(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def training_step(self, batch, batch_idx):
            return self.scale * batch[0].sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ConfigError, match="Nothing"):
        trainer(MaestroCallback(), max_steps=1).fit(Nothing(), loader(train))

    # a checkpoint whose ranks cannot fit the model: fc1 at a rank above its max rank
    module = LeNet(data)
    fit = trainer(MaestroCallback(), max_steps=1)
    fit.fit(module, loader(train))
    path = tmp_path / "c.ckpt"
    fit.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    key = "net.fc1.down"
    checkpoint["state_dict"][key] = torch.zeros(500, checkpoint["state_dict"][key].shape[1])
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="rank 500 for layer 'net.fc1'"):
        trainer(MaestroCallback(), max_epochs=2).fit(LeNet(data), loader(train), ckpt_path=path)

    # a checkpoint of a run that left fc3 dense, resumed with every layer factorised
    fit = trainer(MaestroCallback(factorize={"exclude_modules": ["net.fc3"]}), max_steps=1)
    fit.fit(LeNet(data), loader(train))
    fit.save_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"factorised here but not in the checkpoint: \['net.fc3'\]"):
        trainer(MaestroCallback(), max_epochs=2).fit(LeNet(data), loader(train), ckpt_path=path)


def test_a_target_run_ends_within_the_target(mnist):
    data, train, val = mnist
    torch.manual_seed(0)
    module = LeNet(data)
    callback = MaestroCallback(config=ml.training.MaestroConfig(lambda_gl=1e-3, eps_ps=1e-3, target="params=0.5"))
    trainer(callback, max_epochs=3).fit(module, loader(train), loader(val))
    dense = ml.count_params(ml.export(module, merge="always"))
    assert ml.count_params(ml.export(module)) <= 0.5 * dense
    assert callback.scheduler.met and callback.scheduler.summary_extra(callback._run)["achieved_cost"] <= 0.5
    assert [h["epoch"] for h in callback.scheduler.history] == [1, 2, 3]
    with pytest.raises(ConfigError, match="not both"):
        MaestroCallback(lambda_gl=1e-2, config=ml.training.MaestroConfig())
