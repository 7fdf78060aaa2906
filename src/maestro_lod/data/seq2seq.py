"""Sequence-to-sequence tasks: a generated reversal task and user-supplied parallel text files.

Items are ``((src, tgt_in), tgt_out)``, all of length ``seq_len``: ``src`` padded with
``PAD_INDEX``; ``tgt_in`` is ``BOS`` + target (teacher forcing input), padded with ``PAD_INDEX``;
``tgt_out`` is target + ``EOS``, padded with ``IGNORE_INDEX`` so padding counts in no metric.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, MissingFileError
from .registry import IGNORE_INDEX, LoadOptions, TaskData, register_dataset, require_root
from .vocab import BOS_INDEX, EOS_INDEX, PAD_INDEX, Vocabulary

REVERSE_SEED = 31337
REVERSE_SYMBOLS = "abcdefghijklmnopqrst"
REVERSE_LENGTHS = (4, 16)
REVERSE_SIZES = (5000, 500)
PARALLEL_SPLITS = ("train", "val")


class Seq2SeqDataset(Dataset):
    """Padded ``(src, tgt_in)`` → ``tgt_out`` examples built from pairs of token-id lists."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], seq_len: int):
        n = len(pairs)
        self.src = torch.full((n, seq_len), PAD_INDEX, dtype=torch.long)
        self.tgt_in = torch.full((n, seq_len), PAD_INDEX, dtype=torch.long)
        self.tgt_out = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
        for i, (src, tgt) in enumerate(pairs):
            src, tgt = src[:seq_len], tgt[:seq_len - 1]
            self.src[i, :len(src)] = torch.tensor(src, dtype=torch.long)
            self.tgt_in[i, :len(tgt) + 1] = torch.tensor([BOS_INDEX, *tgt], dtype=torch.long)
            self.tgt_out[i, :len(tgt) + 1] = torch.tensor([*tgt, EOS_INDEX], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        return (self.src[index], self.tgt_in[index]), self.tgt_out[index]


def random_sequences(rng: np.random.Generator, count: int, lengths: tuple[int, int], alphabet: str,
                     exclude: set[str]) -> list[str]:
    """``count`` distinct random strings over ``alphabet`` with lengths uniform in ``lengths``
    (inclusive), none of them in ``exclude`` (so validation never repeats a training sequence)."""
    low, high = lengths
    if high < low:
        raise ConfigError(f"sequence lengths {lengths} are empty")
    possible = sum(len(alphabet) ** k for k in range(low, high + 1)) - len(exclude)
    if possible < count:
        raise ConfigError(f"cannot draw {count} distinct sequences of length {low}..{high} over {len(alphabet)} symbols")
    found: dict[str, None] = {}
    while len(found) < count:
        length = int(rng.integers(low, high + 1))
        seq = "".join(alphabet[j] for j in rng.integers(0, len(alphabet), size=length))
        if seq not in exclude:
            found[seq] = None
    return list(found)


@register_dataset("reverse")
def load_reverse(options: LoadOptions) -> TaskData:
    """Generated task: reverse a random string of 4–16 symbols (5,000 train / 500 val, fixed seed)."""
    seq_len = options.seq_len or REVERSE_LENGTHS[1] + 1
    lengths = (min(REVERSE_LENGTHS[0], seq_len - 1), seq_len - 1)
    rng = np.random.default_rng(REVERSE_SEED)
    train = random_sequences(rng, REVERSE_SIZES[0], lengths, REVERSE_SYMBOLS, set())
    val = random_sequences(rng, REVERSE_SIZES[1], lengths, REVERSE_SYMBOLS, set(train))
    vocab = Vocabulary(REVERSE_SYMBOLS, level="char", specials=True)

    def dataset(texts: list[str]) -> Seq2SeqDataset:
        return Seq2SeqDataset([(vocab.encode(t), vocab.encode(t[::-1])) for t in texts], seq_len)

    return TaskData(
        name="reverse", kind="seq2seq", train=dataset(train), val=dataset(val),
        num_classes=None, input_shape=None, vocab_size=len(vocab), seq_len=seq_len,
        description=f"generated string reversal (offline, fixed seed): {len(train):,} train / {len(val):,} val "
                    f"strings of {lengths[0]}-{lengths[1]} symbols over {len(REVERSE_SYMBOLS)}",
        vocab=vocab,
    )


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (an empty line is an error: it has nothing to translate)."""
    if not path.is_file():
        raise MissingFileError(f"parallel-text file {str(path)!r} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ConfigError(f"{str(path)!r} line {number} is empty")
    return lines


def read_parallel(root: Path, split: str) -> list[tuple[str, str]]:
    """Aligned ``(source, target)`` lines of ``root/<split>.src`` and ``root/<split>.tgt``."""
    src_path, tgt_path = root / f"{split}.src", root / f"{split}.tgt"
    sources, targets = read_lines(src_path), read_lines(tgt_path)
    if not sources:
        raise ConfigError(f"{str(src_path)!r} has no lines")
    if len(sources) != len(targets):
        raise ConfigError(f"{str(src_path)!r} has {len(sources)} lines but {str(tgt_path)!r} has {len(targets)}")
    return list(zip(sources, targets))


@register_dataset("parallel-text")
def load_parallel_text(options: LoadOptions) -> TaskData:
    """Translation-style task from ``root/{train,val}.{src,tgt}`` (one sentence per line, aligned).

    Tokens are whitespace-separated words; one vocabulary shared by source and target is built
    from the training files (unseen validation words become ``<unk>``). ``seq_len`` defaults to
    the longest sentence plus one (for BOS/EOS); a smaller override truncates longer sentences.
    """
    root = require_root("parallel-text", options)
    splits = {split: read_parallel(root, split) for split in PARALLEL_SPLITS}
    vocab = Vocabulary.from_texts((text for pair in splits["train"] for text in pair), level="word", specials=True)
    encoded = {split: [(vocab.encode(s), vocab.encode(t)) for s, t in pairs] for split, pairs in splits.items()}
    longest = max(max(len(s), len(t) + 1) for pairs in encoded.values() for s, t in pairs)
    seq_len = options.seq_len or longest
    train, val = (Seq2SeqDataset(encoded[split], seq_len) for split in PARALLEL_SPLITS)
    return TaskData(
        name="parallel-text", kind="seq2seq", train=train, val=val,
        num_classes=None, input_shape=None, vocab_size=len(vocab), seq_len=seq_len,
        description=f"parallel text from {str(root)!r}, word level: {len(train):,} train / {len(val):,} val "
                    f"sentence pairs, {len(vocab):,} tokens, max length {seq_len}",
        vocab=vocab,
    )
