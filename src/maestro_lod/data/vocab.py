"""Token vocabularies for the language tasks: text ↔ integer ids, character or whitespace level."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ConfigError

PAD_INDEX, BOS_INDEX, EOS_INDEX, UNK_INDEX = 0, 1, 2, 3
"""Ids of the special tokens every seq2seq vocabulary starts with (models mask ``PAD_INDEX``)."""
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
LEVELS = {"char": "", "word": " "}


def split_tokens(text: str, level: str) -> list[str]:
    """Characters of ``text`` (``"char"``) or its whitespace-separated words (``"word"``)."""
    if level not in LEVELS:
        raise ConfigError(f"token level {level!r} is not one of {', '.join(LEVELS)}")
    return list(text) if level == "char" else text.split()


class Vocabulary:
    """An ordered list of tokens; a token's id is its position.

    With ``specials=True`` the first ids are :data:`SPECIAL_TOKENS` and unseen tokens encode to
    ``UNK_INDEX``; without, an unseen token is an error (a closed character set such as a corpus).
    """

    def __init__(self, tokens: Iterable[str], level: str = "char", specials: bool = False):
        split_tokens("", level)
        self.level = level
        self.specials = bool(specials)
        body = [t for t in tokens if not (self.specials and t in SPECIAL_TOKENS)]
        self.tokens: tuple[str, ...] = (SPECIAL_TOKENS if self.specials else ()) + tuple(body)
        self.index = {token: i for i, token in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ConfigError("vocabulary tokens must be unique")

    @classmethod
    def from_texts(cls, texts: Iterable[str], level: str = "char", specials: bool = False) -> "Vocabulary":
        """Every distinct token of ``texts``, sorted (so the ids do not depend on text order)."""
        seen: set[str] = set()
        for text in texts:
            seen.update(split_tokens(text, level))
        return cls(sorted(seen), level, specials)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ids = []
        for token in split_tokens(text, self.level):
            if token in self.index:
                ids.append(self.index[token])
            elif self.specials:
                ids.append(UNK_INDEX)
            else:
                raise ConfigError(f"token {token!r} is not in the vocabulary")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; padding, begin/end markers and negative (ignored) ids are left out."""
        skipped = {PAD_INDEX, BOS_INDEX, EOS_INDEX} if self.specials else set()
        tokens = []
        for i in ids:
            i = int(i)
            if i < 0 or i in skipped:
                continue
            if i >= len(self.tokens):
                raise ConfigError(f"token id {i} is outside the vocabulary of {len(self.tokens)} tokens")
            tokens.append(self.tokens[i])
        return LEVELS[self.level].join(tokens)
