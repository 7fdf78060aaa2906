"""Seeding, derived seeds and the capture / restore of every generator a run draws from."""

import json
import random

import numpy as np
import pytest
import torch

from maestro_lod.errors import ConfigError
from maestro_lod.training.rng import (DERIVED_SEED_LIMIT, SEED_LIMIT, capture_rng, derive_seed, restore_rng,
                                      seed_everything)
from maestro_lod.training.train_config import TrainConfig


def _draws(generators):
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist(),
            {key: torch.randint(0, 10**6, (4,), generator=gen).tolist() for key, gen in generators.items()})


def test_restore_gives_the_same_draws_from_every_generator():
    seed_everything(5)
    generators = {"data": torch.Generator().manual_seed(1), "sampler": torch.Generator().manual_seed(2)}
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.standard_normal()  # and one in NumPy's
    state = capture_rng(generators)
    first = _draws(generators)
    _draws(generators)  # move everything on
    seed_everything(99)
    restore_rng(state, generators)
    assert _draws(generators) == first


def test_restore_into_fresh_generators_continues_the_same_streams():
    generators = {"data": torch.Generator().manual_seed(3)}
    torch.randint(0, 9, (5,), generator=generators["data"])
    state = capture_rng(generators)
    expected = torch.randint(0, 10**6, (8,), generator=generators["data"])
    fresh = {"data": torch.Generator().manual_seed(0)}
    restore_rng(state, fresh)
    assert torch.equal(torch.randint(0, 10**6, (8,), generator=fresh["data"]), expected)


def test_captured_state_is_tensors_and_json_values():
    state = capture_rng({"g": torch.Generator().manual_seed(0)})
    json.dumps({"python": state["python"], "numpy": state["numpy"]})  # plain JSON
    assert isinstance(state["torch"], torch.Tensor) and isinstance(state["generators"]["g"], torch.Tensor)
    assert len(state["python"][1]) == 625 and len(state["numpy"][1]) == 624
    # the JSON round trip of the Python/NumPy parts still restores them
    state = {**state, **json.loads(json.dumps({"python": state["python"], "numpy": state["numpy"]}))}
    expected = (random.random(), np.random.rand())
    restore_rng(state, {"g": torch.Generator()})
    assert (random.random(), np.random.rand()) == expected


def test_seed_everything_seeds_every_global_generator():
    seed_everything(SEED_LIMIT - 1)
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    seed_everything(SEED_LIMIT - 1)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
    seed_everything(SEED_LIMIT - 2)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) != first


def test_derive_seed_is_affine_and_reduced_into_the_generator_range():
    assert derive_seed(7) == 7
    assert derive_seed(3, 1_000_003, 2) == 3_000_011
    assert derive_seed(SEED_LIMIT - 1, 1_000_003, 10**6) == (SEED_LIMIT - 1) * 1_000_003 + 10**6  # below 2^63
    big = derive_seed(2**40, 2**40, 5)
    assert big == (2**80 + 5) % 2**63 == 5 and DERIVED_SEED_LIMIT == 2**63
    assert derive_seed(1, -1, 0) == 2**63 - 1  # negative results wrap into range too
    torch.Generator().manual_seed(derive_seed(2**62, 7, 123))  # always accepted
    for bad in ((1.0,), (True,), (1, 2.0), (1, 1, None)):
        with pytest.raises(TypeError, match="derive_seed takes ints"):
            derive_seed(*bad)


@pytest.mark.parametrize("seed", [0, SEED_LIMIT - 1])
def test_config_accepts_seeds_in_range(seed):
    assert TrainConfig(seed=seed).seed == seed


@pytest.mark.parametrize("seed", [-1, SEED_LIMIT, 2**64, True, 1.0])
def test_config_refuses_seeds_out_of_range(seed):
    with pytest.raises(ConfigError, match="seed="):
        TrainConfig(seed=seed)


def test_factorize_seed_has_the_same_limit():
    assert TrainConfig(factorize={"seed": SEED_LIMIT - 1}).factorize_config().seed == SEED_LIMIT - 1
    with pytest.raises(ConfigError, match="factorize.seed"):
        TrainConfig(factorize={"seed": SEED_LIMIT})
