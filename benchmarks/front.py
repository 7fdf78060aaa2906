"""The whole accuracy–cost front of LeNet-5 on mnist5k from one greedy pass, against uniform truncation.

Trains LeNet-5 with MAESTRO (the ``lenet5-mnist5k`` preset, ``--epochs`` of it; not timed), then
times the latency table plus the greedy search on the default 2,048-sample calibration set, and
the validation evaluation of every point. For comparison, every layer is also truncated to the same
fraction of its trained rank (uniform truncation) and evaluated. Prints a table and writes JSON
(with machine, torch version and date) to ``benchmarks/results/front.json``.

    python benchmarks/front.py                     # about a minute of training, then the front
    python benchmarks/front.py --epochs 30 --threads 1 --out /tmp/front.json
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from maestro_lod import rank_pattern
from maestro_lod.data import load_data
from maestro_lod.deploy import (calibration_batches, deployable, evaluate_front, greedy_front, materialize,
                                measure_latency, visited_ranks)
from maestro_lod.engine.costs import layer_floor
from maestro_lod.files import write_json_atomic
from maestro_lod.layers import low_rank_layers
from maestro_lod.engine.counting import count_macs
from maestro_lod.models import build_model
from maestro_lod.tables import format_table
from maestro_lod.training import TrainConfig, fit
from maestro_lod.runs.presets import preset
from maestro_lod.engine.evaluation import evaluate
from maestro_lod.training.rng import seed_everything

TIME_LIMIT_S = 60.0
"""The latency table plus the greedy search should stay within this on a 2-core CPU."""
UNIFORM = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1)
TARGETS = ({"macs": 0.5}, {"macs": 0.3}, {"params": 0.2}, {"max_drop": 0.01}, {"max_drop": 0.02})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--latency-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "front.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(0)
    data = load_data("mnist5k")
    config = TrainConfig.from_dict({**preset("lenet5-mnist5k"), "epochs": args.epochs, "device": "cpu",
                                    "threads": args.threads})
    started = time.perf_counter()
    model = fit(build_model("lenet5", data), data.train, data.val, config).model.eval()
    train_time = time.perf_counter() - started

    calibration = calibration_batches(data.train, seed=config.seed)
    example = calibration[0][0][:1]
    layers = dict(low_rank_layers(model))
    visits = {name: visited_ranks(layer.rank, layer_floor(layer, layer.rank), 0.25) for name, layer in layers.items()}
    started = time.perf_counter()
    latency = measure_latency(model, example, visits, args.latency_batch)
    latency_time = time.perf_counter() - started
    started = time.perf_counter()
    front = greedy_front(model, calibration, "macs", latency=latency)
    search_time = time.perf_counter() - started
    val = calibration_batches(data.val, len(data.val), config.eval_batch_size)
    started = time.perf_counter()
    evaluate_front(front, model, val, calibration)
    evaluation_time = time.perf_counter() - started

    uniform = []
    trained = rank_pattern(model)
    for fraction in UNIFORM:
        ranks = {name: max(layer_floor(layers[name], r), math.ceil(fraction * r)) for name, r in trained.items()}
        deployed = deployable(materialize(model, ranks, calibration))
        accuracy = evaluate(deployed, val, lambda b, m=deployed: (m(b[0]), b[1]), "classification")["accuracy"]
        uniform.append({"fraction": fraction, "ranks": ranks, "macs": count_macs(deployed, example),
                        "accuracy": accuracy})

    rows = [("point", "ranks", "MACs", "params", "latency est. (ms)", "val accuracy")]
    chosen = []
    for target in TARGETS:
        point = front.select(**target)
        chosen.append({"target": target, "point": point.index})
        rows.append((", ".join(f"{k}={v}" for k, v in target.items()) + f" (#{point.index})", point.label(),
                     f"{point.macs / front.dense_macs:.2f}x", f"{point.params / front.dense_params:.2f}x",
                     f"{1000 * point.latency:.3f}", f"{100 * point.accuracy:.2f}%"))
    print(f"trained {args.epochs} epochs in {train_time:.0f} s: ranks {front.trained.label()}, "
          f"accuracy {100 * front.trained.accuracy:.2f}%")
    print(f"latency table {latency_time:.1f} s + greedy search {search_time:.1f} s "
          f"({len(front.points)} points) = {latency_time + search_time:.1f} s (limit {TIME_LIMIT_S:.0f} s); "
          f"evaluating every point {evaluation_time:.1f} s\n")
    print(format_table(rows))
    print("\nuniform truncation vs the greedy front at no more MACs:")
    comparison = [("fraction", "ranks", "MACs", "uniform acc", "greedy acc at ≤ MACs")]
    for entry in uniform:
        feasible = [p for p in front.points if p.macs <= entry["macs"]]
        best = max((p.accuracy for p in feasible), default=None)
        entry["greedy_accuracy"] = best
        comparison.append((f"{entry['fraction']:.2f}", "/".join(map(str, entry["ranks"].values())),
                           f"{entry['macs'] / front.dense_macs:.2f}x", f"{100 * entry['accuracy']:.2f}%",
                           "-" if best is None else f"{100 * best:.2f}%"))
    print(format_table(comparison))
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "threads": torch.get_num_threads()},
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "epochs": args.epochs,
              "seconds": {"train": train_time, "latency_table": latency_time, "search": search_time,
                          "evaluation": evaluation_time},
              "front": front.to_dict(), "targets": chosen, "uniform": uniform}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
