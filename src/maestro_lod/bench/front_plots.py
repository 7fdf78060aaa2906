"""``fronts.png``: one row per task, the best score within a budget of exported parameters (left)
and of exported MACs (right), one curve per family (mean over seeds, where every seed has a model
within the budget)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..files import write_png_atomic
from .front_tables import AXES, best_within
from .plots import _figure

LOWEST = 0.02
SAMPLES = 300
ZOOM = 20.0
"""Accuracy points shown below the best (lower parts of the curves are cut off)."""


def plot_fronts(tasks: list[dict[str, Any]], path: Path) -> None:
    """Draw every task's family curves (``task["families"][axis][family]``: the points of every seed)."""
    figure = _figure(2, len(tasks))
    budgets = [LOWEST * (1 / LOWEST) ** (i / (SAMPLES - 1)) for i in range(SAMPLES)]
    for row, task in enumerate(tasks):
        metric = task["metric"]
        scale = 100.0 if metric == "accuracy" else 1.0
        for column, axis in enumerate(AXES):
            axes = figure.add_subplot(len(tasks), 2, 2 * row + column + 1)
            for family, seeds in task["families"][axis].items():
                xs, ys = [], []
                for budget in budgets:
                    values = [best_within(points, axis, budget, metric) for points in seeds]
                    if all(v is not None for v in values):
                        xs.append(budget)
                        ys.append(scale * statistics.fmean(values))
                if xs:
                    axes.plot(xs, ys, drawstyle="steps-post", label=family)
            axes.set_xscale("log")
            axes.set_xlabel(f"exported {'parameters' if axis == 'params' else 'MACs'} budget (× dense)")
            axes.set_ylabel("best val accuracy (%)" if metric == "accuracy" else "best val perplexity")
            if metric == "accuracy":
                tops = [y for line in axes.get_lines() for y in line.get_ydata()]
                if tops:
                    high = max(tops)
                    axes.set_ylim(max(min(tops), high - ZOOM) - 0.5, math.ceil(high + 0.5))
            axes.set_title(f"{task['task']}: by {axis} ({len(task['seeds'])} seed{'s' * (len(task['seeds']) > 1)})")
            axes.grid(alpha=0.3, which="both")
            axes.legend(fontsize=7)
    figure.tight_layout()
    write_png_atomic(figure, path, dpi=110)
