"""The curves of the ``fronts`` suite, each computed once from a finished cell and cached as JSON.

A *curve* is a list of deployable models of one task and seed, each with its exported parameters,
exported MACs (per sample, of the deployed form: :func:`~maestro_lod.engine.costs.deployable`)
and validation score, plus the dense architecture's parameters and MACs that the fractions are
taken of. Two kinds:

* a **front** (:func:`front_curve`): the greedy front (``search="lazy"``, step ¼, by ``params`` or
  by ``macs``) of one trained model, prepared first (MAESTRO's trained factor pairs re-factorised
  by SVD, :func:`~maestro_lod.canonicalize_`; a dense model factorised at full rank by SVD or by
  whitened SVD), every point evaluated on the validation set;
* a **point** (:func:`cell_point`): the exported model of one trained cell (a Pufferfish run, a
  model trained at fixed ranks), evaluated the same way.

Every curve of a task and seed uses the same calibration set (:data:`CALIBRATION_SIZE` training
samples drawn with the seed, as ``maestro-lod compress`` draws them) and the whole validation
set. A curve's file records what it was computed from (a digest of the cell's ``summary.json``)
and how; a file whose record differs from the current one is computed again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..canonical import canonicalize_
from ..engine.costs import deployable
from ..engine.counting import count_macs, count_params
from ..engine.evaluation import evaluate_batches
from ..engine.search import (CALIBRATION_SIZE, LAZY_SHARE, calibration_batches, evaluate_front, first_sample,
                             greedy_front, validation_batches)
from ..files import write_json_atomic
from ..inject import factorize
from ..layers import low_rank_layers
from ..models import build_model
from ..runs.directory import SUMMARY_FILE
from ..runs.loading import LoadedRun, load_run

FORMAT = 1
STEP = 0.25
SEARCH = "lazy"
SHARE = LAZY_SHARE
"""The search a front is cached for (its step, kind and the share of a lazy round; a front cached
without a share was searched with one removal per round, share 0); a front cached for another
search is computed again."""
ORDERINGS = ("canonical", "canonical-whitened")
"""How a trained factorised model's ranks are ordered before its front: its pairs re-factorised by
SVD, or by whitened SVD on the calibration set."""
PREPARATIONS = (*ORDERINGS, "svd", "whitened")
"""How a front's model is prepared: one of :data:`ORDERINGS` (a MAESTRO run), or ``svd`` and
``whitened`` (a dense model factorised at full rank by SVD / by whitened SVD)."""


def source_digest(directory: Path) -> str:
    """A digest of the cell's ``summary.json``: it changes whenever the cell is trained again."""
    return hashlib.sha256((directory / SUMMARY_FILE).read_bytes()).hexdigest()[:20]


def read_cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The curve in ``path`` when it was computed as ``key`` says, else None."""
    try:
        curve = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return curve if isinstance(curve, dict) and curve.get("key") == key else None


@dataclasses.dataclass
class Inputs:
    """What every curve of one task and seed is measured with."""

    calibration: list
    validation: list
    example: Any
    kind: str


def run_inputs(run: LoadedRun) -> Inputs:
    """The calibration set (:data:`CALIBRATION_SIZE` training samples drawn with the run's seed),
    the whole validation set and one example input of a loaded run."""
    config, data = run.config, run.data
    calibration = calibration_batches(data.train, CALIBRATION_SIZE, seed=config.seed)
    validation = validation_batches(data.val, config.eval_batch_size)
    return Inputs(calibration, validation, first_sample(calibration), data.kind)


def dense_costs(run: LoadedRun, example: Any) -> dict[str, int]:
    """Parameters and MACs (per sample) of the run's architecture, unfactorised."""
    model = build_model(run.config.model, run.data, **run.config.model_options).eval()
    return {"params": count_params(model), "macs": count_macs(model, example)}


def _score(model: torch.nn.Module, inputs: Inputs) -> dict[str, float | None]:
    metrics = evaluate_batches(model, inputs.validation, inputs.kind)
    return {"accuracy": metrics["accuracy"], "perplexity": metrics.get("perplexity")}


def prepared(run: LoadedRun, how: str, inputs: Inputs) -> torch.nn.Module:
    """The factorised model a front starts from (a copy; the run's model is left unchanged)."""
    model = copy.deepcopy(run.model).eval()
    if how == "canonical":
        return canonicalize_(model)
    if how == "canonical-whitened":
        return canonicalize_(model, calibration=inputs.calibration)
    base = dataclasses.replace(run.config.factorize_config(), init=how, rank=None, rank_pattern={})
    calibration = inputs.calibration if how == "whitened" else None
    return factorize(model, base, calibration=calibration).eval()


def front_curve(directory: Path, path: Path, how: str, cost: str, say: Callable[..., None] = print,
                computed: list[Path] | None = None) -> dict[str, Any]:
    """The front of the run in ``directory`` prepared as ``how`` and searched by ``cost``, read
    from ``path`` when it holds this front of this training, else computed and written there
    (and ``path`` appended to ``computed``)."""
    key = {"format": FORMAT, "source": source_digest(directory), "prepare": how, "cost": cost, "step": STEP,
           "search": SEARCH, **({"share": SHARE} if SHARE else {}), "calibration": CALIBRATION_SIZE}
    cached = read_cached(path, key)
    if cached is not None:
        return cached
    say(f"  front of {directory} ({how}, by {cost})", flush=True)
    run = load_run(directory)
    inputs = run_inputs(run)
    started = time.perf_counter()
    model = prepared(run, how, inputs)
    front = greedy_front(model, inputs.calibration, cost, STEP, kind=inputs.kind, search=SEARCH, share=SHARE)
    searched = time.perf_counter() - started
    evaluate_front(front, model, inputs.validation, inputs.calibration)
    points = [{"params": p.params, "macs": p.macs, "accuracy": p.accuracy, "perplexity": p.perplexity,
               "ranks": dict(p.ranks)} for p in front.points]
    curve = {"key": key, "source": str(directory), "dense": dense_costs(run, inputs.example),
             "front_dense": {"params": front.dense_params, "macs": front.dense_macs},
             "search_seconds": searched, "seconds": time.perf_counter() - started, "points": points,
             "front": front.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, curve)
    if computed is not None:
        computed.append(path)
    return curve


def cell_point(directory: Path, path: Path, computed: list[Path] | None = None) -> dict[str, Any]:
    """The exported model of the cell in ``directory`` as a one-point curve, read from ``path``
    when it holds this training's, else measured and written there."""
    key = {"format": FORMAT, "source": source_digest(directory), "calibration": CALIBRATION_SIZE}
    cached = read_cached(path, key)
    if cached is not None:
        return cached
    run = load_run(directory)
    inputs = run_inputs(run)
    started = time.perf_counter()
    model = run.model.eval()
    deployed = deployable(model, inputs.example) if any(True for _ in low_rank_layers(model)) else model
    point = {"params": count_params(deployed), "macs": count_macs(deployed, inputs.example), **_score(deployed, inputs),
             "ranks": dict(run.summary.get("final_ranks") or {})}
    curve = {"key": key, "source": str(directory), "dense": dense_costs(run, inputs.example),
             "search_seconds": 0.0, "seconds": time.perf_counter() - started, "points": [point]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, curve)
    if computed is not None:
        computed.append(path)
    return curve
