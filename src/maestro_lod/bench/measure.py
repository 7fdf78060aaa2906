"""A finished cell's numbers, measured on its exported model rebuilt from the run directory."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..engine.counting import count_macs, count_params
from ..export import export
from ..runs.loading import load_run
from .cells import Cell


def latency(model: torch.nn.Module, inputs: Any, repeats: int) -> float:
    """Median seconds of one forward pass of ``inputs`` on one CPU thread (after 3 warm-up passes)."""
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
    """The cell's numbers: validation accuracy (and perplexity), final ranks, parameters, MACs and
    CPU latency (median of ``repeats`` passes of one example) of the exported model, the dense
    model's parameters and MACs, training time, training MACs and epochs."""
    run = load_run(cell.directory)
    config, summary, trainer = run.config, run.summary, run.trainer
    options = config.method_options.to_dict()
    deployed = export(trainer.model) if trainer.factorized else trainer.model
    inputs = trainer.example_inputs
    inputs = tuple(x.cpu() for x in inputs) if isinstance(inputs, tuple) else inputs.cpu()
    deployed = deployed.cpu()
    return {"task": cell.task.name, "method": cell.method, "seed": cell.seed, "point": dict(cell.point),
            "directory": str(cell.directory), "lambda_gl": options.get("lambda_gl"), "eps_ps": options.get("eps_ps"),
            "ranks": summary["final_ranks"], "accuracy": summary["final_accuracy"], "perplexity": summary.get("final_perplexity"),
            "params": count_params(deployed), "macs": count_macs(deployed, inputs),
            "dense_params": summary["dense_params"], "dense_macs": summary["dense_macs"],
            "latency_ms": 1000 * latency(deployed, inputs, repeats), "train_time": summary["train_time"],
            "train_macs": summary["train_macs"], "epochs": summary["epochs"]}
