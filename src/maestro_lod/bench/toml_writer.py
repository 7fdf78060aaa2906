"""A TrainConfig as the TOML table ``maestro-lod train --config`` reads: written next to every
bench cell, so each cell can be rerun by hand."""

from __future__ import annotations

import json
from typing import Any

from ..errors import UsageError
from ..training.train_config import TrainConfig


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise UsageError(f"cannot write {value!r} to a TOML config")


def config_toml(config: TrainConfig) -> str:
    """``config`` as a TOML table ``maestro-lod train --config`` reads back to an equal config.
    TOML has no null: a None is left out, which is only right where None is the field's default."""
    defaults = TrainConfig(method=config.method).to_dict()
    lines = []
    for key, value in config.to_dict().items():
        if value is None:
            if defaults[key] is not None:
                raise UsageError(f"{key}=None cannot be written to a TOML config; give it a value")
            continue
        lines.append(f"{key} = {_toml_value(value)}\n")
    return "".join(lines)
