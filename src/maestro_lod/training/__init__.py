"""The MAESTRO training recipe as a reusable component.

``fit(model, train_data, val_data, TrainConfig(...))`` (or a :class:`Trainer` with callbacks) trains
any model with low-rank ordered layers: full pass + sampled pass distilled from it + group lasso per
step; progressive shrinking, BatchNorm recalibration and evaluation after each epoch. Other
training methods (dense training, ablations, baselines) are strategies of the same loop, registered
in :data:`METHODS`. The ``maestro-lod train`` command is a thin layer over this package.
"""

from ..errors import TrainingDiverged
from .checkpoint import load_checkpoint, save_checkpoint
from .train_config import TrainConfig, read_toml
from .loop import Callback, FitResult, Trainer, TrainerState, fit
from .methods import METHODS, DenseMethod, MaestroFullRanks, MaestroMethod, MaestroWithoutShrinking, TrainingMethod
from .records import EpochRecord, RunSummary, StepStats

__all__ = ["TrainConfig", "read_toml", "Trainer", "TrainerState", "fit", "FitResult", "Callback", "TrainingDiverged",
           "METHODS", "TrainingMethod", "DenseMethod", "MaestroMethod", "EpochRecord", "RunSummary", "StepStats",
           "save_checkpoint", "load_checkpoint", "MaestroWithoutShrinking", "MaestroFullRanks"]

from .. import baselines  # noqa: E402,F401  (registers the baseline methods in METHODS)
