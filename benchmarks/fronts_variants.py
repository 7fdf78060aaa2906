"""MAESTRO's front on a ``fronts``-suite task with one recipe change, beside the suite's own.

Trains the task's MAESTRO cell with ``--set KEY=VALUE`` options over the task's recipe (and over
MAESTRO's own options on the task) into ``OUT/<task>/<name>/seed<k>`` (resumed or skipped like the
suite's cells), searches its fronts by parameters and by MACs exactly as ``maestro-lod bench
--suite fronts`` does (cached beside the suite's curves; ``--order`` orders the trained ranks of
both cells another way than the task does), and prints, per budget, the mean ± standard error
over the seeds of the variant and of the suite's ``maestro`` cell (trained and searched first when
missing), with each one's trained model (accuracy, size, training seconds) and the variant's
difference from the suite's cell seed by seed (both cells of a seed share its data split and
initialisation, so the paired difference has a smaller error than the two means apart).
``--pufferfish`` also trains the suite's Pufferfish cells at the same seeds and compares both cells
with each Pufferfish model at its own size, paired by seed. ``--no-fronts`` compares the trained
models only (minutes instead of the searches' tens of minutes). Writes the figures, options,
machine, torch version and date to JSON (``benchmarks/results/fronts_variants-<task>-<name>.json``).

    python benchmarks/fronts_variants.py --task cnn4-mnist5k --name maestro-e12 --set epochs=12 --share 0
    python benchmarks/fronts_variants.py --task cnn4-mnist5k --name maestro-nogl --set lambda_gl=0 --no-fronts
    python benchmarks/fronts_variants.py --task cnn4-mnist5k --name maestro-recipe-budget --set sampler=budget --share 0 --order canonical
    python benchmarks/fronts_variants.py --task cnn4-mnist5k --name maestro-recipe-eighth-batch-norecal --set sampled_batch=0.125 --set bn_recal_batches=0 --share 0 --seeds 5 --pufferfish
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from cli_options import key_value

import maestro_lod.bench.front_curves as front_curves
from maestro_lod.bench.fronts import PUFFERFISH, TASKS, FrontsResult, Runner, pufferfish_cell
from maestro_lod.bench.suites import Task
from maestro_lod.bench.front_tables import BUDGETS, Point, best_within, lower_is_better, normalised, shown
from maestro_lod.files import write_json_atomic
from maestro_lod.tables import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=[t.name for t in TASKS], default="cnn4-mnist5k")
    parser.add_argument("--name", required=True, help="the variant's cell name (a folder under OUT/<task>)")
    parser.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                        help="an option over the task's recipe (repeatable)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-fronts"))
    parser.add_argument("--share", type=float, default=None,
                        help="the lazy search's share per round (default: the search's; 0: one removal per round)")
    parser.add_argument("--order", choices=front_curves.ORDERINGS, default=None,
                        help="how the trained ranks are ordered before both searches (default: the task's, "
                             "as the suite orders them; another order caches its curves under its own name)")
    parser.add_argument("--pufferfish", action="store_true",
                        help="compare both cells with the suite's Pufferfish models (trained when missing)")
    parser.add_argument("--no-fronts", action="store_true", help="compare the trained models only")
    parser.add_argument("--json", type=Path, default=None,
                        help="default: benchmarks/results/fronts_variants-<task>-<name>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.share is not None:
        front_curves.SHARE = args.share
    task = next(t for t in TASKS if t.name == args.task)
    order = args.order or task.maestro_order
    metric = task.metric
    scale = 1.0 if lower_is_better(metric) else 100.0
    runner = Runner(args.out, None, False, print, FrontsResult(args.out))
    result: dict[str, Any] = {"task": task.name, "variant": args.name, "options": dict(args.set),
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                              "machine": platform.platform(), "share": front_curves.SHARE, "order": order,
                              "cells": {}}
    searched: dict[str, dict[str, list[list[Point]]]] = {}
    total = args.seeds * (2 + len(PUFFERFISH) * (args.pufferfish and not args.no_fronts))
    for name, options in (("maestro", task.maestro), (args.name, {**task.maestro, **dict(args.set)})):
        trained, curves = [], {axis: [] for axis in ("params", "macs")}
        searched[name] = {axis: [] for axis in curves}
        cached = name if order == task.maestro_order else f"{name}-{order}"  # the suite's curves stay its own
        for seed in range(args.seeds):
            cell = runner.cell(task, name, "maestro", seed, total, options)
            trained.append(json.loads((cell.directory / "summary.json").read_text()))
            if args.no_fronts:
                continue
            for axis in curves:
                curve = front_curves.front_curve(cell.directory, runner.curve_path(task, seed, f"{cached}-{axis}"),
                                                 order, axis)
                searched[name][axis].append(normalised(curve, metric))
                curves[axis].append([best_within(searched[name][axis][-1], axis, b, metric) for b in BUDGETS])
        final = "final_perplexity" if lower_is_better(metric) else "final_accuracy"
        result["cells"][name] = {
            "trained": [t[final] for t in trained], "params": [t["params_ratio"] for t in trained],
            "train_s": [t["train_time"] for t in trained], "fronts": curves}
    rows = [("cell", f"trained {metric}", "params (× dense)", "training s (median)")]
    for name, cell in result["cells"].items():
        rows.append((name, shown(cell["trained"], scale=scale), f"{statistics.fmean(cell['params']):.3f}",
                     f"{statistics.median(cell['train_s']):.0f}"))
    suite, variant = result["cells"]["maestro"], result["cells"][args.name]
    rows.append(("difference, seed by seed", shown(differences(variant["trained"], suite["trained"]), scale=scale),
                 "", ""))
    print(f"\n{task.name}, {args.seeds} seed(s): the trained models")
    print(format_table(rows))
    if not args.no_fronts:
        for axis in ("params", "macs"):
            rows = [(f"{axis} ≤ (× dense)", *(f"{b:g}" for b in BUDGETS))]
            for name, cell in result["cells"].items():
                rows.append((name, *(shown([seed[i] for seed in cell["fronts"][axis]], scale=scale)
                                     for i in range(len(BUDGETS)))))
            by_budget = zip(zip(*variant["fronts"][axis]), zip(*suite["fronts"][axis]))  # per budget, the seeds
            rows.append(("difference, seed by seed", *(shown(differences(v, m), scale=scale) for v, m in by_budget)))
            print(f"\nbest val {metric} within a {axis} budget, mean ± s.e. over seeds")
            print(format_table(rows))
        if args.pufferfish:
            result["pufferfish"] = against_pufferfish(runner, task, args.seeds, total, searched, metric)
            print(f"\nat each Pufferfish model's own size: its val {metric} and each cell's best within that size "
                  f"minus it, seed by seed (mean ± s.e.)")
            print(format_table(pufferfish_rows(result["pufferfish"], scale)))
    path = args.json or Path(__file__).parent / "results" / f"fronts_variants-{task.name}-{args.name}.json"
    write_json_atomic(path, result)
    print(f"\nwrote {path}")


def differences(values: Sequence[float | None], reference: Sequence[float | None]) -> list[float | None]:
    """Seed by seed, each value minus the reference's on the same seed (None where either has none)."""
    return [None if a is None or b is None else a - b for a, b in zip(values, reference)]


def against_pufferfish(runner: Runner, task: Task, seeds: int, total: int,
                       searched: dict[str, dict[str, list[list[Point]]]], metric: str) -> dict[str, Any]:
    """For each Pufferfish ratio of the suite: its model's size and score per seed, and each searched
    cell's best score within that model's size (by parameters and by MACs) on the same seed."""
    result = {}
    for ratio in PUFFERFISH:
        name = pufferfish_cell(ratio)
        points = []
        for seed in range(seeds):
            cell = runner.cell(task, name, "pufferfish", seed, total, {"rank_ratio": ratio})
            points.append(normalised(front_curves.cell_point(cell.directory, runner.curve_path(task, seed, name)),
                                     metric)[0])
        result[name] = {"models": points, "cells": {
            cell: {axis: [best_within(fronts[axis][seed], axis, points[seed][axis], metric) for seed in range(seeds)]
                   for axis in fronts} for cell, fronts in searched.items()}}
    return result


def pufferfish_rows(comparison: dict[str, Any], scale: float) -> list[tuple[str, ...]]:
    rows = [("Pufferfish", "params (× dense)", "MACs (× dense)", "its score", "cell", "by params", "by MACs")]
    for name, entry in comparison.items():
        models = entry["models"]
        own = [m["score"] for m in models]
        first = (name, shown([m["params"] for m in models], 3), shown([m["macs"] for m in models], 3),
                 shown(own, scale=scale))
        for index, (cell, best) in enumerate(entry["cells"].items()):
            gaps = [shown(differences(best[axis], own), scale=scale) for axis in ("params", "macs")]
            rows.append((*(first if index == 0 else ("", "", "", "")), cell, *gaps))
    return rows


if __name__ == "__main__":
    main()
