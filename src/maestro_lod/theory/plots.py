"""One figure per demo: for each problem, principal angle, error ratio and learned importance per
rank b, LoD next to the contrast. Drawn with matplotlib's Agg canvas (no display, no global
backend switch) and written atomically."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..files import write_png_atomic
from .experiments import ExperimentResult

LOD_STYLE = {"color": "tab:blue", "marker": "o", "label": "LoD (ordered dropout)"}
CONTRAST_STYLE = {"color": "tab:red", "marker": "x", "label": "contrast (full rank only)"}


def _draw_row(axes, result: ExperimentResult) -> None:
    angle_ax, ratio_ax, importance_ax = axes
    ranks = [row.rank for row in result.lod]
    top = result.problem.values[0].item()
    for rows, style in ((result.lod, LOD_STYLE), (result.contrast, CONTRAST_STYLE)):
        angle_ax.plot(ranks, [max(r.left_angle, r.right_angle) for r in rows], **style)
        ratio_ax.plot(ranks, [r.ratio for r in rows], **style)
        importance_ax.plot(ranks, [r.importance / top for r in rows], **style)
    importance_ax.plot(ranks, [r.singular_value / top for r in result.lod], color="black", linestyle="--",
                       label="σ_b / σ_1 (truth)")
    gaps = set(result.gap_ranks)
    no_gap = [b for b in ranks if b not in gaps]
    spans = [angle_ax.axvspan(b - 0.5, b + 0.5, color="0.85", zorder=0, label="no spectral gap: subspace not unique")
             for b in no_gap]  # the angle means nothing there: every basis of the tie is optimal
    angle_ax.set(title=f"{result.problem.name}: largest principal angle", xlabel="rank b", ylabel="degrees",
                 ylim=(0, 90))
    if spans:
        angle_ax.legend(handles=spans[:1], fontsize="small", loc="lower right")
    ratio_ax.set(title="error / Eckart–Young optimum", xlabel="rank b", yscale="log")
    ratio_ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    importance_ax.set(title="importance ‖u_b v_bᵀ S‖ / σ_1", xlabel="rank b", yscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    importance_ax.legend(fontsize="small")


def save_figure(results: list[ExperimentResult], path: Path) -> None:
    """Draw one row of three panels per result and write a PNG to ``path`` atomically."""
    figure = Figure(figsize=(15, 4.2 * len(results)), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(results), 3, squeeze=False)
    for axes, result in zip(grid, results):
        _draw_row(axes, result)
    write_png_atomic(figure, path)
