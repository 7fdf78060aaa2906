"""PNG plots of a run's history: ranks per layer, loss/accuracy curves, parameters/MACs over epochs.

Drawn with matplotlib's object API on an Agg canvas, so no display and no global backend change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..files import write_png_atomic

PLOT_FILES = ("ranks.png", "curves.png", "cost.png")
LEGEND_LIMIT = 12
"""Layers beyond this many are drawn without a legend entry each (the plot stays readable)."""


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)  # attaches the Agg canvas that savefig renders with
    figure.tight_layout()
    write_png_atomic(figure, path, dpi=110)


def plot_ranks(history: list[dict[str, Any]], path: Path) -> None:
    """Rank of every factorised layer per epoch (and the total on a second axis)."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    epochs = [r["epoch"] for r in history]
    names = list(history[-1]["ranks"]) if history else []
    for name in names:
        ranks = [r["ranks"].get(name) for r in history]
        axes.plot(epochs, ranks, marker="." if len(epochs) < 40 else None,
                  label=name if len(names) <= LEGEND_LIMIT else None)
    axes.set_xlabel("epoch")
    axes.set_ylabel("rank")
    axes.set_title("rank per layer" if names else "rank per layer (no factorised layers)")
    if names and len(names) <= LEGEND_LIMIT:
        axes.legend(fontsize="small", loc="upper right")
    total = axes.twinx()
    total.plot(epochs, [r["total_rank"] for r in history], color="black", linestyle="--", label="total")
    total.set_ylabel("total rank (dashed)")
    _save(figure, path)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training and validation loss; training and validation accuracy (and perplexity if present)."""
    epochs = [r["epoch"] for r in history]
    has_ppl = "val_perplexity" in history[-1]
    figure = Figure(figsize=(11 if has_ppl else 9, 4))
    panels = figure.subplots(1, 3 if has_ppl else 2)
    loss, accuracy = panels[0], panels[1]
    loss.plot(epochs, [r["train_loss"] for r in history], label="train objective")
    loss.plot(epochs, [r["train_loss_full"] for r in history], label="train CE (full model)")
    loss.plot(epochs, [r["val_loss"] for r in history], label="validation CE")
    loss.set_xlabel("epoch")
    loss.set_ylabel("loss")
    loss.set_yscale("log")
    loss.legend(fontsize="small")
    accuracy.plot(epochs, [100 * r["train_accuracy"] for r in history], label="train")
    accuracy.plot(epochs, [100 * r["val_accuracy"] for r in history], label="validation")
    accuracy.set_xlabel("epoch")
    accuracy.set_ylabel("accuracy (%)")
    accuracy.legend(fontsize="small")
    if has_ppl:
        panels[2].plot(epochs, [r["val_perplexity"] for r in history])
        panels[2].set_xlabel("epoch")
        panels[2].set_ylabel("validation perplexity")
    _save(figure, path)


def plot_cost(history: list[dict[str, Any]], dense_params: int, dense_macs: int, path: Path) -> None:
    """Parameters and MACs per epoch against the dense model's (dashed); for a run with a size
    target, a third panel: the exported cost against the planned trajectory and the target."""
    epochs = [r["epoch"] for r in history]
    targeted = [r for r in history if "planned_cost" in r]
    figure = Figure(figsize=(13 if targeted else 9, 4))
    panels = figure.subplots(1, 3 if targeted else 2)
    for axes, key, dense, label in zip(panels, ("params", "macs"), (dense_params, dense_macs),
                                       ("parameters", "MACs per sample")):
        axes.plot(epochs, [r[key] for r in history], label="model")
        axes.axhline(dense, color="gray", linestyle="--", label="dense model")
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.set_ylim(bottom=0)
        axes.legend(fontsize="small")
    if targeted:
        axes = panels[2]
        shown = [r["epoch"] for r in targeted]
        axes.plot(shown, [r["exported_cost"] for r in targeted], marker=".", label="exported model")
        axes.plot(shown, [r["planned_cost"] for r in targeted], linestyle=":", label="planned")
        axes.axhline(targeted[-1]["target_cost"], color="tab:red", linestyle="--", label="target")
        axes.set_xlabel("epoch")
        axes.set_ylabel("exported cost / dense")
        axes.set_ylim(0, 1.05)
        axes.legend(fontsize="small")
    _save(figure, path)


def write_plots(history: list[dict[str, Any]], dense_params: int, dense_macs: int, directory: Path) -> list[Path]:
    """All three plots into ``directory``; returns their paths."""
    paths = [directory / name for name in PLOT_FILES]
    plot_ranks(history, paths[0])
    plot_curves(history, paths[1])
    plot_cost(history, dense_params, dense_macs, paths[2])
    return paths
