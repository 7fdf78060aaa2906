"""Export works for every model ``factorize`` accepts: whole Hugging Face and torchvision models,
built from small configs without downloads, are factorised, every layer is cut to half its rank,
and the model is exported with example inputs. The plain ``torch.nn`` model (``model.safetensors``)
and the deployed form (what ``.pt2``/ONNX are traced from) must compute what the truncated
factorised model computes, in eval and in training mode, within ``|a − b| ≤ 1e-5 + 1e-4·|b|``,
and the layers merged because the model's own code reads them must be exactly the ones named.

Random factor initialisation keeps the tests fast (an SVD of every ResNet weight takes seconds);
what is compared is the factorised model against its exports, whatever its weights.
"""

import copy
import warnings
from functools import partial

import pytest
import torch

from maestro_lod import FactorizeConfig, count_params, export, factorize, low_rank_layers, truncate_
from maestro_lod.engine.costs import KEPT_TYPES
from maestro_lod.export import MergedForReaders

ATOL, RTOL = 1e-5, 1e-4
RANDOM = FactorizeConfig(init="random", seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # these models are small: more threads only wait for each other


def _halved(model: torch.nn.Module) -> torch.nn.Module:
    model = factorize(model, RANDOM)
    truncate_(model, {name: max(1, layer.rank // 2) for name, layer in low_rank_layers(model)})
    return model.eval()


def _merged(run) -> tuple[torch.nn.Module, dict[str, str]]:
    """``run()``'s result and the layers its MergedForReaders warnings name."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    named = {}
    for warning in caught:
        if issubclass(warning.category, MergedForReaders):
            named.update(warning.message.layers)
    return result, named


def _plain_torch(model: torch.nn.Module) -> bool:
    return not any(type(m).__module__.startswith("maestro_lod") for m in model.modules())


def _check(model, call, output, plain_merged: set[str], deployed_merged: set[str], **examples):
    """Export ``model`` both ways with ``examples``; outputs of ``call(form)`` must match ``model``'s."""
    plain, named = _merged(lambda: export(model, **examples))
    assert set(named) == plain_merged, named
    deployed, named = _merged(lambda: export(model, keep=KEPT_TYPES, keep_read=True, **examples))
    assert set(named) == deployed_merged, named
    assert _plain_torch(plain)
    assert count_params(deployed) <= count_params(plain) <= count_params(export(model, merge="always"))
    with torch.no_grad():
        expected = output(call(model))
        for form in (plain.eval(), deployed.eval()):
            torch.testing.assert_close(output(call(form)), expected, atol=ATOL, rtol=RTOL)
    for form in (plain, deployed):  # training mode too: dropout draws the same masks from the same seed
        torch.manual_seed(1)
        expected = output(call(copy.deepcopy(model).train()))
        torch.manual_seed(1)
        torch.testing.assert_close(output(call(form.train())), expected, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------- Hugging Face
def _hf():
    return pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")


def _llama(t):
    return t.LlamaForCausalLM(t.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def _bart(t):
    return t.BartForConditionalGeneration(t.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32))


def _distilbert(t):
    return t.DistilBertModel(t.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                max_position_embeddings=32))


def _t5(t):
    return t.T5ForConditionalGeneration(t.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                   num_heads=4, decoder_start_token_id=0))


def _gpt2(t):
    return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                          bos_token_id=0, eos_token_id=0))


def _whisper(t):
    return t.WhisperForConditionalGeneration(t.WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))


def _tokens(*shape):
    return torch.randint(3, 64, shape)


SEQ2SEQ = lambda: dict(input_ids=_tokens(2, 7), decoder_input_ids=_tokens(2, 5))  # noqa: E731
DECODER = lambda: dict(input_ids=_tokens(2, 7))  # noqa: E731
HF_MODELS = {
    "llama": (_llama, DECODER, set()),
    "bart": (_bart, SEQ2SEQ, set()),
    "distilbert": (_distilbert, DECODER, set()),
    "gpt2": (_gpt2, DECODER, set()),
    # T5 compares its activations' dtype with wo.weight.dtype before the last projection of every block
    "t5": (_t5, SEQ2SEQ, {"encoder.block.0.layer.1.DenseReluDense.wo", "decoder.block.0.layer.2.DenseReluDense.wo"}),
    # Whisper checks the input length against conv1.stride and conv2.stride
    "whisper": (_whisper, lambda: dict(input_features=torch.randn(2, 8, 32), decoder_input_ids=_tokens(2, 5)),
                {"model.encoder.conv1", "model.encoder.conv2"}),
}


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hugging_face_models_export(name):
    transformers = _hf()
    build, inputs, readers = HF_MODELS[name]
    torch.manual_seed(0)
    model = _halved(build(transformers))
    kwargs = inputs()
    output = (lambda out: out.last_hidden_state) if name == "distilbert" else (lambda out: out.logits)
    # the deployed form keeps these layers factorised: their code reads only dtypes and strides
    _check(model, lambda form: form(**kwargs), output, readers, set(), example_kwargs=kwargs)


# ------------------------------------------------------------------------------------ torchvision
def _tv():
    return pytest.importorskip("torchvision", reason="torchvision is an optional extra: pip install 'maestro-lod[vision]'")


def _convnext(models):
    from torchvision.models.convnext import CNBlockConfig

    return models.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)


def _swin(models):
    return models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                  window_size=[4, 4], num_classes=10)


SWIN_ATTENTION = {f"features.{stage}.0.attn.{layer}" for stage in (1, 3) for layer in ("qkv", "proj")}
VISION_MODELS = {
    "resnet18": (lambda m: m.resnet18(num_classes=10), 64, set()),
    "mobilenet_v2": (lambda m: m.mobilenet_v2(num_classes=10), 64, set()),
    "efficientnet_b0": (lambda m: m.efficientnet_b0(num_classes=10), 64, set()),
    "convnext": (_convnext, 32, set()),
    "vit": (lambda m: m.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                          mlp_dim=64, num_classes=10), 32, set()),
    # Swin's attention passes qkv.weight and proj.weight to a function that multiplies by them
    "swin": (_swin, 32, SWIN_ATTENTION),
}


@pytest.mark.parametrize("name", sorted(VISION_MODELS))
def test_torchvision_models_export(name):
    models = _tv().models
    build, size, readers = VISION_MODELS[name]
    torch.manual_seed(0)
    model = _halved(build(models))
    x = torch.randn(2, 3, size, size)
    # layers multiplied by from outside are merged in both forms: their own forward never runs
    _check(model, lambda form: form(x), lambda out: out, readers, readers, example_inputs=x)


def test_swin_without_examples_fails_and_says_why():
    """Without example inputs nothing is detected: the exported pair lacks the weight Swin reads."""
    models = _tv().models
    torch.manual_seed(0)
    model = _halved(_swin(models))
    with pytest.raises(AttributeError, match="weight"):
        export(model, merge="never")(torch.randn(1, 3, 32, 32))
    exported = partial(export, model, merge="never", example_inputs=torch.randn(1, 3, 32, 32))
    _, named = _merged(exported)
    assert set(named) == SWIN_ATTENTION and all("multiplies by its weight" in why for why in named.values())
