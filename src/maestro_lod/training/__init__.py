"""The MAESTRO training recipe as a reusable component.

``fit(model, train_data, val_data, TrainConfig(...))`` (or a :class:`Trainer` with callbacks) trains
any model with low-rank ordered layers: full pass + sampled pass distilled from it + group lasso per
step; progressive shrinking, BatchNorm recalibration and evaluation after each epoch. Other
training methods (dense training, ablations, baselines) are strategies of the same loop, registered
in :data:`METHODS`, each with the class of its options (:class:`MaestroConfig` for MAESTRO, whose
group-lasso weight a λ scheduler sets: :class:`ConstantLambda`, or :class:`TargetLambda` for a size
target). The ``maestro-lod train`` command is a thin layer over this package.
"""

from ..errors import TrainingDiverged
from .checkpoint import load_checkpoint, save_checkpoint
from .ablations import VARIANTS, MaestroFullRanks, MaestroWithoutShrinking
from .budget import ConstantLambda, LambdaScheduler, TargetLambda
from .train_config import TrainConfig, read_toml
from .loop import Callback, FitResult, Trainer, TrainerState, fit
from .methods import DenseMethod, MaestroMethod, TrainingMethod
from .options import MaestroConfig, MethodConfig
from .records import EpochRecord, RunSummary, StepStats
from .registries import METHODS
from .. import baselines  # registers the baseline methods in METHODS

__all__ = ["TrainConfig", "read_toml", "Trainer", "TrainerState", "fit", "FitResult", "Callback", "TrainingDiverged",
           "METHODS", "TrainingMethod", "DenseMethod", "MaestroMethod", "EpochRecord", "RunSummary", "StepStats",
           "save_checkpoint", "load_checkpoint", "MaestroWithoutShrinking", "MaestroFullRanks", "VARIANTS",
           "MethodConfig", "MaestroConfig", "LambdaScheduler", "ConstantLambda", "TargetLambda", "baselines"]
