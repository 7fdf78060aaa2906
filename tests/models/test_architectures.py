"""Whole third-party and classic architectures, built locally without downloads: factorise, run,
shrink and export."""

import copy

import pytest
import torch
from torch import nn

from conftest import relative_error
from maestro_lod import (FactorizeConfig, count_macs, count_params, export, factorize, low_rank_layers,
                         plan, shrink_, truncate_)


def _halve_every_rank(model: nn.Module) -> None:
    truncate_(model, {name: max(1, layer.rank // 2) for name, layer in low_rank_layers(model)})


def _check_factorise_shrink_export(dense: nn.Module, inputs: tuple, output=lambda out: out, tolerance=1e-4):
    """Full-rank factorisation reproduces ``dense``; a shrunk model runs and exports to plain torch."""
    dense.eval()
    model = factorize(copy.deepcopy(dense)).eval()
    with torch.no_grad():
        assert relative_error(output(model(*inputs)), output(dense(*inputs))) <= tolerance
    _halve_every_rank(model)
    with torch.no_grad():  # silence the last rank of every layer: shrinking must drop exactly it
        for _, layer in low_rank_layers(model):
            layer.up[..., -1] = 0
    ranks = {name: layer.rank for name, layer in low_rank_layers(model)}
    changes = shrink_(model, 0.0)
    assert changes == {name: (rank, max(rank - 1, 1)) for name, rank in ranks.items()}
    exported = export(model).eval()
    assert not any(type(m).__module__.startswith("maestro_lod") for m in exported.modules())
    with torch.no_grad():
        torch.testing.assert_close(output(exported(*inputs)), output(model(*inputs)), rtol=1e-4, atol=1e-4)
    assert count_params(model) < count_params(dense)
    return model, exported


class BasicBlock(nn.Module):
    """A ResNet basic block with a 1×1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """A MobileNetV2 block: 1×1 expansion, 3×3 depthwise, 1×1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


def _warm_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Give BatchNorm non-trivial running statistics so eval-mode comparisons mean something."""
    model.train()
    with torch.no_grad():
        model(x)


def test_resnet_style_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    x = torch.randn(4, 3, 16, 16)
    _warm_batchnorm(model, x)
    _check_factorise_shrink_export(model, (x,))


def test_mobilenet_style_network_skips_depthwise_convs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                          InvertedResidual(8, 8, 1), InvertedResidual(8, 16, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    x = torch.randn(4, 3, 16, 16)
    _warm_batchnorm(model, x)
    skipped = [e.name for e in plan(model).skipped]
    assert skipped == ["3.block.3", "4.block.3"]
    _check_factorise_shrink_export(model, (x,))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models(name):
    torchvision = pytest.importorskip("torchvision", reason="torchvision is an optional extra: pip install 'maestro-lod[vision]'")
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    _warm_batchnorm(model, x)
    _check_factorise_shrink_export(model, (x,))
    if name == "mobilenet_v2":
        assert all("groups=" in e.skipped for e in plan(model).skipped)


def test_gpt2_conv1d_layers_with_transposed_weights():
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 97, (2, 12))
    entries = plan(model, FactorizeConfig(target_modules=r".*\.(c_attn|c_proj|c_fc)")).factorized
    assert {e.layer_type for e in entries} == {"transformers Conv1D"}
    shapes = {e.name: (e.out_features, e.in_features) for e in entries}
    assert shapes["transformer.h.0.attn.c_attn"] == (96, 32) and shapes["transformer.h.0.mlp.c_proj"] == (32, 128)
    dense = model.eval()
    low_rank = factorize(copy.deepcopy(dense), FactorizeConfig(target_modules=r".*\.(c_attn|c_proj|c_fc)")).eval()
    logits = lambda out: out.logits
    with torch.no_grad():
        assert relative_error(logits(low_rank(ids)), logits(dense(ids))) <= 1e-5
    _halve_every_rank(low_rank)
    exported = export(low_rank).eval()
    assert type(exported.transformer.h[0].attn.c_attn).__module__.startswith("torch.nn")
    with torch.no_grad():
        torch.testing.assert_close(logits(exported(ids)), logits(low_rank(ids)), rtol=1e-4, atol=1e-4)
    assert count_params(exported) < count_params(dense)


def test_bert_linear_layers():
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    dense = transformers.BertModel(config).eval()
    ids, mask = torch.randint(0, 101, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    hidden = lambda out: out.last_hidden_state
    low_rank = factorize(copy.deepcopy(dense), FactorizeConfig(exclude_modules=["pooler.dense"])).eval()
    assert len(list(low_rank_layers(low_rank))) == 2 * 6  # q, k, v, attention output, intermediate, output
    with torch.no_grad():
        assert relative_error(hidden(low_rank(ids, attention_mask=mask)), hidden(dense(ids, attention_mask=mask))) <= 1e-5
    _halve_every_rank(low_rank)
    exported = export(low_rank, merge="never").eval()
    with torch.no_grad():
        torch.testing.assert_close(hidden(exported(ids, attention_mask=mask)), hidden(low_rank(ids, attention_mask=mask)),
                                   rtol=1e-4, atol=1e-4)
    assert count_macs(exported, (ids,)) == count_macs(low_rank, (ids,))
