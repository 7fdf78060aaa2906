"""Command-line helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
from typing import Any


def key_value(text: str) -> tuple[str, Any]:
    """A ``KEY=VALUE`` argument → (key, value): VALUE read as JSON where it is JSON (numbers,
    booleans, lists), else kept as a string (``sampler=suffix``)."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
