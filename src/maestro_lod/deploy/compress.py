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
from ..data import TaskData
from ..engine.passes import forward
from ..engine.search import Batch, Loss, calibration_batches, evaluate_front, greedy_front, materialize
from ..engine.targets import check_target
from ..errors import ConfigError, ConfigTypeError, MaestroError, UsageError
from ..files import write_json_atomic
from ..layers import low_rank_layers
from .artifacts import FILES, FORMATS, build_artifacts, check_formats, output_tensors, write_files
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


def _spec(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": ["batch", *tensor.shape[1:]], "dtype": str(tensor.dtype).removeprefix("torch.")}


def feed_record(model: nn.Module, example: Any, data: TaskData | None = None) -> dict[str, Any]:
    """How to feed the deployed model and read its output, for ``point.json``: the shape and dtype
    of every input (``"batch"``: the dynamic batch dimension) and output tensor, from ``example``
    (one sample) and the model's output on it; with ``data``, the normalisation its inputs were
    made with, the class labels (in output order) or the vocabulary (token ids are positions)."""
    inputs = example if isinstance(example, (tuple, list)) else (example,)
    with torch.no_grad():
        outputs = output_tensors(forward(model.eval(), example))
    record: dict[str, Any] = {"inputs": [_spec(x) for x in inputs], "outputs": [_spec(y) for y in outputs]}
    if data is not None:
        record["data"] = data.name
        if data.normalization is not None:
            record["normalization"] = data.normalization.to_dict()
        if data.labels is not None:
            record["labels"] = list(data.labels)
        if data.vocab is not None:
            record["vocabulary"] = {"level": data.vocab.level, "tokens": list(data.vocab.tokens)}
    return record


def point_record(folder: str, point: FrontPoint, formats: Sequence[str], feed: dict[str, Any] | None) -> dict[str, Any]:
    """The ``point.json`` of a target folder: the target, the point, the files and how to feed them."""
    return {"target": folder, "point": point.to_dict(), "files": {f: FILES[f] for f in formats}, **(feed or {})}


def check_input_batches(model: nn.Module, batches: Sequence[Batch], what: str, loss: Loss | None = None) -> None:
    """Refuse, with a one-line :class:`ConfigError` naming the batch, inputs that are not finite
    tensors, inputs the model cannot run (a wrong shape) and a first batch whose outputs (or loss)
    are not finite. Runs the model once, in eval mode without gradients (modes restored)."""
    for i, (inputs, _) in enumerate(batches):
        for x in (inputs if isinstance(inputs, (tuple, list)) else (inputs,)):
            if not isinstance(x, torch.Tensor):
                raise ConfigTypeError(f"{what} batch {i}: model inputs must be tensors (or a tuple of them), "
                                      f"got {type(x).__name__}")
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise ConfigError(f"{what} batch {i}: the inputs hold NaN or infinite values")
    inputs, targets = batches[0]
    shapes = ", ".join(str(tuple(x.shape)) for x in (inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
    modes = [(module, module.training) for module in model.modules()]
    try:
        with torch.no_grad():
            output = forward(model.eval(), inputs)
            value = None if loss is None else loss(output, targets)
    except MaestroError:
        raise
    except Exception as exc:  # the model's own error on inputs it cannot take
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{what} batch 0: the model fails on inputs of shape {shapes}: {message}") from None
    finally:
        for module, training in modes:
            module.training = training
    if not all(bool(torch.isfinite(y).all()) for y in output_tensors(output) if y.is_floating_point()):
        raise ConfigError(f"{what} batch 0: the model's outputs on inputs of shape {shapes} hold NaN or infinite "
                          f"values (non-finite weights or activations)")
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not bool(torch.isfinite(value).all()):
        raise ConfigError(f"{what} batch 0: loss(output, batch) is {float(value)}")


def no_progress(description: str) -> Callable[[int, int], None]:
    """The :data:`ProgressFactory` that reports nothing."""
    return lambda done, total: None


def compress_model(model: nn.Module, calibration: Sequence[Batch], validation: Sequence[Batch] | None, out: str | Path, *,
                   checks: Sequence[Any], targets: Sequence[tuple[str, float]] = (), cost: str = "macs",
                   step: float = 0.25, formats: Sequence[str] = FORMATS, latency_batch: int = 32,
                   family: bool = True, force: bool = False, architecture: Callable[[], nn.Module] | None = None,
                   kind: str = "classification", dense_accuracy: float | None = None,
                   metadata: dict[str, Any] | None = None, say: Callable[..., None] = lambda *a, **k: None,
                   progress: ProgressFactory = no_progress, loss: Loss | None = None,
                   data: TaskData | None = None, search: str = "lazy", full_front: bool = False) -> CompressResult:
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
    ``callback(done, total)`` for the search and the evaluation. ``loss(output, targets)``
    scores a batch instead of the cross-entropy of the logits (see
    :func:`~maestro_lod.engine.search.greedy_front`); ``validation=None`` leaves the points
    unevaluated (chosen by calibration loss). Each ``point.json`` records how to feed the model
    (:func:`feed_record`; with ``data``, its normalisation and labels or vocabulary).

    ``search``: how the front is found (``lazy``, the default: re-scores only the most promising
    removals each round and gives the exhaustive search's front on the models measured in
    ``benchmarks/front_speed.py``; ``exhaustive``; ``allocate``: ranks chosen from each layer's
    error curve, no search). With ``targets`` the search stops once every cost target is met,
    and an unreachable one is refused before it starts; ``full_front`` walks on to every layer's
    smallest rank all the same (the whole front in ``front.json`` and the family file).

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
    stops = None if full_front or not targets else {key: value for key, value in targets}
    front = greedy_front(model, calibration, cost, step, latency=latency, kind=kind, progress=progress("search rounds"),
                         loss=loss, search=search, targets=stops)
    if validation is not None:
        evaluate_front(front, model, validation, calibration, progress=progress("evaluating points"), loss=loss)
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
        write_json_atomic(out / folder / POINT_FILE,
                          point_record(folder, point, list(files), feed_record(materialized, example, data)))
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
