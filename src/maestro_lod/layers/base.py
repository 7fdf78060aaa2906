"""The shared behaviour of every factorised module: the :class:`Factorized` protocol that
``factorize``, ``export`` and the layer queries rely on, and :class:`LowRankLayer` (factors, ranks,
importance, physical truncation)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, ConfigTypeError
from ..functional import DOWN_RANK_DIM, UP_RANK_DIM, rank_importance
from .weight import ComputedWeight


class Factorized:
    """Protocol of every module that :func:`maestro_lod.factorize` puts in place of a dense one.

    A factorised module is built from its dense counterpart by :meth:`from_dense` (called by the
    layer's handler, see :mod:`maestro_lod.layers.handlers`) and turned back into plain ``torch.nn``
    by :meth:`to_standard`, which is all :func:`maestro_lod.export` calls. Its low-rank factors are
    the :class:`LowRankLayer` modules it is or contains. The dense weights it stands for
    (``computed_weights``) are read-only views computed from the factors.
    """

    computed_weights: tuple[str, ...] = ()
    """Attribute names that read as dense weights computed from the factors; assigning them fails."""

    @classmethod
    def from_dense(cls, module: nn.Module, rank: int | dict[str, int] | None = None, init: str = "svd",
                   min_rank: int = 1, generator: torch.Generator | None = None) -> "Factorized":
        """The factorised replacement of ``module`` at ``rank`` (None: full rank; exact with SVD init)."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_dense")

    def to_standard(self, merge: bool) -> nn.Module:
        """A plain ``torch.nn`` module with the same outputs at the current (effective) rank:
        one dense layer when ``merge``, else the cheapest faithful form the module has."""
        raise NotImplementedError(f"{type(self).__name__} does not implement to_standard")

    def merge_saves_params(self) -> bool:
        """Whether the merged dense form has no more parameters than the factorised one."""
        raise NotImplementedError(f"{type(self).__name__} does not implement merge_saves_params")

    def __setattr__(self, name: str, value) -> None:
        if name in self.computed_weights:
            raise ConfigError(f"{type(self).__name__}.{name} is computed from the factors up @ down and cannot be "
                              f"assigned; change the factors instead")
        super().__setattr__(name, value)


def follow_requires_grad(layer: "LowRankLayer", weight: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLayer":
    """Freeze ``layer``'s factors if the dense ``weight`` was frozen, and its bias like ``bias``."""
    layer.up.requires_grad_(weight.requires_grad)
    layer.down.requires_grad_(weight.requires_grad)
    if bias is not None and layer.bias is not None:
        layer.bias.requires_grad_(bias.requires_grad)
    return layer


def composing_is_cheaper(positions: int, rank: int, out_per_group: int, in_per_group: int) -> bool:
    """Whether a factor pair of ``rank`` (per group: ``out_per_group × rank`` and ``rank ×
    in_per_group``) applied at ``positions`` output positions costs fewer MACs as one dense op with
    the composed weight than as two thin ops.

    Two thin ops cost ``positions · rank · (m + n)``; composing costs ``m · n · rank`` once plus
    ``positions · m · n`` (per group; the backward pass costs twice the forward either way, so the
    comparison holds for a whole training pass). Composing wins at high rank over many positions
    (convolutions, a language model's tokens); a rank-0 pair never composes.
    """
    m, n = out_per_group, in_per_group
    return positions * rank * (m + n) > m * n * (rank + positions)


def plain_layer(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` with uninitialised parameters, for a caller that overwrites every
    one of them. Skipping the initialisation keeps export from drawing on the global random
    generator (which would change a training run's data order or dropout masks after an export)
    and from spending time on initialising weights that are thrown away."""
    return torch.nn.utils.skip_init(cls, *args, **kwargs)


class LowRankLayer(Factorized, nn.Module):
    """A layer whose weight is ``up @ down`` with ranks ordered by importance.

    * ``rank`` is the physical rank, read from the factor shapes (no mask, no separate counter).
    * ``active_rank`` (None = full) makes the forward pass use only the leading ``b`` ranks, as a
      view of the factors: this is how ordered dropout samples a sub-model without copying.
    * ``truncate_`` drops trailing ranks physically while keeping each Parameter object, so an
      existing optimiser keeps training (see :func:`maestro_lod.shrink_`).
    * ``weight`` is a :class:`ComputedWeight`: metadata reads are free, value reads compute
      ``up @ down`` at the effective rank, writes raise.
    """

    computed_weights = ("weight",)
    may_compose = True
    """Whether :meth:`composes` may pick the composed product. The deployed form of
    :mod:`maestro_lod.deploy` turns it off: a traced program must not depend on the batch size it
    was traced at, and wherever composing can pay (``b·(m+n) > m·n``) export merges the layer instead."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, max_rank: int, min_rank: int = 1):
        super().__init__()
        self.up = nn.Parameter(up)
        self.down = nn.Parameter(down)
        self.max_rank = int(max_rank)
        self.min_rank = int(min_rank)
        self._active_rank: int | None = None

    @property
    def rank(self) -> int:
        """Current physical rank (the factors' rank dimension)."""
        return self.down.shape[DOWN_RANK_DIM]

    @property
    def active_rank(self) -> int | None:
        """Rank used by the forward pass; None means the full current rank."""
        return self._active_rank

    @active_rank.setter
    def active_rank(self, value: int | None) -> None:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigTypeError(f"active_rank must be an int or None, got {value!r}")
            if not 0 <= value <= self.rank:
                raise ConfigError(f"active_rank {value} is outside 0..{self.rank} (the layer's current rank)")
        self._active_rank = value

    def __setattr__(self, name: str, value) -> None:
        # A sampled scope sets and restores active ranks every step; nn.Module's __setattr__ (which
        # sorts parameters, modules and buffers) has nothing to do for them and costs more than the
        # rest of the scope on a large model, so they bypass it.
        if name in ("active_rank", "_active_rank"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def effective_rank(self) -> int:
        """The rank the next forward pass uses."""
        return self.rank if self._active_rank is None else self._active_rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the leading ``effective_rank`` ranks of ``up`` and ``down``."""
        b = self.effective_rank
        if b == self.rank:
            return self.up, self.down
        return self.up[..., :b], self.down[..., :b, :]

    def composes(self, positions: int) -> bool:
        """Whether the next forward over ``positions`` output positions runs as one dense op with
        the composed weight ``up[..., :b] @ down[..., :b, :]`` instead of two thin ops: the cheaper
        of the two in MACs (:func:`composing_is_cheaper`). Both give the same outputs and gradients
        up to float rounding; autograd carries the gradients through the composition to the factors."""
        return self.may_compose and composing_is_cheaper(positions, self.effective_rank, self.up.shape[-2],
                                                         self.down.shape[-1])

    def importance(self) -> torch.Tensor:
        """Per-rank importance ``‖U[:, b:]‖_F · ‖V[:, b:]‖_F`` (detached, non-increasing)."""
        with torch.no_grad():
            return rank_importance(self.up, self.down)

    @torch.no_grad()
    def truncate_(self, rank: int) -> None:
        """Keep only the leading ``rank`` ranks, physically and in place (Parameter identity kept)."""
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ConfigTypeError(f"rank must be an int, got {rank!r}")
        if not 0 <= rank <= self.rank:
            raise ConfigError(f"cannot truncate to rank {rank}: the layer's current rank is {self.rank}")
        self._resize_(rank)

    @torch.no_grad()
    def _resize_(self, rank: int) -> None:
        """Set the physical rank: keeps leading ranks when shrinking, zero-pads when growing."""
        for param, dim in ((self.up, UP_RANK_DIM), (self.down, DOWN_RANK_DIM)):
            current = param.shape[dim]
            if rank <= current:
                new = param.narrow(dim, 0, rank).clone(memory_format=torch.contiguous_format)
            else:
                shape = list(param.shape)
                shape[dim] = rank
                new = param.new_zeros(shape)
                new.narrow(dim, 0, current).copy_(param)
            param.set_(new)
            if param.grad is not None:
                param.grad = param.grad.narrow(dim, 0, rank).clone(memory_format=torch.contiguous_format) if rank <= current else None
        if self._active_rank is not None and self._active_rank > rank:
            self._active_rank = None

    def dense_weight(self) -> torch.Tensor:
        """The dense weight ``up @ down`` at the effective rank, in the original layer's layout."""
        raise NotImplementedError(f"{type(self).__name__} does not implement dense_weight")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of :meth:`dense_weight` (known without computing it)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement weight_shape")

    @property
    def weight(self) -> ComputedWeight:
        """The dense weight for code that reads ``.weight`` (``nn.MultiheadAttention`` internals,
        ``nn.TransformerEncoderLayer``, T5's dtype checks): free for metadata, computed for values."""
        return ComputedWeight(self.dense_weight, self.weight_shape, self.up.dtype, self.up.device,
                              self.up.requires_grad or self.down.requires_grad, f"{type(self).__name__}.weight")

    def merge_saves_params(self) -> bool:
        """``r·(m+n) ≥ m·n`` per group at the effective rank: one dense layer is no larger than the pair."""
        m, n, groups = self.dense_shape()
        return self.effective_rank * (m + n) >= m * n // groups

    def dense_shape(self) -> tuple[int, int, int]:
        """``(m, n, groups)``: outputs and inputs per group of the factorised matrix."""
        up, down = self.up, self.down
        groups = up.shape[0] if up.dim() == 3 else 1
        return up.shape[-2] * groups, down.shape[-1] * groups, groups

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A checkpoint taken after shrinking carries smaller factors: resize first so that a
        # freshly factorised model loads it strictly.
        incoming = state_dict.get(prefix + "down")
        if isinstance(incoming, torch.Tensor) and incoming.dim() == self.down.dim():
            rank = incoming.shape[DOWN_RANK_DIM]
            if rank != self.rank:
                if rank > self.max_rank:
                    error_msgs.append(f"{prefix}down has rank {rank}, above the layer's max rank {self.max_rank}")
                    return
                self._resize_(rank)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        active = "" if self._active_rank is None else f", active_rank={self._active_rank}"
        return f"rank={self.rank}, max_rank={self.max_rank}{active}"
