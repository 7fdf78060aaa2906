"""Cells of the benchmark: one (task, method, grid point, seed) each, trained into its own run
directory by the same functions as ``maestro-lod train``, so a cell can be inspected, plotted or
resumed on its own."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MaestroError, UsageError
from ..files import write_text_atomic
from ..runs.directory import CHECKPOINT_FILE, CONFIG_FILE, SUMMARY_FILE
from ..runs.report import result_table
from ..runs.training import train_directory
from ..training.train_config import TrainConfig
from .suites import VARIANTS, Task
from .sweep import applicable, grid_points, point_label
from .toml_writer import config_toml


@dataclass
class Cell:
    """One run of the benchmark: its task, bench method, seed, full config, run directory and the
    grid point (reduced to what applies to the method) it trains."""

    task: Task
    method: str
    seed: int
    config: TrainConfig
    directory: Path
    point: dict[str, float | int] = field(default_factory=dict)


def cell_config(task: Task, method: str, seed: int, max_epochs: int | None,
                point: dict[str, float | int] | None = None) -> TrainConfig:
    """The full TrainConfig of one cell: the task's recipe, the grid ``point`` (already reduced to
    what applies to ``method``), the variant's options, the seed; ``max_epochs`` caps the epochs."""
    name, overrides = VARIANTS[method]
    options = {**task.options, **(point or {}), **overrides, "method": name, "seed": seed, "reference": "none"}
    if max_epochs is not None:
        options["epochs"] = min(options.get("epochs", TrainConfig().epochs), max_epochs)
    epochs = options.get("epochs", TrainConfig().epochs)
    options["svd_finetune_epochs"] = min(options.get("svd_finetune_epochs", 0), epochs - 1)  # one dense epoch at least
    return TrainConfig.from_dict(options)


def plan_cells(tasks: list[Task], methods: list[str], seeds: range, grid: dict[str, list[float | int | str]],
               max_epochs: int | None, out: Path) -> list[Cell]:
    """Every cell, task by task and method by method: one per seed at every distinct grid point that
    applies to the method, in ``out/<task>/<method>[/<point>]/seed<k>``."""
    cells = []
    for task in tasks:
        for method in methods:
            points = {point_label(p): p for p in (applicable(p, method) for p in grid_points(grid))}
            for label, point in points.items():
                base = out / task.name / method / label if label else out / task.name / method
                cells += [Cell(task, method, seed, cell_config(task, method, seed, max_epochs, point),
                               base / f"seed{seed}", point) for seed in seeds]
    return cells


def _saved_config_is(cell: Cell) -> bool:
    saved = cell.directory / CONFIG_FILE
    if not saved.is_file():
        return False
    try:  # read as a config, so that a file written in an older layout still matches
        return TrainConfig.from_dict(json.loads(saved.read_text())).to_dict() == cell.config.to_dict()
    except (ValueError, TypeError):
        return False


def is_finished(cell: Cell) -> bool:
    """Whether the cell's run finished with the cell's options (its ``summary.json`` written)."""
    return (cell.directory / SUMMARY_FILE).is_file() and _saved_config_is(cell)


def train_cell(cell: Cell, force: bool, say: Callable[..., None] = print) -> None:
    """Train the cell into its directory: continue its interrupted run when the checkpoint there has
    the cell's options (unless ``force``), else start it over (writing ``<directory>.toml``, the
    options for ``maestro-lod train --config``). ``say`` prints the training lines and the closing
    report, as ``maestro-lod train --quiet`` does; a failure is a one-line :class:`UsageError`."""
    resume = not force and (cell.directory / CHECKPOINT_FILE).is_file() and _saved_config_is(cell)
    if not resume:
        cell.directory.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cell.directory.parent / f"{cell.directory.name}.toml", config_toml(cell.config))
    try:
        trained = train_directory(cell.directory, None if resume else cell.config, force=cell.directory.exists(),
                                  quiet=True, say=say)
    except MaestroError as exc:
        raise UsageError(f"cell {cell.directory} failed: {exc}") from None
    say()
    say(result_table(trained.summary, trained.reference))
    say(f"\nrun files: {trained.directory}")
