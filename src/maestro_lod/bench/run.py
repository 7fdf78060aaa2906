"""A whole benchmark: plan the cells, train those not finished, measure every one, and write
``results.json``, ``results.md`` and the figures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..files import write_json_atomic, write_text_atomic
from .aggregate import aggregate, markdown
from .cells import Cell, is_finished, plan_cells, train_cell
from .measure import measure
from .plots import plot, plot_sweep
from .suites import SUITES, VARIANTS
from .sweep import SWEEP_METHODS, point_label

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"


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
    An unknown method or task or ``epochs < 1`` is a one-line :class:`UsageError` before any cell
    is trained."""
    chosen = SUITES[suite]
    grid = grid or {}
    selected = [t for t in chosen.tasks if tasks is None or t.name in tasks]
    methods = methods or list(SWEEP_METHODS if grid else chosen.methods)
    unknown = sorted(set(methods) - set(VARIANTS)) + sorted(set(tasks or ()) - {t.name for t in chosen.tasks})
    if unknown:
        raise UsageError(f"unknown method(s) or task(s) for suite {suite!r}: {', '.join(unknown)}")
    if epochs is not None and epochs < 1:
        raise UsageError(f"--epochs {epochs} must be at least 1")
    out = Path(out or f"runs/bench-{suite}")
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
