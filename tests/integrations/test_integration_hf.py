"""MAESTRO through transformers.Trainer: training, saving, reloading, accumulation, resume, parity."""

import contextlib
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import maestro_lod as ml  # noqa: E402
from maestro_lod.data.text import pydoc_corpus  # noqa: E402
from maestro_lod.errors import CheckpointError, ConfigError  # noqa: E402
from maestro_lod.integrations.transformers import MAESTRO_FILE, MaestroTrainer, load_factorized  # noqa: E402
from maestro_lod.regularization import GroupLassoGradient  # noqa: E402
from maestro_lod.training import MaestroConfig  # noqa: E402
from maestro_lod.training.step_macs import rank_cost_scales  # noqa: E402
from maestro_lod.training.steps import MaestroStep  # noqa: E402

LENGTH = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # these small models train fastest on one thread


@pytest.fixture(scope="module")
def windows():
    text = pydoc_corpus()[:LENGTH * 300]
    symbols = sorted(set(text))
    ids = torch.tensor([symbols.index(c) for c in text])
    rows = ids.view(-1, LENGTH)
    return len(symbols), [{"input_ids": row, "labels": row.clone()} for row in rows]


def gpt2(vocab):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=vocab, n_positions=LENGTH,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def arguments(out, **kwargs):
    options = dict(per_device_train_batch_size=16, num_train_epochs=1, report_to=[], save_strategy="no",
                   use_cpu=True, learning_rate=3e-3, logging_steps=5, disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(str(out), **{**options, **kwargs})


def test_train_shrink_save_and_reload(windows, tmp_path):
    vocab, data = windows
    trainer = MaestroTrainer(gpt2(vocab), arguments(tmp_path), train_dataset=data, lambda_gl=1e-2, eps_ps=0.05)
    trainer.train()
    ranks = ml.rank_pattern(trainer.model)
    assert len(trainer.shrinks) == 1 and sum(ranks.values()) < sum(l.max_rank for _, l in ml.low_rank_layers(trainer.model))
    logged = [entry for entry in trainer.state.log_history if "maestro/params" in entry][-1]
    assert logged["maestro/total_rank"] == sum(ranks.values())
    assert logged["maestro/params"] == ml.count_params(trainer.model) and logged["maestro/macs"] > 0
    assert any("maestro/loss_sampled" in entry and "maestro/penalty" in entry for entry in trainer.state.log_history)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = load_factorized(transformers.GPT2LMHeadModel, tmp_path / "final")
    assert ml.rank_pattern(reloaded) == ranks
    x = data[0]["input_ids"][None]
    trainer.model.eval()
    torch.testing.assert_close(reloaded(x).logits, trainer.model(x).logits, atol=0, rtol=0)


def test_gradient_accumulation_and_resume_restore_ranks(windows, tmp_path):
    vocab, data = windows
    args = arguments(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=8,
                     save_strategy="steps", save_steps=4)
    trainer = MaestroTrainer(gpt2(vocab), args, train_dataset=data, lambda_gl=1e-2, eps_ps=0.05, shrink_every=4)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-4"
    saved = json.loads((checkpoint / MAESTRO_FILE).read_text())
    assert saved["ranks"] == {name: after for name, (_, after) in trainer.shrinks[0].items()}
    assert saved["ranks"] != {name: layer.max_rank for name, layer in ml.low_rank_layers(trainer.model)}

    seen = {}

    class Probe(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            seen["ranks"] = ml.rank_pattern(model)
            seen["sampler"] = resumed.sampler.generator.get_state().tolist()

    resumed = MaestroTrainer(gpt2(vocab), args, train_dataset=data, lambda_gl=1e-2, eps_ps=0.05, shrink_every=4,
                             callbacks=[Probe()])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert seen["ranks"] == saved["ranks"]
    assert resumed.state.global_step == 8
    assert seen["sampler"] == saved["sampler_state"]

    # a checkpoint whose ranks cannot fit this model
    saved["ranks"]["transformer.h.0.mlp.c_fc"] = 10_000
    (checkpoint / MAESTRO_FILE).write_text(json.dumps(saved))
    again = MaestroTrainer(gpt2(vocab), args, train_dataset=data)
    with pytest.raises(CheckpointError, match="rank 10000 for layer 'transformer.h.0.mlp.c_fc'"):
        again.train(resume_from_checkpoint=str(checkpoint))

    # a checkpoint of a run that left the MLP's output layer dense, resumed with every layer factorised
    del saved["ranks"]["transformer.h.0.mlp.c_proj"]
    saved["ranks"]["transformer.h.0.mlp.c_fc"] = 1
    (checkpoint / MAESTRO_FILE).write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"no rank for layers \['transformer.h.0.mlp.c_proj'\]"):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_bf16_mixed_precision_trains_shrinks_logs_and_keeps_float32_factors(windows, tmp_path):
    vocab, data = windows
    args = arguments(tmp_path, bf16=True, max_steps=6, logging_steps=3, per_device_train_batch_size=8)
    trainer = MaestroTrainer(gpt2(vocab), args, train_dataset=data, lambda_gl=0.1, eps_ps=0.05, shrink_every=3)
    assert trainer.accelerator.mixed_precision == "bf16"
    outputs = []
    trainer.model.lm_head.register_forward_hook(lambda layer, x, y: outputs.append(y.dtype) if layer.training else None)
    full_rank = sum(layer.rank for _, layer in ml.low_rank_layers(trainer.model))
    trainer.train()
    assert len(outputs) == 12 and set(outputs) == {torch.bfloat16}  # both passes of every step under autocast
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in losses] == [3, 6]  # the steps that shrink log their loss too
    for entry in losses:
        assert 0 < entry["loss"] < 20 and entry["maestro/penalty"] > 0
    assert len(trainer.shrinks) == 2 and sum(ml.rank_pattern(trainer.model).values()) < full_rank
    for name, layer in ml.low_rank_layers(trainer.model):
        for factor in (layer.up, layer.down):
            assert isinstance(factor, torch.nn.Parameter) and factor.dtype == torch.float32, name


@pytest.mark.parametrize("sampled_batch, sampled_weight, group_weights",
                         [(1.0, 1.0, "uniform"), (0.25, 0.5, "uniform"), (1.0, 1.0, "macs")])
def test_one_step_equals_the_repo_maestro_step(windows, tmp_path, sampled_batch, sampled_weight, group_weights):
    vocab, data = windows
    model = gpt2(vocab)
    reference = ml.factorize(copy.deepcopy(model))
    args = arguments(tmp_path, max_steps=1, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
                     max_grad_norm=0.0, per_device_train_batch_size=len(data))
    options = MaestroConfig(lambda_gl=1e-2, sampler="single", sampled_batch=sampled_batch,
                            sampled_weight=sampled_weight, group_weights=group_weights)
    trainer = MaestroTrainer(model, args, train_dataset=data, shrink_every=None, sampler_seed=5, config=options)
    trainer.train()

    class Logits(torch.nn.Module):  # the repo's step reads logits and targets: shift them here
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, x):
            return self.lm(input_ids=x).logits[:, :-1]

    wrapped = Logits(reference).train()
    layers = list(ml.low_rank_layers(wrapped))
    x = next(iter(trainer.get_train_dataloader()))["input_ids"]  # the shuffled order the first examples come from
    scales = rank_cost_scales(reference, x[:1], [name for name, _ in ml.low_rank_layers(reference)], group_weights)
    assert (scales is None) == (group_weights == "uniform")
    step = MaestroStep(wrapped, layers, ml.SingleLayerSampler(5), contextlib.nullcontext, masked=True,
                       penalty=GroupLassoGradient([layer for _, layer in layers], 1e-2, layer_scales=scales),
                       sampled_batch=sampled_batch, sampled_weight=sampled_weight)
    step(x, x[:, 1:], lambda loss: loss.backward())
    step.add_penalty_gradients_()
    torch.optim.SGD(wrapped.parameters(), lr=0.1).step()
    for (name, got), (_, want) in zip(trainer.model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)


def tiny_resnet():
    """A small vision model with BatchNorm, and 32 labelled 16×16 images for it."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=3)
    data = [{"pixel_values": torch.randn(1, 16, 16), "labels": torch.tensor(i % 3)} for i in range(32)]
    return transformers.ResNetForImageClassification(config), data


def test_the_sampled_pass_leaves_batchnorm_statistics_to_the_full_pass(tmp_path):
    """A vision model with BatchNorm (a small ResNet): after one step the running statistics are
    those of one training-mode forward of the model as it was, i.e. the full pass's batch alone."""
    model, data = tiny_resnet()
    reference = copy.deepcopy(model).train()
    trainer = MaestroTrainer(model, arguments(tmp_path, max_steps=1, per_device_train_batch_size=len(data)),
                             train_dataset=data, lambda_gl=1e-2, shrink_every=None)
    trainer.train()
    with torch.no_grad():
        reference(pixel_values=next(iter(trainer.get_train_dataloader()))["pixel_values"])
    buffers = dict(reference.named_buffers())
    assert any(name.endswith("running_mean") for name in buffers)
    for name, got in trainer.model.named_buffers():
        torch.testing.assert_close(got, buffers[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_vision_model_counts_its_costs_on_its_main_input(tmp_path):
    """MACs of a vision model are counted on ``pixel_values``: the group lasso weighed by MACs, and
    a MACs target reached."""
    model, data = tiny_resnet()
    options = MaestroConfig(lambda_gl=1e-2, group_weights="macs", target="macs=0.6", eps_ps=0.05)
    trainer = MaestroTrainer(model, arguments(tmp_path, num_train_epochs=2, per_device_train_batch_size=8),
                             train_dataset=data, config=options)
    trainer.train()
    names = [name for name, _ in ml.low_rank_layers(model)]
    example = data[0]["pixel_values"][None]
    assert trainer.penalty.scales[::2] == pytest.approx(rank_cost_scales(model, example, names, "macs"))
    assert len(set(trainer.penalty.scales)) > 1  # the convolutions' ranks cost more than the classifier's
    dense = ml.count_macs(ml.export(trainer.model, merge="always"), example)
    assert ml.count_macs(ml.export(trainer.model), example) <= 0.6 * dense and trainer.scheduler.met


def test_masked_positions_are_ignored(windows, tmp_path):
    vocab, data = windows
    trainer = MaestroTrainer(gpt2(vocab), arguments(tmp_path), train_dataset=data, sampler="fixed", sample_fraction=0.5)
    batch = {"input_ids": data[0]["input_ids"][None], "labels": data[0]["labels"][None].clone()}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    batch["labels"][0, 20:] = -100
    changed = batch["input_ids"].clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % vocab  # causal: positions ≥ 20 only affect ignored targets
    masked = trainer.compute_loss(trainer.model, batch)
    batch["input_ids"] = changed
    assert not torch.isclose(loss, masked)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), masked)


def test_bad_input_names_the_value(windows, tmp_path):
    vocab, data = windows
    with pytest.raises(ConfigError, match="'nope'"):
        MaestroTrainer(gpt2(vocab), arguments(tmp_path), train_dataset=data, sampler="nope")
    with pytest.raises(ConfigError, match=r"sample_fraction=0 must be a number in \(0, 1\]"):
        MaestroTrainer(gpt2(vocab), arguments(tmp_path), train_dataset=data, sampler="fixed", sample_fraction=0)
    with pytest.raises(ConfigError, match="sampler_seed='5' must be an int"):
        MaestroTrainer(gpt2(vocab), arguments(tmp_path), train_dataset=data, sampler_seed="5")
    with pytest.raises(TypeError, match="sampler_fraction"):  # a setting neither MaestroTrainer nor Trainer has
        MaestroTrainer(gpt2(vocab), arguments(tmp_path), train_dataset=data, sampler_fraction=0.5)
    with pytest.raises(ConfigError, match="Embedding"):
        MaestroTrainer(torch.nn.Embedding(4, 4), arguments(tmp_path), train_dataset=data)
    with pytest.raises(ConfigError, match="shrink_every='weekly'"):
        MaestroTrainer(gpt2(vocab), arguments(tmp_path), train_dataset=data, shrink_every="weekly")
    with pytest.raises(ConfigError, match="full_pass=False is not offered"):
        MaestroTrainer(gpt2(vocab), arguments(tmp_path), train_dataset=data, config=MaestroConfig(full_pass=False))
    with pytest.raises(CheckpointError, match="maestro.json"):
        load_factorized(transformers.GPT2LMHeadModel, tmp_path)


def test_exported_linear_model_loads_with_plain_from_pretrained(tmp_path):
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = ml.factorize(transformers.LlamaForCausalLM(config), ml.FactorizeConfig(exclude_modules=["lm_head"]))
    ml.truncate_(model, {name: layer.rank // 2 for name, layer in ml.low_rank_layers(model)})
    from maestro_lod.integrations.transformers import export_for_from_pretrained

    exported = export_for_from_pretrained(model)
    exported.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.arange(10)[None]
    torch.testing.assert_close(plain(x).logits, model.eval()(x).logits, atol=1e-5, rtol=1e-4)


def test_a_target_run_ends_within_the_target(windows, tmp_path):
    vocab, data = windows
    trainer = MaestroTrainer(gpt2(vocab), arguments(tmp_path, num_train_epochs=2), train_dataset=data,
                             lambda_gl=1e-3, target="params=0.6")
    trainer.train()
    dense = ml.count_params(ml.export(trainer.model, merge="always"))
    assert ml.count_params(ml.export(trainer.model)) <= 0.6 * dense
    assert trainer.scheduler.met and len(trainer.shrinks) == 2
    assert any("maestro/exported_cost" in entry for entry in trainer.state.log_history)
    with pytest.raises(ConfigError, match="unknown cost 'latency'"):
        MaestroTrainer(gpt2(vocab), arguments(tmp_path), train_dataset=data, target="latency=0.5")
