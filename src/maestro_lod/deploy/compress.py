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
from ..engine.search import Batch, calibration_batches, evaluate_front, greedy_front, materialize
from ..engine.targets import check_target
from ..errors import ConfigError, RunDirectoryError, UsageError
from ..files import TEMPORARY_SUFFIX, check_output_directory, json_text, write_text_atomic
from ..layers import low_rank_layers
from .artifacts import FILES, FORMATS, build_artifacts, check_formats, write_files
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


def unique_targets(targets: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """``targets`` checked, in their canonical form, each once (``macs=0.5`` and ``macs=0.50`` are one)."""
    return list(dict.fromkeys(check_target(key, value) for key, value in targets))


def check_outputs(out: Path, targets: Sequence[tuple[str, float]], force: bool, family: bool = True,
                  what: str = "output directory") -> None:
    """Refuse ``out`` when it cannot be a writable directory, and, unless ``force``, the paths under
    it that :func:`compress_model` would write and that exist. Creates nothing."""
    check_output_directory(out, what)
    out = Path(out)
    paths = [out / FRONT_FILE, out / PLOT_FILE] + [out / FAMILY_FILE] * family + [out / target_folder(k, v) for k, v in targets]
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not force:
        raise UsageError(f"{', '.join(str(p) for p in existing)} already exist; pass --force to replace them")
    blocking = [p for p in paths[3 if family else 2:] if os.path.lexists(p) and (p.is_symlink() or not p.is_dir())]
    if blocking:
        raise UsageError(f"{', '.join(str(p) for p in blocking)} exist and are not folders; move them away")


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
    tensors = outputs if isinstance(outputs, (tuple, list)) else [getattr(outputs, "logits", outputs)]
    for tensor in tensors:
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    if isinstance(latency_batch, bool) or not isinstance(latency_batch, int) or \
            not 1 <= latency_batch <= LATENCY_BATCH_LIMIT:
        raise ConfigError(f"latency_batch={latency_batch!r} must be an int from 1 to {LATENCY_BATCH_LIMIT:,}")
    targets = unique_targets(targets)
    formats = check_formats(formats)
    check_outputs(out, targets, force, family)
    layers = dict(low_rank_layers(model))
    if not layers:
        raise ConfigError("the model has no low-rank layers: nothing to compress")
    if not calibration or not validation:
        raise ConfigError("compress needs at least one calibration and one validation batch")
    check_model_outputs(model, calibration[0])
    example = calibration[0][0]
    example = tuple(x[:1] for x in example) if isinstance(example, (tuple, list)) else example[:1]
    visits = {name: visited_ranks(layer.rank, layer_floor(layer, layer.rank), step) for name, layer in layers.items()}
    say(f"measuring the latency table ({sum(map(len, visits.values()))} layer ranks, batch {latency_batch})", flush=True)
    with deferred_interrupts():
        latency = measure_latency(model, example, visits, latency_batch)
    front = greedy_front(model, calibration, cost, step, latency=latency, kind=kind, progress=progress("greedy rounds"))
    evaluate_front(front, model, validation, calibration, progress=progress("evaluating points"))
    _check_front_numbers(front)
    chosen = [(target_folder(k, v), front.select(**{k: v})) for k, v in targets]  # unreachable: fails here
    front.metadata = {**(metadata or {}), "dense_accuracy": dense_accuracy, "torch": torch.__version__}
    timing = repeat_batch(example, latency_batch)
    result = CompressResult(front, chosen, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        folders = [folder for folder, _ in chosen]
        _remove_temporaries(out, folders)
        temporaries: list[Path] = []
        try:
            for folder, point in chosen:
                materialized = materialize(model, point, calibration)
                with deferred_interrupts():
                    files, report = build_artifacts(materialized, formats, checks, architecture)
                for fmt, why in report["skipped"].items():
                    say(f"{folder}: {fmt} not written: {why}", flush=True)
                temporary = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=TEMPORARY_SUFFIX, dir=out))
                temporaries.append(temporary)
                names = write_files(temporary, files)
                with deferred_interrupts():
                    measured = time_model(deployable(materialized, example), timing, latency.repeats, latency.warmup)
                point.exported = {"folder": folder, "files": names, "latency": measured, **report}
                write_text_atomic(temporary / POINT_FILE, json_text({"target": folder, "point": point.to_dict(),
                                                                      "files": {f: FILES[f] for f in files}},
                                                                     repr(str(out / folder / POINT_FILE)), indent=2) + "\n")
                os.chmod(temporary, 0o777 & ~_umask())
                _place_folder(temporary, out / folder)
                temporaries.remove(temporary)
                result.artifacts[folder] = [out / folder / name for name in names] + [out / folder / POINT_FILE]
        finally:
            for temporary in temporaries:
                shutil.rmtree(temporary, ignore_errors=True)
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
    except OSError as exc:  # a full disk, a read-only or vanished directory
        raise RunDirectoryError(f"cannot write into {str(out)!r}: {exc.strerror or exc}; the files written before "
                                f"are complete and nothing half-written is left") from None
    return result
