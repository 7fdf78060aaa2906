"""Seeding and saving every random number generator a run draws from, for exact resumption."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

SEED_LIMIT = 2**32
"""Seeds of a run are ints in [0, SEED_LIMIT): what NumPy accepts, and far inside every generator's range."""
DERIVED_SEED_LIMIT = 2**63
"""Seeds derived from a run's seed lie in [0, DERIVED_SEED_LIMIT), which ``torch.Generator.manual_seed`` accepts."""


def derive_seed(seed: int, scale: int = 1, offset: int = 0) -> int:
    """``seed · scale + offset`` as the seed of a generator of its own, reduced modulo 2^63 so that it
    always fits ``torch.Generator.manual_seed`` (a value already in [0, 2^63) comes back unchanged, so
    derived streams of ordinary seeds stay as they were)."""
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (seed, scale, offset)):
        raise TypeError(f"derive_seed takes ints, got {seed!r}, {scale!r}, {offset!r}")
    return (seed * scale + offset) % DERIVED_SEED_LIMIT


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """The states of the global generators and of the run's own ``generators``, checkpoint-ready
    (tensors and JSON values only)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "generators": {key: gen.get_state() for key, gen in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Put every generator back in the state :func:`capture_rng` recorded."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    for key, gen in generators.items():
        gen.set_state(state["generators"][key])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
