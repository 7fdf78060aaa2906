"""The shared behaviour of every factorised layer: factors, ranks, importance, physical truncation."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, ConfigTypeError
from ..functional import DOWN_RANK_DIM, UP_RANK_DIM, rank_importance


class LowRankLayer(nn.Module):
    """A layer whose weight is ``up @ down`` with ranks ordered by importance.

    * ``rank`` is the physical rank, read from the factor shapes (no mask, no separate counter).
    * ``active_rank`` (None = full) makes the forward pass use only the leading ``b`` ranks, as a
      view of the factors: this is how ordered dropout samples a sub-model without copying.
    * ``truncate_`` drops trailing ranks physically while keeping each Parameter object, so an
      existing optimiser keeps training (see :func:`maestro_lod.shrink_`).
    """

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
        raise NotImplementedError

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
