"""The benchmark's figures: ``accuracy-vs-macs.png`` and ``training-cost.png`` (one marker per
method, a panel per task) and, for a sweep, ``sweep.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import write_png_atomic
from .sweep import axis_value, point_label


def _figure(panels: int, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * panels, 4 * rows))
    FigureCanvasAgg(figure)
    return figure


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    """accuracy-vs-macs.png (one marker per method, a panel per task) and training-cost.png."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for filename, x_key, x_label in (("accuracy-vs-macs.png", "macs", "inference MACs (exported)"),
                                     ("training-cost.png", "train_macs", "training MACs")):
        figure = _figure(len(tasks))
        for index, task in enumerate(tasks, start=1):
            axes = figure.add_subplot(1, len(tasks), index)
            for r in (r for r in rows if r["task"] == task):
                y = 100 * r["accuracy"] if r["metric"] == "accuracy" else r["perplexity"]
                label = r["method"] + (f" {point_label(r['point'])}" if r["point"] else "")
                axes.scatter(r[x_key], y, label=label)
            axes.set_xscale("log")
            axes.set_xlabel(x_label)
            metric = next(r["metric"] for r in rows if r["task"] == task)
            axes.set_ylabel("val accuracy (%)" if metric == "accuracy" else "val perplexity")
            axes.set_title(task)
            axes.legend(fontsize=6)
        figure.tight_layout()
        write_png_atomic(figure, out / filename, dpi=110)


def plot_sweep(rows: list[dict[str, Any]], grid: dict[str, list[float | int]], out: Path) -> None:
    """sweep.png, one row of two panels per task: the score, and the exported parameters (solid) and
    MACs (dashed) as shares of the dense model's, against λ (or the first swept key; a size target
    by its fraction), one line per method and value of the other swept keys. The dense model is a
    horizontal line in both panels."""
    x_key = "lambda_gl" if "lambda_gl" in grid else next(iter(grid))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    figure = _figure(2, len(tasks))
    for index, task in enumerate(tasks):
        task_rows = [r for r in rows if r["task"] == task]
        metric = task_rows[0]["metric"]
        score = (lambda r: 100 * r["accuracy"]) if metric == "accuracy" else (lambda r: r["perplexity"])
        accuracy, cost = figure.add_subplot(len(tasks), 2, 2 * index + 1), figure.add_subplot(len(tasks), 2, 2 * index + 2)
        series: dict[str, list[dict[str, Any]]] = {}
        for r in task_rows:
            if x_key in r["point"]:
                rest = {k: v for k, v in r["point"].items() if k != x_key}
                series.setdefault(r["method"] + (f", {point_label(rest)}" if rest else ""), []).append(r)
        for label, points in series.items():
            points.sort(key=lambda r: axis_value(r["point"][x_key]))
            xs = [axis_value(r["point"][x_key]) for r in points]
            line, = accuracy.plot(xs, [score(r) for r in points], "o-", label=label)
            cost.plot(xs, [r["params_ratio"] for r in points], "o-", color=line.get_color(), label=f"{label}: params")
            cost.plot(xs, [r["macs_ratio"] for r in points], "s--", color=line.get_color(), label=f"{label}: MACs")
        dense = next((r for r in task_rows if r["method"] == "dense"), None)
        if dense is not None:
            accuracy.axhline(score(dense), color="black", linestyle=":", label="dense")
        cost.axhline(1.0, color="black", linestyle=":", label="dense")
        for axes in (accuracy, cost):
            positive = [v for v in map(axis_value, grid[x_key]) if v > 0]
            if positive and len(positive) < len(grid[x_key]):
                axes.set_xscale("symlog", linthresh=min(positive))
            elif positive and max(positive) / min(positive) > 10:
                axes.set_xscale("log")
            axes.set_xlabel(f"{x_key} (fraction of the dense cost)" if x_key == "target" else x_key)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=6)
        accuracy.set_ylabel("val accuracy (%)" if metric == "accuracy" else "val perplexity")
        accuracy.set_title(task)
        cost.set_ylabel("exported cost / dense")
        cost.set_title(f"{task}: exported size")
    figure.tight_layout()
    write_png_atomic(figure, out / "sweep.png", dpi=110)
