"""Checkpoints in one safetensors file: the tensors in the file body, everything else as JSON metadata.

A checkpoint is any nested structure of dicts, lists, tensors and JSON values (the trainer stores the
model and optimiser state dicts, the scheduler and RNG states, the rank pattern and the history).
Tensors are stored under their path in the structure (``model.fc1.up``; a path taken twice, as by
the keys ``"a.b"`` and ``"a": {"b"}``, gets a ``#n`` suffix) and the JSON skeleton refers to them in a
tagged form that no user key can imitate: every dict is ``{"d": {...}}``, every list ``{"l": [...]}``,
every tensor ``{"t": name}``. Loading never unpickles anything. Files are written atomically, so an
interrupted save leaves the previous (last good) checkpoint intact.

:func:`check_trainer_state` tells whether a loaded state fits the run it is meant to continue.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..errors import CheckpointError, ConfigTypeError, MissingFileError
from ..files import write_bytes_atomic
from ..functional import DOWN_RANK_DIM, UP_RANK_DIM
from ..layers import low_rank_layers

METADATA_KEY = "maestro_lod"
FORMAT = 2
"""Format 2: tagged skeleton (this version writes it). Format 1, untagged with ``{"__tensor__": path}``
references, is still read."""
LEGACY_TENSOR_TAG = "__tensor__"
DEPTH_LIMIT = 64
"""Deepest nesting a checkpoint may have (a trainer's state nests about six levels)."""


# --------------------------------------------------------------------------------------- writing
def _tensor_name(path: str, tensors: dict[str, torch.Tensor]) -> str:
    """``path``, or ``path#n`` with the first free n when another tensor already took it."""
    name, count = path or "<root>", 1
    while name in tensors:
        name, count = f"{path}#{count}", count + 1
    return name


def _pack(value: Any, path: str, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    if depth > DEPTH_LIMIT:
        raise ConfigTypeError(f"cannot store a structure nested more than {DEPTH_LIMIT} levels deep (at {path})")
    if isinstance(value, torch.Tensor):
        name = _tensor_name(path, tensors)
        tensors[name] = value.detach().to("cpu").contiguous().clone()
        return {"t": name}
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ConfigTypeError(f"checkpoint dict keys must be strings, got {sorted(map(repr, value))[:3]} at {path or '<root>'}")
        return {"d": {k: _pack(v, f"{path}.{k}" if path else k, tensors, depth + 1) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"l": [_pack(v, f"{path}.{i}", tensors, depth + 1) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigTypeError(f"cannot store a {type(value).__name__} in a checkpoint (at {path or '<root>'})")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (string-keyed dicts, lists, tensors, JSON scalars) to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(state, "", tensors)
    metadata = {METADATA_KEY: json.dumps({"format": FORMAT, "state": skeleton})}
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata=metadata))


# --------------------------------------------------------------------------------------- reading
def _unpack(value: Any, tensors: dict[str, torch.Tensor], where: str, depth: int = 0) -> Any:
    """Format 2 skeleton → structure; anything malformed raises a CheckpointError naming ``where``."""
    if depth > DEPTH_LIMIT:
        raise CheckpointError(f"{where} is nested more than {DEPTH_LIMIT} levels deep")
    if not isinstance(value, dict):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(f"{where} holds an untagged {type(value).__name__}")
    if len(value) != 1 or next(iter(value)) not in ("d", "l", "t"):
        raise CheckpointError(f"{where} holds a malformed entry {str(value)[:60]}")
    (tag, content), = value.items()
    if tag == "t":
        if not isinstance(content, str) or content not in tensors:
            raise CheckpointError(f"{where} refers to a tensor {content!r} that is not in the file")
        return tensors[content]
    if tag == "d" and isinstance(content, dict):
        return {k: _unpack(v, tensors, where, depth + 1) for k, v in content.items()}
    if tag == "l" and isinstance(content, list):
        return [_unpack(v, tensors, where, depth + 1) for v in content]
    raise CheckpointError(f"{where} holds a malformed {tag!r} entry")


def _unpack_legacy(value: Any, tensors: dict[str, torch.Tensor], where: str, depth: int = 0) -> Any:
    """Format 1 skeleton (dicts as they are, ``{"__tensor__": path}`` for tensors) → structure."""
    if depth > DEPTH_LIMIT:
        raise CheckpointError(f"{where} is nested more than {DEPTH_LIMIT} levels deep")
    if isinstance(value, dict):
        if set(value) == {LEGACY_TENSOR_TAG}:
            if value[LEGACY_TENSOR_TAG] not in tensors:
                raise CheckpointError(f"{where} refers to a tensor {value[LEGACY_TENSOR_TAG]!r} that is not in the file")
            return tensors[value[LEGACY_TENSOR_TAG]]
        return {k: _unpack_legacy(v, tensors, where, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack_legacy(v, tensors, where, depth + 1) for v in value]
    return value


def _document(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The JSON document in the file's metadata, checked to be a maestro-lod checkpoint of a known format."""
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not a maestro-lod checkpoint")
    try:
        document = json.loads(metadata[METADATA_KEY])
    except RecursionError:
        raise CheckpointError(f"checkpoint {str(path)!r}: its metadata is nested too deeply to be a checkpoint") from None
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: its metadata is not valid JSON ({exc})") from None
    if not isinstance(document, dict) or "state" not in document:
        raise CheckpointError(f"checkpoint {str(path)!r}: its metadata holds no state")
    if document.get("format") not in (1, FORMAT):
        raise CheckpointError(f"checkpoint {str(path)!r} has format {document.get('format')!r}; "
                              f"this version reads 1 and {FORMAT}")
    return document


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tuples come back as lists)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no checkpoint at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc.strerror or exc}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {exc}") from None
    document = _document(path, metadata)
    unpack = _unpack if document["format"] == FORMAT else _unpack_legacy
    return unpack(document["state"], tensors, f"checkpoint {str(path)!r}")


# ------------------------------------------------------------------------------------ validation
TRAINER_KEYS = ("config", "kind", "epoch", "factorized", "rank_pattern", "initial_ranks", "history", "model",
                "optimizer", "scheduler", "scaler", "rng")
"""What every checkpoint of :class:`~.loop.Trainer` holds (``method`` was added later and is optional)."""


def _factor_rank_dims(model: nn.Module) -> dict[str, tuple[str, int, str, int]]:
    """``{layer name: (up key, its rank dimension, down key, its rank dimension)}`` of the model's
    low-rank layers, keys as in its state dict."""
    state = model.state_dict()
    dims = {}
    for name, _ in low_rank_layers(model):
        up, down = (f"{name}.up", f"{name}.down") if name else ("up", "down")
        dims[name] = (up, UP_RANK_DIM % state[up].dim(), down, DOWN_RANK_DIM % state[down].dim())
    return dims


def _check_tensor_shapes(model_state: Any, model: nn.Module) -> list[str]:
    """Problems of a saved model state dict against ``model`` (freshly built, factorised when the saved
    one was): same names; same shapes, except that a low-rank factor may have shrunk along its rank;
    the two factors of a layer at the same rank."""
    if not isinstance(model_state, dict) or not all(isinstance(v, torch.Tensor) for v in model_state.values()):
        return ["'model' is not a table of tensors"]
    fresh = model.state_dict()
    missing, unexpected = sorted(set(fresh) - set(model_state)), sorted(set(model_state) - set(fresh))
    if missing:
        return [f"tensor(s) missing: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"]
    if unexpected:
        return [f"tensor(s) this model does not have: {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"]
    factors = _factor_rank_dims(model)
    rank_dims = {key: dim for up, up_dim, down, down_dim in factors.values() for key, dim in ((up, up_dim), (down, down_dim))}
    for key, expected in fresh.items():
        saved, rank_dim = model_state[key], rank_dims.get(key)
        fits = saved.dim() == expected.dim() and all(
            s == e or (i == rank_dim and s <= e) for i, (s, e) in enumerate(zip(saved.shape, expected.shape)))
        if not fits or saved.dtype != expected.dtype:
            bound = " (a factor may only be smaller along its rank)" if rank_dim is not None else ""
            return [f"tensor {key!r} is {tuple(saved.shape)} {saved.dtype}, this model's is "
                    f"{tuple(expected.shape)} {expected.dtype}{bound}"]
    for name, (up, up_dim, down, down_dim) in factors.items():
        up_rank, down_rank = model_state[up].shape[up_dim], model_state[down].shape[down_dim]
        if up_rank != down_rank:
            return [f"layer {name!r} has factors of rank {up_rank} ({up}) and {down_rank} ({down})"]
    return []


def _check_optimizer(optimizer_state: Any, model_state: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Problems of a saved optimiser state: per-parameter tensors must have the saved parameter's
    shape (or be scalars, like Adam's step); param groups must list as many parameters as the model has."""
    if not isinstance(optimizer_state, dict) or not isinstance(optimizer_state.get("state"), dict) \
            or not isinstance(optimizer_state.get("param_groups"), list):
        return ["'optimizer' lacks its 'state' table or 'param_groups' list"]
    names = [name for name, _ in model.named_parameters()]
    grouped = [i for group in optimizer_state["param_groups"] if isinstance(group, dict)
               for i in group.get("params", [])]
    if sorted(grouped) != list(range(len(names))):
        return [f"the optimiser covers {len(grouped)} parameters, the model has {len(names)}"]
    for index, entry in optimizer_state["state"].items():
        if not (isinstance(index, str) and index.isdigit() and int(index) < len(names)) or not isinstance(entry, dict):
            return [f"the optimiser holds state for a parameter {index!r} the model does not have"]
        shape = model_state[names[int(index)]].shape
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shape:
                return [f"optimiser state {key!r} of parameter {names[int(index)]!r} has shape "
                        f"{tuple(value.shape)}, the parameter {tuple(shape)}"]
    return []


def _check_rng(rng: Any) -> list[str]:
    """Problems of the saved RNG states: each must have the shape of a state of this PyTorch."""
    if not isinstance(rng, dict) or not {"python", "numpy", "torch", "generators"} <= set(rng):
        return ["'rng' lacks the python, numpy, torch or generators state"]
    reference = torch.get_rng_state()
    states = {"torch": rng["torch"], **({f"generators.{k}": v for k, v in rng["generators"].items()}
                                        if isinstance(rng["generators"], dict) else {"generators": None})}
    for name, state in states.items():
        if not isinstance(state, torch.Tensor) or state.shape != reference.shape or state.dtype != reference.dtype:
            shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            return [f"RNG state {name!r} is {shape}, this PyTorch's are {tuple(reference.shape)} {reference.dtype}"]
    python, numpy = rng["python"], rng["numpy"]
    if not (isinstance(python, list) and len(python) == 3 and isinstance(python[1], list) and len(python[1]) == 625):
        return ["the Python RNG state is malformed"]
    if not (isinstance(numpy, list) and len(numpy) == 5 and isinstance(numpy[1], list) and len(numpy[1]) == 624):
        return ["the NumPy RNG state is malformed"]
    return []


def _check_schedule(scheduler: Any, param_groups: list) -> list[str]:
    """Problems of the saved LR-scheduler state: a step counter and one last rate per param group."""
    if not isinstance(scheduler, dict):
        return ["'scheduler' is not a table"]
    last_epoch, last_lr = scheduler.get("last_epoch"), scheduler.get("_last_lr")
    if isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < 0:
        return [f"the scheduler's step counter {last_epoch!r} is not a count"]
    if not isinstance(last_lr, list) or len(last_lr) != len(param_groups) \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in last_lr):
        return [f"the scheduler's last rates {last_lr!r} do not match {len(param_groups)} param group(s)"]
    return []


def _check_progress(state: dict[str, Any], epochs: int) -> list[str]:
    """Problems of the saved epoch counter and history against the run's ``epochs``."""
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= epochs:
        return [f"epoch {epoch!r} is outside 0..{epochs}"]
    history = state["history"]
    if not isinstance(history, list) or len(history) != epoch or not all(isinstance(r, dict) for r in history):
        count = len(history) if isinstance(history, list) else type(history).__name__
        return [f"the history holds {count} records for {epoch} epochs"]
    if [r.get("epoch") for r in history] != list(range(1, epoch + 1)):
        return ["the history's epochs are not 1.." + str(epoch)]
    if not all(isinstance(r.get("val_loss"), (int, float)) and math.isfinite(r["val_loss"]) for r in history):
        return ["the history holds a non-finite validation loss"]
    return []


def check_trainer_state(state: Any, model: nn.Module, epochs: int, where: str = "checkpoint") -> None:
    """Refuse a trainer state (:meth:`~.loop.Trainer.state_dict` output) that does not fit a run of
    ``epochs`` epochs of ``model``: the freshly built model, factorised when the state says it was.

    Checks the keys, the model tensors' names and shapes (a factor may be smaller along its rank
    than the fresh one, never larger; the two factors of a layer agree), the optimiser state's
    shapes, the RNG states, the epoch range and the history's length. Raises a CheckpointError
    ``"<where> does not fit this run: <first mismatch>"``.
    """
    problems: list[str]
    if not isinstance(state, dict):
        problems = [f"it holds a {type(state).__name__}, not a trainer state"]
    elif missing := [key for key in TRAINER_KEYS if key not in state]:
        problems = [f"it lacks {', '.join(missing)}"]
    elif not isinstance(state["factorized"], bool) or not isinstance(state["config"], dict):
        problems = ["its 'factorized' flag or 'config' table is malformed"]
    else:
        problems = (_check_progress(state, epochs) or _check_tensor_shapes(state["model"], model)
                    or _check_optimizer(state["optimizer"], state["model"], model)
                    or _check_schedule(state["scheduler"], state["optimizer"]["param_groups"]) or _check_rng(state["rng"]))
    if problems:
        raise CheckpointError(f"{where} does not fit this run: {problems[0]}")
