"""Training speed of MAESTRO against dense training, on LeNet-5, the VGG-style ``cnn4`` and the
character language model.

Tasks (``--task``; every recipe is the same for both methods, and so is the seed):

* ``lenet5``: the ``lenet5-mnist5k`` preset (batch 64, SGD lr 0.01 momentum 0.9, 30 epochs,
  λ_gl = 1e-3, ε_ps = 1e-3). Targets: MAESTRO total time ≤ 2.2× dense (aim 1.6×), median accuracy
  over seeds ≥ 96.4%, total rank ≤ 6 + 16 + 35 + 27 + 10 = 94 (the ranks the MAESTRO research code
  reaches in this setting).
* ``cnn4``: the four-convolution CNN on mnist5k (batch 64, SGD lr 0.02 momentum 0.9, 8 epochs,
  λ_gl = 1e-3, ε_ps = 1e-3). Targets: time ≤ 1.3× dense; the exported model at ≤ 50% of the
  dense MACs, within 1 pt of dense accuracy.
* ``char-lm``: the ``char-lm-pydoc`` preset's shared options (AdamW, cosine, 4 epochs; the sampled
  pass on the whole batch: ``--maestro sampled_batch=0.4`` adds the preset's option for MAESTRO).
  Target: time ≤ 1.5× dense.

For each seed a dense and a MAESTRO trainer are built and their epochs interleaved (dense,
MAESTRO, MAESTRO, dense, ...), so load from other processes on a shared machine hits both alike;
the ratio of their total times, measured within one run, is the figure that counts. An epoch's
time covers everything the loop does: the optimisation steps, shrinking, BatchNorm recalibration,
evaluation on the validation set and counting MACs.

    python benchmarks/training_speed.py                          # LeNet-5, seeds 0 1 2, table + JSON
    python benchmarks/training_speed.py --task cnn4 --seeds 0    # results/training_speed-cnn4.json
    python benchmarks/training_speed.py --task char-lm --epochs 2 --seeds 0
    python benchmarks/training_speed.py --seeds 0 --profile      # where the time goes (cProfile, one epoch each)
    python benchmarks/training_speed.py --reuse-prefix off       # ablation: no reuse of the full pass
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cli_options import key_value

from maestro_lod.data import load_data
from maestro_lod.files import write_json_atomic
from maestro_lod.models import build_model
from maestro_lod.tables import format_table
from maestro_lod.training import TrainConfig, Trainer
from maestro_lod.runs.presets import preset


@dataclass(frozen=True)
class Task:
    """A model, its dataset and recipe, and the targets MAESTRO is held to on it."""

    recipe: dict[str, Any]
    targets: Callable[[dict], dict[str, bool]]
    json_name: str


def _lenet5_targets(median: dict) -> dict[str, bool]:
    return {"ratio <= 2.2": median["ratio"] <= 2.2, "ratio <= 1.6 (aim)": median["ratio"] <= 1.6,
            "median accuracy >= 96.4%": median["maestro_accuracy"] >= 0.964,
            "median total rank <= 94": median["total_rank"] <= 94}


def _cnn4_targets(median: dict) -> dict[str, bool]:
    return {"ratio <= 1.3": median["ratio"] <= 1.3, "exported MACs <= 50% of dense": median["exported_macs_ratio"] <= 0.5,
            "accuracy within 1 pt of dense": median["maestro_accuracy"] >= median["dense_accuracy"] - 0.01}


def _char_lm_targets(median: dict) -> dict[str, bool]:
    return {"ratio <= 1.5": median["ratio"] <= 1.5}


TASKS = {
    "lenet5": Task(preset("lenet5-mnist5k"), _lenet5_targets, "training_speed.json"),
    "cnn4": Task({"model": "cnn4", "data": "mnist5k", "epochs": 8, "batch_size": 64, "optimizer": "sgd", "lr": 0.02,
                  "momentum": 0.9, "lambda_gl": 1e-3, "eps_ps": 1e-3}, _cnn4_targets, "training_speed-cnn4.json"),
    "char-lm": Task(preset("char-lm-pydoc"), _char_lm_targets, "training_speed-char-lm.json"),
}


def make_trainer(data, method: str, seed: int, args: argparse.Namespace) -> Trainer:
    recipe = TASKS[args.task].recipe
    changes = dict(args.maestro) if method == "maestro" else {}
    config = TrainConfig.from_dict({**recipe, "epochs": args.epochs, "threads": args.threads, "method": method,
                                    "seed": seed, "reuse_prefix": args.reuse_prefix, **changes})
    torch.manual_seed(seed)
    return Trainer(build_model(recipe["model"], data), data.train, data.val, config, kind=data.kind)


def run_seed(data, seed: int, args: argparse.Namespace) -> dict:
    """Interleaved dense and MAESTRO training for one seed; per-epoch records of both."""
    trainers = {"dense": make_trainer(data, "dense", seed, args), "maestro": make_trainer(data, "maestro", seed, args)}
    for epoch in range(args.epochs):
        order = ("dense", "maestro") if epoch % 2 == 0 else ("maestro", "dense")
        for method in order:
            trainers[method].train_epoch()
        if not args.quiet:
            d, m = trainers["dense"].history[-1], trainers["maestro"].history[-1]
            print(f"seed {seed} epoch {epoch + 1:2d}: dense {d['epoch_time']:.2f}s {100 * d['val_accuracy']:.1f}%  "
                  f"maestro {m['epoch_time']:.2f}s {100 * m['val_accuracy']:.1f}% rank {m['total_rank']}", flush=True)
    for trainer in trainers.values():
        trainer.close()
    return {method: {"history": [r.to_dict() for r in trainer.history], "summary": trainer.summary().to_dict()}
            for method, trainer in trainers.items()}


def profile(data, args: argparse.Namespace) -> None:
    """cProfile of the second epoch of each method (the first includes one-off start-up costs)."""
    for method in ("dense", "maestro"):
        trainer = make_trainer(data, method, args.seeds[0], args)
        trainer.train_epoch()
        profiler = cProfile.Profile()
        profiler.enable()
        trainer.train_epoch()
        profiler.disable()
        print(f"\n=== {method}: epoch 2, sorted by own time ===")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def seed_row(seed: int, result: dict) -> dict:
    dense, maestro = result["dense"]["summary"], result["maestro"]["summary"]
    return {"seed": seed, "dense_time": dense["train_time"], "maestro_time": maestro["train_time"],
            "ratio": maestro["train_time"] / dense["train_time"],
            "dense_steps_time": sum(r["train_time"] for r in result["dense"]["history"]),
            "maestro_steps_time": sum(r["train_time"] for r in result["maestro"]["history"]),
            "dense_accuracy": dense["final_accuracy"], "maestro_accuracy": maestro["final_accuracy"],
            "dense_perplexity": dense.get("final_perplexity"), "maestro_perplexity": maestro.get("final_perplexity"),
            "final_ranks": maestro["final_ranks"], "total_rank": maestro["final_total_rank"],
            "initial_total_rank": maestro["initial_total_rank"],
            "params_ratio": maestro["params_ratio"], "macs_ratio": maestro["macs_ratio"],
            "exported_macs_ratio": maestro["exported_macs"] / maestro["dense_macs"],
            "train_macs_ratio": maestro["train_macs"] / max(dense["train_macs"], 1)}


def epoch_table(result: dict) -> str:
    rows = [("epoch", "dense s", "MAESTRO s", "ratio", "dense acc", "MAESTRO acc", "MAESTRO ranks")]
    for d, m in zip(result["dense"]["history"], result["maestro"]["history"]):
        rows.append((d["epoch"], f"{d['epoch_time']:.2f}", f"{m['epoch_time']:.2f}",
                     f"{m['epoch_time'] / d['epoch_time']:.2f}", f"{100 * d['val_accuracy']:.1f}%",
                     f"{100 * m['val_accuracy']:.1f}%", "/".join(str(r) for r in m["ranks"].values())))
    return format_table(rows)


def summary_table(rows: list[dict]) -> str:
    table = [("seed", "dense total s", "MAESTRO total s", "ratio", "steps-only ratio", "dense acc", "MAESTRO acc",
              "exported MACs", "ranks", "total rank")]
    for r in rows:
        table.append((r["seed"], f"{r['dense_time']:.1f}", f"{r['maestro_time']:.1f}", f"{r['ratio']:.2f}",
                      f"{r['maestro_steps_time'] / r['dense_steps_time']:.2f}", f"{100 * r['dense_accuracy']:.2f}%",
                      f"{100 * r['maestro_accuracy']:.2f}%", f"{r['exported_macs_ratio']:.2f}x",
                      "/".join(str(v) for v in r["final_ranks"].values()), r["total_rank"]))
    return format_table(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=tuple(TASKS), default="lenet5")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the task's recipe")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both methods (default 1)")
    parser.add_argument("--reuse-prefix", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--maestro", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                        help="a MAESTRO option over the recipe (repeatable; VALUE in JSON, or a plain string): "
                             "--maestro sampler=suffix --maestro warmup_epochs=2")
    parser.add_argument("--profile", action="store_true", help="cProfile one epoch of each method and stop")
    parser.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/<the task's file>")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    task = TASKS[args.task]
    args.epochs = task.recipe["epochs"] if args.epochs is None else args.epochs
    args.json = Path(__file__).parent / "results" / task.json_name if args.json is None else args.json
    data = load_data(task.recipe["data"])
    if args.profile:
        profile(data, args)
        return
    started = time.perf_counter()
    results, rows = {}, []
    for seed in args.seeds:
        results[seed] = run_seed(data, seed, args)
        rows.append(seed_row(seed, results[seed]))
    median = {key: statistics.median(r[key] for r in rows)
              for key in ("ratio", "dense_accuracy", "maestro_accuracy", "total_rank", "dense_time", "maestro_time",
                          "exported_macs_ratio", "train_macs_ratio")}
    if rows[0]["dense_perplexity"] is not None:
        median.update({key: statistics.median(r[key] for r in rows) for key in ("dense_perplexity", "maestro_perplexity")})
    print(f"\nper-epoch times, seed {args.seeds[0]} (wall seconds per epoch, interleaved):")
    print(epoch_table(results[args.seeds[0]]))
    print("\nper seed:")
    print(summary_table(rows))
    verdict = task.targets(median)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{args.task}, {args.epochs} epochs; {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {machine}, "
          f"{args.threads} thread(s){''.join(f', {k}={v}' for k, v in args.maestro)}")
    perplexity = (f", perplexity MAESTRO {median['maestro_perplexity']:.2f} (dense {median['dense_perplexity']:.2f})"
                  if "dense_perplexity" in median else "")
    print(f"median over {len(rows)} seed(s): time ratio {median['ratio']:.2f}, MAESTRO accuracy "
          f"{100 * median['maestro_accuracy']:.2f}% (dense {100 * median['dense_accuracy']:.2f}%){perplexity}, "
          f"total rank {median['total_rank']}, exported MACs {median['exported_macs_ratio']:.2f}x dense, "
          f"training MACs {median['train_macs_ratio']:.2f}x dense")
    print("targets: " + ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in verdict.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, {
        "task": args.task, "recipe": task.recipe | {"epochs": args.epochs}, "threads": args.threads,
        "reuse_prefix": args.reuse_prefix, "maestro": dict(args.maestro), "seeds": args.seeds, "per_seed": rows,
        "median": median, "targets": verdict,
        "histories": {str(seed): {m: r[m]["history"] for m in r} for seed, r in results.items()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
                    "cpu_count": os.cpu_count()}, "date": time.strftime("%Y-%m-%d"),
        "wall_time": time.perf_counter() - started,
    })
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
