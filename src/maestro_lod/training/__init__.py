"""The MAESTRO training recipe as a reusable component.

``fit(model, train_data, val_data, TrainConfig(...))`` (or a :class:`Trainer` with callbacks) trains
any model with low-rank ordered layers: full pass + sampled pass distilled from it + group lasso per
step; progressive shrinking, BatchNorm recalibration and evaluation after each epoch. The
``maestro-lod train`` command is a thin layer over this package.
"""

from ..errors import TrainingDiverged
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, read_toml
from .loop import Callback, FitResult, Trainer, fit
from .presets import PRESETS, preset

__all__ = ["TrainConfig", "read_toml", "Trainer", "fit", "FitResult", "Callback", "TrainingDiverged",
           "save_checkpoint", "load_checkpoint", "PRESETS", "preset"]
