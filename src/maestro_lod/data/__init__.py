"""Registry of datasets: ``load_data(name)`` returns a :class:`TaskData` (train/val datasets plus
the shapes and sizes a model builder needs). Importing this package registers the built-in sets:
offline ``mnist5k``, ``digits``, ``pydoc-text``, ``reverse``, file-based ``parallel-text``, and
torchvision-backed ``mnist``, ``cifar10``, ``image-folder`` (optional ``vision`` extra)."""

from . import embedded, seq2seq, text, vision  # noqa: F401  (register the built-in datasets)
from .registry import (DATASETS, IGNORE_INDEX, KINDS, LoadOptions, Normalization, TaskData, available_datasets,
                       load_data, register_dataset)
from .vocab import BOS_INDEX, EOS_INDEX, PAD_INDEX, SPECIAL_TOKENS, UNK_INDEX, Vocabulary

__all__ = [
    "TaskData", "LoadOptions", "Normalization", "load_data", "DATASETS", "register_dataset", "available_datasets", "IGNORE_INDEX",
    "KINDS", "Vocabulary", "PAD_INDEX", "BOS_INDEX", "EOS_INDEX", "UNK_INDEX", "SPECIAL_TOKENS",
]
