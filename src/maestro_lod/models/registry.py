"""The name → builder registry behind ``build_model`` and the checks builders share."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from ..data import TaskData
from ..errors import ConfigError, ConfigTypeError
from ..registry import Registry

Builder = Callable[..., nn.Module]
MODELS = Registry("model")
register_model = MODELS.register  # decorator: ``@register_model("name")`` on ``builder(data, **options)``
available_models = MODELS.names


def model_options(name: str) -> list[str]:
    """The keyword options a registered model accepts (its builder's parameters after ``data``)."""
    return list(inspect.signature(MODELS.lookup(name)).parameters)[1:]


def build_model(name: str, data: TaskData, **options) -> nn.Module:
    """A dense (unfactorised) model ``name`` sized for ``data`` (classes, input shape, vocabulary).

    Unknown names or options and models that cannot handle ``data`` raise ValueError.
    """
    accepted = model_options(name)
    if not isinstance(data, TaskData):
        raise ConfigTypeError(f"build_model expects a TaskData, got {type(data).__name__}")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"model {name!r} has no option(s) {', '.join(unknown)}; "
                         f"options: {', '.join(accepted) or 'none'}")
    return MODELS[name](data, **options)


def require_kind(model: str, data: TaskData, kind: str) -> None:
    """Refuse a dataset of the wrong kind, naming both."""
    if data.kind != kind:
        raise ConfigError(f"model {model!r} needs {kind} data, but dataset {data.name!r} is {data.kind}")


def require_image_shape(model: str, data: TaskData, min_size: int = 1) -> tuple[int, int, int]:
    """``(channels, height, width)`` of a classification dataset whose images are at least ``min_size``."""
    require_kind(model, data, "classification")
    shape = data.input_shape
    if shape is None or len(shape) != 3 or min(shape[1:]) < min_size:
        raise ConfigError(f"model {model!r} needs (channels, height, width) images of at least {min_size}x{min_size}, "
                         f"but dataset {data.name!r} has input_shape {shape}")
    return shape


def check_dropout(value: object) -> float:
    """A dropout probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"dropout={value!r} must be a number in [0, 1)")
    return float(value)
