"""The cells' numbers summarised: mean ± std over seeds per (task, method, grid point), and the
Markdown table of ``results.md``."""

from __future__ import annotations

import statistics
from typing import Any

from .suites import Task
from .sweep import point_label


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict[str, Any]], tasks: list[Task]) -> list[dict[str, Any]]:
    """One row per (task, method, grid point): mean and std over seeds of every number, the exported
    cost as a share of the dense model's, and each seed's final ranks."""
    rows = []
    for task in tasks:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in results:
            if r["task"] == task.name:
                groups.setdefault((r["method"], point_label(r["point"])), []).append(r)
        for (method, _), cells in groups.items():
            row = {"task": task.name, "method": method, "point": dict(cells[0]["point"]), "metric": task.metric,
                   "seeds": len(cells), "ranks": ["/".join(str(v) for v in c["ranks"].values()) or "—" for c in cells]}
            for key in ("accuracy", "perplexity", "params", "macs", "latency_ms", "train_time", "train_macs"):
                values = [c[key] for c in cells if c[key] is not None]
                if values:
                    row[key], row[key + "_std"] = _mean_std(values)
            row["params_ratio"] = row["params"] / cells[0]["dense_params"]
            row["macs_ratio"] = row["macs"] / cells[0]["dense_macs"]
            rows.append(row)
    return rows


def _shown(value: float | int | str) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def markdown(rows: list[dict[str, Any]], grid: dict[str, list[float | int]] | None = None) -> str:
    """The aggregate rows as a Markdown table per task; with a sweep ``grid``, a column per swept key
    ("—" where the key does not apply to the method), the exported cost against dense and the ranks."""
    keys = list(grid or {})
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        metric = task_rows[0]["metric"]
        dense = next((r for r in task_rows if r["method"] == "dense"), None)
        swept = "".join(f" {key} |" for key in keys)
        extra = " params / dense | MACs / dense | final ranks |" if keys else ""
        out += [f"### {task}", "",
                (f"| method |{swept} {'val accuracy (%)' if metric == 'accuracy' else 'val perplexity'} | params | "
                 f"inference MACs |{extra} CPU latency (ms) | train time (s) | train MACs | train MACs / dense |"),
                "|---|" + "---|" * (len(keys) + 7 + (3 if keys else 0))]
        for r in task_rows:
            if metric == "accuracy":
                score = f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}"
            else:
                score = f"{r['perplexity']:.3f} ± {r['perplexity_std']:.3f}"
            ratio = f"{r['train_macs'] / dense['train_macs']:.2f}" if dense else "—"
            values = "".join(f" {_shown(r['point'][key])} |" if key in r["point"] else " — |" for key in keys)
            costs = (f" {r['params_ratio']:.3f} | {r['macs_ratio']:.3f} | {'; '.join(r['ranks'])} |"
                     if keys else "")
            out.append(f"| {r['method']} |{values} {score} | {r['params']:,.0f} | {r['macs']:,.0f} |{costs} "
                       f"{r['latency_ms']:.3f} | {r['train_time']:.1f} ± {r['train_time_std']:.1f} | "
                       f"{r['train_macs']:.3g} | {ratio} |")
        out.append("")
    return "\n".join(out)
