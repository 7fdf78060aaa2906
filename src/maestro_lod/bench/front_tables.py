"""The ``fronts`` suite's numbers from its cached curves: the best score within a budget, the mean
gap between two families' curves over a range of budgets, the training cost of each family, and
the Markdown tables.

Budgets and costs are fractions of the dense architecture's exported parameters or MACs. A
family's curve on an axis is the best score any of its models reaches within each budget (a
step function of the budget). Scores: validation accuracy (higher is better) or perplexity (lower
is better); a *gap* is always MAESTRO's advantage, positive where MAESTRO is better (accuracy in
percentage points, MAESTRO minus the family; perplexity, the family minus MAESTRO).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

AXES = ("params", "macs")
BUDGETS = (0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
RANGE = (0.1, 1.0)
"""The budgets a gap is averaged over, on a logarithmic axis."""
TOLERANCE = 1e-9

Point = dict[str, float]
"""``{"params": fraction, "macs": fraction, "score": accuracy or perplexity}``."""


def lower_is_better(metric: str) -> bool:
    return metric == "perplexity"


def normalised(curve: dict[str, Any], metric: str) -> list[Point]:
    """A cached curve's points as fractions of its dense costs, with the task's score."""
    dense = curve["dense"]
    return [{"params": p["params"] / dense["params"], "macs": p["macs"] / dense["macs"], "score": p[metric]}
            for p in curve["points"] if p.get(metric) is not None]


def best_within(points: Sequence[Point], axis: str, budget: float, metric: str) -> float | None:
    """The best score of ``points`` whose ``axis`` fraction is at most ``budget`` (None if none is)."""
    scores = [p["score"] for p in points if p[axis] <= budget + TOLERANCE]
    if not scores:
        return None
    return min(scores) if lower_is_better(metric) else max(scores)


def advantage(maestro: float, other: float, metric: str) -> float:
    """MAESTRO's advantage: percentage points of accuracy, or perplexity saved."""
    return other - maestro if lower_is_better(metric) else 100 * (maestro - other)


def mean_gap(maestro: Sequence[Point], other: Sequence[Point], axis: str, metric: str,
             budgets: tuple[float, float] = RANGE) -> tuple[float | None, float | None]:
    """MAESTRO's mean advantage over ``other`` on a logarithmic budget axis: the exact area
    between the two step curves over the budgets in ``budgets`` where both have a point, divided
    by that range's width in log-budget. Returns (gap, the lowest budget of that range), or
    (None, None) when the curves share no budget in ``budgets``."""
    low, high = budgets
    cheapest = [min((p[axis] for p in points), default=math.inf) for points in (maestro, other)]
    start = max(low, *cheapest)
    if start >= high:
        return None, None
    edges = sorted({start, high, *(p[axis] for p in (*maestro, *other) if start < p[axis] < high)})
    area = 0.0
    for left, right in zip(edges, edges[1:]):
        area += math.log(right / left) * advantage(best_within(maestro, axis, left, metric),
                                                   best_within(other, axis, left, metric), metric)
    return area / math.log(high / start), start


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def shown(values: Sequence[float | None], digits: int = 2, scale: float = 1.0) -> str:
    """``mean ± s.e.`` of ``values``; "—" if any is None (a seed with no model within the budget)."""
    if not values or any(v is None for v in values):
        return "—"
    mean, se = mean_se([scale * v for v in values])
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def budget_table(families: dict[str, list[list[Point]]], axis: str, metric: str,
                 budgets: Sequence[float] = BUDGETS) -> list[dict[str, Any]]:
    """Per family (``{name: [points of seed 0, points of seed 1, ...]}``): the best score within
    every budget (in the order of ``budgets``), per seed."""
    return [{"family": name, "values": [[best_within(points, axis, b, metric) for points in seeds] for b in budgets]}
            for name, seeds in families.items()]


def gap_table(families: dict[str, dict[str, list[list[Point]]]], metric: str, reference: str) -> list[dict[str, Any]]:
    """Per family other than ``reference`` and per axis (``families[axis][name]``: the points of
    every seed): MAESTRO's mean advantage per seed, and the lowest budget from which every seed's
    range is counted."""
    rows = []
    for name in families[AXES[0]]:
        if name == reference:
            continue
        row = {"family": name}
        for axis in AXES:
            pairs = [mean_gap(ours, theirs, axis, metric)
                     for ours, theirs in zip(families[axis][reference], families[axis][name])]
            starts = [s for _, s in pairs if s is not None]
            row[axis] = {"gaps": [g for g, _ in pairs], "from": max(starts, default=None)}
        rows.append(row)
    return rows


def markdown(task: dict[str, Any]) -> str:
    """One task's tables: the score within each budget (params, then MACs), MAESTRO's mean
    advantage over each family, and each family's training cost."""
    metric, seeds = task["metric"], task["seeds"]
    accuracy = metric == "accuracy"
    score = "val accuracy (%)" if accuracy else "val perplexity"
    scale = 100.0 if accuracy else 1.0
    digits = 2 if accuracy else 3
    epochs = f"{task['epochs']} epoch{'s' * (task['epochs'] != 1)}"
    out = [f"### {task['task']} ({epochs}, seed{'s' * (len(seeds) != 1)} {', '.join(map(str, seeds))})", ""]
    trained = task["maestro_trained"]
    out.append(f"MAESTRO's trained model: {shown(trained['params'], 3)} × dense params, "
               f"{shown(trained['macs'], 3)} × dense MACs, {score} {shown(trained['score'], digits, scale)}.")
    out.append("")
    for axis in AXES:
        out += [f"Best {score} within a budget of exported {'parameters' if axis == 'params' else 'MACs'} "
                f"(× dense), mean ± s.e. over seeds:", "",
                "| family | " + " | ".join(f"≤ {b:g}" for b in task["budgets"]) + " |",
                "|---|" + "---|" * len(task["budgets"])]
        for row in task["tables"][axis]:
            cells = [shown(values, digits, scale) for values in row["values"]]
            out.append(f"| {row['family']} | " + " | ".join(cells) + " |")
        out.append("")
    unit = "accuracy points" if accuracy else "perplexity"
    low, high = task["range"]
    out += [f"MAESTRO's mean advantage ({unit}; > 0: MAESTRO better) over budgets {low:g}–{high:g} × dense on a log "
            "axis (from the lowest budget where both curves have a model):", "",
            "| against | params | from | MACs | from |", "|---|---|---|---|---|"]
    for row in task["gaps"]:
        cells = []
        for axis in AXES:
            start = row[axis]["from"]
            cells += [shown(row[axis]["gaps"], 2 if accuracy else 3), "—" if start is None else f"{start:.3g}"]
        out.append(f"| {row['family']} | " + " | ".join(cells) + " |")
    if task.get("same_ranks"):
        out += ["", f"Trained separately at the ranks of a point of MAESTRO's parameter front against that point "
                f"({score}; the point is where cutting MAESTRO's trained model to the share of its parameters lands):",
                "", "| share | params / dense | MACs / dense | trained separately | MAESTRO's point |",
                "|---|---|---|---|---|"]
        for row in task["same_ranks"]:
            seeds_rows = row["seeds"]
            out.append(f"| {row['share']:g} | {shown([r['params'] for r in seeds_rows], 3)} | "
                       f"{shown([r['macs'] for r in seeds_rows], 3)} | "
                       f"{shown([r['separate'] for r in seeds_rows], digits, scale)} | "
                       f"{shown([r['maestro'] for r in seeds_rows], digits, scale)} |")
    out += ["", "Cost of each family per seed (sum over its trainings; search: the greedy searches and their "
            "evaluation):", "", "| family | trainings | train time (s) | train MACs | search (s) |",
            "|---|---|---|---|---|"]
    for row in task["costs"]:
        out.append(f"| {row['family']} | {row['trainings']} | {shown(row['train_time'], 1)} | "
                   f"{statistics.fmean(row['train_macs']):.3g} | {shown(row['search_time'], 1)} |")
    out.append("")
    return "\n".join(out)
