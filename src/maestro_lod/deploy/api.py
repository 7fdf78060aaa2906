"""``maestro_lod.compress``: the accuracy–cost front of any model, dense or factorised, from Python.

:func:`compress` takes an ``nn.Module`` and calibration batches, factorises the model at full
rank if it is dense (SVD or whitened SVD, which reproduce it), or re-orders the ranks of an
already factorised one (:func:`maestro_lod.canonicalize_`), runs the greedy search, evaluates
every point on the validation batches if given, and returns a :class:`CompressedFront`: a
:class:`~maestro_lod.engine.front.Front` (points, selection by budget, JSON, plot) that also
holds the factorised model, so any point can be materialised or exported.

Batches: a list (or any iterable, e.g. a ``DataLoader``, read once) of ``(inputs, targets)``
pairs, scored by the cross-entropy of the model's logits against ``targets`` (class ids, or token
ids per position; ``-100`` is ignored). With ``loss``, a batch may also be the model inputs alone
(a tensor), and ``loss(output, batch)`` gets the model's output (logits, a tuple, a Hugging Face
``ModelOutput``) and the batch exactly as given, and returns the mean loss as a scalar tensor.
Model inputs are a tensor or a tuple of tensors (``model(*inputs)``), batch dimension first.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..canonical import canonicalize_
from ..config import FactorizeConfig
from ..data import TaskData
from ..engine.front import Front, FrontPoint
from ..engine.search import Batch, Loss, evaluate_front, greedy_front, materialize
from ..engine.targets import check_target
from ..errors import ConfigError, ConfigTypeError, UsageError
from ..files import write_json_atomic
from ..inject import factorize
from ..layers import low_rank_layers
from .artifacts import FILES, FORMATS, build_artifacts, check_formats, write_files
from .compress import POINT_FILE, check_input_batches, check_outputs, compress_model, feed_record, point_record
from .family import save_family

INITS = ("svd", "whitened")
"""How a dense model is factorised at full rank: SVD of each weight, or SVD whitened by the
inputs each layer sees on the calibration batches (same function, ranks ordered by output error)."""
ORDERS = ("svd", "whitened", "trained")
"""How the ranks of an already factorised model are ordered before the search: each layer
re-factorised by SVD or whitened SVD at its rank (same function), or as trained."""
CHECK_SAMPLES = 64


def check_preparation(init: str, order: str) -> None:
    """A one-line ConfigError naming ``init`` or ``order`` when it is not one of :data:`INITS` /
    :data:`ORDERS`."""
    for name, value, choices in (("init", init, INITS), ("order", order, ORDERS)):
        if value not in choices:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def prepare_model(model: nn.Module, calibration: Sequence[Batch], init: str = "whitened",
                  order: str = "svd") -> tuple[nn.Module, dict[str, Any]]:
    """The factorised model the search starts from, changed in place, and what was done (for the
    front's metadata). A model without low-rank layers is factorised at full rank with ``init``
    (:data:`INITS`; whitened on the inputs of ``calibration``); one with low-rank layers has its
    ranks ordered by ``order`` (:data:`ORDERS`). Either way the model computes what it did."""
    check_preparation(init, order)
    model.eval()
    if not any(True for _ in low_rank_layers(model)):
        model = factorize(model, FactorizeConfig(init=init), calibration=calibration if init == "whitened" else None)
        return model.eval(), {"factorized": True, "init": init}
    if order != "trained":
        canonicalize_(model, calibration if order == "whitened" else None)
    return model, {"factorized": False, "order": order}


def as_batches(batches: object, what: str, loss: Loss | None) -> list[Batch]:
    """The engine's ``(inputs, targets)`` pairs of the batches given to :func:`compress`; with
    ``loss``, ``targets`` is the batch as given (what ``loss`` receives)."""
    if batches is None or isinstance(batches, (Dataset, torch.Tensor, str, bytes, dict)) or not isinstance(batches, Iterable):
        raise ConfigTypeError(f"{what} must be a list or DataLoader of batches, got {type(batches).__name__}"
                              + ("; wrap a single batch in a list" if isinstance(batches, torch.Tensor) else ""))
    result = []
    for i, batch in enumerate(batches):
        if isinstance(batch, dict):
            raise ConfigTypeError(f"{what} batch {i} is a dict: pass the model inputs as a tensor or a tuple of "
                                  f"tensors (e.g. input_ids), with loss=... for the targets")
        if isinstance(batch, torch.Tensor):
            if loss is None:
                raise ConfigTypeError(f"{what} batch {i} is a tensor of inputs alone: pass (inputs, targets) batches, "
                                      f"or loss=... to score the model's output on it")
            result.append((batch, batch))
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            result.append((batch[0], batch if loss is not None else batch[1]))
        else:
            raise ConfigTypeError(f"{what} batch {i} must be an (inputs, targets) pair"
                                  + (" or a tensor of inputs" if loss is not None else "")
                                  + f", got {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    if not result:
        raise ConfigError(f"{what} is empty: give at least one batch")
    return result


def _slice(inputs: Any, part: slice) -> Any:
    return tuple(x[part] for x in inputs) if isinstance(inputs, (tuple, list)) else inputs[part]


def check_batches_from(batches: Sequence[Batch]) -> list[Any]:
    """Input batches each artifact is checked on: up to :data:`CHECK_SAMPLES` samples of the first
    batch, and its last 3 (a second batch size)."""
    inputs = batches[0][0]
    return [_slice(inputs, slice(0, CHECK_SAMPLES)), _slice(inputs, slice(-3, None))]


def _kind(batches: Sequence[Batch], loss: Loss | None) -> str:
    if loss is not None:
        return "custom"
    targets = batches[0][1]
    return "language-model" if isinstance(targets, torch.Tensor) and targets.dim() > 1 else "classification"


class CompressedFront(Front):
    """The front of :func:`compress` with the factorised model it was searched on.

    Everything a :class:`~maestro_lod.engine.front.Front` has (``points``, ``select(params=0.5)``,
    ``fraction``, ``save``/``load`` as JSON, ``plot``), plus :meth:`model` (the model at a point)
    and :meth:`export` (its artifacts). Points are given by index or as :class:`FrontPoint`."""

    def __init__(self, front: Front, model: nn.Module, calibration: Sequence[Batch], checks: Sequence[Any],
                 architecture: Callable[[], nn.Module] | None = None, data: TaskData | None = None):
        super().__init__(**{f.name: getattr(front, f.name) for f in fields(Front)})
        self.source, self.calibration, self.checks = model, list(calibration), list(checks)
        self.architecture, self.data = architecture, data

    def point(self, point: int | FrontPoint) -> FrontPoint:
        """The point of this front at index ``point`` (or the one with the same index and ranks)."""
        return self.point_at(point)

    def model(self, point: int | FrontPoint = 0) -> nn.Module:
        """A copy of the factorised model truncated to ``point``'s ranks, in eval mode (BatchNorm
        statistics recomputed on the calibration batches, as the search did)."""
        return materialize(self.source, self.point(point), self.calibration)

    def export(self, point: int | FrontPoint, formats: Sequence[str] = FORMATS, dir: str | Path = ".",
               force: bool = False) -> list[Path]:
        """Write the artifacts of ``point`` (``model.pt2``, ``model.onnx``, ``model.safetensors``:
        see :mod:`maestro_lod.deploy.artifacts`, each checked against PyTorch) and its
        ``point.json`` into ``dir``; returns their paths. Existing files are refused unless ``force``."""
        formats = check_formats(formats)
        chosen = self.point(point)
        directory = Path(dir)
        paths = [directory / FILES[f] for f in formats] + [directory / POINT_FILE]
        existing = [str(p) for p in paths if p.exists()]
        if existing and not force:
            raise UsageError(f"{', '.join(existing)} already exist; pass force=True to replace them")
        materialized = self.model(chosen)
        files, report = build_artifacts(materialized, formats, self.checks, self.architecture)
        names = write_files(directory, files)
        chosen.exported = {"folder": str(directory), "files": names, **report}
        example = _slice(self.checks[0], slice(0, 1))
        write_json_atomic(directory / POINT_FILE, point_record(directory.name, chosen, list(files),
                                                               feed_record(materialized, example, self.data)))
        return [directory / name for name in names] + [directory / POINT_FILE]

    def save_family(self, path: str | Path) -> Path:
        """Write every point in one file (:mod:`maestro_lod.deploy.family`); returns ``path``."""
        save_family(self.source, self, path, self.calibration)
        return Path(path)


def compress(model: nn.Module, calibration: Iterable, validation: Iterable | None = None, *, cost: str = "macs",
             init: str = "whitened", order: str = "svd", loss: Loss | None = None,
             targets: Sequence[tuple[str, float]] = (), out: str | Path | None = None, step: float = 0.25,
             formats: Sequence[str] = FORMATS, family: bool = True, force: bool = False, latency_batch: int = 32,
             data: TaskData | None = None, search: str = "lazy") -> CompressedFront:
    """The accuracy–cost front of ``model`` (left unchanged), as a :class:`CompressedFront`.

    ``calibration``: the batches that score each removal (and recompute BatchNorm statistics, and
    whiten a dense model's factorisation); ``validation``: batches every point is evaluated on
    (accuracy and loss; the loss alone with ``loss``), or None. See the module's docstring for the
    batch forms and ``loss``. A dense model is factorised at full rank with ``init`` ("whitened"
    or "svd"); a factorised one has its ranks ordered by ``order`` ("svd", "whitened" or
    "trained"). ``cost``: what a removal saves ("macs", "params", "latency"); ``step``: the
    fraction of a layer's rank removed per try; ``search``: "lazy" (default), "exhaustive" or
    "allocate" (:func:`~maestro_lod.engine.search.greedy_front`). The whole front is searched, down
    to every layer's smallest rank, so that any budget can be selected from it afterwards.

    With ``out``, everything ``maestro-lod compress`` writes goes there: ``front.json``,
    ``front.png``, ``family.safetensors`` (unless ``family=False``) and a folder of ``formats``
    per target (``targets``: ``[("params", 0.5), ("max_drop", 0.01)]``); existing files are
    refused unless ``force``. ``data`` (a :class:`~maestro_lod.data.TaskData`) adds its
    normalisation and labels or vocabulary to each ``point.json``.

    Bad input (not a module, empty or malformed batches, inputs the model cannot run, NaN inputs
    or outputs, unknown options, targets without ``out``) raises a one-line
    :class:`~maestro_lod.errors.ConfigError` before anything is written.
    """
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss is not None and not callable(loss):
        raise ConfigTypeError(f"loss must be a function loss(output, batch) -> tensor, got {type(loss).__name__}")
    check_preparation(init, order)
    if targets and out is None:
        raise ConfigError("targets are exported into out=<directory>: pass out, or choose points with front.select")
    if out is not None:
        check_outputs(Path(out), [check_target(k, v) for k, v in targets], force, family)
    batches = as_batches(calibration, "calibration", loss)
    val = None if validation is None else as_batches(validation, "validation", loss)
    check_input_batches(model, batches, "calibration", loss)
    if val is not None:
        check_input_batches(model, val, "validation", loss)
    dense = not any(True for _ in low_rank_layers(model))
    architecture = (lambda: copy.deepcopy(model)) if dense else None
    work, info = prepare_model(copy.deepcopy(model), batches, init, order)
    checks = check_batches_from(val or batches)
    kind = _kind(batches, loss)
    if out is not None:
        result = compress_model(work, batches, val, out, checks=checks, targets=targets, cost=cost, step=step,
                                formats=formats, latency_batch=latency_batch, family=family, force=force,
                                architecture=architecture, kind=kind, metadata=info, loss=loss, data=data,
                                search=search, full_front=True)
        front = result.front
    else:
        front = greedy_front(work, batches, cost, step, kind=kind, loss=loss, search=search)
        if val is not None:
            evaluate_front(front, work, val, batches, loss=loss)
        front.metadata = {**info, "torch": torch.__version__}
    return CompressedFront(front, work, batches, checks, architecture, data)
