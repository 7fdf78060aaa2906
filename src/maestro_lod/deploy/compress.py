"""One trained model to a family of deployable ones: the whole compress pipeline on a model and its
data batches (what ``maestro-lod compress`` runs on a run directory, see
:func:`maestro_lod.runs.compress.compress_run`).

:func:`compress_model` measures the latency table, runs the greedy search on the calibration
batches, evaluates every point on the validation batches, resolves every target, and only then
writes into ``out``: one folder per target with the artifacts of the point chosen for it
(:data:`POINT_FILE` describes them), ``family.safetensors`` (every point in one file, see
:mod:`maestro_lod.deploy.family`), ``front.json`` and ``front.png``.

Every file is written whole or not at all: a target folder is filled under a temporary name
(``.<folder>.<random>.tmp``) and renamed into place, files are written atomically, and the
temporaries are removed on any exit (those of a killed process at the next start). Ctrl-C during
the latency table or an export is held until that step ends, as interrupting ``torch.export``
half-way can abort the interpreter; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
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
from ..engine.search import (Batch, Loss, calibration_batches, evaluate_front, first_sample, greedy_front,
                             materialize)
from ..engine.targets import check_target
from ..errors import ConfigError, ConfigTypeError, MaestroError, RunDirectoryError, UsageError
from ..files import TEMPORARY_SUFFIX, check_output_directory, json_text, write_text_atomic
from ..layers import low_rank_layers
from .artifacts import FILES, FORMATS, build_artifacts, check_formats, output_tensors, write_files
from .family import FAMILY_FILE, save_family

FRONT_FILE = "front.json"
PLOT_FILE = "front.png"
POINT_FILE = "point.json"
CHECK_SAMPLES = 64
"""Validation samples each artifact's outputs are compared on (and 3 more, as a second batch size)."""

LATENCY_BATCH_LIMIT = 65536
"""Largest batch the latency table and the exported models are timed at."""
OUTPUT_LIMIT = 1e18
"""Largest output magnitude a model to compress may produce: far beyond any trained model's, below
where its losses overflow (a flipped exponent bit in a weight gives ~1e38)."""

ProgressFactory = Callable[[str], Callable[[int, int], None]]
"""``progress(description)`` → a ``callback(done, total)`` told how far one stage got."""
Healing = Callable[[nn.Module, FrontPoint], tuple[nn.Module, dict[str, Any]]]
"""``healing(model, point) → (model to export, record)``: see ``healing`` of :func:`compress_model`."""


@dataclass
class CompressResult:
    """What :func:`compress_model` computed and wrote.

    ``front``: every point, evaluated (``front.metadata`` as saved in ``front.json``); ``chosen``:
    (folder, point) per target, in the order given; ``earlier``: (folder, point) per target an
    earlier compress into ``out`` exported (kept when the front was reused); ``artifacts``: the
    files written per folder; ``front_file``, ``plot_file`` and ``family_file`` (None when not
    written); ``searched``: whether the front was searched (False: read from ``front.json``);
    ``latency_reused``: whether the latency table was read from ``front.json``; ``healing``: per
    folder, the record of the healing its model went through (see ``healing`` of
    :func:`compress_model`)."""

    front: Front
    chosen: list[tuple[str, FrontPoint]]
    out: Path
    artifacts: dict[str, list[Path]] = field(default_factory=dict)
    front_file: Path | None = None
    plot_file: Path | None = None
    family_file: Path | None = None
    earlier: list[tuple[str, FrontPoint]] = field(default_factory=list)
    searched: bool = True
    latency_reused: bool = False
    healing: dict[str, dict[str, Any]] = field(default_factory=dict)


def target_folder(key: str, value: float) -> str:
    """Folder name of a target: ``macs-0.5``, ``max_drop-0.01``."""
    return f"{key}-{value:g}"


def unique_targets(targets: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """``targets`` checked, in their canonical form, each once (``macs=0.5`` and ``macs=0.50`` are one)."""
    return list(dict.fromkeys(check_target(key, value) for key, value in targets))


def check_outputs(out: Path, targets: Sequence[tuple[str, float]], force: bool, family: bool = True,
                  what: str = "output directory", reuse: bool = False) -> None:
    """Refuse ``out`` when it cannot be a writable directory, and, unless ``force``, the paths under
    it that :func:`compress_model` would write and that exist. With ``reuse`` and ``targets``, the
    front files of an earlier compress are not refused (the targets are added to its front; see
    :func:`cached_front`), only the target folders. Creates nothing."""
    check_output_directory(out, what)
    out = Path(out)
    paths = [out / FRONT_FILE, out / PLOT_FILE] + [out / FAMILY_FILE] * family + [out / target_folder(k, v) for k, v in targets]
    adding = reuse and bool(targets) and os.path.lexists(out / FRONT_FILE)
    existing = [p for p in paths[3 if family else 2:] if os.path.lexists(p)] if adding else \
        [p for p in paths if os.path.lexists(p)]
    if existing and not force:
        raise UsageError(f"{', '.join(str(p) for p in existing)} already exist; pass --force to replace them")
    blocking = [p for p in paths[3 if family else 2:] if os.path.lexists(p) and (p.is_symlink() or not p.is_dir())]
    if blocking:
        raise UsageError(f"{', '.join(str(p) for p in blocking)} exist and are not folders; move them away")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file at ``path`` (a checkpoint, weights), to record what a front was computed from."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


INPUT_NAMES = {"checkpoint_sha256": "checkpoint", "weights_sha256": "weights", "calibration_size": "calibration size",
               "latency_batch": "latency batch", "model_factory": "model factory"}
"""How a difference in each recorded input is named (others by their key)."""


def _shown(key: str, value: Any) -> str:
    if key.endswith("sha256") and isinstance(value, str):
        return value[:12]
    return "none" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _difference(key: str, recorded: Any, now: Any) -> str:
    """``checkpoint (sha256 1ad6a6f3833c, now 51ac4578e323)``, ``step (0.25, now 0.5)``."""
    hashed = "sha256 " if key.endswith("sha256") and isinstance(recorded, str) else ""
    return f"{INPUT_NAMES.get(key, key)} ({hashed}{_shown(key, recorded)}, now {_shown(key, now)})"


def cached_front(out: str | Path, inputs: dict[str, Any]) -> Front:
    """The front an earlier compress wrote into ``out`` (``front.json``), when it was computed from
    ``inputs`` (recorded under ``metadata.inputs``: the checkpoint's sha256, the cost, step,
    calibration size and seed, the search, the initialisation or order, the latency batch, ...).
    Raises a one-line :class:`UsageError` naming what differs (or why the file cannot be used),
    suggesting ``--force``."""
    path = Path(out) / FRONT_FILE
    try:
        front = Front.load(path)
    except (OSError, ValueError, KeyError, TypeError, MaestroError) as exc:
        raise UsageError(f"{path} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                         f"pass --force to recompute it") from None
    recorded = front.metadata.get("inputs")
    if not isinstance(recorded, dict):
        raise UsageError(f"{path} does not record what it was computed from (written by an earlier version); "
                         f"pass --force to recompute it")
    differ = [_difference(key, recorded.get(key), value) for key, value in inputs.items() if recorded.get(key) != value]
    differ += [_difference(key, recorded[key], None) for key in recorded if key not in inputs]
    if differ:
        raise UsageError(f"{path} was computed from another {', '.join(differ)}; pass --force to recompute the front")
    return front


def earlier_targets(front: Front) -> list[tuple[str, float]]:
    """The targets exported into the folder of ``front`` (``metadata.targets``), in their order."""
    return [check_target(str(key), float(value)) for key, value in front.metadata.get("targets") or []]


def _exported_point(front: Front, folder: str) -> FrontPoint | None:
    """The point of ``front`` exported into ``folder``, if one is marked so."""
    for point in front.points:
        if point.exported and (point.exported.get("folder") == folder or folder in point.exported.get("folders", [])):
            return point
    return None


def _unanswered(front: Front, targets: Sequence[tuple[str, float]], search: str, full_front: bool) -> str | None:
    """Why the cached ``front`` cannot answer ``targets`` as a search for them would (None: it can).

    A front searched to every layer's smallest rank answers any target; one stopped at its
    targets' budgets (``metadata.stops``) answers a budget that one of its points meets (a new
    search stopping at both would end where it ended), and, without ``full_front``, any
    ``max_drop``. A front allocated for given budgets answers only those budgets."""
    stops = front.metadata.get("stops")
    if not stops:
        return None
    if full_front:
        return "the cached front stops at its targets and --full-front asks for the whole front"
    for key, value in targets:
        if key == "max_drop":
            continue
        if search == "allocate":
            if stops.get(key) != value:
                return f"the cached front was allocated for other budgets than {key}={value:g}"
        elif not any(front._meets(point, key, value) for point in front.points):
            return f"the cached front stops before {key}={value:g}"
    return None


def _keep_marks(front: Front, folders: Sequence[str]) -> None:
    """Unmark in ``front`` the exports into folders other than ``folders`` (folders since removed)."""
    for point in front.points:
        if not point.exported:
            continue
        marked = [f for f in point.exported.get("folders", [point.exported.get("folder")]) if f in folders]
        if not marked:
            point.exported = None
        else:
            point.exported["folder"] = marked[0]
            point.exported.pop("folders", None)
            if len(marked) > 1:
                point.exported["folders"] = marked


def _stops(targets: Sequence[tuple[str, float]]) -> dict[str, float] | None:
    """The budgets a search for ``targets`` stops at: the smallest of each kind (None: no budget)."""
    stops: dict[str, float] = {}
    for key, value in targets:
        if key != "max_drop":
            stops[key] = min(stops.get(key, value), value)
    return stops or None


def check_model_outputs(model: nn.Module, batch: Batch) -> None:
    """Refuse a model whose parameters, or outputs on one calibration batch, are not finite (a
    corrupted checkpoint): every accuracy and cost of the front would be meaningless."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"the model's {name!r} holds NaN or infinite values: nothing to compress "
                              f"(a corrupted checkpoint?)")
    inputs = batch[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    finally:
        model.train(was_training)
    for tensor in output_tensors(outputs):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or not tensor.numel():
            continue
        if not bool(torch.isfinite(tensor).all()) or float(tensor.detach().abs().max()) > OUTPUT_LIMIT:
            raise ConfigError("the model's outputs on the calibration data are NaN, infinite or beyond "
                              f"±{OUTPUT_LIMIT:g} (its weights are out of range: a corrupted checkpoint?); "
                              "nothing to compress")


def _check_front_numbers(front: Front) -> None:
    """Refuse, before anything is written, a front whose trained point scores NaN or infinity, or
    that holds numbers JSON cannot store."""
    trained = front.points[0]
    for what in ("accuracy", "calibration_loss", "val_loss"):
        value = getattr(trained, what, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"the trained model's {what} is {value}: its outputs are not finite (a corrupted "
                              f"checkpoint?); nothing was written")
    try:
        json_text(front.to_dict(), "front.json")
    except ValueError as exc:
        raise ConfigError(f"the front holds numbers JSON cannot store ({exc}); nothing was written") from None


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it; a second Ctrl-C raises at once. Only
    in the main thread with Python's own SIGINT handler in place (elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending = []

    def hold(signum, frame):
        if pending:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        pending.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def _remove_temporaries(out: Path, folders: Sequence[str]) -> None:
    """Delete the temporary folders that a killed compress left for ``folders`` under ``out``."""
    for folder in folders:
        for path in out.glob(f".{folder}.*{TEMPORARY_SUFFIX}"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)


def _place_folder(temporary: Path, target: Path) -> None:
    """Rename the filled ``temporary`` folder to ``target``; an existing ``target`` (``--force``) is
    renamed aside first and deleted once the new one is in place (put back if that fails)."""
    old = None
    if os.path.lexists(target):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX, dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    try:
        os.replace(temporary, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
                   data: TaskData | None = None, search: str = "lazy", full_front: bool = False,
                   inputs: dict[str, Any] | None = None, remeasure_latency: bool = False,
                   healing: Healing | None = None) -> CompressResult:
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
    removals each round, cuts several layers per round far from the target, and gives the
    exhaustive search's front on the models measured in ``benchmarks/front_speed.py``;
    ``exhaustive``; ``allocate``: ranks chosen from each layer's
    error curve, no search). With ``targets`` the search stops once every cost target is met,
    and an unreachable one is refused before it starts; ``full_front`` walks on to every layer's
    smallest rank all the same (the whole front in ``front.json`` and the family file).

    ``inputs``: what identifies the model and its batches (the checkpoint's sha256, the calibration
    size and seed, the initialisation or order, ...; JSON values), recorded in ``front.json`` with
    the cost, step, search and latency batch (``metadata.inputs``), which lets a later call add
    targets to this front. When ``out`` holds the ``front.json`` of the same inputs, the targets
    are added to it: their folders are written beside those of the earlier targets, which stay
    (``metadata.targets`` and each point's ``exported`` mark them all), and nothing is searched
    when the front answers the new targets as a search for all of them would (a front stopped at
    the earlier targets is searched again, for all of them, when a new budget lies beyond it).
    Its latency table is reused by any new search of the same inputs, ``--force`` included,
    unless ``remeasure_latency`` (which also searches again). A ``front.json`` of other inputs is
    refused, naming what differs, unless ``force`` (which recomputes the front for ``targets``).
    Without ``inputs``, an existing ``front.json`` is refused unless ``force``.

    ``healing(model, point)``, when given, is called on each target's materialised model and returns
    the model to export instead (a fine-tuned one, say) and a record of what it did, kept in the
    folder's ``point.json`` (``healing``) and in the result: the front and the family file describe
    the models before it.

    Every option, output path and target is checked before the first file is written; files that
    exist are replaced only with ``force``. Raises a one-line
    :class:`~maestro_lod.errors.MaestroError` for a bad option, an existing output, a model
    without low-rank layers or a target no point reaches.
    """
    out = Path(out)
    if not 0 < step <= 1:
        raise ConfigError(f"step={step} must be a fraction in (0, 1]")
    if isinstance(latency_batch, bool) or not isinstance(latency_batch, int) or \
            not 1 <= latency_batch <= LATENCY_BATCH_LIMIT:
        raise ConfigError(f"latency_batch={latency_batch!r} must be an int from 1 to {LATENCY_BATCH_LIMIT:,}")
    targets = unique_targets(targets)
    formats = check_formats(formats)
    identity = None if inputs is None else {**inputs, "cost": cost, "step": float(step), "search": search,
                                            "latency_batch": latency_batch}
    check_outputs(out, targets, force, family, reuse=identity is not None)
    layers = dict(low_rank_layers(model))
    if not layers:
        raise ConfigError("the model has no low-rank layers: nothing to compress")
    if not calibration or (validation is not None and not validation):
        raise ConfigError("compress needs at least one calibration batch, and one validation batch if validation "
                          "is given")
    check_model_outputs(model, calibration[0])
    cache, reuse = None, False
    if identity is not None and (force or targets) and os.path.lexists(out / FRONT_FILE):
        if force:
            with contextlib.suppress(MaestroError):  # only its latency table may serve
                cache = cached_front(out, identity)
        else:
            cache, reuse = cached_front(out, identity), True
    earlier: list[tuple[str, float]] = []
    if reuse:
        earlier = [t for t in earlier_targets(cache) if t not in targets]
        missing = [target_folder(*t) for t in earlier if not (out / target_folder(*t)).is_dir()]
        if missing:
            say(f"note: {', '.join(missing)} (exported before) no longer exist; front.json stops marking them",
                flush=True)
            earlier = [t for t in earlier if target_folder(*t) not in missing]
    example = first_sample(calibration)
    front = None
    if reuse:
        why = "the latency table is measured again (--remeasure-latency)" if remeasure_latency else \
            _unanswered(cache, targets, search, full_front)
        if why is None:
            front = cache
            _keep_marks(front, [target_folder(*t) for t in earlier])
            say(f"reusing the front in {out / FRONT_FILE} ({len(front.points)} points, same checkpoint and options): "
                f"no latency table, search or evaluation", flush=True)
        else:
            say(f"{why}: searching again", flush=True)
    searched = front is None
    latency_reused = False
    if searched:
        if cache is not None and cache.latency_table is not None and not remeasure_latency:
            latency, latency_reused = cache.latency_table, True
            say(f"latency table: reused from {out / FRONT_FILE} (--remeasure-latency measures it again)", flush=True)
        else:
            visits = {name: visited_ranks(layer.rank, layer_floor(layer, layer.rank), step)
                      for name, layer in layers.items()}
            say(f"measuring the latency table ({sum(map(len, visits.values()))} layer ranks, batch {latency_batch})",
                flush=True)
            with deferred_interrupts():
                latency = measure_latency(model, example, visits, latency_batch)
        every = earlier + targets
        complete = full_front or not every or (reuse and not cache.metadata.get("stops"))
        stops = None if complete else _stops(every)
        front = greedy_front(model, calibration, cost, step, latency=latency, kind=kind,
                             progress=progress("search rounds"), loss=loss, search=search, targets=stops)
        if validation is not None:
            evaluate_front(front, model, validation, calibration, progress=progress("evaluating points"), loss=loss)
        _check_front_numbers(front)
        front.metadata = {**(metadata or {}), "dense_accuracy": dense_accuracy, "torch": torch.__version__}
        if identity is not None:
            front.metadata.update(inputs=identity, stops=stops)
        for key, value in earlier:  # an earlier target keeps the point it was exported with
            folder = target_folder(key, value)
            old = _exported_point(cache, folder)
            new = next((p for p in front.points if old is not None and p.ranks == old.ranks), None)
            if new is None:
                raise UsageError(f"the new front does not hold the point {out / folder} was exported with; pass "
                                 f"--force to recompute the front and every target")
            if new.exported is None:
                new.exported = {**{k: v for k, v in old.exported.items() if k != "folders"}, "folder": folder}
            else:
                new.exported.setdefault("folders", [new.exported["folder"]]).append(folder)
    else:
        front.metadata["dense_accuracy"] = dense_accuracy
    latency = front.latency_table
    chosen = [(target_folder(k, v), front.select(**{k: v})) for k, v in targets]  # unreachable: fails here
    kept = [(target_folder(*t), _exported_point(front, target_folder(*t))) for t in earlier]
    if identity is not None:
        front.metadata["targets"] = [[k, v] for k, v in earlier + targets]
    if force and cache is None and identity is not None:
        with contextlib.suppress(MaestroError, OSError, ValueError, KeyError, TypeError):
            cache = Front.load(out / FRONT_FILE)
    left: list[str] = []
    if force and cache is not None:
        with contextlib.suppress(MaestroError):
            left = [target_folder(*t) for t in earlier_targets(cache) if t not in targets
                    and (out / target_folder(*t)).is_dir()]
        if left:
            say(f"note: {', '.join(left)} (exported with the earlier front) stay, but the new front.json does not "
                f"mark them", flush=True)
    timing = repeat_batch(example, latency_batch)
    result = CompressResult(front, chosen, out, earlier=kept, searched=searched, latency_reused=latency_reused)
    try:
        out.mkdir(parents=True, exist_ok=True)
        folders = [folder for folder, _ in chosen]
        _remove_temporaries(out, folders)
        temporaries: list[Path] = []
        try:
            for folder, point in chosen:
                materialized = materialize(model, point, calibration)
                healed: dict[str, Any] = {}
                if healing is not None:
                    materialized, healed = healing(materialized, point)
                    result.healing[folder] = healed
                with deferred_interrupts():
                    files, report = build_artifacts(materialized, formats, checks, architecture)
                for fmt, why in report["skipped"].items():
                    say(f"{folder}: {fmt} not written: {why}", flush=True)
                temporary = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=TEMPORARY_SUFFIX, dir=out))
                temporaries.append(temporary)
                names = write_files(temporary, files)
                with deferred_interrupts():
                    measured = time_model(deployable(materialized, example), timing,
                                          *((latency.repeats, latency.warmup) if latency is not None else ()))
                exported = {"folder": folder, "files": names, "latency": measured, **report}
                if point.exported is None:
                    point.exported = exported
                else:  # the point of another target too
                    point.exported.setdefault("folders", [point.exported["folder"]]).append(folder)
                record = point_record(folder, dataclasses.replace(point, exported=exported), list(files),
                                      feed_record(materialized, example, data))
                if healed:
                    record["healing"] = healed
                write_text_atomic(temporary / POINT_FILE,
                                  json_text(record, repr(str(out / folder / POINT_FILE)), indent=2) + "\n")
                os.chmod(temporary, 0o777 & ~_umask())
                _place_folder(temporary, out / folder)
                temporaries.remove(temporary)
                result.artifacts[folder] = [out / folder / name for name in names] + [out / folder / POINT_FILE]
        finally:
            for temporary in temporaries:
                shutil.rmtree(temporary, ignore_errors=True)
        family_file = out / FAMILY_FILE
        present = family_file.is_file()
        write = (family and (searched or not present)) or (reuse and searched and present)  # never stale
        if write:
            save_family(model, front, family_file, calibration)
        if write or (reuse and present):
            result.family_file = family_file
            every_folder = [folder for folder, _ in kept + chosen]
            separate = {fmt: sum((out / folder / FILES[fmt]).stat().st_size for folder in every_folder
                                 if (out / folder / FILES[fmt]).is_file()) for fmt in formats}
            front.metadata["family"] = {"file": FAMILY_FILE, "bytes": family_file.stat().st_size,
                                        "points": len(front.points), "separate": separate}
        else:
            front.metadata.pop("family", None)
        result.front_file, result.plot_file = out / FRONT_FILE, out / PLOT_FILE
        front.save(result.front_file)
        front.plot(result.plot_file, dense_accuracy)
    except OSError as exc:  # a full disk, a read-only or vanished directory
        raise RunDirectoryError(f"cannot write into {str(out)!r}: {exc.strerror or exc}; the files written before "
                                f"are complete and nothing half-written is left") from None
    return result
