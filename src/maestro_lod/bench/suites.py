"""The tasks and suites of the benchmark, and the methods it compares (:data:`VARIANTS`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..runs.presets import preset
from ..training.ablations import VARIANTS



@dataclass(frozen=True)
class Task:
    """One model on one dataset with one recipe (a partial TrainConfig table). ``maestro`` holds
    MAESTRO's own options on this task, applied over the recipe to its cells only where a suite
    trains MAESTRO beside other families (the ``fronts`` suite): what every family shares stays in
    ``options``. ``maestro_order`` is how that suite orders MAESTRO's trained ranks before its
    search: ``canonical`` (each pair re-factorised by SVD) or ``canonical-whitened`` (by whitened
    SVD on the calibration set)."""

    name: str
    options: dict[str, Any]
    metric: str = "accuracy"  # or "perplexity"
    maestro: dict[str, Any] = field(default_factory=dict)
    maestro_order: str = "canonical"


@dataclass(frozen=True)
class Suite:
    """Tasks, the number of seeds per cell, and the methods run on every task by default."""

    tasks: tuple[Task, ...]
    seeds: int
    methods: tuple[str, ...] = tuple(VARIANTS)
    description: str = ""


_LENET = Task("lenet5-mnist5k", {**preset("lenet5-mnist5k"), "epochs": 10})
_MLP = Task("mlp-digits", {"model": "mlp", "data": "digits", "epochs": 15, "batch_size": 64, "lr": 0.05,
                           "lambda_gl": 1e-3, "eps_ps": 1e-3})
_CNN4 = Task("cnn4-mnist5k", {"model": "cnn4", "data": "mnist5k", "epochs": 8, "batch_size": 64, "lr": 0.02,
                              "lambda_gl": 1e-3, "eps_ps": 1e-3, "threads": 2})
_CHAR = Task("char-lm-pydoc", {**preset("char-lm-pydoc"), "epochs": 2}, metric="perplexity")

SUITES: dict[str, Suite] = {
    "quick": Suite((_LENET, _MLP), 1, description="LeNet-5 / mnist5k and MLP / digits, one seed"),
    "cpu": Suite((_LENET, _MLP, _CNN4, _CHAR), 3, description="the quick tasks, cnn4 / mnist5k, char-lm / pydoc-text"),
    "paper": Suite((Task("resnet18-cifar10", {**preset("resnet18-cifar10"), "threads": 8}),
                    Task("vgg19-cifar10", {**preset("vgg19-cifar10"), "threads": 8}),
                    Task("transformer-reverse", preset("transformer-reverse"))), 3,
                   description="CIFAR-10 ResNet-18 / VGG-19 and the Transformer (GPU)"),
}
"""The suites by name: ``quick`` (a few minutes on two cores), ``cpu`` (3 seeds, four tasks) and
``paper`` (needs a GPU and the CIFAR-10 / translation data)."""
