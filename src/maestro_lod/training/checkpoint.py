"""Checkpoints in one safetensors file: the tensors in the file body, everything else as JSON metadata.

A checkpoint is any nested structure of dicts, lists, tensors and JSON values (the trainer stores the
model and optimiser state dicts, the scheduler and RNG states, the rank pattern and the history).
Tensors are stored under their path in the structure and replaced by a reference in the JSON
skeleton; loading never unpickles anything. Files are written atomically, so an interrupted save
leaves the previous (last good) checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..errors import CheckpointError, ConfigTypeError, MissingFileError
from ..files import write_bytes_atomic

METADATA_KEY = "maestro_lod"
FORMAT = 1
TENSOR_TAG = "__tensor__"


def _pack(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu").contiguous().clone()
        return {TENSOR_TAG: path}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ConfigTypeError(f"checkpoint dict keys must be strings, got {sorted(map(repr, value))[:3]} at {path or '<root>'}")
        return {k: _pack(v, f"{path}.{k}" if path else k, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_pack(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigTypeError(f"cannot store a {type(value).__name__} in a checkpoint (at {path or '<root>'})")


def _unpack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {TENSOR_TAG}:
            return tensors[value[TENSOR_TAG]]
        return {k: _unpack(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    return value


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (string-keyed dicts, lists, tensors, JSON scalars) to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(state, "", tensors)
    metadata = {METADATA_KEY: json.dumps({"format": FORMAT, "state": skeleton})}
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata=metadata))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tuples come back as lists)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no checkpoint at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {exc}") from None
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not a maestro-lod checkpoint")
    document = json.loads(metadata[METADATA_KEY])
    if document.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {document.get('format')!r}; this version reads {FORMAT}")
    return _unpack(document["state"], tensors)
