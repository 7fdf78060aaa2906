"""Export finds the layers whose attributes other modules read, in eval and in training mode, and
exports those merged (the plain form) or keeps them factorised where only metadata is read (the
deployed form); detection leaves the model's state as it was."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maestro_lod import count_macs, count_params, export, factorize, rank_pattern, truncate_
from maestro_lod.export import MergedForReaders, Reads, TrainingReadsUnchecked, attribute_readers
from maestro_lod.layers import LowRankLinear


class _Reader(nn.Module):
    """A parent that reads its child's ``weight.dtype`` and ``in_features`` in its forward."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 20)
        self.head = nn.Linear(20, 6)

    def forward(self, x):
        x = x.to(self.proj.weight.dtype)
        assert x.shape[-1] == self.proj.in_features
        return self.head(torch.relu(self.proj(x)))


def _half_rank(model: nn.Module) -> nn.Module:
    truncate_(model, {name: max(1, rank // 2) for name, rank in rank_pattern(model).items()})
    return model


def _factorised_reader() -> nn.Module:
    torch.manual_seed(0)
    return _half_rank(factorize(_Reader())).eval()


def test_without_examples_the_pair_lacks_what_the_parent_reads():
    model = _factorised_reader()
    exported = export(model, merge="never")
    assert isinstance(exported.proj, nn.Sequential)
    with pytest.raises(AttributeError, match="weight"):
        exported(torch.randn(3, 24))


def test_detection_merges_exactly_the_read_layer_and_names_it():
    model = _factorised_reader()
    x = torch.randn(3, 24)
    assert attribute_readers(copy.deepcopy(model), x) == {"proj": Reads(frozenset({"weight", "in_features"}))}
    with pytest.warns(MergedForReaders, match=r"proj \(in_features, weight\)"):
        exported = export(model, merge="never", example_inputs=x)
    assert type(exported.proj) is nn.Linear
    assert isinstance(exported.head, nn.Sequential)  # nobody reads it: the pair stays
    torch.testing.assert_close(exported(x), model(x))
    assert type(model.proj).__name__ == "LowRankLinear" and type(model.proj) is not type(exported.proj)
    assert model.training is False and all(not m.training for m in model.modules())


def test_detection_restores_classes_and_training_flags():
    model = _factorised_reader()
    cls = type(model.proj)
    model.train()
    model.head.eval()
    attribute_readers(model, torch.randn(2, 24))
    assert type(model.proj) is cls
    assert model.training and model.proj.training and not model.head.training


def test_a_model_without_readers_exports_as_before():
    torch.manual_seed(0)
    model = _half_rank(factorize(nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 6))).eval())
    x = torch.randn(3, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergedForReaders)
        detected = export(model, merge="never", example_inputs=x)
    plain = export(model, merge="never")
    assert [type(m) for m in detected.modules()] == [type(m) for m in plain.modules()]
    assert isinstance(detected[0], nn.Sequential) and isinstance(detected[2], nn.Sequential)
    torch.testing.assert_close(detected(x), plain(x))


def test_transformer_encoder_fast_path_reads_are_detected():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = _half_rank(factorize(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))).eval()
    reads = attribute_readers(copy.deepcopy(model), torch.randn(2, 5, 16))
    assert {"layers.0.linear1", "layers.0.linear2"} <= set(reads) and "weight" in reads["layers.0.linear1"].names
    assert not reads["layers.0.linear1"].values  # read to choose the fused path, which a computed weight declines


def test_t5_exported_with_examples_runs_and_matches():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0)
    model = _half_rank(factorize(transformers.T5ForConditionalGeneration(config))).eval()
    inputs = dict(input_ids=torch.randint(0, 64, (2, 7)), decoder_input_ids=torch.randint(0, 64, (2, 4)))
    with pytest.raises(AttributeError, match="weight"):
        export(model, merge="never")(**inputs)
    with pytest.warns(MergedForReaders, match="DenseReluDense.wo"):
        exported = export(model, merge="never", example_kwargs=inputs)
    assert all(type(m).__module__.startswith(("torch.nn.", "transformers.")) for m in exported.modules())
    assert type(exported.encoder.block[0].layer[1].DenseReluDense.wo) is nn.Linear
    assert isinstance(exported.encoder.block[0].layer[1].DenseReluDense.wi, nn.Sequential)
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_deploy_artifacts_of_a_reader_model_run_and_load():
    from maestro_lod.deploy import deployable
    from maestro_lod.deploy.artifacts import build_artifacts

    model = _factorised_reader()
    x = torch.randn(5, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergedForReaders)
        deployed = deployable(model, x)
    assert type(deployed.proj) is LowRankLinear  # read for dtype and size only: the factors still run
    with pytest.warns(MergedForReaders, match="proj"):  # the plain model.safetensors form must merge it
        files, report = build_artifacts(model, ["pt2", "safetensors"], [x, x[:2]], _Reader)
    assert set(files) == {"pt2", "safetensors"} and set(report["differences"]) == {"pt2", "safetensors"}
    loaded = torch.export.load(io.BytesIO(files["pt2"])).module()
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


class _TrainingReader(nn.Module):
    """Reads ``proj.in_features`` only while training, as code checking shapes for a loss might."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 20)
        self.head = nn.Linear(20, 6)

    def forward(self, x):
        if self.training:
            assert x.shape[-1] == self.proj.in_features
        return self.head(torch.relu(self.proj(x)))


def test_reads_made_only_in_training_mode_are_detected():
    torch.manual_seed(0)
    model = _half_rank(factorize(_TrainingReader())).eval()
    x = torch.randn(3, 24)
    assert attribute_readers(model, x) == {"proj": Reads(frozenset({"in_features"}))}
    with pytest.warns(MergedForReaders, match=r"proj \(in_features\)"):
        exported = export(model, merge="never", example_inputs=x)
    exported.train()
    torch.testing.assert_close(exported(x), model.train()(x))  # the plain model trains where the pair would fail


class _Stateful(nn.Module):
    """BatchNorm, dropout and a buffer the forward updates in training mode, around a reader."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 16)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.calls += 1
        x = x.to(self.proj.weight.dtype)
        return self.head(self.drop(self.norm(self.proj(x))))


def test_detection_leaves_state_outputs_rng_and_flags_unchanged():
    torch.manual_seed(0)
    model = factorize(_Stateful())
    x = torch.randn(8, 12)
    model.train()
    with torch.no_grad():
        model(x)  # non-trivial running statistics and a counted call
    model.head.eval()  # mixed training flags must come back as they were
    state = {key: value.clone() for key, value in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    reads = attribute_readers(model, x)
    assert reads == {"proj": Reads(frozenset({"weight"}))}
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert int(model.calls) == 1 and int(model.norm.num_batches_tracked) == 1
    model.eval()
    torch.manual_seed(1)
    untouched = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(model(x), untouched(x))
    model.train()
    torch.manual_seed(2)
    first = model(x)
    torch.manual_seed(2)
    assert torch.equal(untouched.train()(x), first)  # dropout draws and BatchNorm batch statistics alike


class _Bypass(nn.Module):
    """Multiplies by ``qkv.weight`` itself (as torchvision's Swin does), so qkv's forward never runs;
    reads ``out.in_features`` only for a check."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(48, 16)

    def forward(self, x):
        assert x.shape[-1] == self.qkv.in_features
        hidden = F.linear(x, self.qkv.weight, self.qkv.bias)
        assert hidden.shape[-1] == self.out.in_features
        return self.out(torch.relu(hidden))


def test_a_weight_used_for_its_values_is_merged_in_every_form():
    from maestro_lod.deploy import deployable

    torch.manual_seed(0)
    model = _half_rank(factorize(_Bypass())).eval()
    x = torch.randn(3, 16)
    reads = attribute_readers(model, x)
    assert reads == {"qkv": Reads(frozenset({"in_features", "weight", "bias"}), values=True),
                     "out": Reads(frozenset({"in_features"}))}
    with pytest.warns(MergedForReaders, match=r"qkv \(bias, in_features, weight; outside code multiplies by its weight\)"):
        plain = export(model, merge="never", example_inputs=x)
    assert type(plain.qkv) is nn.Linear and type(plain.out) is nn.Linear
    with pytest.warns(MergedForReaders, match=r"1 layer\(s\).*qkv"):
        deployed = deployable(model, x)
    assert type(deployed.qkv) is nn.Linear and type(deployed.out) is LowRankLinear  # only metadata read: kept
    for form in (plain, deployed):
        torch.testing.assert_close(form(x), model(x), rtol=1e-5, atol=1e-5)
    assert count_params(deployed) == count_params(model) - model.qkv.rank * (16 + 48) + 16 * 48
    assert count_macs(deployed, x) < count_macs(plain, x)


def test_a_failing_training_forward_is_a_warning_and_eval_reads_still_count():
    class NeedsTargets(_Reader):
        def forward(self, x):
            if self.training:
                raise ValueError("targets are required in training mode")
            return super().forward(x)

    torch.manual_seed(0)
    model = _half_rank(factorize(NeedsTargets())).eval()
    with pytest.warns(TrainingReadsUnchecked, match="ValueError: targets are required"):
        reads = attribute_readers(model, torch.randn(2, 24))
    assert set(reads) == {"proj"} and not model.training
