"""What a loaded task looks like (:class:`TaskData`) and the name → loader registry behind ``load_data``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import ConfigError, ConfigTypeError, MissingFileError
from ..registry import Registry
from .vocab import Vocabulary

IGNORE_INDEX = -100
"""Target value of positions that count neither in the loss nor in the accuracy (padding)."""

KINDS = ("classification", "language-model", "seq2seq")


@dataclass(frozen=True)
class Normalization:
    """How a task's raw inputs become model inputs: ``(raw · scale − mean) / std``, per channel
    (axis 1 of a batch), e.g. pixels 0–255 with ``scale = 1/255``. ``resize``: the (height, width)
    images are resized to first (image folders), None when they are not resized."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0
    resize: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, object]:
        return {"formula": "(raw * scale - mean) / std, per channel", "scale": self.scale, "mean": list(self.mean),
                "std": list(self.std), "resize": None if self.resize is None else list(self.resize)}


DIGIT_LABELS = tuple(str(digit) for digit in range(10))


@dataclass(frozen=True)
class TaskData:
    """A dataset split into train / validation plus the facts a model builder needs.

    Every item is ``(inputs, targets)``: inputs a tensor or a tuple of tensors, targets a LongTensor,
    all of fixed shape so the default ``DataLoader`` collate works. ``vocab`` (optional) maps
    token ids back to text for language tasks. ``normalization`` (image tasks) says how raw inputs
    were turned into the dataset's tensors; ``labels`` names the classes of a classification task,
    in target order. Both are what a deployed model's user needs to feed it and read its output.
    """

    name: str
    kind: str
    train: Dataset
    val: Dataset
    num_classes: int | None
    input_shape: tuple[int, ...] | None
    vocab_size: int | None
    seq_len: int | None
    description: str
    vocab: Vocabulary | None = None
    normalization: Normalization | None = None
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"TaskData kind={self.kind!r} is not one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class LoadOptions:
    """The arguments of :func:`load_data` that every loader receives (each reads what it needs).

    ``seed`` never changes a built-in split or generated dataset: those use fixed seeds so runs
    stay comparable. ``seq_len`` overrides a language / seq2seq task's context or maximum length.
    """

    root: Path | None = None
    download: bool = False
    seed: int = 0
    augment: bool = True
    seq_len: int | None = None


Loader = Callable[[LoadOptions], TaskData]
DATASETS = Registry("dataset")
register_dataset = DATASETS.register  # decorator: ``@register_dataset("name")`` on ``loader(options) -> TaskData``
available_datasets = DATASETS.names


def load_data(name: str, *, root: str | None = None, download: bool = False, seed: int = 0,
              augment: bool = True, seq_len: int | None = None) -> TaskData:
    """Load a registered dataset by name.

    Args:
        name: one of :func:`available_datasets`.
        root: directory of local or downloaded files (required by the file-based datasets).
        download: let online datasets (torchvision) fetch missing files.
        seed: passed to loaders; built-in splits are fixed whatever its value.
        augment: training-set augmentation where a dataset defines one (CIFAR-10, image folders).
        seq_len: optional override of the context length (language model) or maximum sequence
            length (seq2seq).
    """
    loader = DATASETS.lookup(name)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigTypeError(f"seed must be an int, got {seed!r}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2):
        raise ConfigError(f"seq_len={seq_len!r} must be an int >= 2")
    options = LoadOptions(None if root is None else Path(root).expanduser(), bool(download), seed, bool(augment),
                          seq_len)
    data = loader(options)
    if seq_len is not None and data.seq_len is None:
        raise ConfigError(f"seq_len={seq_len} applies to sequence tasks, but dataset {name!r} is {data.kind}")
    return data


def require_root(name: str, options: LoadOptions) -> Path:
    """The ``root`` directory of a file-based dataset, which must be given and exist."""
    if options.root is None:
        raise ConfigError(f"dataset {name!r} reads local files: pass root=<directory>")
    if not options.root.is_dir():
        raise MissingFileError(f"dataset {name!r}: directory {str(options.root)!r} does not exist")
    return options.root
