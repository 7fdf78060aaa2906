"""One trained model to a family of deployable ones: the whole compress pipeline on a model and its
data batches (what ``maestro-lod compress`` runs on a run directory, see
:func:`maestro_lod.runs.compress.compress_run`).

:func:`compress_model` measures the latency table, runs the greedy search on the calibration
batches, evaluates every point on the validation batches, resolves every target, and only then
writes into ``out``: one folder per target with the artifacts of the point chosen for it
(:data:`POINT_FILE` describes them), ``family.safetensors`` (every point in one file, see
:mod:`maestro_lod.deploy.family`), ``front.json`` and ``front.png``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..engine.costs import deployable, layer_floor, measure_latency, repeat_batch, time_model, visited_ranks
from ..engine.front import Front, FrontPoint
from ..engine.search import Batch, calibration_batches, evaluate_front, greedy_front, materialize
from ..engine.targets import check_target
from ..errors import ConfigError, UsageError
from ..files import write_json_atomic
from ..layers import low_rank_layers
from .artifacts import FILES, FORMATS, build_artifacts, check_formats, write_files
from .family import FAMILY_FILE, save_family

FRONT_FILE = "front.json"
PLOT_FILE = "front.png"
POINT_FILE = "point.json"
CHECK_SAMPLES = 64
"""Validation samples each artifact's outputs are compared on (and 3 more, as a second batch size)."""

ProgressFactory = Callable[[str], Callable[[int, int], None]]
"""``progress(description)`` → a ``callback(done, total)`` told how far one stage got."""


@dataclass
class CompressResult:
    """What :func:`compress_model` computed and wrote.

    ``front``: every point, evaluated (``front.metadata`` as saved in ``front.json``); ``chosen``:
    (folder, point) per target, in the order given; ``artifacts``: the files written per folder;
    ``front_file``, ``plot_file`` and ``family_file`` (None when not written)."""

    front: Front
    chosen: list[tuple[str, FrontPoint]]
    out: Path
    artifacts: dict[str, list[Path]] = field(default_factory=dict)
    front_file: Path | None = None
    plot_file: Path | None = None
    family_file: Path | None = None


def target_folder(key: str, value: float) -> str:
    """Folder name of a target: ``macs-0.5``, ``max_drop-0.01``."""
    return f"{key}-{value:g}"


def check_outputs(out: Path, targets: Sequence[tuple[str, float]], force: bool, family: bool = True) -> None:
    """Refuse, unless ``force``, the paths under ``out`` that :func:`compress_model` would write and that exist."""
    paths = [out / FRONT_FILE, out / PLOT_FILE] + [out / FAMILY_FILE] * family + [out / target_folder(k, v) for k, v in targets]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise UsageError(f"{', '.join(str(p) for p in existing)} already exist; pass --force to replace them")


def check_inputs(dataset: Dataset) -> list[Any]:
    """The input batches each artifact is checked on: :data:`CHECK_SAMPLES` samples of ``dataset``
    and 3 more (a second batch size), each drawn with a fixed seed."""
    return [calibration_batches(dataset, CHECK_SAMPLES, CHECK_SAMPLES, seed=1)[0][0],
            calibration_batches(dataset, 3, 3, seed=2)[0][0]]


def no_progress(description: str) -> Callable[[int, int], None]:
    """The :data:`ProgressFactory` that reports nothing."""
    return lambda done, total: None


def compress_model(model: nn.Module, calibration: Sequence[Batch], validation: Sequence[Batch], out: str | Path, *,
                   checks: Sequence[Any], targets: Sequence[tuple[str, float]] = (), cost: str = "macs",
                   step: float = 0.25, formats: Sequence[str] = FORMATS, latency_batch: int = 32,
                   family: bool = True, force: bool = False, architecture: Callable[[], nn.Module] | None = None,
                   kind: str = "classification", dense_accuracy: float | None = None,
                   metadata: dict[str, Any] | None = None, say: Callable[..., None] = lambda *a, **k: None,
                   progress: ProgressFactory = no_progress) -> CompressResult:
    """The accuracy–cost front of a trained low-rank ``model`` and deployable models for ``targets``.

    ``calibration``: fixed batches of training data that score each removal (and recalibrate
    BatchNorm); ``validation``: the batches every point is evaluated on; ``checks``: input batches
    each artifact's outputs are compared on (:func:`check_inputs`). ``targets``: (key, value)
    pairs as :meth:`Front.select` takes them (``("macs", 0.5)``, ``("max_drop", 0.01)``), each
    exported in ``formats`` to ``out/<key>-<value>/``. ``cost``: what a removal saves (``macs``,
    ``params``, ``latency``); ``step``: the fraction of a layer's rank removed per try;
    ``latency_batch``: batch size of latency measurements. ``family``: also write
    ``family.safetensors``. ``architecture()`` builds the dense model the safetensors artifact
    loads into, to check that one too. ``kind``: the task's kind (``classification`` or a
    language task). ``dense_accuracy`` is drawn in the plot and kept, with ``metadata``, in
    ``front.json``. ``say`` prints progress lines; ``progress(description)`` gives a
    ``callback(done, total)`` for the search and the evaluation.

    Every option, output path and target is checked before the first file is written; files that
    exist are replaced only with ``force``. Raises a one-line
    :class:`~maestro_lod.errors.MaestroError` for a bad option, an existing output, a model
    without low-rank layers or a target no point reaches.
    """
    out = Path(out)
    if not 0 < step <= 1:
        raise ConfigError(f"step={step} must be a fraction in (0, 1]")
    if isinstance(latency_batch, bool) or not isinstance(latency_batch, int) or latency_batch < 1:
        raise ConfigError(f"latency_batch={latency_batch!r} must be a positive int")
    targets = [check_target(key, value) for key, value in targets]
    formats = check_formats(formats)
    check_outputs(out, targets, force, family)
    layers = dict(low_rank_layers(model))
    if not layers:
        raise ConfigError("the model has no low-rank layers: nothing to compress")
    example = calibration[0][0]
    example = tuple(x[:1] for x in example) if isinstance(example, (tuple, list)) else example[:1]
    visits = {name: visited_ranks(layer.rank, layer_floor(layer, layer.rank), step) for name, layer in layers.items()}
    say(f"measuring the latency table ({sum(map(len, visits.values()))} layer ranks, batch {latency_batch})", flush=True)
    latency = measure_latency(model, example, visits, latency_batch)
    front = greedy_front(model, calibration, cost, step, latency=latency, kind=kind, progress=progress("greedy rounds"))
    evaluate_front(front, model, validation, calibration, progress=progress("evaluating points"))
    chosen = [(target_folder(k, v), front.select(**{k: v})) for k, v in targets]  # unreachable: fails here
    front.metadata = {**(metadata or {}), "dense_accuracy": dense_accuracy, "torch": torch.__version__}
    timing = repeat_batch(example, latency_batch)
    result = CompressResult(front, chosen, out)
    out.mkdir(parents=True, exist_ok=True)
    for folder, point in chosen:
        materialized = materialize(model, point, calibration)
        files, report = build_artifacts(materialized, formats, checks, architecture)
        for fmt, why in report["skipped"].items():
            say(f"{folder}: {fmt} not written: {why}", flush=True)
        names = write_files(out / folder, files)
        measured = time_model(deployable(materialized, example), timing, latency.repeats, latency.warmup)
        point.exported = {"folder": folder, "files": names, "latency": measured, **report}
        write_json_atomic(out / folder / POINT_FILE, {"target": folder, "point": point.to_dict(),
                                                       "files": {f: FILES[f] for f in files}})
        result.artifacts[folder] = [out / folder / name for name in names] + [out / folder / POINT_FILE]
    if family:
        result.family_file = out / FAMILY_FILE
        size = save_family(model, front, result.family_file, calibration)
        separate = {fmt: sum((out / folder / FILES[fmt]).stat().st_size for folder, _ in chosen
                             if (out / folder / FILES[fmt]).is_file()) for fmt in formats}
        front.metadata["family"] = {"file": FAMILY_FILE, "bytes": size, "points": len(front.points),
                                    "separate": separate}
    result.front_file, result.plot_file = out / FRONT_FILE, out / PLOT_FILE
    front.save(result.front_file)
    front.plot(result.plot_file, dense_accuracy)
    return result
