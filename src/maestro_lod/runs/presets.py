"""Named recipes: partial :class:`TrainConfig` tables that the command line and config files extend.

``lenet5-mnist5k`` is the offline benchmark recipe: LeNet-5 on the 4,000/1,000 ``mnist5k`` split,
batch 64, SGD lr 0.01 with momentum 0.9, 30 epochs, λ_gl = ε_ps = 1e-3 (the setting for which the
MAESTRO research code reports 96.7% and ranks 6/16/35/27/10), with two changes measured to improve
the front of the trained model (``benchmarks/recipe.py``, 3 seeds): the learning rate drops ×0.1
for the last 10 % of the epochs (for every method alike), and MAESTRO's sampled pass draws a rank
in every layer (``sampler = "independent"``) instead of one layer's (the paper's ``single``). The CIFAR presets copy the paper's optimisation
settings (SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, 300 epochs, ×0.1 at 50% and 75%);
they need a GPU and ``pip install "maestro-lod[vision]"``. Their ``lambda_gl`` is a starting point:
the paper tunes it per model ("start large, halve until the footprint and accuracy targets are
met"). The two language presets are small offline recipes sized for a CPU.

A preset may also hold options for one training method only (:data:`METHOD_OPTIONS`), applied when
the run uses that method: ``char-lm-pydoc`` runs MAESTRO's sampled pass on 40 % of each batch,
which trains in 1.44× the dense time instead of 1.85× with the trained model and the fronts within
about one standard error of the whole batch's (3 seeds). The ablation methods trained from the same
preset (``maestro-no-shrink``, ``maestro-full``) keep their own defaults; MAESTRO without its full
pass (``--no-full-pass``) is refused until ``--sampled-batch 1`` is given, since its sampled pass is
then the only one and trains on the whole batch.
"""

from __future__ import annotations

from typing import Any

from ..registry import Registry

_CIFAR = {"data": "cifar10", "epochs": 300, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
          "weight_decay": 1e-4, "schedule": "multistep", "milestones": [0.5, 0.75], "gamma": 0.1,
          "lambda_gl": 5e-4, "eps_ps": 1e-5, "bn_recal_batches": 50, "threads": None}

_LENET5 = {"model": "lenet5", "data": "mnist5k", "epochs": 30, "batch_size": 64, "optimizer": "sgd", "lr": 0.01,
           "momentum": 0.9, "schedule": "multistep", "milestones": [0.9], "gamma": 0.1, "sampler": "independent",
           "lambda_gl": 1e-3, "eps_ps": 1e-3}

PRESETS = Registry("preset", {
    "lenet5-mnist5k": _LENET5,
    "lenet5-mnist": {**_LENET5, "data": "mnist"},
    "resnet18-cifar10": {"model": "resnet18", **_CIFAR},
    "vgg19-cifar10": {"model": "vgg19", **_CIFAR},
    "transformer-reverse": {"model": "transformer", "data": "reverse", "epochs": 15, "batch_size": 64,
                            "optimizer": "adamw", "lr": 2e-3, "betas": [0.9, 0.98], "weight_decay": 0.0,
                            "schedule": "noam", "warmup_steps": 100, "grad_clip": 1.0, "lambda_gl": 1e-4,
                            "eps_ps": 1e-3},
    "char-lm-pydoc": {"model": "char-lm", "data": "pydoc-text", "epochs": 4, "batch_size": 32,
                      "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.01, "schedule": "cosine",
                      "warmup_steps": 100, "grad_clip": 1.0, "lambda_gl": 1e-4, "eps_ps": 1e-3},
})
"""Named partial configurations; ``PRESETS.add(name, table)`` adds one."""

METHOD_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "char-lm-pydoc": {"maestro": {"sampled_batch": 0.4}},
}
"""Preset → training method → options over the preset for runs of that method only."""


def method_options(name: str, method: str) -> dict[str, Any]:
    """The named preset's options for ``method`` alone (empty when it has none)."""
    return dict(METHOD_OPTIONS.get(name, {}).get(method, {}))


def preset(name: str, method: str | None = None) -> dict[str, Any]:
    """A copy of the named preset's options, with its options for ``method`` over them when a
    method is given; unknown names raise a ValueError listing the presets."""
    options = {key: list(value) if isinstance(value, list) else value for key, value in PRESETS.lookup(name).items()}
    return options if method is None else {**options, **method_options(name, method)}
