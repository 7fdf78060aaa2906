"""Train once, deploy everywhere: the accuracy–cost front of one trained MAESTRO model, points
chosen by budget, and deployable artifacts for them.

* :func:`greedy_front` walks from the trained ranks down to every layer's minimum, one slice of
  one layer per round, keeping the removal that costs the least calibration loss per unit of cost
  saved (MACs, parameters or measured latency); the result is a :class:`Front`.
* :func:`evaluate_front` scores every point on validation data; :meth:`Front.select` picks one by
  budget (``macs=0.5``, ``params=0.3``, ``latency=0.5``, ``max_drop=0.01``).
* :func:`materialize` gives the model at a point; :func:`write_artifacts` exports it as a
  ``torch.export`` program, ONNX and a plain torch.nn state dict, each checked against PyTorch.
* :func:`save_family` writes one file holding the trained factors and the front's rank patterns;
  :func:`load_family` materialises any of its points from it by slicing the leading ranks.
* :func:`maestro_lod.compress` (:mod:`.api`; not re-exported here, where ``compress`` names the
  pipeline's module) takes any model, dense or factorised, and its
  batches, and returns a :class:`CompressedFront`: the front with the model, so that any point
  can be materialised (``front.model(i)``) or exported (``front.export(i, dir=...)``).
* :func:`compress_model` runs all of it on a model and its calibration and validation batches
  and writes the front, the family file and the artifacts of the points chosen for targets (a
  :class:`CompressResult`); :func:`maestro_lod.runs.compress.compress_run` does the same on a run
  directory of ``maestro-lod train``.
"""

from .api import CompressedFront
from .compress import CompressResult, compress_model
from ..engine.costs import COSTS, LatencyTable, deployable, measure_latency, visited_ranks
from .family import FAMILY_FILE, load_family, load_family_front, save_family
from ..engine.front import TARGET_KEYS, Front, FrontPoint
from ..engine.search import CALIBRATION_SIZE, calibration_batches, calibration_loss, evaluate_front, greedy_front, materialize

__all__ = ["COSTS", "TARGET_KEYS", "CALIBRATION_SIZE", "Front", "FrontPoint", "LatencyTable", "greedy_front",
           "evaluate_front", "materialize", "calibration_batches", "calibration_loss", "deployable",
           "measure_latency", "visited_ranks", "FAMILY_FILE", "save_family", "load_family", "load_family_front",
           "compress_model", "CompressResult", "CompressedFront"]
