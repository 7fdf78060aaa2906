"""The ``fronts`` suite: MAESTRO's one-run front against the ways of getting models of several
sizes without it, per task and seed, on the same axes (exported parameters, exported MACs), the
same calibration set and the same validation data.

Families (the trainings of one task and seed share the recipe, epochs and seed):

* **MAESTRO**: one MAESTRO run (the task's recipe, with MAESTRO's own options on the task:
  ``Task.maestro``); its trained factor pairs re-factorised by SVD, or by whitened SVD where the
  task says so (``Task.maestro_order``; :func:`~maestro_lod.canonicalize_`), then the lazy greedy
  front by parameters, and a second search by MACs;
* **dense + SVD** and **dense + whitened SVD**: one dense run, factorised at full rank by SVD, or
  by whitened SVD on the calibration set, and the same two searches;
* **Pufferfish**: three runs (``method="pufferfish"``) at ``rank_ratio`` ½, ¼ and ⅛;
* **separately trained**: three runs at fixed ranks, those of three points of MAESTRO's
  parameter front (the largest within 0.7, 0.4 and 0.2 × the trained model's parameters),
  each a freshly initialised model factorised by SVD at those ranks and trained plainly (method
  ``maestro-full`` with λ_gl = ε_ps = 0: every step at all ranks, no regulariser, nothing cut).

Every training is an ordinary cell (:mod:`~maestro_lod.bench.cells`) in
``OUT/<task>/<cell>/seed<k>``, resumed or skipped like the other suites' cells; every front and
every trained model's measurement is computed once and cached in
``OUT/<task>/curves/seed<k>/<curve>.json`` (:mod:`~maestro_lod.bench.front_curves`). ``OUT``
receives ``fronts.json`` (every curve, table and cost, the machine and torch version),
``fronts.md`` (:func:`~maestro_lod.bench.front_tables.markdown`) and ``fronts.png``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..files import write_json_atomic, write_text_atomic
from ..runs.directory import SUMMARY_FILE
from ..runs.presets import method_options, preset
from .cells import Cell, cell_config, is_finished, train_cell
from .front_curves import ORDERINGS, cell_point, front_curve
from .front_plots import plot_fronts
from .front_tables import AXES, BUDGETS, RANGE, budget_table, gap_table, markdown, normalised
from .suites import SUITES, Task

ANNEAL = {"schedule": "multistep", "milestones": [0.9], "gamma": 0.1}
RECIPE = {**ANNEAL, "sampler": "independent", "threads": 1}
"""What the ``lenet5-mnist5k`` preset's recipe changed (the final ×0.1 phase, the independent
sampler), applied to the tasks without a preset; one thread per training everywhere. The MLP
trains at half the ``cpu`` suite's learning rate, 0.025, for every family: at 0.05 MAESTRO's
summed loss (full plus sampled pass, about twice the gradient of one) swung its validation
accuracy between 86 and 97 % from epoch to epoch and ended 1.6 points below dense."""
_CPU = {task.name: task for task in SUITES["cpu"].tasks}
CNN4_MAESTRO = {"factorize": {"keep_ends": True}, "sampled_weight": 0.25}
"""MAESTRO's recipe on cnn4, each part measured beside the paper's (3 seeds, 8 epochs): the stem
and the classifier stay dense, as Pufferfish keeps them (every front kept both whole down to 0.3×
of either cost, while sampling them cost the full model 0.4 points; the sampled pass also replays
the stem from the full pass), and the sampled pass's loss weighs ¼ (at weight 1 it held the full
model 0.6 points back in 8 epochs). The other tasks keep the paper's objective: on LeNet-5 neither
change helped (its first convolution holds 31 % of its MACs), and the ¼ weight cost the MLP and
the character LM at deep cuts. cnn4's front also orders the trained ranks by whitened SVD (the
outputs' error on the calibration set, not the weights'), which lifted its deep cuts (+0.7 points
within 0.16× the MACs, 3 seeds); on LeNet-5 that order moved every budget within the noise. The
sampled pass on an eighth of each batch with its loss weighted ⅛ and no recalibration trains cnn4
in 1.21× the dense time instead of 1.85× with the trained model unchanged within the noise (5
seeds) and a front 0.1–0.2 points higher from 0.2× either cost up but 0.3–0.6 lower within 0.1×;
the suite keeps the whole batch, whose tables it measured."""
CHAR_LM_MAESTRO = method_options("char-lm-pydoc", "maestro")
"""MAESTRO's recipe on the character LM, the ``char-lm-pydoc`` preset's for MAESTRO: the sampled
pass on 40 % of each batch, which trains in 1.44× the dense time instead of 1.85× with the trained
model and the fronts within about one standard error of the whole batch's (3 seeds; a quarter of
the batch cost up to 1.3 % perplexity beyond the noise at deep cuts)."""
TASKS: tuple[Task, ...] = (
    Task("lenet5-mnist5k", {**preset("lenet5-mnist5k"), "threads": 1}),
    Task("cnn4-mnist5k", {**_CPU["cnn4-mnist5k"].options, **RECIPE}, maestro=CNN4_MAESTRO,
         maestro_order="canonical-whitened"),
    Task("mlp-digits", {**_CPU["mlp-digits"].options, **RECIPE, "lr": 0.025}),
    Task("char-lm-pydoc", {**preset("char-lm-pydoc"), "epochs": 2, "sampler": "independent", "threads": 1},
         metric="perplexity", maestro=CHAR_LM_MAESTRO),
)
SEEDS = 3
DURATION = ("on 2 CPU cores, one training at a time: LeNet-5 about 6 minutes per seed, the MLP under 1, cnn4 "
            "about 40 minutes per seed, mostly its six greedy searches, the character LM about 15 minutes per seed; "
            "about 3 hours for the default 4 tasks x 3 seeds")
"""How long the default tasks and seeds take (measured; cnn4's with searches of one removal per
round, where the default search now cuts several layers per round far from its goal)."""

PUFFERFISH = (0.5, 0.25, 0.125)
SEPARATE = (0.7, 0.4, 0.2)
"""The separately trained models' budgets, as shares of MAESTRO's trained model's parameters."""
MAESTRO, DENSE_SVD, DENSE_WHITENED, PUFFER, SEPARATELY = (
    "MAESTRO", "dense + SVD", "dense + whitened SVD", "Pufferfish", "separately trained")
FAMILIES = (MAESTRO, DENSE_SVD, DENSE_WHITENED, PUFFER, SEPARATELY)
FRONT_FAMILIES = {MAESTRO: "maestro", DENSE_SVD: "dense-svd", DENSE_WHITENED: "dense-whitened"}
RESULTS_FILE, TABLE_FILE, PLOT_FILE = "fronts.json", "fronts.md", "fronts.png"


def check_maestro_order(task: Task) -> None:
    """A one-line UsageError when ``task.maestro_order`` is not one of :data:`ORDERINGS`."""
    if task.maestro_order not in ORDERINGS:
        raise UsageError(f"task {task.name}: maestro_order={task.maestro_order!r} must be one of "
                         f"{', '.join(ORDERINGS)}")


def task_fronts(task: Task) -> dict[str, tuple[str, str]]:
    """Front curve → (the cell it is searched on, how its model is prepared), each searched by both
    axes: MAESTRO's trained ranks ordered as the task says (checked by :func:`run_fronts` before
    anything runs), the dense model factorised by SVD and by whitened SVD."""
    return {"maestro": ("maestro", task.maestro_order), "dense-svd": ("dense", "svd"),
            "dense-whitened": ("dense", "whitened")}


def pufferfish_cell(ratio: float) -> str:
    return f"pufferfish-{ratio:g}"


def separate_cell(index: int) -> str:
    return f"separate-{index}"


FAMILY_CELLS = {MAESTRO: ["maestro"], DENSE_SVD: ["dense"], DENSE_WHITENED: ["dense"],
                PUFFER: [pufferfish_cell(r) for r in PUFFERFISH],
                SEPARATELY: [separate_cell(i) for i in range(1, len(SEPARATE) + 1)]}
"""The trainings each family's cost is the sum of (the two dense families share one)."""


@dataclass
class FrontsResult:
    """What :func:`run_fronts` did and wrote: the cells trained and the curves computed by this
    call (empty when everything was cached), one summary per task it ran, and the Markdown of
    ``fronts.md`` (every task reported in ``out``)."""

    out: Path
    trained: list[Path] = field(default_factory=list)
    computed: list[Path] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    table: str = ""

    @property
    def files(self) -> tuple[Path, Path, Path]:
        """``fronts.json``, ``fronts.md`` and ``fronts.png``."""
        return self.out / RESULTS_FILE, self.out / TABLE_FILE, self.out / PLOT_FILE


def separate_ranks(curve: dict[str, Any]) -> list[dict[str, int]]:
    """The rank patterns of the separately trained models: per share of :data:`SEPARATE`, the
    point of MAESTRO's parameter front that cutting its trained model to that share of its
    parameters reaches (the largest point within the share; the cheapest point if none is)."""
    points = curve["points"]
    trained = points[0]["params"]
    patterns = []
    for share in SEPARATE:
        feasible = [p for p in points if p["params"] <= share * trained] or [min(points, key=lambda p: p["params"])]
        patterns.append(dict(max(feasible, key=lambda p: p["params"])["ranks"]))
    return patterns


class Runner:
    """Trains and measures one task's cells and curves, in order, skipping what is done."""

    def __init__(self, out: Path, epochs: int | None, force: bool, say: Callable[..., None], result: FrontsResult):
        self.out, self.epochs, self.force, self.say, self.result = out, epochs, force, say, result
        self.number = 0

    def cell(self, task: Task, name: str, method: str, seed: int, total: int,
             options: dict[str, Any] | None = None) -> Cell:
        directory = self.out / task.name / name / f"seed{seed}"
        config = cell_config(task, method, seed, self.epochs, options)
        cell = Cell(task, name, seed, config, directory, dict(options or {}))
        self.number += 1
        done = is_finished(cell) and not self.force
        self.say(f"[{self.number}/{total}] {task.name} {name} seed {seed}{' (done)' if done else ''}", flush=True)
        if not done:
            train_cell(cell, self.force, self.say)
            self.result.trained.append(directory)
        return cell

    def curve_path(self, task: Task, seed: int, name: str) -> Path:
        """A curve's cache (a cell trained again, with ``force`` too, invalidates its curves)."""
        return self.out / task.name / "curves" / f"seed{seed}" / f"{name}.json"

    def seed(self, task: Task, seed: int, total: int) -> dict[str, Any]:
        """Every cell and curve of one seed: {"curves": {name: curve}, "cells": {name: directory}}."""
        curves: dict[str, dict[str, Any]] = {}
        cells: dict[str, Path] = {}
        computed = self.result.computed
        for source, own in (("maestro", task.maestro), ("dense", None)):
            trained = self.cell(task, source, source, seed, total, own)
            cells[source] = trained.directory
            if source == "maestro":  # the models trained at its ranks keep dense what it keeps dense
                factorize = dict(trained.config.factorize)
            for name, (cell, how) in task_fronts(task).items():
                if cell == source:
                    for cost in AXES:
                        path = self.curve_path(task, seed, f"{name}-{cost}")
                        curves[f"{name}-{cost}"] = front_curve(cells[source], path, how, cost, self.say, computed)
        for ratio in PUFFERFISH:
            name = pufferfish_cell(ratio)
            cells[name] = self.cell(task, name, "pufferfish", seed, total, {"rank_ratio": ratio}).directory
            curves[name] = cell_point(cells[name], self.curve_path(task, seed, name), computed)
        for index, ranks in enumerate(separate_ranks(curves["maestro-params"]), start=1):
            name = separate_cell(index)
            options = {"lambda_gl": 0.0, "eps_ps": 0.0, "factorize": {**factorize, "rank_pattern": ranks}}
            cells[name] = self.cell(task, name, "maestro-full", seed, total, options).directory
            curves[name] = cell_point(cells[name], self.curve_path(task, seed, name), computed)
            if curves[name]["points"][0]["ranks"] != ranks:
                raise UsageError(f"{cells[name]} trained at ranks {curves[name]['points'][0]['ranks']}, not {ranks}")
        return {"curves": curves, "cells": cells}


def family_points(curves: dict[str, dict[str, Any]], family: str, axis: str, metric: str) -> list[dict[str, float]]:
    """One seed's models of ``family`` for the curve on ``axis``, as fractions of the dense costs."""
    if family in FRONT_FAMILIES:
        return normalised(curves[f"{FRONT_FAMILIES[family]}-{axis}"], metric)
    return [p for name in FAMILY_CELLS[family] for p in normalised(curves[name], metric)]


def summarise(task: Task, seeds: list[int], per_seed: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """The task's tables, gaps and costs from every seed's curves and cells."""
    metric = task.metric
    families = {axis: {f: [family_points(s["curves"], f, axis, metric) for s in per_seed] for f in FAMILIES}
                for axis in AXES}
    trained = [normalised(s["curves"]["maestro-params"], metric)[0] for s in per_seed]
    costs = []
    for family in FAMILIES:
        summaries = [[_summary(s["cells"][name]) for name in FAMILY_CELLS[family]] for s in per_seed]
        searches = [f"{FRONT_FAMILIES[family]}-{axis}" for axis in AXES] if family in FRONT_FAMILIES else []
        costs.append({"family": family, "trainings": len(FAMILY_CELLS[family]),
                      "train_time": [sum(x["train_time"] for x in seed) for seed in summaries],
                      "train_macs": [sum(x["train_macs"] for x in seed) for seed in summaries],
                      "search_time": [sum(s["curves"][name]["seconds"] for name in searches) for s in per_seed]})
    pairs = []
    for index in range(1, len(SEPARATE) + 1):
        name, seeds_pairs = separate_cell(index), []
        for s in per_seed:
            (alone,) = normalised(s["curves"][name], metric)
            ranks = s["curves"][name]["points"][0]["ranks"]
            point = next(p for p in s["curves"]["maestro-params"]["points"] if p["ranks"] == ranks)
            seeds_pairs.append({"params": alone["params"], "macs": alone["macs"], "separate": alone["score"],
                                "maestro": point[metric], "ranks": ranks})
        pairs.append({"share": SEPARATE[index - 1], "seeds": seeds_pairs})
    return {"task": task.name, "metric": metric, "epochs": epochs, "seeds": seeds, "budgets": list(BUDGETS),
            "range": list(RANGE),
            "maestro_trained": {key: [t[key] for t in trained] for key in ("params", "macs", "score")},
            "tables": {axis: budget_table(families[axis], axis, metric) for axis in AXES},
            "gaps": gap_table(families, metric, MAESTRO), "costs": costs, "same_ranks": pairs, "families": families,
            "cells": [{name: str(path) for name, path in s["cells"].items()} for s in per_seed]}


def _summary(directory: Path) -> dict[str, Any]:
    return json.loads((directory / SUMMARY_FILE).read_text())


def _earlier_tasks(path: Path) -> dict[str, dict[str, Any]]:
    """The tasks of an earlier ``fronts.json`` in ``path`` by name (none if it cannot be read)."""
    try:
        tasks = json.loads(path.read_text()).get("tasks", [])
        return {t["task"]: t for t in tasks if isinstance(t, dict) and "task" in t}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def run_fronts(out: str | Path | None = None, *, tasks: list[str] | None = None, seeds: int | None = None,
               epochs: int | None = None, force: bool = False, say: Callable[..., None] = print,
               threads: int = 1) -> FrontsResult:
    """Train and compare the ``fronts`` suite's families in ``out`` (default ``runs/bench-fronts``),
    as ``maestro-lod bench --suite fronts`` does.

    ``tasks`` selects tasks of :data:`TASKS` (default: all), ``seeds`` runs seeds 0..seeds-1
    (default :data:`SEEDS`), ``epochs`` caps every task's epochs. Finished cells and cached curves
    are reused unless ``force``; an interrupted cell continues from its checkpoint. The searches
    and evaluations run on ``threads`` threads. ``fronts.json``, ``fronts.md`` and ``fronts.png``
    are rewritten after every task; they keep the tasks an earlier call wrote there and this one
    did not run (each task records its seeds and date), so tasks can be run one call at a time.
    An unknown task or ``maestro_order``, ``seeds < 1`` or ``epochs < 1`` is a one-line
    :class:`UsageError` before anything is trained."""
    unknown = sorted(set(tasks or ()) - {t.name for t in TASKS})
    if unknown:
        raise UsageError(f"unknown task(s) for suite 'fronts': {', '.join(unknown)}; "
                         f"choose from {', '.join(t.name for t in TASKS)}")
    if epochs is not None and epochs < 1:
        raise UsageError(f"--epochs {epochs} must be at least 1")
    if seeds is not None and seeds < 1:
        raise UsageError(f"--seeds {seeds} must be at least 1")
    selected = [t for t in TASKS if tasks is None or t.name in tasks]
    for task in selected:
        check_maestro_order(task)
    seed_list = list(range(seeds if seeds is not None else SEEDS))
    out = Path(out or "runs/bench-fronts")
    result = FrontsResult(out)
    runner = Runner(out, epochs, force, say, result)
    total = len(selected) * len(seed_list) * (2 + len(PUFFERFISH) + len(SEPARATE))
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__}
    reported = _earlier_tasks(out / RESULTS_FILE)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for task in selected:
            started = time.perf_counter()
            per_seed = [runner.seed(task, seed, total) for seed in seed_list]
            task_epochs = cell_config(task, "maestro", 0, epochs).epochs
            summary = summarise(task, seed_list, per_seed, task_epochs)
            summary["seconds"] = time.perf_counter() - started
            summary["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
            result.tasks.append(summary)
            reported[task.name] = summary
            torch.set_num_threads(threads)  # a training may have set its own
            order = {t.name: i for i, t in enumerate(TASKS)}
            shown = sorted(reported.values(), key=lambda t: order.get(t["task"], len(order)))
            result.table = "\n".join(markdown(t) for t in shown)
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / RESULTS_FILE, {"suite": "fronts", "machine": machine, "tasks": shown})
            write_text_atomic(out / TABLE_FILE, result.table)
            plot_fronts(shown, out / PLOT_FILE)
    finally:
        torch.set_num_threads(previous)
    return result
