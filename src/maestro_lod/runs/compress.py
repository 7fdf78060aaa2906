"""The compress pipeline on a run directory of ``maestro-lod train`` (:func:`compress_run`), or on
a model of one's own built from local files (:func:`compress_files`): load the model, draw its
calibration, validation and check batches, factorise a dense model at full rank (or order a
factorised model's ranks), and hand them to :func:`maestro_lod.deploy.compress.compress_model`."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path


from ..data import load_data
from ..deploy.api import check_preparation, prepare_model
from ..deploy.artifacts import FORMATS
from ..deploy.compress import (CompressResult, ProgressFactory, check_input_batches, check_inputs, check_outputs,
                               compress_model, file_sha256, no_progress)
from ..engine.evaluation import evaluate_batches
from ..engine.search import CALIBRATION_SIZE, calibration_batches, validation_batches
from ..errors import UsageError
from ..models import build_model
from .directory import CHECKPOINT_FILE
from .healing import PointHealing, check_epochs, heal_front
from .loading import build_from_factory, build_torchvision, load_run, load_weights

def _preparation(prepared: dict) -> dict:
    """What of the model's preparation shapes the front: the initialisation of a dense model, the
    order of a factorised one, and the epochs of MAESTRO that healed it."""
    return {key: prepared[key] for key in ("init", "order", "heal_maestro") if key in prepared}


def compress_run(run_dir: str | Path, out: str | Path | None = None, *, targets: Sequence[tuple[str, float]] = (),
                 cost: str = "macs", step: float = 0.25, calibration_size: int = CALIBRATION_SIZE,
                 formats: Sequence[str] = FORMATS, latency_batch: int = 32, family: bool = True, force: bool = False,
                 init: str = "whitened", order: str = "svd", search: str = "lazy", full_front: bool = False,
                 remeasure_latency: bool = False, say: Callable[..., None] = lambda *a, **k: None,
                 progress: ProgressFactory = no_progress, data_root: str | Path | None = None,
                 download: bool = False, heal: int | None = None, heal_maestro: int | None = None) -> CompressResult:
    """The front of the run in ``run_dir`` and deployable models for ``targets``, written under
    ``out`` (default: ``run_dir``), as ``maestro-lod compress`` does.

    The run's model is loaded on the CPU with its trained ranks; ``calibration_size`` samples of its
    training data (drawn with the run's seed) score the removals, its whole validation set scores
    the points. A dense run's model (``--method dense``) is factorised at full rank first with
    ``init`` (``whitened``: on the calibration batches; ``svd``); the low-rank layers of any other
    run are re-factorised at their trained ranks with ``order`` (``svd``, ``whitened``; ``trained``
    keeps the trained factors), which changes no output but the order in which ranks are removed.
    Both choices are recorded in ``front.json``'s metadata. ``dense_accuracy`` in ``front.json`` is
    the run's dense reference (a dense run's own accuracy). The other options are those of
    :func:`~maestro_lod.deploy.compress.compress_model`; existing outputs are refused (unless
    ``force``) before the run is loaded. The data is read from ``data_root`` (default: the run's)
    and downloaded only with ``download=True``, whatever the run's config.json says.

    A second call into the same ``out`` adds its ``targets`` to the front the first one wrote when
    that was computed from the same checkpoint (its sha256), model, data, seed, calibration size,
    ``init`` or ``order``, cost, step, search and latency batch, without a new search when the
    front answers them; other inputs are refused, naming what differs, unless ``force``. The
    latency table in ``front.json`` is reused unless ``remeasure_latency`` (see
    :func:`~maestro_lod.deploy.compress.compress_model`).

    Healing (:mod:`~maestro_lod.runs.healing`), on the run's training data with its recipe at a
    tenth of its learning rate: ``heal_maestro`` epochs of MAESTRO on the factorised model before
    the search (ordered dropout with self-distillation, no group lasso, no shrinking), so that the
    whole front is searched on the healed model (trained from plain SVD factors, then its ranks
    ordered by ``order``, or for a dense run by ``init``, as the unhealed model's were; trained
    anew on every call, and part of the inputs a later call must share), and ``heal`` epochs of
    fine-tuning at fixed ranks for each exported point. Each target's ``point.json`` records its
    validation figures before and after each healing and the seconds it took."""
    check_preparation(init, order)
    check_epochs("heal", heal)
    check_epochs("heal_maestro", heal_maestro)
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    check_outputs(out, targets, force, family, reuse=True)
    run = load_run(run_dir, data_root=data_root, download=download)
    config, data = run.config, run.data
    calibration = calibration_batches(data.train, calibration_size, seed=config.seed)
    validation = validation_batches(data.val, config.eval_batch_size)
    model, prepared = prepare_model(run.model.eval(), calibration, init, order)
    dense_accuracy = (run.summary.get("dense_reference") or {}).get("accuracy")
    if dense_accuracy is None and config.method == "dense":
        dense_accuracy = run.summary.get("final_accuracy")
    unhealed, front_healing = model, None
    if heal_maestro is not None:
        say(f"healing the whole front: {heal_maestro} epoch(s) of MAESTRO on the factorised model", flush=True)
        healed, seconds = heal_front(model, data, config, heal_maestro)
        model, _ = prepare_model(healed, calibration, init, prepared.get("order", init))
        front_healing = {"epochs": heal_maestro, "seconds": round(seconds, 2)}
        prepared = {**prepared, "heal_maestro": heal_maestro}
    healing = None if heal is None and heal_maestro is None else PointHealing(
        data, config, validation, calibration, epochs=heal, front=front_healing, unhealed=unhealed)
    return compress_model(model, calibration, validation, out, checks=check_inputs(data.val), targets=targets,
                          cost=cost, step=step, formats=formats, latency_batch=latency_batch, family=family,
                          force=force, architecture=lambda: build_model(config.model, data, **config.model_options),
                          kind=data.kind, dense_accuracy=dense_accuracy,
                          metadata={"run": str(run_dir), "model": config.model, "data": config.data,
                                                    "method": config.method, **prepared},
                          say=say, progress=progress, data=data, search=search, full_front=full_front,
                          inputs={"checkpoint_sha256": file_sha256(run_dir / CHECKPOINT_FILE), "model": config.model,
                                  "data": config.data, "seed": config.seed, "calibration_size": calibration_size,
                                  **_preparation(prepared)},
                          remeasure_latency=remeasure_latency, healing=healing)


def compress_files(out: str | Path, *, weights: str | Path, data: str, model_factory: str | None = None,
                   torchvision: str | None = None, data_root: str | Path | None = None, seed: int = 0,
                   targets: Sequence[tuple[str, float]] = (), cost: str = "macs", step: float = 0.25,
                   calibration_size: int = CALIBRATION_SIZE, formats: Sequence[str] = FORMATS,
                   latency_batch: int = 32, family: bool = True, force: bool = False, init: str = "whitened",
                   order: str = "svd", search: str = "lazy", full_front: bool = False,
                   remeasure_latency: bool = False, say: Callable[..., None] = lambda *a, **k: None,
                   progress: ProgressFactory = no_progress) -> CompressResult:
    """:func:`compress_run` for a model that is not a run: built by ``model_factory``
    (``module:function`` or ``file.py:function``, called without arguments) or torchvision's
    classifier ``torchvision`` (``resnet18``, …, with the dataset's number of classes, no
    pretrained weights), its ``weights`` loaded strictly from a safetensors file, and its
    calibration (``calibration_size`` training samples drawn with ``seed``, no augmentation) and
    validation batches drawn from the registered dataset ``data`` (``data_root``: its files).
    Everything is read from local files. Outputs go to ``out``; every input is checked (the
    weights against the model, the model on a calibration batch) before anything is written. As
    with :func:`compress_run`, a second call into ``out`` adds its targets to the front of the
    same inputs (the weights file's sha256 in place of the checkpoint's)."""
    check_preparation(init, order)
    if (model_factory is None) == (torchvision is None):
        raise UsageError("give exactly one of a model factory (--model-factory) and a torchvision architecture "
                         "(--torchvision)")
    out = Path(out)
    check_outputs(out, targets, force, family, reuse=True)
    task = load_data(data, root=None if data_root is None else str(data_root), seed=seed, augment=False)
    build = (lambda: build_from_factory(model_factory)) if model_factory is not None else \
        (lambda: build_torchvision(torchvision, task.num_classes))
    dense = load_weights(build(), weights)
    calibration = calibration_batches(task.train, calibration_size, seed=seed)
    validation = validation_batches(task.val)
    check_input_batches(dense, calibration, "calibration")
    check_input_batches(dense, validation, "validation")
    dense_accuracy = evaluate_batches(dense, validation, task.kind)["accuracy"]
    architecture = copy.deepcopy(dense)
    model, prepared = prepare_model(dense, calibration, init, order)
    source = {"model_factory": model_factory} if model_factory is not None else {"torchvision": torchvision}
    return compress_model(model, calibration, validation, out, checks=check_inputs(task.val), targets=targets,
                          cost=cost, step=step, formats=formats, latency_batch=latency_batch, family=family,
                          force=force, architecture=lambda: copy.deepcopy(architecture), kind=task.kind,
                          dense_accuracy=dense_accuracy,
                          metadata={**source, "weights": str(weights), "data": data, **prepared},
                          say=say, progress=progress, data=task, search=search, full_front=full_front,
                          inputs={"weights_sha256": file_sha256(weights), **source, "data": data, "seed": seed,
                                  "calibration_size": calibration_size, **_preparation(prepared)},
                          remeasure_latency=remeasure_latency)
