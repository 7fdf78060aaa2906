"""The model registry: shapes, sizes, masks, errors, and that factorize() handles every model exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from maestro_lod import factorize, rank_pattern
from maestro_lod.data import PAD_INDEX, TaskData, load_data
from maestro_lod.models import available_models, build_model, model_options


def image_task(shape: tuple[int, int, int], classes: int = 10, name: str = "images") -> TaskData:
    dataset = TensorDataset(torch.randn(4, *shape), torch.randint(0, classes, (4,)))
    return TaskData(name, "classification", dataset, dataset, classes, shape, None, None, "random images")


@pytest.fixture(scope="module")
def digits() -> TaskData:
    return load_data("digits")


@pytest.fixture(scope="module")
def text() -> TaskData:
    return load_data("pydoc-text")


@pytest.fixture(scope="module")
def reverse() -> TaskData:
    return load_data("reverse")


def batch(data: TaskData, size: int = 3):
    return next(iter(DataLoader(data.val, batch_size=size)))


def run(model, inputs):
    return model(*inputs) if isinstance(inputs, (list, tuple)) else model(inputs)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_builtin_model():
    assert available_models() == ["char-lm", "cnn4", "lenet5", "mlp", "resnet18", "transformer", "vgg19"]
    assert model_options("vgg19") == ["width", "head"]


def test_unknown_model_and_option_name_the_value():
    data = image_task((1, 28, 28))
    with pytest.raises(ValueError, match=r"unknown model 'lenet6'.*lenet5"):
        build_model("lenet6", data)
    with pytest.raises(ValueError, match=r"model 'mlp' has no option\(s\) hidden; options: hidden_sizes"):
        build_model("mlp", data, hidden=[3])
    with pytest.raises(TypeError, match="TaskData"):
        build_model("mlp", "mnist5k")


def test_models_refuse_data_they_cannot_handle(reverse, text, digits):
    with pytest.raises(ValueError, match="'lenet5' needs classification data, but dataset 'reverse' is seq2seq"):
        build_model("lenet5", reverse)
    flat = TaskData("flat", "classification", digits.train, digits.val, 10, (64,), None, None, "flat digits")
    expected = r"'resnet18' needs \(channels, height, width\).*'flat' has input_shape \(64,\)$"
    with pytest.raises(ValueError, match=expected):
        build_model("resnet18", flat)
    with pytest.raises(ValueError, match="'char-lm' needs language-model data, but dataset 'reverse' is seq2seq"):
        build_model("char-lm", reverse)
    with pytest.raises(ValueError, match="'transformer' needs seq2seq data, but dataset 'pydoc-text'"):
        build_model("transformer", text)
    with pytest.raises(ValueError, match=r"'vgg19' needs .* at least 32x32, .*'digits' has input_shape \(1, 8, 8\)"):
        build_model("vgg19", digits)
    with pytest.raises(ValueError, match=r"'lenet5' with padding=0 cannot handle input_shape \(1, 8, 8\).*padding=2"):
        build_model("lenet5", digits)
    with pytest.raises(ValueError, match="d_model=100 is not divisible by num_heads=8"):
        build_model("transformer", reverse, d_model=100, num_heads=8)
    with pytest.raises(ValueError, match="size='huge'"):
        build_model("transformer", reverse, size="huge")
    with pytest.raises(ValueError, match="dropout=1.5"):
        build_model("char-lm", text, dropout=1.5)
    with pytest.raises(ValueError, match="width=0"):
        build_model("resnet18", image_task((3, 32, 32)), width=0)


def test_lenet5_layers_have_the_paper_full_ranks():
    model = build_model("lenet5", image_task((1, 28, 28)))
    assert model.fc1.in_features == 16 * 4 * 4
    assert rank_pattern(factorize(model)) == {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84, "fc3": 10}


def test_reference_architectures_have_their_published_sizes(reverse):
    cifar = image_task((3, 32, 32))
    assert num_params(build_model("resnet18", cifar)) == 11_173_962  # the standard CIFAR ResNet-18
    # CIFAR VGG-19-BN with a 512→10 head: 20,040,522 with conv biases, minus 5,504 bias-free conv channels
    assert num_params(build_model("vgg19", cifar, head="linear")) == 20_040_522 - 5_504
    assert num_params(build_model("vgg19", cifar)) == 20_035_018 + 2 * (512 * 512 + 512)
    base = build_model("transformer", reverse, size="base")
    assert len(base.transformer.encoder.layers) == len(base.transformer.decoder.layers) == 6
    assert num_params(base.transformer.encoder.layers[0]) == 3_152_384  # Transformer-base encoder layer
    assert num_params(base.transformer.decoder.layers[0]) == 4_204_032
    assert base.transformer.encoder.layers[0].self_attn.num_heads == 8


CASES = {
    "lenet5 / mnist-shaped": ("lenet5", lambda d: image_task((1, 28, 28)), {}),
    "lenet5 / digits": ("lenet5", lambda d: d["digits"], {"padding": 2}),
    "mlp / digits": ("mlp", lambda d: d["digits"], {"hidden_sizes": [32, 16]}),
    "resnet18 / cifar-shaped": ("resnet18", lambda d: image_task((3, 32, 32)), {"width": 8}),
    "vgg19 / cifar-shaped": ("vgg19", lambda d: image_task((3, 32, 32)), {"width": 8}),
    "vgg19 linear head": ("vgg19", lambda d: image_task((3, 40, 36), classes=7), {"width": 8, "head": "linear"}),
    "char-lm / pydoc-text": ("char-lm", lambda d: d["text"], {}),
    "transformer / reverse": ("transformer", lambda d: d["reverse"], {"d_model": 64}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_shapes_and_exact_full_rank_factorisation(case, digits, text, reverse):
    name, task, options = CASES[case]
    data = task({"digits": digits, "text": text, "reverse": reverse})
    torch.manual_seed(0)
    model = build_model(name, data, **options).eval()
    inputs, targets = batch(data)
    with torch.no_grad():
        logits = run(model, inputs)
    classes = data.num_classes or data.vocab_size
    assert logits.shape == (*targets.shape, classes)
    factorised = factorize(copy.deepcopy(model)).eval()
    assert len(rank_pattern(factorised)) >= 3
    with torch.no_grad():
        again = run(factorised, inputs)
    assert ((again - logits).norm() / logits.norm()).item() <= 1e-4
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, classes), targets.reshape(-1), ignore_index=-100)
    assert torch.isfinite(loss)


def test_char_lm_cannot_see_the_future(text):
    torch.manual_seed(0)
    model = build_model("char-lm", text).eval()
    tokens, _ = batch(text, 2)
    changed = tokens.clone()
    changed[:, 40] = (changed[:, 40] + 1) % text.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.allclose(before[:, :40], after[:, :40], atol=1e-5)
    assert (before[:, 40:] - after[:, 40:]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="sequence length 65 exceeds the model's maximum length 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_transformer_ignores_source_padding_and_future_targets(reverse):
    torch.manual_seed(0)
    model = build_model("transformer", reverse).eval()
    (src, tgt_in), _ = batch(reverse, 4)
    longest = int((src != PAD_INDEX).sum(1).max())
    assert longest < src.shape[1]
    with torch.no_grad():
        full = model(src, tgt_in)
        trimmed = model(src[:, :longest], tgt_in)  # fewer padding positions, same sentences
        unmasked = src.clone()
        unmasked[:, longest:] = 5  # real tokens where the padding was: must change the output
        assert torch.allclose(full, trimmed, atol=1e-5)
        assert (model(unmasked, tgt_in) - full).abs().amax() > 1e-3
        later = tgt_in.clone()
        later[:, 6] = 7
        shifted = model(src, later)
    assert torch.allclose(full[:, :6], shifted[:, :6], atol=1e-5)
    assert (full[:, 6:] - shifted[:, 6:]).abs().amax() > 1e-3


def test_transformer_padding_masks_hold_after_factorisation(reverse):
    torch.manual_seed(0)
    model = factorize(build_model("transformer", reverse, d_model=64)).eval()
    (src, tgt_in), _ = batch(reverse, 4)
    longest = int((src != PAD_INDEX).sum(1).max())
    with torch.no_grad():
        assert torch.allclose(model(src, tgt_in), model(src[:, :longest], tgt_in), atol=1e-5)
