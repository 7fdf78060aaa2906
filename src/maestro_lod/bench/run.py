"""A whole benchmark: plan the cells, train those not finished, measure every one, and write
``results.json``, ``results.md`` and the figures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..files import check_output_directory, write_json_atomic, write_text_atomic
from .aggregate import aggregate, markdown
from .cells import Cell, is_finished, plan_cells, train_cell
from .measure import measure
from .plots import plot, plot_sweep
from .suites import SUITES, VARIANTS
from .sweep import SWEEP_METHODS, point_label

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
SEED_LIMIT = 1000
"""Most seeds a benchmark runs (``seeds`` counts them: seeds 0..seeds-1)."""
REPEAT_LIMIT = 100_000
"""Most timed passes per latency."""


def _check_names(what: str, names: list[str] | None) -> None:
    if names is None:
        return
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise UsageError(f"{what} must be a list of names, got {names!r}")
    if not names:
        raise UsageError(f"{what} is empty; give at least one name or leave it out for the suite's")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"{what} lists {', '.join(repeated)} more than once")


def _check_count(what: str, value: int | None, low: int, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{what} {value!r} must be an int from {low} to {high:,}")


def check_bench_arguments(suite: str, out: str | Path | None, methods: list[str] | None, tasks: list[str] | None,
                          seeds: int | None, epochs: int | None, repeats: int) -> None:
    """Every argument of :func:`run_bench`, checked before anything is trained or written."""
    if suite not in SUITES:
        raise UsageError(f"unknown suite {suite!r}; known: {', '.join(sorted(SUITES))}")
    _check_names("--methods", methods)
    _check_names("--tasks", tasks)
    _check_count("--seeds (a number of seeds: 0..N-1)", seeds, 1, SEED_LIMIT)
    _check_count("--repeats", repeats, 1, REPEAT_LIMIT)
    _check_count("--epochs", epochs, 1, 1_000_000)
    if out is not None:
        check_output_directory(out, "--out")


@dataclass
class BenchResult:
    """What :func:`run_bench` measured and wrote: the cells, each cell's numbers (``results``), the
    aggregate rows, the Markdown table and the directory holding them all."""

    out: Path
    grid: dict[str, list[float | int | str]]
    cells: list[Cell]
    results: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    table: str

    @property
    def files(self) -> tuple[Path, Path]:
        """``results.json`` and ``results.md``."""
        return self.out / RESULTS_FILE, self.out / TABLE_FILE


def run_bench(suite: str = "quick", out: str | Path | None = None, *, methods: list[str] | None = None,
              tasks: list[str] | None = None, seeds: int | None = None, epochs: int | None = None,
              repeats: int = 50, grid: dict[str, list[float | int | str]] | None = None, force: bool = False,
              say: Callable[..., None] = print) -> BenchResult:
    """Train and compare the cells of ``suite`` (see :data:`~maestro_lod.bench.suites.SUITES`) in
    ``out`` (default ``runs/bench-<suite>``), as ``maestro-lod bench`` does.

    ``methods`` and ``tasks`` select cells (default: all of the suite's; with a ``grid``, dense and
    MAESTRO), ``seeds`` runs seeds 0..seeds-1 (default: the suite's), ``epochs`` caps every task's
    epochs, ``repeats`` is the number of timed passes per latency. ``grid`` (from
    :func:`~maestro_lod.bench.sweep.parse_sweep`) trains every point of a sweep as cells of their
    own. A finished cell is measured without training it again unless ``force``; an interrupted one
    continues from its checkpoint. ``say`` prints one line per cell and the cells' training lines.
    An unknown, repeated or empty list of methods or tasks, ``seeds``, ``repeats`` or ``epochs`` below
    1 (or absurdly large), or an ``out`` that cannot be a writable directory is a one-line
    :class:`UsageError` before any cell is trained or any file written; ``results.json`` and
    ``results.md`` are replaced atomically at the end."""
    check_bench_arguments(suite, out, methods, tasks, seeds, epochs, repeats)
    chosen = SUITES[suite]
    grid = grid or {}
    selected = [t for t in chosen.tasks if tasks is None or t.name in tasks]
    methods = methods or list(SWEEP_METHODS if grid else chosen.methods)
    unknown = sorted(set(methods) - set(VARIANTS)) + sorted(set(tasks or ()) - {t.name for t in chosen.tasks})
    if unknown:
        raise UsageError(f"unknown method(s) or task(s) for suite {suite!r}: {', '.join(unknown)}")
    out = Path(out or f"runs/bench-{suite}")
    check_output_directory(out, "--out")
    if not selected:
        raise UsageError(f"no task of suite {suite!r} selected")
    cells = plan_cells(selected, methods, range(seeds if seeds is not None else chosen.seeds), grid, epochs, out)
    results = []
    for number, cell in enumerate(cells, start=1):
        done = is_finished(cell) and not force
        where = f" {point_label(cell.point)}" if cell.point else ""
        say(f"[{number}/{len(cells)}] {cell.task.name} {cell.method}{where} seed {cell.seed}"
            f"{' (done)' if done else ''}", flush=True)
        if not done:
            train_cell(cell, force, say)
        results.append(measure(cell, repeats))
    rows = aggregate(results, selected)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULTS_FILE, {"suite": suite, "torch": torch.__version__, "sweep": grid,
                                           "cells": results, "aggregate": rows})
    table = markdown(rows, grid)
    write_text_atomic(out / TABLE_FILE, table)
    plot(rows, out)
    if grid:
        plot_sweep(rows, grid, out)
    return BenchResult(out, grid, cells, results, rows, table)
