"""Transformer models for the language tasks, built from PyTorch's own Transformer layers so that
``maestro_lod.factorize`` finds every ``nn.Linear`` and ``nn.MultiheadAttention`` in them.

* ``char-lm``: decoder-only language model (``nn.TransformerEncoderLayer`` + causal mask, learned
  positions, pre-LayerNorm); logits ``(batch, time, vocab)``.
* ``transformer``: the encoder–decoder ``nn.Transformer`` of the MAESTRO translation experiment,
  ``model(src, tgt_in)`` → logits ``(batch, tgt_time, vocab)``, with causal and padding masks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_positive_int
from ..data import PAD_INDEX, TaskData
from ..errors import ConfigError
from .registry import check_dropout, register_model, require_kind


def check_length(model: str, length: int, max_len: int) -> None:
    """Refuse sequences longer than the positions a model was built for."""
    if length > max_len:
        raise ConfigError(f"{model}: sequence length {length} exceeds the model's maximum length {max_len}")


def check_heads(d_model: int, num_heads: int) -> None:
    """Multi-head attention splits ``d_model`` evenly across the heads."""
    if d_model % num_heads:
        raise ConfigError(f"d_model={d_model} is not divisible by num_heads={num_heads}")


class CharTransformerLM(nn.Module):
    """Decoder-only Transformer LM: token + learned position embeddings, ``num_layers`` pre-LN
    self-attention blocks under a causal mask (position t sees only positions ≤ t), LayerNorm,
    and a linear head to the vocabulary (not tied to the embedding, so it can be factorised)."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int, num_layers: int, num_heads: int,
                 dim_feedforward: int, dropout: float):
        super().__init__()
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_len, d_model)
        self.dropout = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(d_model, num_heads, dim_feedforward, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[-1]
        check_length("char-lm", length, self.max_len)
        positions = torch.arange(length, device=tokens.device)
        h = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=h.dtype)
        return self.head(self.blocks(h, mask=mask, is_causal=True))


@register_model("char-lm")
def build_char_lm(data: TaskData, d_model: int = 64, num_layers: int = 2, num_heads: int = 4,
                  dim_feedforward: int | None = None, dropout: float = 0.1) -> nn.Module:
    """Character Transformer LM sized for ``data`` (vocabulary, context length ``data.seq_len``).

    The defaults (d_model 64, 2 layers, 4 heads, FFN 4·d_model; about 110k parameters) keep a
    CPU epoch on ``pydoc-text`` (64-character context) under a minute on one thread; raise ``d_model`` /
    ``num_layers`` (and ``load_data(seq_len=...)``) for a stronger model.
    """
    require_kind("char-lm", data, "language-model")
    d_model, num_layers, num_heads = (check_positive_int(n, v) for n, v in
                                      (("d_model", d_model), ("num_layers", num_layers), ("num_heads", num_heads)))
    check_heads(d_model, num_heads)
    ffn = 4 * d_model if dim_feedforward is None else check_positive_int("dim_feedforward", dim_feedforward)
    return CharTransformerLM(data.vocab_size, data.seq_len, d_model, num_layers, num_heads, ffn, check_dropout(dropout))


class SinusoidalPositions(nn.Module):
    """Adds the fixed sine/cosine position encoding of "Attention Is All You Need"."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_len, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[-2]].to(x.dtype)


class Seq2SeqTransformer(nn.Module):
    """Encoder–decoder ``nn.Transformer`` over a vocabulary shared by source and target.

    Embeddings are scaled by √d_model and get sinusoidal positions; the source padding mask
    (tokens equal to ``pad_index``) applies to encoder self-attention and decoder cross-attention,
    the target padding mask and a causal mask to decoder self-attention.
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int, num_heads: int, num_encoder_layers: int,
                 num_decoder_layers: int, dim_feedforward: int, dropout: float, pad_index: int = PAD_INDEX):
        super().__init__()
        self.max_len = max_len
        self.pad_index = pad_index
        self.scale = math.sqrt(d_model)
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_index)
        self.positions = SinusoidalPositions(d_model, max_len)
        self.dropout = nn.Dropout(dropout)
        encoder_layer = nn.TransformerEncoderLayer(d_model, num_heads, dim_feedforward, dropout, batch_first=True)
        encoder = nn.TransformerEncoder(encoder_layer, num_encoder_layers, norm=nn.LayerNorm(d_model),
                                        enable_nested_tensor=False)
        self.transformer = nn.Transformer(d_model, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward,
                                          dropout, custom_encoder=encoder, batch_first=True)
        self.generator = nn.Linear(d_model, vocab_size)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        check_length("transformer", tokens.shape[-1], self.max_len)
        return self.dropout(self.positions(self.embedding(tokens) * self.scale))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        src_padding = src == self.pad_index
        length = tgt_in.shape[-1]
        causal = torch.ones(length, length, dtype=torch.bool, device=tgt_in.device).triu(1)
        h = self.transformer(self.embed(src), self.embed(tgt_in), tgt_mask=causal, src_key_padding_mask=src_padding,
                             tgt_key_padding_mask=tgt_in == self.pad_index, memory_key_padding_mask=src_padding,
                             tgt_is_causal=True)
        return self.generator(h)


TRANSFORMER_SIZES = {
    "small": dict(d_model=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=512),
    "base": dict(d_model=512, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048),
}
"""Presets: "small" (about 0.9M parameters; a CPU epoch of ``reverse`` takes seconds) and "base",
the Transformer-base of the paper (d_model 512, 8 heads, 6+6 layers, FFN 2048)."""


@register_model("transformer")
def build_transformer(data: TaskData, size: str = "small", d_model: int | None = None, num_heads: int | None = None,
                      num_encoder_layers: int | None = None, num_decoder_layers: int | None = None,
                      dim_feedforward: int | None = None, dropout: float = 0.1) -> nn.Module:
    """Encoder–decoder Transformer for ``data`` (seq2seq); ``size`` picks a preset of
    :data:`TRANSFORMER_SIZES` and any explicit dimension overrides it."""
    require_kind("transformer", data, "seq2seq")
    if size not in TRANSFORMER_SIZES:
        raise ConfigError(f"size={size!r} is not one of {', '.join(TRANSFORMER_SIZES)}")
    overrides = dict(d_model=d_model, num_heads=num_heads, num_encoder_layers=num_encoder_layers,
                     num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward)
    dims = {k: check_positive_int(k, v) if v is not None else TRANSFORMER_SIZES[size][k] for k, v in overrides.items()}
    check_heads(dims["d_model"], dims["num_heads"])
    return Seq2SeqTransformer(data.vocab_size, data.seq_len, dropout=check_dropout(dropout), **dims)
