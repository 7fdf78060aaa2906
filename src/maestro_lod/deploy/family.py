"""The family artifact: every point of a front in one file.

A MAESTRO model orders its ranks by importance, so the model at any point of its front is the
trained model with each factor cut to its leading ranks. ``family.safetensors`` therefore holds
the trained model's state dict once, at the trained ranks, plus the front (its rank patterns,
costs and scores) as JSON in the safetensors metadata; :func:`load_family` materialises any point
by loading the trained weights into a fresh factorised model and slicing the leading ranks, which
gives exactly the model :func:`~maestro_lod.deploy.materialize` gives for that point.

BatchNorm: a point's running statistics are recomputed on the calibration set (see
:func:`~maestro_lod.deploy.materialize`), so they cannot be sliced from the trained ones. For a
model with BatchNorm, :func:`save_family` needs the calibration batches and stores the running
statistics of every point whose ranks differ from the trained ones (the BatchNorm buffers only:
a few numbers per channel and point), under ``points.<index>.<buffer name>``.

The file is plain safetensors: tensors and JSON, nothing is pickled or unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..errors import CheckpointError, ConfigError, ConfigTypeError
from ..files import write_bytes_atomic
from ..layers import low_rank_layers, rank_pattern
from ..shrinking import truncate_
from ..engine.batchnorm import batchnorm_layers
from .artifacts import read_tagged_safetensors
from ..engine.front import Front, FrontPoint
from ..engine.search import Batch, materialize

FAMILY_FILE = "family.safetensors"
FAMILY_METADATA_KEY = "maestro_lod_family"
FORMAT = 1
POINT_PREFIX = "points."
"""Tensor names starting with this hold one point's BatchNorm statistics (``points.<index>.<buffer>``)."""


def _batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running-statistics buffers (``running_mean``, ``running_var``, ``num_batches_tracked``)
    of every BatchNorm layer of ``model``, by state-dict name."""
    layers = {id(m) for m in batchnorm_layers(model)}
    return {f"{name}.{key}" if name else key: buffer
            for name, module in model.named_modules() if id(module) in layers
            for key, buffer in module.named_buffers(recurse=False) if buffer is not None}


def _plain_tensor(value: torch.Tensor) -> torch.Tensor:
    return value.detach().cpu().clone().contiguous()


def family_bytes(model: nn.Module, front: Front, calibration: Sequence[Batch] | None = None) -> bytes:
    """The bytes of the family file of ``model`` (trained, factorised) and its ``front``; see
    :func:`save_family`."""
    if not isinstance(front, Front):
        raise ConfigTypeError(f"front must be a Front, got {type(front).__name__}")
    if not any(True for _ in low_rank_layers(model)):
        raise ConfigError("save_family: the model has no low-rank layers")
    for _, layer in low_rank_layers(model):
        if layer.active_rank is not None:
            raise ConfigError("save_family: clear every layer's active_rank first (the family holds physical ranks)")
    trained = rank_pattern(model)
    if front.trained.ranks != trained:
        raise ConfigError(f"the front's point 0 (ranks {front.trained.label()}) is not this model "
                          f"(ranks {'/'.join(map(str, trained.values()))}): build the front from this model")
    for point in front.points:
        above = sorted(name for name, rank in point.ranks.items() if name not in trained or rank > trained[name])
        if above or set(point.ranks) != set(trained):
            raise ConfigError(f"point {point.index} of the front does not slice this model's ranks "
                              f"({', '.join(above) or 'other layer names'})")
    tensors = {key: _plain_tensor(value) for key, value in model.state_dict().items()}
    stored: list[int] = []
    if batchnorm_layers(model):
        if calibration is None:
            raise ConfigError("this model has BatchNorm: pass the calibration batches the front was built with, "
                              "so every point's running statistics can be stored")
        for point in front.points:
            if point.ranks == trained:
                continue
            for key, value in _batchnorm_buffers(materialize(model, point, calibration)).items():
                tensors[f"{POINT_PREFIX}{point.index}.{key}"] = _plain_tensor(value)
            stored.append(point.index)
    front_dict = front.to_dict()
    for point in front_dict["points"]:
        point["exported"] = None  # where another run wrote its artifacts is not part of the family
    metadata = {FAMILY_METADATA_KEY: json.dumps({"format": FORMAT, "ranks": trained, "front": front_dict,
                                                 "batchnorm_points": stored})}
    return safetensors_bytes(tensors, metadata=metadata)


def save_family(model: nn.Module, front: Front, path: str | Path,
                calibration: Sequence[Batch] | None = None) -> int:
    """Write the family file of ``model`` (trained, factorised, at the ranks of ``front``'s point
    0) and ``front`` to ``path`` atomically; returns its size in bytes.

    The file holds ``model``'s state dict once, at the trained ranks, and the front as JSON in
    the safetensors metadata. For a model with BatchNorm, ``calibration`` (the batches the front
    was built with) is required: the recomputed running statistics of every other point are
    stored too. Any point is then rebuilt with :func:`load_family`.
    """
    data = family_bytes(model, front, calibration)
    write_bytes_atomic(path, data)
    return len(data)


def _read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    info, tensors = read_tagged_safetensors(path, FAMILY_METADATA_KEY, "family file")
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r}: family format {info.get('format')!r} is not {FORMAT}")
    return info, tensors


def load_family_front(path: str | Path) -> Front:
    """The front stored in a family file (choose a point with :meth:`Front.select`)."""
    info, _ = _read(path)
    return Front.from_dict(info["front"])


def load_family(path: str | Path, model: nn.Module | Callable[[], nn.Module],
                point: int | FrontPoint = 0) -> nn.Module:
    """The model at ``point`` (an index into the stored front, or one of its points) of the family
    file at ``path``, in eval mode.

    ``model`` is a freshly factorised model of the trained architecture (the same
    :func:`maestro_lod.factorize` call as for training; any initialisation and ranks up to the
    layers' maximum), or a function building one. It is changed in place and returned: the
    trained weights are loaded strictly (factors resized to the trained ranks), every low-rank
    layer is cut to the point's leading ranks and, with BatchNorm, the point's stored running
    statistics are loaded. The result equals ``materialize(trained_model, point, calibration)``.
    """
    info, tensors = _read(path)
    front = Front.from_dict(info["front"])
    chosen = front.point_at(point, "the family's front")
    index = chosen.index
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise ConfigTypeError(f"model must be a factorised nn.Module or a function building one, "
                                  f"got {type(model).__name__}")
        model = model()
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(f"the model builder returned {type(model).__name__}, not an nn.Module")
    names = [name for name, _ in low_rank_layers(model)]
    if set(names) != set(info["ranks"]):
        missing = sorted(set(info["ranks"]) - set(names))
        raise ConfigError("load_family needs a model factorised like the trained one"
                          + (f"; it lacks the low-rank layers {', '.join(missing)}" if missing else
                             f"; its low-rank layers are {', '.join(names) or '(none)'}"))
    for _, layer in low_rank_layers(model):
        layer.active_rank = None
    state = {key: value for key, value in tensors.items() if not key.startswith(POINT_PREFIX)}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{str(path)!r} does not fit this model: {str(exc).strip().splitlines()[0]}") from None
    truncate_(model, dict(chosen.ranks))
    if index in info["batchnorm_points"]:
        prefix = f"{POINT_PREFIX}{index}."
        buffers = _batchnorm_buffers(model)
        stored = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        if set(stored) != set(buffers):
            raise CheckpointError(f"{str(path)!r}: the BatchNorm statistics of point {index} do not fit this model")
        with torch.no_grad():
            for key, value in stored.items():
                buffers[key].copy_(value)
    return model.eval()
