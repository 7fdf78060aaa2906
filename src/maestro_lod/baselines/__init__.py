"""Baselines that MAESTRO is compared with, as strategies of the one training loop.

Importing this package registers them in :data:`maestro_lod.training.METHODS`:

* ``pufferfish`` (:mod:`.pufferfish`): full-rank warm-up, then a fixed rank ratio, plain training;
* ``cuttlefish`` (:mod:`.cuttlefish`): full-rank training until every layer's stable rank has
  settled, then factorisation at the ranks it settled at;
* ``svd`` (:mod:`.svd`): dense training, then truncated SVD to a budget, optional fine-tuning.

:mod:`.layers` holds the per-model table of the layers the baselines keep dense.
"""

from . import cuttlefish, pufferfish, svd
from .cuttlefish import CuttlefishMethod, scaled_epochs, stable_rank, stabilised
from .pufferfish import PufferfishMethod
from .svd import SvdMethod, energy_rank

__all__ = ["PufferfishMethod", "CuttlefishMethod", "SvdMethod", "stable_rank", "stabilised", "scaled_epochs",
           "energy_rank", "cuttlefish", "pufferfish", "svd"]
