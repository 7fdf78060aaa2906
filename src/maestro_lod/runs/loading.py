"""Starting, continuing and loading runs of ``maestro-lod train`` without ever losing one.

A run first claims its directory (:class:`~maestro_lod.runs.directory.RunLock`), so two commands
never train into the same place; then everything that can fail is checked (the model's size on
PyTorch's ``meta`` device, the model, the device, a checkpoint's contents) before a file of an
earlier run is deleted, right before training starts.

A trained run directory is read back by one path, whoever reads it (``train --resume``,
``compress``, ``bench``): :func:`read_run_config` (``config.json``), :func:`load_task` (the
data), :func:`build_trainer` with the ``checkpoint`` (safetensors, no pickle) to restore;
:func:`load_run` does all three for a finished or interrupted run.

A model that is not a run (``compress --model-factory`` / ``--torchvision``) is built from local
files only: :func:`build_from_factory` or :func:`build_torchvision`, then :func:`load_weights`.

A run directory may come from someone else, so reading one never downloads anything, and never
writes outside it: the ``download`` of its ``config.json`` is ignored (only the caller's
``download=True`` lets a loader fetch files) and the caller's ``data_root`` replaces the saved one.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from ..data import TaskData, load_data
from ..errors import (CheckpointError, ConfigError, ConfigTypeError, MaestroError, MissingFileError, RunDirectoryError,
                      UsageError)
from ..models import build_model
from ..training.checkpoint import load_checkpoint
from ..training.train_config import EXECUTION_KEYS, TrainConfig
from ..training.distributed import Distributed
from ..training.loop import Callback, Trainer
from ..training.rng import seed_everything
from .directory import (CHECKPOINT_FILE, CONFIG_FILE, RUN_FILES, SUMMARY_FILE, RunDirectory, RunLock,
                        claim_directory, claim_new_directory, clean_temporaries, compress_outputs, foreign_message,
                        read_json_file, restore_set_aside, run_status, set_aside)

RUNS_ROOT = Path("runs")
PARAMETER_LIMIT = 2_000_000_000
"""Largest model (dense parameters) a run may build: 8 GB of float32 weights before factorising."""


@dataclass(frozen=True)
class DataAccess:
    """Where the data of a run read back comes from: ``data_root`` (None keeps the run's) and whether
    a loader may download (never unless the caller asks)."""

    data_root: str | None = None
    download: bool = False

    def apply(self, config: TrainConfig) -> TrainConfig:
        """``config`` with the data options of this access (the run's own ``download`` is dropped)."""
        root = config.data_root if self.data_root is None else self.data_root
        if root == config.data_root and self.download == config.download:
            return config
        return config.replace(data_root=root, download=self.download)


def load_task(config: TrainConfig, access: DataAccess | None = None) -> TaskData:
    """The dataset of ``config``; with ``access`` (a run read back), its data root and download
    permission replace the config's."""
    if access is not None:
        config = access.apply(config)
    return load_data(config.data, root=config.data_root, download=config.download, seed=config.seed,
                     augment=config.augment, seq_len=config.seq_len)


def check_model_size(config: TrainConfig, data: TaskData) -> None:
    """Build the model on PyTorch's ``meta`` device (no memory) and refuse it above
    :data:`PARAMETER_LIMIT` parameters, before a real build tries to allocate them. The builder's
    own checks (options, model/data pairing) run here too. A builder that cannot run on ``meta`` is
    left to the real build."""
    try:
        with torch.device("meta"):
            model = build_model(config.model, data, **config.model_options)
    except (NotImplementedError, RuntimeError):
        return
    count = sum(p.numel() for p in model.parameters())
    if count > PARAMETER_LIMIT:
        options = ", ".join(f"{k}={v!r}" for k, v in config.model_options.items()) or "default options"
        raise ConfigError(f"model {config.model!r} ({options}) would have {count:,} parameters, more than "
                          f"{PARAMETER_LIMIT:,}; choose smaller model options")


def build_trainer(config: TrainConfig, data: TaskData, callbacks: list[Callback] = (),
                  distributed: Distributed | None = None, checkpoint: Path | None = None) -> Trainer:
    """The model of ``config`` (size-checked first), seeded by ``config.seed``, in a :class:`Trainer`;
    with ``checkpoint``, the trainer continues from it (:func:`restore`)."""
    check_model_size(config, data)
    seed_everything(config.seed)
    model = build_model(config.model, data, **config.model_options)
    trainer = Trainer(model, data.train, data.val, config, kind=data.kind, callbacks=list(callbacks),
                      distributed=distributed)
    if checkpoint is not None:
        restore(trainer, checkpoint)
    return trainer


def restore(trainer: Trainer, checkpoint: Path) -> None:
    """Load ``checkpoint`` into ``trainer`` after checking that it fits the run; one that does not
    fit raises a one-line :class:`CheckpointError`."""
    source = f"checkpoint {str(checkpoint)!r}"
    try:
        trainer.load_state_dict(load_checkpoint(checkpoint), source=source)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{source} does not fit model {trainer.config.model!r}: "
                              f"{str(exc).strip().splitlines()[0]}") from None
    check_finite(trainer.model, source)


def check_finite(model: torch.nn.Module, source: str) -> None:
    """Refuse a model whose parameters or buffers hold NaN or infinite values (a corrupted file:
    training stops before such an update is applied, so no checkpoint of a run holds one)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source} holds {bad} NaN or infinite value(s) in {name!r}: the file is "
                                  f"corrupted; use another copy of the run")


def read_run_config(directory: Path, changes: dict[str, Any] | None = None) -> TrainConfig:
    """The config a run directory was trained with (its ``config.json``), with ``changes`` to its
    execution options (:data:`~maestro_lod.training.train_config.EXECUTION_KEYS`; others are ignored).
    A config.json that is not a valid config raises a one-line :class:`ConfigError` naming the file."""
    path = directory / CONFIG_FILE
    saved = read_json_file(path, "run config")
    saved.update({k: v for k, v in (changes or {}).items() if k in EXECUTION_KEYS})
    try:
        return TrainConfig.from_dict(saved)
    except ConfigError as exc:
        raise type(exc)(f"run config {str(path)!r}: {exc}") from None


def read_run_summary(directory: Path) -> dict[str, Any]:
    """A run's ``summary.json`` ({} when there is none: an unfinished run), checked where readers
    rely on it: ``dense_reference`` is a table or null, its ``accuracy`` a number in [0, 1] or null."""
    path = directory / SUMMARY_FILE
    if not path.is_file():
        return {}
    summary = read_json_file(path, "run summary")
    reference = summary.get("dense_reference")
    if reference is not None and not isinstance(reference, dict):
        raise RunDirectoryError(f"run summary {str(path)!r}: dense_reference is a JSON {type(reference).__name__}, "
                                f"not a table")
    accuracy = (reference or {}).get("accuracy")
    if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, (int, float))
                                 or not math.isfinite(accuracy) or not 0 <= accuracy <= 1):
        raise RunDirectoryError(f"run summary {str(path)!r}: dense_reference.accuracy={accuracy!r} is not a "
                                f"fraction in [0, 1]")
    return summary


@dataclass
class LoadedRun:
    """A run directory read back: its config, summary (empty for an unfinished run), data and a
    :class:`Trainer` holding the checkpoint's model, optimiser and history."""

    directory: Path
    config: TrainConfig
    summary: dict[str, Any]
    data: TaskData
    trainer: Trainer

    @property
    def model(self) -> torch.nn.Module:
        """The trained (shrunk, factorised unless dense) model."""
        return self.trainer.model


def load_run(directory: str | Path, device: str | None = "cpu", *, data_root: str | Path | None = None,
             download: bool = False) -> LoadedRun:
    """Read the run in ``directory`` (written by ``maestro-lod train``): its config, rebuilt data and
    model, and its checkpoint. ``device`` replaces the run's device (None keeps it). The data is read
    from ``data_root`` (default: the run's) and fetched only with ``download=True`` (the run's own
    ``download`` is not followed). A directory without ``config.json`` and ``checkpoint.safetensors``,
    one that another process is training in, an invalid config or summary, or a checkpoint that does
    not fit the config or holds NaN / infinite values raises a one-line
    :class:`~maestro_lod.errors.MaestroError`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{str(directory)!r} is not a run directory")
    RunLock(directory).check_free()
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        if not (directory / name).is_file():
            raise UsageError(f"{str(directory)!r} has no {name}: not a run written by maestro-lod train")
    config = read_run_config(directory)
    if device is not None:
        config = config.replace(device=device)
    summary = read_run_summary(directory)
    data = load_task(config, DataAccess(None if data_root is None else str(data_root), bool(download)))
    return LoadedRun(directory, config, summary, data, build_trainer(config, data, checkpoint=directory / CHECKPOINT_FILE))


@dataclass
class Claim:
    """A run directory this process holds, and what must happen there before training starts."""

    lock: RunLock
    config: TrainConfig
    checkpoint: Path | None = None  # resume from it
    clear: tuple[str, ...] = ()  # files of this run's own killed start, to delete (starting over)
    replace: tuple[str, ...] = ()  # files of an earlier run (or of its older state), set aside until a checkpoint
    access: DataAccess | None = None  # a run read back (resumed): where its data comes from

    @property
    def directory(self) -> Path:
        return self.lock.directory

    def prepare_files(self, files: RunDirectory | None = None) -> None:
        """Right before training: delete the files of a killed start, set aside those of the run
        that was there (``files`` deletes them at its first checkpoint, or puts them back), and
        remove stale temporaries."""
        for name in self.clear:
            (self.directory / name).unlink(missing_ok=True)
        try:
            moved = set_aside(self.directory, self.replace)
        except OSError as exc:
            restore_set_aside(self.directory)
            raise RunDirectoryError(f"cannot set the earlier run's files aside in {str(self.directory)!r}: "
                                    f"{exc.strerror or exc}; they are where they were") from None
        if files is not None:
            files.replaced = moved
            # a resumed run keeps the fronts compressed from its older checkpoint, under a name saying so
            files.keep_replaced_as = f"compressed-epoch{files.saved_epoch}" if self.checkpoint is not None else None
        clean_temporaries(self.directory)


def _default_directory(config: TrainConfig) -> Path:
    return RUNS_ROOT / f"{config.model}-{config.data}-{time.strftime('%Y%m%d-%H%M%S')}"


def claim_output(config: TrainConfig, out: Path | None = None, force: bool = False) -> Claim:
    """Claim ``out`` (``--out``; None: a new ``runs/<model>-<data>-<time>``) for a new run. A directory
    holding a run is refused unless ``force`` (its files are deleted only when training starts);
    files with run-file names that this package did not write are refused even then. With ``force``
    the earlier run's files (and fronts compressed from it) are only set aside when training starts,
    and deleted once the new run has written its first checkpoint."""
    if out is None:
        return Claim(claim_new_directory(_default_directory(config)), config)
    out = Path(out)
    lock = claim_directory(out)
    try:
        status = run_status(out)
        if status == "foreign":
            raise RunDirectoryError(foreign_message("--out", out))
        if status == "finished" and not force:
            raise UsageError(f"--out {str(out)!r} holds a finished run; choose another directory or pass --force")
        if status in ("started", "unfinished") and not force:
            raise UsageError(f"--out {str(out)!r} holds an unfinished run; continue it with --resume {out} "
                             f"or pass --force")
    except BaseException:
        lock.release()
        raise
    replace = (*RUN_FILES, *compress_outputs(out)) if status != "empty" else ()
    return Claim(lock, config, replace=replace)


def claim_resume(directory: Path, changes: dict[str, Any], lock: bool = True, access: DataAccess | None = None) -> Claim:
    """Claim ``directory`` to continue its run from the checkpoint with its saved config (``changes``:
    the execution options given again); a run killed before its first checkpoint starts over.
    ``lock=False`` (the other processes of a distributed run, which only read the directory): the
    same checks without taking the lock, which rank 0 holds. ``access``: where the data comes from
    (default: the run's data root, no download). Fronts compressed from the checkpoint are set aside
    when training starts and kept, at the first new checkpoint, in ``compressed-epoch<N>/``."""
    if not (directory / CONFIG_FILE).is_file():
        raise UsageError(f"--resume {str(directory)!r}: no {CONFIG_FILE} and {CHECKPOINT_FILE} there to resume from")
    lock = RunLock(directory).acquire() if lock else RunLock(directory)
    try:
        status = run_status(directory)
        if status == "foreign":
            raise RunDirectoryError(foreign_message("--resume", directory))
        if status == "finished":
            raise UsageError(f"--resume {str(directory)!r}: that run has already finished")
        config = read_run_config(directory, changes)
    except BaseException:
        lock.release()
        raise
    access = access or DataAccess()
    if status == "started":  # killed during epoch 1: nothing to continue, so start over
        return Claim(lock, config, clear=tuple(name for name in RUN_FILES if name != CONFIG_FILE), access=access)
    return Claim(lock, config, checkpoint=directory / CHECKPOINT_FILE, replace=tuple(compress_outputs(directory)),
                 access=access)


# ------------------------------------------------------------------ a model of one's own, from files
def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_model_factory(spec: str) -> Callable[[], nn.Module]:
    """The function named by ``spec``: ``package.module:function`` (importable, the current
    directory first on the path) or ``path/to/file.py:function``. It is called without arguments
    to build the dense model. A spec that names no importable module or no callable is refused in
    one line naming it."""
    module_name, colon, attribute = str(spec).rpartition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(f"--model-factory {spec!r} must be module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise MissingFileError(f"--model-factory {spec!r}: no file {module_name!r}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            added = os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except MaestroError:
        raise
    except ModuleNotFoundError as exc:
        raise UsageError(f"--model-factory {spec!r}: no module named {exc.name or module_name!r}") from None
    except Exception as exc:  # the module's own code failed while importing
        message = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(f"--model-factory {spec!r}: importing {module_name!r} failed: "
                         f"{type(exc).__name__}: {message}") from None
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise UsageError(f"--model-factory {spec!r}: module {module_name!r} has no function {attribute!r}")
    return factory


def build_from_factory(spec: str) -> nn.Module:
    """The dense model returned by the function of :func:`load_model_factory` (called without arguments)."""
    factory = load_model_factory(spec)
    try:
        model = factory()
    except MaestroError:
        raise
    except Exception as exc:
        message = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(f"--model-factory {spec!r} failed: {type(exc).__name__}: {message}") from None
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"--model-factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_torchvision(arch: str, num_classes: int | None) -> nn.Module:
    """torchvision's classifier ``arch`` (``resnet18``, ``mobilenet_v2``, …) with ``num_classes``
    outputs and no pretrained weights (nothing is downloaded)."""
    try:
        import torchvision
    except ImportError:
        raise UsageError(f'--torchvision {arch} needs torchvision: pip install "maestro-lod[vision]"') from None
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise UsageError(f"--torchvision {arch!r} is not a torchvision classifier (e.g. {', '.join(known[:6])}, ...)")
    if not num_classes:
        raise UsageError(f"--torchvision {arch}: the dataset has no classes (an image classification dataset is needed)")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors state dict into ``model`` strictly, in place. A missing file, one that
    is not safetensors, or weights that do not fit (missing or unexpected keys, other shapes) are
    refused in one line naming them. Nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--weights {str(path)!r} does not exist")
    try:
        state = load_safetensors(str(path))
    except Exception as exc:
        message = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"--weights {str(path)!r} is not a safetensors file: {message}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{key} {tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} in the model"
              for key in sorted(set(state) & set(expected)) if state[key].shape != expected[key].shape]
    problems = ([f"missing keys {_listing(missing)}"] if missing else []) + \
               ([f"unexpected keys {_listing(unexpected)}"] if unexpected else []) + \
               ([f"shape mismatch: {_listing(shapes, 2)}"] if shapes else [])
    if problems:
        raise CheckpointError(f"--weights {str(path)!r} do not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model.eval()
