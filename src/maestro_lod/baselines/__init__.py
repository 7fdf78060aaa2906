"""Baselines that MAESTRO is compared with, as strategies of the one training loop.

Importing this package registers them in :data:`maestro_lod.training.METHODS`, each with the
class of its options (``TrainConfig.method_options``):

* ``pufferfish`` (:mod:`.pufferfish`): full-rank warm-up, then a fixed rank ratio, plain training;
* ``cuttlefish`` (:mod:`.cuttlefish`): full-rank training until every layer's stable rank has
  settled, then factorisation at the ranks it settled at;
* ``svd`` (:mod:`.svd`): dense training, then truncated SVD to a budget, optional fine-tuning.

:mod:`.layers` holds the per-model table of the layers the baselines keep dense.
"""

from . import cuttlefish, pufferfish, svd
from .cuttlefish import CuttlefishConfig, CuttlefishMethod, scaled_epochs, stable_rank, stabilised
from .pufferfish import PufferfishConfig, PufferfishMethod
from .svd import SvdConfig, SvdMethod, energy_rank

__all__ = ["PufferfishMethod", "CuttlefishMethod", "SvdMethod", "PufferfishConfig", "CuttlefishConfig", "SvdConfig",
           "stable_rank", "stabilised", "scaled_epochs", "energy_rank", "cuttlefish", "pufferfish", "svd"]
