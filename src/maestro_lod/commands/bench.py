"""``maestro-lod bench``: train a suite of (task × method × seed) cells and compare them.

Every cell is an ordinary ``maestro-lod train`` run directory under ``OUT/<task>/<method>/seed<k>``,
so a cell can be inspected, plotted or resumed on its own. A finished cell (its ``summary.json``
written by the same options) is never recomputed unless ``--force``; an interrupted one continues
from its checkpoint. After the cells, ``OUT`` receives ``results.json`` (every cell and the
aggregates), ``results.md`` (mean ± std over seeds), ``accuracy-vs-macs.png`` and
``training-cost.png``.

Per cell: validation accuracy (perplexity for language models), parameters and MACs of the
exported model, its CPU latency (median of ``--repeats`` forward passes of one example, one
thread), training wall time, and training MACs (3 × forward MACs per example and pass, from the
ranks each step ran; see :mod:`maestro_lod.training.step_macs`).

Suites:

* ``quick`` (1 seed, a few minutes on two cores): LeNet-5 on mnist5k, the MLP on digits;
* ``cpu`` (3 seeds): the quick tasks, the four-convolution CNN ``cnn4`` on mnist5k and the
  character transformer on pydoc-text;
* ``paper`` (3 seeds, needs a GPU and the CIFAR-10 / translation data): ResNet-18 and VGG-19 on
  CIFAR-10 with the paper's recipe, the Transformer on the offline ``reverse`` task.

``--epochs N`` caps every task's epochs (a tiny budget for a smoke test); ``--methods``,
``--tasks`` and ``--seeds`` select cells.

Sensitivity sweeps: ``--sweep lambda_gl=1e-4,1e-3 --sweep eps_ps=1e-4,1e-3`` trains every point of
the cartesian product of the given values (``epochs=...`` may be swept too, and size targets:
``--sweep target=macs=0.5,macs=0.3`` trains one targeted MAESTRO run per target). A grid point is one
more level of the cell directory, ``OUT/<task>/<method>/lambda_gl=0.0001,eps_ps=0.001/seed<k>``, so
each point is an ordinary resumable run. The MAESTRO options (``lambda_gl``, ``eps_ps``) vary only
in cells of a MAESTRO method whose variant does not fix them (``maestro-no-gl`` keeps λ = 0); the
other methods run once per value of the keys they use, as references. Without ``--methods`` a
sweep trains ``dense`` once and ``maestro`` at every point. ``results.md`` then holds one row per
point and ``sweep.png`` draws accuracy and exported parameters / MACs against λ (or the first swept
key), one line per value of the other keys, the dense model as a horizontal line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import load_data
from ..errors import ConfigError, UsageError
from ..export import export
from ..files import write_json_atomic, write_png_atomic, write_text_atomic
from ..engine.counting import count_macs, count_params
from ..models import build_model
from ..training.checkpoint import load_checkpoint
from ..engine.targets import parse_target
from ..training.train_config import TrainConfig
from ..training.loop import Trainer
from ..training.ablations import VARIANTS as TRAINING_VARIANTS
from ..training.methods import METHODS, MaestroMethod
from ..runs.presets import preset

VARIANTS = TRAINING_VARIANTS
"""Bench method → (training method, options over the task's recipe): the library's table of the
ablations and baselines (:data:`maestro_lod.training.VARIANTS`)."""


@dataclass(frozen=True)
class Task:
    """One model on one dataset with one recipe (a partial TrainConfig table)."""

    name: str
    options: dict[str, Any]
    metric: str = "accuracy"  # or "perplexity"


@dataclass(frozen=True)
class Suite:
    tasks: tuple[Task, ...]
    seeds: int
    methods: tuple[str, ...] = tuple(VARIANTS)
    description: str = ""


_LENET = Task("lenet5-mnist5k", {**preset("lenet5-mnist5k"), "epochs": 10})
_MLP = Task("mlp-digits", {"model": "mlp", "data": "digits", "epochs": 15, "batch_size": 64, "lr": 0.05,
                           "lambda_gl": 1e-3, "eps_ps": 1e-3})
_CNN4 = Task("cnn4-mnist5k", {"model": "cnn4", "data": "mnist5k", "epochs": 8, "batch_size": 64, "lr": 0.02,
                              "lambda_gl": 1e-3, "eps_ps": 1e-3, "threads": 2})
_CHAR = Task("char-lm-pydoc", {**preset("char-lm-pydoc"), "epochs": 2}, metric="perplexity")

SUITES: dict[str, Suite] = {
    "quick": Suite((_LENET, _MLP), 1, description="LeNet-5 / mnist5k and MLP / digits, one seed"),
    "cpu": Suite((_LENET, _MLP, _CNN4, _CHAR), 3, description="the quick tasks, cnn4 / mnist5k, char-lm / pydoc-text"),
    "paper": Suite((Task("resnet18-cifar10", {**preset("resnet18-cifar10"), "threads": 8}),
                    Task("vgg19-cifar10", {**preset("vgg19-cifar10"), "threads": 8}),
                    Task("transformer-reverse", preset("transformer-reverse"))), 3,
                   description="CIFAR-10 ResNet-18 / VGG-19 and the Transformer (GPU)"),
}


SWEEP_KEYS: dict[str, tuple[type, str]] = {
    "lambda_gl": (float, "maestro"),
    "eps_ps": (float, "maestro"),
    "target": (str, "maestro"),
    "epochs": (int, "every"),
}
"""Options ``--sweep`` can vary → (value type, which cells it varies in: MAESTRO cells only, or every cell)."""
SWEEP_METHODS = ("dense", "maestro")
"""The methods of a sweep without ``--methods``: the dense reference once, MAESTRO at every point."""


def parse_sweep(items: list[str]) -> dict[str, list[float | int | str]]:
    """``["lambda_gl=1e-3,1e-2", "eps_ps=1e-4"]`` → ``{"lambda_gl": [0.001, 0.01], "eps_ps": [0.0001]}``
    (keys in the order given); ``"target=macs=0.5,macs=0.3"`` → ``{"target": ["macs=0.5", "macs=0.3"]}``.
    An unknown or repeated key, a value that is not a number of the key's type or not a size target,
    a negative λ or ε, a repeated value or epochs < 1 is a one-line :class:`UsageError`."""
    grid: dict[str, list[float | int | str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in SWEEP_KEYS:
            raise UsageError(f"--sweep {item!r}: unknown key {key!r}; give KEY=V1,V2,... with KEY one of "
                             f"{', '.join(SWEEP_KEYS)}")
        if key in grid:
            raise UsageError(f"--sweep {item!r}: {key} is swept twice; list all its values in one --sweep")
        kind = SWEEP_KEYS[key][0]
        values = []
        for part in _list(text):
            value = _target_value(item, part) if kind is str else _number_value(item, key, kind, part)
            if value in values:
                raise UsageError(f"--sweep {item!r}: {key}={part} is listed twice")
            values.append(value)
        if not values:
            raise UsageError(f"--sweep {item!r}: no values; give {key}=V1,V2,...")
        grid[key] = values
    return grid


def _number_value(item: str, key: str, kind: type, part: str) -> float | int:
    """One swept number: an int of at least 1 (epochs) or a finite float of at least 0 (λ, ε)."""
    try:
        value = kind(part)
    except ValueError:
        raise UsageError(f"--sweep {item!r}: {part!r} is not {'an int' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise UsageError(f"--sweep {item!r}: {part!r} is not a finite number")
    if value < (1 if kind is int else 0):
        raise UsageError(f"--sweep {item!r}: {key}={part} must be {'at least 1' if kind is int else '>= 0'}")
    return value


def _target_value(item: str, part: str) -> str:
    """One swept size target in its canonical spelling (``"macs=0.50"`` → ``"macs=0.5"``)."""
    try:
        cost, fraction = parse_target(part)
    except ConfigError as error:
        raise UsageError(f"--sweep {item!r}: {error}") from None
    return f"{cost}={fraction:g}"


def _axis_value(value: float | int | str) -> float:
    """A swept value as a number on a plot's axis (a size target by its fraction)."""
    return parse_target(value)[1] if isinstance(value, str) else float(value)


def grid_points(grid: dict[str, list[float | int]]) -> list[dict[str, float | int]]:
    """Every combination of the swept values (the first key varying slowest); ``[{}]`` without a sweep."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def applicable(point: dict[str, float | int], method: str) -> dict[str, float | int]:
    """The part of a grid point that changes ``method``'s cells: the ``every`` keys always, the
    MAESTRO keys only for a MAESTRO training method whose variant does not fix them."""
    name, overrides = VARIANTS[method]
    maestro = issubclass(METHODS[name], MaestroMethod)
    return {key: value for key, value in point.items()
            if SWEEP_KEYS[key][1] == "every" or (maestro and key not in overrides)}


def point_label(point: dict[str, float | int | str]) -> str:
    """``{"lambda_gl": 0.001, "eps_ps": 0.0001}`` → ``"lambda_gl=0.001,eps_ps=0.0001"`` (a directory name)."""
    return ",".join(f"{key}={value if isinstance(value, str) else repr(value)}" for key, value in point.items())


@dataclass
class Cell:
    task: Task
    method: str
    seed: int
    config: TrainConfig
    directory: Path
    point: dict[str, float | int] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


def cell_config(task: Task, method: str, seed: int, max_epochs: int | None,
                point: dict[str, float | int] | None = None) -> TrainConfig:
    """The full TrainConfig of one cell: the task's recipe, the grid ``point`` (already reduced to
    what applies to ``method``), the variant's options, the seed; ``max_epochs`` caps the epochs."""
    name, overrides = VARIANTS[method]
    options = {**task.options, **(point or {}), **overrides, "method": name, "seed": seed, "reference": "none"}
    if max_epochs is not None:
        options["epochs"] = min(options.get("epochs", TrainConfig().epochs), max_epochs)
    epochs = options.get("epochs", TrainConfig().epochs)
    options["svd_finetune_epochs"] = min(options.get("svd_finetune_epochs", 0), epochs - 1)  # one dense epoch at least
    return TrainConfig.from_dict(options)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise UsageError(f"cannot write {value!r} to a TOML config")


def config_toml(config: TrainConfig) -> str:
    """``config`` as a TOML table ``maestro-lod train --config`` reads back to an equal config.
    TOML has no null: a None is left out, which is only right where None is the field's default."""
    defaults = TrainConfig(method=config.method).to_dict()
    lines = []
    for key, value in config.to_dict().items():
        if value is None:
            if defaults[key] is not None:
                raise UsageError(f"{key}=None cannot be written to a TOML config; give it a value")
            continue
        lines.append(f"{key} = {_toml_value(value)}\n")
    return "".join(lines)


def _finished(cell: Cell) -> bool:
    summary, saved = cell.directory / "summary.json", cell.directory / "config.json"
    return (summary.is_file() and saved.is_file()
            and json.loads(saved.read_text()) == cell.config.to_dict())


def _train(cell: Cell, force: bool) -> None:
    from .. import cli  # the train command runs the cell exactly as a user's run

    checkpoint = cell.directory / "checkpoint.safetensors"
    config_file = cell.directory.parent / f"{cell.directory.name}.toml"
    if not force and checkpoint.is_file() and (cell.directory / "config.json").is_file() and \
            json.loads((cell.directory / "config.json").read_text()) == cell.config.to_dict():
        argv = ["train", "--resume", str(cell.directory), "--quiet"]
    else:
        cell.directory.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(config_file, config_toml(cell.config))
        argv = ["train", "--config", str(config_file), "--out", str(cell.directory), "--quiet"]
        if cell.directory.exists():
            argv.append("--force")
    code = cli.main(argv)
    if code != 0:
        raise UsageError(f"cell {cell.directory} failed (maestro-lod {' '.join(argv)} exited with {code})")


def _latency(model: torch.nn.Module, inputs: Any, repeats: int) -> float:
    """Median seconds of one forward pass of ``inputs`` on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    try:
        model.eval()
        with torch.no_grad():
            for _ in range(3):
                model(*args)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                model(*args)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def measure(cell: Cell, repeats: int) -> dict[str, Any]:
    """The cell's numbers from its run directory (the exported model rebuilt from its checkpoint)."""
    config = cell.config
    options = config.method_options.to_dict()
    summary = json.loads((cell.directory / "summary.json").read_text())
    data = load_data(config.data, root=config.data_root, download=config.download, seed=config.seed,
                     augment=config.augment, seq_len=config.seq_len)
    trainer = Trainer(build_model(config.model, data, **config.model_options), data.train, data.val,
                      config.replace(device="cpu"), kind=data.kind)
    trainer.load_state_dict(load_checkpoint(cell.directory / "checkpoint.safetensors"))
    deployed = export(trainer.model) if trainer.factorized else trainer.model
    inputs = trainer.example_inputs
    inputs = tuple(x.cpu() for x in inputs) if isinstance(inputs, tuple) else inputs.cpu()
    deployed = deployed.cpu()
    return {"task": cell.task.name, "method": cell.method, "seed": cell.seed, "point": dict(cell.point),
            "directory": str(cell.directory), "lambda_gl": options.get("lambda_gl"), "eps_ps": options.get("eps_ps"),
            "ranks": summary["final_ranks"], "accuracy": summary["final_accuracy"], "perplexity": summary.get("final_perplexity"),
            "params": count_params(deployed), "macs": count_macs(deployed, inputs),
            "dense_params": summary["dense_params"], "dense_macs": summary["dense_macs"],
            "latency_ms": 1000 * _latency(deployed, inputs, repeats), "train_time": summary["train_time"],
            "train_macs": summary["train_macs"], "epochs": summary["epochs"]}


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
            points.sort(key=lambda r: _axis_value(r["point"][x_key]))
            xs = [_axis_value(r["point"][x_key]) for r in points]
            line, = accuracy.plot(xs, [score(r) for r in points], "o-", label=label)
            cost.plot(xs, [r["params_ratio"] for r in points], "o-", color=line.get_color(), label=f"{label}: params")
            cost.plot(xs, [r["macs_ratio"] for r in points], "s--", color=line.get_color(), label=f"{label}: MACs")
        dense = next((r for r in task_rows if r["method"] == "dense"), None)
        if dense is not None:
            accuracy.axhline(score(dense), color="black", linestyle=":", label="dense")
        cost.axhline(1.0, color="black", linestyle=":", label="dense")
        for axes in (accuracy, cost):
            positive = [v for v in map(_axis_value, grid[x_key]) if v > 0]
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


def run(args: argparse.Namespace) -> int:
    suite = SUITES[args.suite]
    tasks = [t for t in suite.tasks if args.tasks is None or t.name in args.tasks]
    grid = parse_sweep(args.sweep or [])
    methods = args.methods or list(SWEEP_METHODS if grid else suite.methods)
    unknown = sorted(set(methods) - set(VARIANTS)) + sorted(set(args.tasks or ()) - {t.name for t in suite.tasks})
    if unknown:
        raise UsageError(f"unknown method(s) or task(s) for suite {args.suite!r}: {', '.join(unknown)}")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs} must be at least 1")
    seeds = range(args.seeds if args.seeds is not None else suite.seeds)
    out = Path(args.out or f"runs/bench-{args.suite}")
    cells = []
    for task in tasks:
        for method in methods:
            points = {point_label(p): p for p in (applicable(p, method) for p in grid_points(grid))}
            for label, point in points.items():
                base = out / task.name / method / label if label else out / task.name / method
                cells += [Cell(task, method, seed, cell_config(task, method, seed, args.epochs, point),
                               base / f"seed{seed}", point) for seed in seeds]
    results = []
    for number, cell in enumerate(cells, start=1):
        done = _finished(cell) and not args.force
        where = f" {point_label(cell.point)}" if cell.point else ""
        print(f"[{number}/{len(cells)}] {cell.task.name} {cell.method}{where} seed {cell.seed}"
              f"{' (done)' if done else ''}", flush=True)
        if not done:
            _train(cell, args.force)
        results.append(measure(cell, args.repeats))
    rows = aggregate(results, tasks)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"suite": args.suite, "torch": torch.__version__, "sweep": grid,
                                             "cells": results, "aggregate": rows})
    table = markdown(rows, grid)
    write_text_atomic(out / "results.md", table)
    plot(rows, out)
    if grid:
        plot_sweep(rows, grid, out)
    print(table)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command."""
    parser = subparsers.add_parser("bench", help="compare MAESTRO with ablations and baselines on a suite of tasks",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--out", metavar="DIR", help="directory of the cells and results (default runs/bench-SUITE)")
    parser.add_argument("--methods", type=_list, metavar="NAMES", help=f"subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--tasks", type=_list, metavar="NAMES", help="subset of the suite's tasks")
    parser.add_argument("--seeds", type=int, metavar="N", help="seeds 0..N-1 (default: the suite's)")
    parser.add_argument("--epochs", type=int, metavar="N", help="cap every task's epochs (a tiny budget)")
    parser.add_argument("--repeats", type=int, default=50, help="timed forward passes per latency (default 50)")
    parser.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                        help=f"train every combination of these values (repeatable; KEY: {', '.join(SWEEP_KEYS)})")
    parser.add_argument("--force", action="store_true", help="recompute finished cells")
    parser.set_defaults(handler=run)
