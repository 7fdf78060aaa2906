"""The files of a run's output directory, written as training goes.

``config.json`` at the start; ``metrics.jsonl`` (one JSON object per epoch) and the checkpoint after
every epoch; the PNG plots and finally ``summary.json``, whose presence marks a finished run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import write_json_atomic, write_text_atomic
from .checkpoint import save_checkpoint
from .loop import Callback, Trainer
from .plots import PLOT_FILES, write_plots

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.safetensors"
SUMMARY_FILE = "summary.json"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE, *PLOT_FILES)


def run_status(directory: Path) -> str:
    """``"finished"`` (has a summary), ``"unfinished"`` (has other run files), or ``"empty"``."""
    if (directory / SUMMARY_FILE).exists():
        return "finished"
    if any((directory / name).exists() for name in RUN_FILES):
        return "unfinished"
    return "empty"


def clear_run_files(directory: Path) -> None:
    """Delete this package's run files from ``directory`` (nothing else in it)."""
    for name in RUN_FILES:
        (directory / name).unlink(missing_ok=True)


class RunDirectory(Callback):
    """Keeps ``directory`` up to date with the run; ``summary_extra`` is merged into summary.json."""

    def __init__(self, directory: str | Path, summary_extra: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self.summary_extra = dict(summary_extra or {})

    def on_fit_start(self, trainer: Trainer) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.directory / CONFIG_FILE, trainer.config.to_dict())

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        lines = "".join(json.dumps(r.to_dict()) + "\n" for r in trainer.history)
        write_text_atomic(self.directory / METRICS_FILE, lines)
        save_checkpoint(self.directory / CHECKPOINT_FILE, trainer.state_dict())

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        write_plots(trainer.history, trainer.dense_params, trainer.dense_macs, self.directory)
        write_json_atomic(self.directory / SUMMARY_FILE, {**summary, **self.summary_extra})
