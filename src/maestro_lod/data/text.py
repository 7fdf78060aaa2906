"""Character-level language modelling on the Python documentation bundled with CPython.

``pydoc_data.topics.topics`` (the help texts behind ``help("if")``) is about 460,000 characters of
real English/Python prose that every Python installation has, so the task loads offline.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .registry import LoadOptions, TaskData, register_dataset
from .vocab import Vocabulary

DEFAULT_CONTEXT = 64
VAL_FRACTION = 0.1


def check_stream(tokens: torch.Tensor, length: int) -> None:
    """A stream must hold at least one window of ``length`` inputs plus the shifted target."""
    if length < 1:
        raise ConfigError(f"window length {length} must be positive")
    if len(tokens) < length + 1:
        raise ConfigError(f"a stream of {len(tokens)} tokens is too short for windows of {length} (+1) tokens")


class TokenWindows(Dataset):
    """Next-token windows ``(x[t:t+L], x[t+1:t+L+1])`` of a token stream, one every ``stride`` tokens."""

    def __init__(self, tokens: torch.Tensor, length: int, stride: int):
        check_stream(tokens, length)
        if stride < 1:
            raise ConfigError(f"window stride {stride} must be positive")
        self.tokens = tokens
        self.length = length
        self.stride = stride
        self.count = (len(tokens) - length - 1) // stride + 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.count <= index < self.count:
            raise IndexError(f"window {index} is out of range for {self.count} windows")
        start = (index % self.count) * self.stride
        chunk = self.tokens[start:start + self.length + 1]
        return chunk[:-1], chunk[1:]


class RandomWindows(Dataset):
    """Next-token windows at a fresh uniformly random offset on every read.

    ``len()`` is the number of non-overlapping windows, so an epoch covers about as many tokens as
    the stream holds; the index only counts. Offsets come from torch's global generator, like
    torchvision's random augmentations, so ``torch.manual_seed`` (and the DataLoader's per-worker
    seeding) makes them reproducible, and every epoch sees the text at new alignments.
    """

    def __init__(self, tokens: torch.Tensor, length: int):
        check_stream(tokens, length)
        self.tokens = tokens
        self.length = length
        self.count = (len(tokens) - 1) // length

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.count <= index < self.count:
            raise IndexError(f"window {index} is out of range for {self.count} windows")
        start = int(torch.randint(len(self.tokens) - self.length, ()))
        chunk = self.tokens[start:start + self.length + 1]
        return chunk[:-1], chunk[1:]


def pydoc_corpus() -> str:
    """The pydoc topic texts joined in sorted-key order, one blank line apart."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


@register_dataset("pydoc-text")
def load_pydoc_text(options: LoadOptions) -> TaskData:
    """First 90% of the corpus for training (windows at random offsets, see :class:`RandomWindows`),
    last 10% for validation (fixed non-overlapping windows); the character vocabulary covers the
    whole corpus (a closed set: validation has no unknown symbols)."""
    text = pydoc_corpus()
    length = options.seq_len or DEFAULT_CONTEXT
    vocab = Vocabulary.from_texts([text], level="char")
    tokens = torch.tensor(vocab.encode(text), dtype=torch.long)
    split = int(len(tokens) * (1 - VAL_FRACTION))
    train = RandomWindows(tokens[:split], length)
    val = TokenWindows(tokens[split:], length, length)
    return TaskData(
        name="pydoc-text", kind="language-model", train=train, val=val,
        num_classes=None, input_shape=None, vocab_size=len(vocab), seq_len=length,
        description=f"CPython pydoc topic texts, character level (offline): {split:,} train / "
                    f"{len(tokens) - split:,} val characters, {len(vocab)} symbols, {len(train):,} / {len(val):,} "
                    f"windows of {length}",
        vocab=vocab,
    )
