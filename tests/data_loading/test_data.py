"""The dataset registry: split sizes, determinism, encodings and errors of every built-in dataset."""

from __future__ import annotations

import importlib.util
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from maestro_lod.data import (BOS_INDEX, EOS_INDEX, IGNORE_INDEX, PAD_INDEX, UNK_INDEX, TaskData, Vocabulary,
                              available_datasets, load_data, register_dataset)
from maestro_lod.data.embedded import MNIST_MEAN, MNIST_STD
from maestro_lod.data.text import RandomWindows, TokenWindows, pydoc_corpus

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(scope="module")
def mnist5k() -> TaskData:
    return load_data("mnist5k")


def tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    return x, y


def test_registry_lists_every_builtin_dataset():
    assert available_datasets() == sorted(["mnist5k", "digits", "pydoc-text", "reverse", "parallel-text", "mnist",
                                           "cifar10", "image-folder"])


def test_unknown_dataset_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist4k'.*mnist5k"):
        load_data("mnist4k")


def test_registering_a_taken_name_fails():
    with pytest.raises(ValueError, match="'digits' is already registered"):
        register_dataset("digits")(lambda options: None)


def test_bad_kind_and_bad_seq_len_are_refused():
    with pytest.raises(ValueError, match="kind='regression'"):
        TaskData("x", "regression", [], [], None, None, None, None, "")
    with pytest.raises(ValueError, match="seq_len=1"):
        load_data("reverse", seq_len=1)
    with pytest.raises(ValueError, match="seq_len=32 applies to sequence tasks, but dataset 'digits' is"):
        load_data("digits", seq_len=32)


def test_mnist5k_split_sizes_classes_and_scaling(mnist5k):
    assert (mnist5k.kind, mnist5k.num_classes, mnist5k.input_shape) == ("classification", 10, (1, 28, 28))
    x_train, y_train = tensors(mnist5k.train)
    x_val, y_val = tensors(mnist5k.val)
    assert x_train.shape == (4000, 1, 28, 28) and x_val.shape == (1000, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.long
    assert torch.bincount(y_train, minlength=10).min() > 300 and torch.bincount(y_val, minlength=10).min() > 50
    # pixels 0..255 scaled to [0, 1], then standardised with the MNIST mean / std
    assert x_train.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-5)
    assert x_train.max().item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-5)
    assert abs(x_train.mean().item()) < 0.1


def test_mnist5k_split_is_fixed_and_disjoint(mnist5k):
    again = load_data("mnist5k", seed=123)
    for first, second in ((mnist5k.train, again.train), (mnist5k.val, again.val)):
        assert all(torch.equal(a, b) for a, b in zip(tensors(first), tensors(second)))
    train_rows = {row.numpy().tobytes() for row in tensors(mnist5k.train)[0]}
    assert not any(row.numpy().tobytes() in train_rows for row in tensors(mnist5k.val)[0])


def test_digits_split_is_stratified_standardised_and_fixed():
    data = load_data("digits")
    x_train, y_train = tensors(data.train)
    x_val, y_val = tensors(data.val)
    assert x_train.shape == (1437, 1, 8, 8) and x_val.shape == (360, 1, 8, 8)
    assert set(y_train.tolist()) == set(y_val.tolist()) == set(range(10))
    assert torch.bincount(y_val).min() >= 35
    assert x_train.mean().item() == pytest.approx(0, abs=1e-5) and x_train.std().item() == pytest.approx(1, abs=1e-3)
    assert torch.equal(x_val, tensors(load_data("digits", seed=7).val)[0])


def test_vocabulary_round_trip_specials_and_unknowns():
    chars = Vocabulary.from_texts(["hello", "world"])
    assert chars.tokens == tuple("dehlorw")
    assert chars.decode(chars.encode("lower")) == "lower"
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        chars.encode("z")
    words = Vocabulary.from_texts(["a cat", "the dog"], level="word", specials=True)
    assert words.encode("the cat flew") == [words.index["the"], words.index["cat"], UNK_INDEX]
    assert words.decode([BOS_INDEX, words.index["dog"], EOS_INDEX, PAD_INDEX, IGNORE_INDEX]) == "dog"
    assert words.decode(words.encode("the cat flew")) == "the cat <unk>"


def test_token_windows_cover_the_stream_at_the_stride():
    windows = TokenWindows(torch.arange(10), length=3, stride=3)
    assert len(windows) == 3
    assert [w[0].tolist() for w in windows] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows[-1][1].tolist() == [7, 8, 9]
    with pytest.raises(IndexError):
        windows[3]
    with pytest.raises(ValueError, match="too short"):
        TokenWindows(torch.arange(3), length=3, stride=1)


def test_random_windows_are_shifted_pairs_reproducible_under_a_seed():
    windows = RandomWindows(torch.arange(100), length=8)
    assert len(windows) == 12
    torch.manual_seed(0)
    first = [windows[i] for i in range(len(windows))]
    torch.manual_seed(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, [windows[i] for i in range(len(windows))]))
    assert len({int(x[0]) for x, _ in first}) > 1
    for x, y in first:
        assert torch.equal(y, x + 1) and x.shape == (8,)


def test_pydoc_text_vocabulary_shift_and_validation_tail():
    data = load_data("pydoc-text")
    text = pydoc_corpus()
    assert data.kind == "language-model" and data.seq_len == 64
    assert data.vocab_size == len(set(text)) == len(data.vocab)
    ids = data.vocab.encode(text)
    assert data.vocab.decode(ids) == text
    split = int(len(text) * 0.9)
    x, y = data.train[0]
    assert x.shape == y.shape == (64,) and torch.equal(x[1:], y[:-1])
    assert data.vocab.decode(torch.cat([x, y[-1:]])) in text[:split]
    val_x, val_y = tensors(data.val)
    assert len(data.val) == (len(text) - split - 1) // 64
    assert torch.equal(val_x.reshape(-1), torch.tensor(ids[split:split + val_x.numel()]))
    assert torch.equal(val_y.reshape(-1), torch.tensor(ids[split + 1:split + 1 + val_x.numel()]))


def test_pydoc_text_context_length_override():
    data = load_data("pydoc-text", seq_len=32)
    assert data.seq_len == 32 and data.val[0][0].shape == (32,)


def test_reverse_targets_are_reversed_sources_with_ignored_padding():
    data = load_data("reverse")
    assert (len(data.train), len(data.val), data.kind, data.seq_len) == (5000, 500, "seq2seq", 17)
    (src, tgt_in), tgt_out = next(iter(DataLoader(data.train, batch_size=len(data.train))))
    assert src.shape == tgt_in.shape == tgt_out.shape == (5000, 17)
    lengths = (src != PAD_INDEX).sum(1)
    assert lengths.min() == 4 and lengths.max() == 16
    for i in range(0, 5000, 97):
        n = int(lengths[i])
        assert torch.equal(tgt_out[i, :n], src[i, :n].flip(0)) and tgt_out[i, n] == EOS_INDEX
        assert tgt_in[i, 0] == BOS_INDEX and torch.equal(tgt_in[i, 1:n + 1], tgt_out[i, :n])
        assert (tgt_out[i, n + 1:] == IGNORE_INDEX).all() and (tgt_in[i, n + 1:] == PAD_INDEX).all()
        assert (src[i, n:] == PAD_INDEX).all()
        assert data.vocab.decode(tgt_out[i]) == data.vocab.decode(src[i])[::-1]
    train_texts = {data.vocab.decode(s) for s in src}
    assert len(train_texts) == 5000
    assert not any(data.vocab.decode(item[0][0]) in train_texts for item in data.val)
    again = load_data("reverse", seed=5)
    assert torch.equal(again.val.src, data.val.src)


def write_parallel(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")


PARALLEL = {"train.src": "ein Hund\nzwei kleine Katzen\n", "train.tgt": "a dog\ntwo small cats\n",
            "val.src": "ein Vogel\n", "val.tgt": "a bird\n"}


def test_parallel_text_builds_a_shared_word_vocabulary_from_train(tmp_path):
    write_parallel(tmp_path, PARALLEL)
    data = load_data("parallel-text", root=str(tmp_path))
    assert (len(data.train), len(data.val)) == (2, 1)
    assert data.vocab_size == 4 + len({"ein", "Hund", "zwei", "kleine", "Katzen", "a", "dog", "two", "small", "cats"})
    assert data.seq_len == 4  # "two small cats" + EOS
    (src, tgt_in), tgt_out = data.train[1]
    assert data.vocab.decode(src) == "zwei kleine Katzen" and data.vocab.decode(tgt_out) == "two small cats"
    assert tgt_out.tolist()[-1] == EOS_INDEX and tgt_in.tolist()[0] == BOS_INDEX
    (val_src, _), val_out = data.val[0]
    assert val_src.tolist()[:2] == [data.vocab.index["ein"], UNK_INDEX]
    assert data.vocab.decode(val_out) == "a <unk>" and val_out.tolist()[2:] == [EOS_INDEX, IGNORE_INDEX]


def test_parallel_text_errors_name_the_offending_file(tmp_path):
    with pytest.raises(ValueError, match="pass root="):
        load_data("parallel-text")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data("parallel-text", root=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="train.src"):
        load_data("parallel-text", root=str(tmp_path))
    write_parallel(tmp_path, {**PARALLEL, "val.tgt": "a bird\nextra line\n"})
    with pytest.raises(ValueError, match=r"val.src' has 1 lines but .*val.tgt' has 2"):
        load_data("parallel-text", root=str(tmp_path))
    write_parallel(tmp_path, {**PARALLEL, "train.tgt": "a dog\n\n"})
    with pytest.raises(ValueError, match="train.tgt' line 2 is empty"):
        load_data("parallel-text", root=str(tmp_path))


@pytest.mark.parametrize("name", ["mnist5k", "digits", "pydoc-text", "reverse"])
def test_default_collate_batches_every_offline_dataset(name, mnist5k):
    data = mnist5k if name == "mnist5k" else load_data(name)
    inputs, targets = next(iter(DataLoader(data.train, batch_size=8, shuffle=True)))
    first = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
    assert first.shape[0] == targets.shape[0] == 8 and targets.dtype == torch.long


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed: the missing-extra message cannot occur")
@pytest.mark.parametrize("name", ["mnist", "cifar10", "image-folder"])
def test_torchvision_datasets_explain_the_missing_extra(name, tmp_path):
    with pytest.raises(ValueError, match=rf"'{name}' needs torchvision: pip install \"maestro-lod\[vision\]\""):
        load_data(name, root=str(tmp_path))


def test_image_folder_reads_generated_pngs(tmp_path):
    pytest.importorskip("torchvision", reason="image-folder needs the optional torchvision extra")
    from PIL import Image

    for split, count in (("train", 3), ("val", 2)):
        for label, colour in (("cat", (250, 10, 10)), ("dog", (10, 10, 250))):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12, 10), colour).save(folder / f"{i}.png")
    data = load_data("image-folder", root=str(tmp_path), augment=False)
    assert (len(data.train), len(data.val), data.num_classes, data.input_shape) == (6, 4, 2, (3, 10, 12))
    x, y = data.val[3]
    assert x.shape == (3, 10, 12) and y == 1
    assert x[2].mean() > x[0].mean()  # the blue "dog" images
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data("image-folder", root=str(tmp_path / "train"))


def write_idx(path, magic: int, array) -> None:
    """An MNIST IDX file: big-endian magic, dimensions, then uint8 data."""
    header = struct.pack(f">{1 + array.ndim}i", magic, *array.shape)
    path.write_bytes(header + array.astype("uint8").tobytes())


def test_mnist_reads_torchvision_files_under_root(tmp_path):
    pytest.importorskip("torchvision", reason="mnist needs the optional torchvision extra")
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", 5), ("t10k", 3)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, rng.integers(0, 256, (count, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, np.arange(count) % 10)
    data = load_data("mnist", root=str(tmp_path))
    assert (len(data.train), len(data.val), data.input_shape) == (5, 3, (1, 28, 28))
    x, y = data.val[2]
    assert x.shape == (1, 28, 28) and int(y) == 2
    assert x.min().item() >= -MNIST_MEAN / MNIST_STD - 1e-5 and x.max().item() <= (1 - MNIST_MEAN) / MNIST_STD + 1e-5


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_online_datasets_without_download_name_the_root(name, tmp_path):
    pytest.importorskip("torchvision", reason=f"{name} needs the optional torchvision extra")
    with pytest.raises(FileNotFoundError, match=rf"'{name}' not found under .*pass download=True"):
        load_data(name, root=str(tmp_path))
