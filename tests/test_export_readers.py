"""Export finds the layers whose attributes other modules read, and exports those merged."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from maestro_lod import export, factorize, rank_pattern, truncate_
from maestro_lod.export import MergedForReaders, attribute_readers


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
    assert attribute_readers(copy.deepcopy(model), x) == {"proj": {"weight", "in_features"}}
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
    assert {"layers.0.linear1", "layers.0.linear2"} <= set(reads) and "weight" in reads["layers.0.linear1"]


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
    with pytest.warns(MergedForReaders):
        assert type(deployable(model, x).proj) is nn.Linear
    with pytest.warns(MergedForReaders):
        files, report = build_artifacts(model, ["pt2", "safetensors"], [x, x[:2]], _Reader)
    assert set(files) == {"pt2", "safetensors"} and set(report["differences"]) == {"pt2", "safetensors"}
    loaded = torch.export.load(io.BytesIO(files["pt2"])).module()
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
