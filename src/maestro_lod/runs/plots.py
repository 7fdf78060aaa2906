"""PNG plots of a run's history: ranks per layer, loss/accuracy curves, parameters/MACs over epochs.

Drawn with matplotlib's object API on an Agg canvas, so no display and no global backend change.
Every curve has markers while there are few epochs (a one-epoch run is one point per curve); the
ranks plot is drawn only for runs with factorised layers, as lines with a legend up to
:data:`LEGEND_LIMIT` layers and as a labelled heat map beyond.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..files import write_png_atomic

PLOT_FILES = ("ranks.png", "curves.png", "cost.png")
LEGEND_LIMIT = 8
"""Most layers drawn as lines with a legend; more are drawn as a heat map, one labelled row each."""
MARKER_LIMIT = 40
"""Curves of runs with fewer epochs than this get a marker per epoch."""


def _marker(epochs: list[int]) -> str | None:
    return "o" if len(epochs) < MARKER_LIMIT else None


def _epoch_axis(axes: Any) -> None:
    """Label the x axis "epoch" with whole-number ticks only."""
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)  # attaches the Agg canvas that savefig renders with
    figure.tight_layout()
    write_png_atomic(figure, path, dpi=110)


def has_ranks(history: list[dict[str, Any]]) -> bool:
    """Whether the run had factorised layers (a dense run has none: no ranks plot)."""
    return any(r.get("ranks") for r in history)


def plot_ranks(history: list[dict[str, Any]], path: Path) -> None:
    """Rank of every factorised layer per epoch: lines (and the total on a second axis) with a
    legend for up to :data:`LEGEND_LIMIT` layers, else a heat map of each layer's rank relative to
    its first, one row per layer labelled with its name and ranks first → last."""
    epochs = [r["epoch"] for r in history]
    names = list(dict.fromkeys(name for r in history for name in r.get("ranks", {})))
    if len(names) > LEGEND_LIMIT:
        _rank_heat_map(history, epochs, names, path)
        return
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for name in names:
        ranks = [r.get("ranks", {}).get(name) for r in history]
        axes.plot(epochs, [float("nan") if v is None else v for v in ranks], marker=_marker(epochs), label=name)
    _epoch_axis(axes)
    axes.set_ylabel("rank")
    axes.set_title("rank per layer")
    if names:
        axes.legend(fontsize="small", loc="upper right")
    total = axes.twinx()
    total.plot(epochs, [r["total_rank"] for r in history], color="black", linestyle="--", marker=_marker(epochs))
    total.set_ylabel("total rank (dashed)")
    _save(figure, path)


def _rank_heat_map(history: list[dict[str, Any]], epochs: list[int], names: list[str], path: Path) -> None:
    import numpy as np

    values = np.full((len(names), len(epochs)), np.nan)
    labels = []
    for row, name in enumerate(names):
        ranks = [r.get("ranks", {}).get(name) for r in history]
        known = [v for v in ranks if v is not None]
        first = known[0] if known else 1
        values[row] = [np.nan if v is None else v / max(first, 1) for v in ranks]
        labels.append(f"{name} ({known[0]}→{known[-1]})" if known else name)
    figure = Figure(figsize=(9, 1.5 + 0.28 * len(names)))
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                        extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(names) - 0.5, -0.5))
    axes.set_yticks(range(len(names)), labels, fontsize="small")
    _epoch_axis(axes)
    axes.set_title(f"rank per layer ({len(names)} layers; total {history[0]['total_rank']} → "
                   f"{history[-1]['total_rank']})")
    figure.colorbar(image, ax=axes, label="rank / first rank")
    _save(figure, path)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training and validation loss; training and validation accuracy (and perplexity if present)."""
    epochs = [r["epoch"] for r in history]
    has_ppl = "val_perplexity" in history[-1]
    figure = Figure(figsize=(11 if has_ppl else 9, 4))
    panels = figure.subplots(1, 3 if has_ppl else 2)
    loss, accuracy = panels[0], panels[1]
    marker = _marker(epochs)
    loss.plot(epochs, [r["train_loss"] for r in history], marker=marker, label="train objective")
    loss.plot(epochs, [r["train_loss_full"] for r in history], marker=marker, label="train CE (full model)")
    loss.plot(epochs, [r["val_loss"] for r in history], marker=marker, label="validation CE")
    _epoch_axis(loss)
    loss.set_ylabel("loss")
    loss.set_yscale("log")
    loss.legend(fontsize="small")
    accuracy.plot(epochs, [100 * r["train_accuracy"] for r in history], marker=marker, label="train")
    accuracy.plot(epochs, [100 * r["val_accuracy"] for r in history], marker=marker, label="validation")
    _epoch_axis(accuracy)
    accuracy.set_ylabel("accuracy (%)")
    accuracy.legend(fontsize="small")
    if has_ppl:
        panels[2].plot(epochs, [r["val_perplexity"] for r in history], marker=marker)
        _epoch_axis(panels[2])
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
        axes.plot(epochs, [r[key] for r in history], marker=_marker(epochs), label="model")
        axes.axhline(dense, color="gray", linestyle="--", label="dense model")
        _epoch_axis(axes)
        axes.set_ylabel(label)
        axes.set_ylim(bottom=0)
        axes.legend(fontsize="small")
    if targeted:
        axes = panels[2]
        shown = [r["epoch"] for r in targeted]
        axes.plot(shown, [r["exported_cost"] for r in targeted], marker=".", label="exported model")
        axes.plot(shown, [r["planned_cost"] for r in targeted], linestyle=":", label="planned")
        axes.axhline(targeted[-1]["target_cost"], color="tab:red", linestyle="--", label="target")
        _epoch_axis(axes)
        axes.set_ylabel("exported cost / dense")
        axes.set_ylim(0, 1.05)
        axes.legend(fontsize="small")
    _save(figure, path)


def write_plots(history: list[dict[str, Any]], dense_params: int, dense_macs: int, directory: Path) -> list[Path]:
    """The plots into ``directory`` (the ranks plot only when the run had factorised layers);
    returns their paths."""
    ranks, curves, cost = (directory / name for name in PLOT_FILES)
    paths = [ranks] if has_ranks(history) else []
    if paths:
        plot_ranks(history, ranks)
    plot_curves(history, curves)
    plot_cost(history, dense_params, dense_macs, cost)
    return paths + [curves, cost]
