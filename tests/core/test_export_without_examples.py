"""``export(model)`` without example inputs never returns a model whose forward fails on an attribute
a factor pair lacks: the layers the model's own code reads (found by reading that code) are exported
merged, the others stay pairs, and the export computes what the truncated factorised model
computes within ``|a − b| ≤ 1e-5 + 1e-4·|b|``."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maestro_lod as ml
from maestro_lod.export import MergedForReaders, PairsLackReadAttributes, source_readers

ATOL, RTOL = 1e-5, 1e-4
RANDOM = ml.FactorizeConfig(init="random", seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # these models are small: more threads only wait for each other


def _halved(model: nn.Module, config: ml.FactorizeConfig | None = None) -> nn.Module:
    model = ml.factorize(model, config)
    ml.truncate_(model, {name: max(1, layer.rank // 2) for name, layer in ml.low_rank_layers(model)})
    return model.eval()


def _export(model: nn.Module, **options) -> tuple[nn.Module, dict[str, str]]:
    """``export(model, **options)`` and the layers its MergedForReaders warnings name."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported = ml.export(model, **options)
    named = {}
    for warning in caught:
        if issubclass(warning.category, MergedForReaders):
            named.update(warning.message.layers)
    return exported.eval(), named


def _no_maestro_modules(model: nn.Module) -> bool:
    return not any(type(m).__module__.startswith("maestro_lod") for m in model.modules())


def _assert_matches(exported: nn.Module, model: nn.Module, *args, output=lambda out: out, **kwargs) -> None:
    with torch.no_grad():
        torch.testing.assert_close(output(exported(*args, **kwargs)), output(model(*args, **kwargs)),
                                   atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------- parents that read children
class SwinStyleAttention(nn.Module):
    """Multiplies by ``qkv.weight`` itself, as torchvision's Swin does (qkv's forward never runs)."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = torch.softmax(q @ k.transpose(-2, -1) / (dim // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.fc2(F.gelu(self.fc1(x)))


class T5StyleFeedForward(nn.Module):
    """Casts its activations to ``wo.weight.dtype`` before the last projection, as T5 does."""

    def __init__(self, dim: int = 16, hidden: int = 64):
        super().__init__()
        self.wi = nn.Linear(dim, hidden, bias=False)
        self.wo = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        hidden = self.dropout(F.relu(self.wi(x)))
        if isinstance(self.wo.weight, torch.Tensor) and hidden.dtype != self.wo.weight.dtype:
            hidden = hidden.to(self.wo.weight.dtype)
        return self.wo(hidden)


class WhisperStyleEncoder(nn.Module):
    """Checks the input length against ``conv1.stride`` and ``conv2.stride``, as Whisper's encoder does."""

    def __init__(self, mels: int = 8, dim: int = 32, positions: int = 8):
        super().__init__()
        self.positions = positions
        self.conv1 = nn.Conv1d(mels, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)
        self.head = nn.Linear(dim, 10)

    def forward(self, features):
        expected = self.positions * self.conv1.stride[0] * self.conv2.stride[0]
        if features.shape[-1] != expected:
            raise ValueError(f"expected {expected} frames, got {features.shape[-1]}")
        hidden = F.gelu(self.conv2(F.gelu(self.conv1(features))))
        return self.head(hidden.transpose(1, 2))


PARENTS = {
    "swin-style": (SwinStyleAttention, lambda: torch.randn(2, 5, 16), {"qkv"}, {"fc1", "fc2"}),
    "t5-style": (T5StyleFeedForward, lambda: torch.randn(2, 5, 16), {"wo"}, {"wi"}),
    "whisper-style": (WhisperStyleEncoder, lambda: torch.randn(2, 8, 16), {"conv1", "conv2"}, {"head"}),
}


@pytest.mark.parametrize("name", sorted(PARENTS))
def test_layers_the_parent_reads_are_merged_and_the_export_matches(name):
    build, inputs, read, pairs = PARENTS[name]
    torch.manual_seed(0)
    model = _halved(build())
    x = inputs()
    exported, named = _export(model)
    assert set(named) == read and all("read by the code of" in why for why in named.values())
    assert all(not isinstance(exported.get_submodule(path), nn.Sequential) for path in read)
    assert all(isinstance(exported.get_submodule(path), nn.Sequential) for path in pairs)  # nothing else merged
    assert _no_maestro_modules(exported)
    _assert_matches(exported, model, x)
    # what reading the code finds is what running it on examples finds
    with_examples, _ = _export(model, example_inputs=x)
    assert exported.state_dict().keys() == with_examples.state_dict().keys()


@pytest.mark.parametrize("name", sorted(PARENTS))
def test_merge_never_keeps_pairs_and_warns_about_the_read_layers(name):
    build, inputs, read, _ = PARENTS[name]
    torch.manual_seed(0)
    model = _halved(build())
    with pytest.warns(PairsLackReadAttributes) as caught:
        exported = ml.export(model, merge="never")
    assert set(caught[0].message.layers) == read
    assert all(isinstance(exported.get_submodule(path), nn.Sequential) for path in read)


def test_the_deployed_form_keeps_read_layers_factorised_without_examples():
    torch.manual_seed(0)
    model = _halved(SwinStyleAttention())
    deployed, _ = _export(model, keep_read=True)
    assert type(deployed.qkv) is ml.LowRankLinear  # a factorised layer answers weight and bias itself
    _assert_matches(deployed, model, torch.randn(2, 5, 16))


class Grandparent(nn.Module):
    """Reads a grandchild's attributes through an index, a loop variable and ``getattr``."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([T5StyleFeedForward() for _ in range(2)])
        self.stem = nn.Conv2d(3, 16, 3, stride=2)
        self.out = nn.Linear(16, 64)

    def forward(self, x):
        assert getattr(self, "stem").stride == (2, 2)
        x = self.stem(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            assert block.wi.in_features == x.shape[-1]
            x = x + block(x)
        return self.out(x.to(self.blocks[1].wi.weight.dtype))


def test_reads_through_indices_loops_and_getattr_are_found():
    torch.manual_seed(0)
    model = _halved(Grandparent())
    read = {"stem", "blocks.0.wi", "blocks.1.wi", "blocks.0.wo", "blocks.1.wo"}
    found, why = source_readers(model)
    assert set(found) == read
    assert why["blocks.0.wi"] == "Grandparent" and why["blocks.0.wo"] == "T5StyleFeedForward"
    exported, named = _export(model)
    assert set(named) == read and isinstance(exported.out, nn.Sequential)
    _assert_matches(exported, model, torch.randn(2, 3, 9, 9))


def test_a_model_whose_code_cannot_be_read_is_exported_merged():
    namespace = {"nn": nn, "F": F, "torch": torch, "__name__": "built_at_run_time"}
    exec("class Hidden(nn.Module):\n"
         "    def __init__(self):\n"
         "        super().__init__()\n"
         "        self.qkv = nn.Linear(16, 48)\n"
         "        self.fc = nn.Linear(48, 8)\n"
         "    def forward(self, x):\n"
         "        return self.fc(F.linear(x, self.qkv.weight, self.qkv.bias))\n", namespace)
    torch.manual_seed(0)
    model = _halved(namespace["Hidden"]())
    exported, named = _export(model)
    assert set(named) == {"qkv", "fc"} and all("could not be read" in why for why in named.values())
    assert type(exported.qkv) is nn.Linear and type(exported.fc) is nn.Linear
    _assert_matches(exported, model, torch.randn(3, 16))


def test_a_forward_replaced_on_the_instance_is_read_too():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.fc = nn.Linear(48, 8)

        def forward(self, x):
            return self.fc(self.qkv(x))

    def bypassing(self, x):
        return self.fc(F.linear(x, self.qkv.weight, self.qkv.bias))

    torch.manual_seed(0)
    model = _halved(Plain())
    model.forward = bypassing.__get__(model)
    exported, named = _export(model)
    assert set(named) == {"qkv"} and isinstance(exported.fc, nn.Sequential)
    _assert_matches(exported, model, torch.randn(3, 16))
    model.forward = lambda x: model.fc(F.linear(x, model.qkv.weight, model.qkv.bias))  # a closure: unreadable
    exported, named = _export(model)
    assert set(named) == {"qkv", "fc"}


def test_a_model_nobody_reads_exports_as_pairs_without_warnings():
    torch.manual_seed(0)
    model = _halved(nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exported = ml.export(model)
    assert isinstance(exported[0], nn.Sequential) and isinstance(exported[2], nn.Sequential)
    _assert_matches(exported, model, torch.randn(3, 24))


def test_the_export_is_an_ordinary_torch_model():
    torch.manual_seed(0)
    model = _halved(SwinStyleAttention())
    exported, _ = _export(model)
    x = torch.randn(2, 5, 16)
    twin = copy.deepcopy(exported)
    _assert_matches(twin, model, x)
    program = torch.export.export(exported, (x,), strict=False)
    torch.testing.assert_close(program.module()(x), exported(x), atol=ATOL, rtol=RTOL)
    assert all(key.endswith(("weight", "bias")) for key in exported.state_dict())


# ----------------------------------------------------------------------------------- Hugging Face
def _hf():
    return pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")


def _tokens(*shape):
    return torch.randint(3, 64, shape)


def _mt5(t):
    return t.MT5ForConditionalGeneration(t.MT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                     num_heads=4, decoder_start_token_id=0))


def _bart(t):
    return t.BartForConditionalGeneration(t.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32))


def _mistral(t):
    return t.MistralForCausalLM(t.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=32, sliding_window=16))


SEQ2SEQ = lambda: dict(input_ids=_tokens(2, 7), decoder_input_ids=_tokens(2, 5))  # noqa: E731
HF_MODELS = {
    # the gated feed-forward compares its activations' dtype with wo.weight.dtype
    "mt5": (_mt5, SEQ2SEQ, {"encoder.block.0.layer.1.DenseReluDense.wo", "decoder.block.0.layer.2.DenseReluDense.wo"}),
    "bart": (_bart, SEQ2SEQ, set()),
    "mistral": (_mistral, lambda: dict(input_ids=_tokens(2, 7)), set()),
}


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hugging_face_models_export_without_examples(name):
    transformers = _hf()
    build, inputs, read = HF_MODELS[name]
    torch.manual_seed(0)
    model = _halved(build(transformers), RANDOM)
    exported, named = _export(model)
    assert set(named) == read
    assert _no_maestro_modules(exported)
    _assert_matches(exported, model, output=lambda out: out.logits, **inputs())


# ------------------------------------------------------------------------------------ torchvision
TORCHVISION = {
    # its attention passes qkv.weight and proj.weight to a function that multiplies by them
    "swin_v2_t": (lambda m: m.swin_v2_t(num_classes=10), 64, ("attn.qkv", "attn.proj")),
    # its partitions are 7×7 windows of the 1/32 feature map: 224 is the smallest input it takes
    "maxvit_t": (lambda m: m.maxvit_t(num_classes=10), 224, ()),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_models_export_without_examples(name):
    models = pytest.importorskip("torchvision", reason="torchvision is an optional extra").models
    build, size, read = TORCHVISION[name]
    torch.manual_seed(0)
    model = _halved(build(models), RANDOM)
    exported, named = _export(model)
    expected = {path for path, _ in ml.low_rank_layers(model) if read and path.endswith(read)}
    assert set(named) <= expected and bool(named) == bool(expected)  # square projections merge anyway at half rank
    assert not any(isinstance(exported.get_submodule(path), nn.Sequential) for path in expected)
    assert _no_maestro_modules(exported)
    _assert_matches(exported, model, torch.randn(1, 3, size, size))
