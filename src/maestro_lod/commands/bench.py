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
ranks each step ran; see :mod:`maestro_lod.training.cost`).

Suites:

* ``quick`` (1 seed, a few minutes on two cores): LeNet-5 on mnist5k, the MLP on digits;
* ``cpu`` (3 seeds): the quick tasks, the four-convolution CNN ``cnn4`` on mnist5k and the
  character transformer on pydoc-text;
* ``paper`` (3 seeds, needs a GPU and the CIFAR-10 / translation data): ResNet-18 and VGG-19 on
  CIFAR-10 with the paper's recipe, the Transformer on the offline ``reverse`` task.

``--epochs N`` caps every task's epochs (a tiny budget for a smoke test); ``--methods``,
``--tasks`` and ``--seeds`` select cells.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import load_data
from ..errors import UsageError
from ..export import export
from ..files import write_json_atomic, write_text_atomic
from ..metrics import count_macs, count_params
from ..models import build_model
from ..training.checkpoint import load_checkpoint
from ..training.config import TrainConfig
from ..training.loop import Trainer
from ..training.presets import preset

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense", {}),
    "maestro": ("maestro", {}),
    "maestro-no-gl": ("maestro", {"lambda_gl": 0.0}),
    "maestro-no-shrink": ("maestro-no-shrink", {}),
    "maestro-no-full-pass": ("maestro", {"full_pass": False}),
    "maestro-full": ("maestro-full", {}),
    "pufferfish": ("pufferfish", {}),
    "cuttlefish": ("cuttlefish", {}),
    "svd": ("svd", {"svd_energy": 0.9, "svd_finetune_epochs": 2}),
}
"""Bench method → (training method, options over the task's recipe). The ablations: no group lasso,
no progressive shrinking, no full pass, and every step at all ranks."""


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


@dataclass
class Cell:
    task: Task
    method: str
    seed: int
    config: TrainConfig
    directory: Path
    result: dict[str, Any] = field(default_factory=dict)


def cell_config(task: Task, method: str, seed: int, max_epochs: int | None) -> TrainConfig:
    """The full TrainConfig of one cell."""
    name, overrides = VARIANTS[method]
    options = {**task.options, **overrides, "method": name, "seed": seed, "reference": "none"}
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
    defaults = TrainConfig().to_dict()
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
    return {"task": cell.task.name, "method": cell.method, "seed": cell.seed, "directory": str(cell.directory),
            "accuracy": summary["final_accuracy"], "perplexity": summary.get("final_perplexity"),
            "params": count_params(deployed), "macs": count_macs(deployed, inputs),
            "dense_params": summary["dense_params"], "dense_macs": summary["dense_macs"],
            "latency_ms": 1000 * _latency(deployed, inputs, repeats), "train_time": summary["train_time"],
            "train_macs": summary["train_macs"], "epochs": summary["epochs"]}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict[str, Any]], tasks: list[Task]) -> list[dict[str, Any]]:
    """One row per (task, method): mean and std over seeds of every number."""
    rows = []
    for task in tasks:
        for method in dict.fromkeys(r["method"] for r in results if r["task"] == task.name):
            cells = [r for r in results if r["task"] == task.name and r["method"] == method]
            row = {"task": task.name, "method": method, "metric": task.metric, "seeds": len(cells)}
            for key in ("accuracy", "perplexity", "params", "macs", "latency_ms", "train_time", "train_macs"):
                values = [c[key] for c in cells if c[key] is not None]
                if values:
                    row[key], row[key + "_std"] = _mean_std(values)
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The aggregate rows as a Markdown table per task."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        metric = task_rows[0]["metric"]
        dense = next((r for r in task_rows if r["method"] == "dense"), None)
        out += [f"### {task}", "",
                f"| method | {'val accuracy (%)' if metric == 'accuracy' else 'val perplexity'} | params | "
                "inference MACs | CPU latency (ms) | train time (s) | train MACs | train MACs / dense |",
                "|---|---|---|---|---|---|---|---|"]
        for r in task_rows:
            if metric == "accuracy":
                score = f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}"
            else:
                score = f"{r['perplexity']:.3f} ± {r['perplexity_std']:.3f}"
            ratio = f"{r['train_macs'] / dense['train_macs']:.2f}" if dense else "—"
            out.append(f"| {r['method']} | {score} | {r['params']:,.0f} | {r['macs']:,.0f} | "
                       f"{r['latency_ms']:.3f} | {r['train_time']:.1f} ± {r['train_time_std']:.1f} | "
                       f"{r['train_macs']:.3g} | {ratio} |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    """accuracy-vs-macs.png (one marker per method, a panel per task) and training-cost.png."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for filename, x_key, x_label in (("accuracy-vs-macs.png", "macs", "inference MACs (exported)"),
                                     ("training-cost.png", "train_macs", "training MACs")):
        figure = Figure(figsize=(5 * len(tasks), 4))
        for index, task in enumerate(tasks, start=1):
            axes = figure.add_subplot(1, len(tasks), index)
            for r in (r for r in rows if r["task"] == task):
                y = 100 * r["accuracy"] if r["metric"] == "accuracy" else r["perplexity"]
                axes.scatter(r[x_key], y, label=r["method"])
            axes.set_xscale("log")
            axes.set_xlabel(x_label)
            metric = next(r["metric"] for r in rows if r["task"] == task)
            axes.set_ylabel("val accuracy (%)" if metric == "accuracy" else "val perplexity")
            axes.set_title(task)
            axes.legend(fontsize=7)
        FigureCanvasAgg(figure)
        figure.tight_layout()
        figure.savefig(out / filename, dpi=110)


def run(args: argparse.Namespace) -> int:
    suite = SUITES[args.suite]
    tasks = [t for t in suite.tasks if args.tasks is None or t.name in args.tasks]
    methods = args.methods or list(suite.methods)
    unknown = sorted(set(methods) - set(VARIANTS)) + sorted(set(args.tasks or ()) - {t.name for t in suite.tasks})
    if unknown:
        raise UsageError(f"unknown method(s) or task(s) for suite {args.suite!r}: {', '.join(unknown)}")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs} must be at least 1")
    seeds = range(args.seeds if args.seeds is not None else suite.seeds)
    out = Path(args.out or f"runs/bench-{args.suite}")
    cells = [Cell(task, method, seed, cell_config(task, method, seed, args.epochs),
                  out / task.name / method / f"seed{seed}")
             for task in tasks for method in methods for seed in seeds]
    results = []
    for number, cell in enumerate(cells, start=1):
        done = _finished(cell) and not args.force
        print(f"[{number}/{len(cells)}] {cell.task.name} {cell.method} seed {cell.seed}"
              f"{' (done)' if done else ''}", flush=True)
        if not done:
            _train(cell, args.force)
        results.append(measure(cell, args.repeats))
    rows = aggregate(results, tasks)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"suite": args.suite, "torch": torch.__version__, "cells": results,
                                             "aggregate": rows})
    table = markdown(rows)
    write_text_atomic(out / "results.md", table)
    plot(rows, out)
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
    parser.add_argument("--force", action="store_true", help="recompute finished cells")
    parser.set_defaults(handler=run)
