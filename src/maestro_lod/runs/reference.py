"""Dense-model accuracies measured once with this package, shown next to a run's result.

A figure is only used for a run whose dense-relevant options (model, data, optimisation recipe,
budget) equal the ones it was measured with; any other run gets no stored figure (``--reference
run`` measures one instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..training.train_config import TrainConfig
from .presets import preset

DENSE_RECIPE_KEYS = ("model", "data", "model_options", "data_root", "augment", "seq_len", "epochs", "batch_size",
                     "optimizer", "lr", "momentum", "nesterov", "weight_decay", "betas", "schedule", "milestones",
                     "gamma", "warmup_steps", "grad_clip")
"""The options that determine what dense training of the model reaches."""


@dataclass(frozen=True)
class StoredReference:
    """A dense accuracy, the recipe it was measured with, where the number comes from (``source``,
    a sentence) and ``origin``, the short name of that measurement shown in the result table."""

    recipe: dict[str, Any]
    accuracy: float
    source: str
    origin: str = "measured once with this package"


def _recipe(**changes: Any) -> dict[str, Any]:
    config = TrainConfig.from_dict(changes).to_dict()
    return {key: config[key] for key in DENSE_RECIPE_KEYS}


STORED_REFERENCES = (
    StoredReference(
        recipe=_recipe(**preset("lenet5-mnist5k")),
        accuracy=0.967,
        source=("dense LeNet-5 with this recipe, median validation accuracy of seeds 0, 1, 2 "
                "(96.7%, 97.4%, 96.2%), measured by benchmarks/recipe.py (torch 2.13, CPU)"),
    ),
    StoredReference(
        recipe=_recipe(**{**preset("lenet5-mnist5k"), "schedule": "constant"}),
        accuracy=0.965,
        source=("dense LeNet-5 with this recipe, median validation accuracy of seeds 0, 1, 2 "
                "(96.4%, 96.5%, 97.4%), measured by benchmarks/training_speed.py (torch 2.13, CPU)"),
        origin="benchmark, 3 seeds",
    ),
)


def stored_reference(config: TrainConfig) -> StoredReference | None:
    """The stored dense figure for ``config``'s recipe, or None."""
    recipe = {key: config.to_dict()[key] for key in DENSE_RECIPE_KEYS}
    return next((ref for ref in STORED_REFERENCES if ref.recipe == recipe), None)
