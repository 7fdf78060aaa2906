"""What each change of the training recipe and of the search buys MAESTRO's one-run front.

On LeNet-5 / mnist5k (the default ``maestro-lod train`` task), for each seed, every row trains
one model with the preset's optimiser and epochs and searches one greedy front (step 0.25,
2,048 calibration samples, cost = parameters). The first rows use the recipe before the changes
(constant learning rate, the paper's single-layer sampler); the preset now holds the last row's
training recipe. Rows:

* ``dense + SVD``: dense training, factorised by SVD at full rank, greedy front;
* ``dense + SVD, anneal``: the same with a final ×0.1 learning-rate phase (the last 10 % of epochs);
* ``dense + whitened SVD, anneal``: factorised by SVD of W·L on the calibration inputs instead;
* ``MAESTRO``: the preset's MAESTRO run, greedy front from its trained factors;
* ``MAESTRO, anneal``: with the final ×0.1 phase;
* ``…, canonical``: each trained factor pair re-factorised by SVD (``canonicalize_``) before the
  search; ``…, canonical (whitened)``: by whitened SVD on the calibration set;
* ``…, independent sampler``: every layer draws a rank in the sampled pass instead of one layer;
* ``… 10 epochs``: the run cut to 10 epochs, with the 30-epoch λ_gl or with it scaled to the
  run length (``lambda_epochs = 30``: λ × 3), against dense + SVD trained as long;
* ``MAESTRO recipe, group lasso by MACs``: each layer's groups weighted by what one of its ranks
  costs in MACs (``group_weights = "macs"``);
* ``MAESTRO recipe, dense warm-up``: the first quarter of the epochs trained dense (Pufferfish's
  share), then factorised by SVD (``warmup_epochs``);
* ``MAESTRO recipe, suffix sampler``: the sampled pass truncates every layer from a randomly
  drawn one on (``sampler = "suffix"``), so it reuses the full pass's leading layers;
* ``MAESTRO recipe, sampled pass on half / a quarter of each batch``: the sampled pass trains on
  that share of each batch's examples (``sampled_batch``), so it costs that share of a full pass;
* ``MAESTRO recipe, budget sampler``: the sampled sub-model's size drawn uniformly, every layer's
  ranks near it (``sampler = "budget"``);
* ``MAESTRO recipe, sampled loss weighted ½ / ¼``: the distillation loss of the sampled pass
  weighted 0.5 / 0.25 against the full pass's (``sampled_weight``);
* ``MAESTRO recipe, first and last layer kept dense``: ``conv1`` and ``fc3`` are not factorised
  (``factorize.keep_ends``), so neither is sampled nor cut.

Prints, per row, the best validation accuracy of the front within each budget (mean ± standard
error over seeds) and the training and search seconds; writes every front to JSON with the
machine, torch version and date.

    python benchmarks/recipe.py --seeds 0 1 2          # ~15 minutes on one core
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import maestro_lod as ml
from maestro_lod.data import load_data
from maestro_lod.deploy import calibration_batches, evaluate_front, greedy_front
from maestro_lod.files import write_json_atomic
from maestro_lod.models import build_model
from maestro_lod.runs.presets import preset
from maestro_lod.tables import format_table
from maestro_lod.training import TrainConfig, fit
from maestro_lod.training.rng import seed_everything

BUDGETS = (0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
PAPER = {"schedule": "constant", "sampler": "single"}
"""The recipe before the two changes measured here (the constant learning rate, the paper's sampler)."""
ANNEAL = {"schedule": "multistep", "milestones": [0.9], "gamma": 0.1}
TRAININGS = {  # name -> (method, config changes over the preset)
    "dense": ("dense", PAPER),
    "dense-anneal": ("dense", {**PAPER, **ANNEAL}),
    "maestro": ("maestro", PAPER),
    "maestro-anneal": ("maestro", {**PAPER, **ANNEAL}),
    "maestro-anneal-independent": ("maestro", {**ANNEAL, "sampler": "independent"}),
    "dense-10": ("dense", {**ANNEAL, "epochs": 10}),
    "maestro-10": ("maestro", {**ANNEAL, "sampler": "independent", "epochs": 10}),
    "maestro-10-scaled": ("maestro", {**ANNEAL, "sampler": "independent", "epochs": 10, "lambda_epochs": 30}),
    "maestro-macs": ("maestro", {**ANNEAL, "sampler": "independent", "group_weights": "macs"}),
    "maestro-warmup": ("maestro", {**ANNEAL, "sampler": "independent", "warmup_share": 0.25}),
    "maestro-suffix": ("maestro", {**ANNEAL, "sampler": "suffix"}),
    "maestro-half-batch": ("maestro", {**ANNEAL, "sampler": "independent", "sampled_batch": 0.5}),
    "maestro-quarter-batch": ("maestro", {**ANNEAL, "sampler": "independent", "sampled_batch": 0.25}),
    "maestro-budget": ("maestro", {**ANNEAL, "sampler": "budget"}),
    "maestro-weight-half": ("maestro", {**ANNEAL, "sampler": "independent", "sampled_weight": 0.5}),
    "maestro-weight-quarter": ("maestro", {**ANNEAL, "sampler": "independent", "sampled_weight": 0.25}),
    "maestro-keep-ends": ("maestro", {**ANNEAL, "sampler": "independent", "factorize": {"keep_ends": True}}),
}
"""``warmup_share``: that share of the epochs trained dense before factorising (``warmup_epochs``)."""
ROWS = {  # row -> (training, how the front's model is prepared)
    "dense + SVD": ("dense", "svd"),
    "dense + SVD, anneal": ("dense-anneal", "svd"),
    "dense + whitened SVD, anneal": ("dense-anneal", "whitened"),
    "MAESTRO": ("maestro", "trained"),
    "MAESTRO, anneal": ("maestro-anneal", "trained"),
    "MAESTRO, anneal, canonical": ("maestro-anneal", "canonical"),
    "MAESTRO, anneal, canonical (whitened)": ("maestro-anneal", "canonical-whitened"),
    "MAESTRO, anneal, independent sampler, canonical": ("maestro-anneal-independent", "canonical"),
    "MAESTRO recipe, canonical (whitened)": ("maestro-anneal-independent", "canonical-whitened"),
    "dense + SVD, anneal, 10 epochs": ("dense-10", "svd"),
    "MAESTRO recipe, 10 epochs, λ of 30": ("maestro-10", "canonical"),
    "MAESTRO recipe, 10 epochs, λ scaled to 10": ("maestro-10-scaled", "canonical"),
    "MAESTRO recipe, group lasso by MACs": ("maestro-macs", "canonical"),
    "MAESTRO recipe, dense warm-up (first quarter of the epochs)": ("maestro-warmup", "canonical"),
    "MAESTRO recipe, suffix sampler": ("maestro-suffix", "canonical"),
    "MAESTRO recipe, sampled pass on half of each batch": ("maestro-half-batch", "canonical"),
    "MAESTRO recipe, sampled pass on a quarter of each batch": ("maestro-quarter-batch", "canonical"),
    "MAESTRO recipe, budget sampler": ("maestro-budget", "canonical"),
    "MAESTRO recipe, sampled loss weighted ½": ("maestro-weight-half", "canonical"),
    "MAESTRO recipe, sampled loss weighted ¼": ("maestro-weight-quarter", "canonical"),
    "MAESTRO recipe, first and last layer kept dense": ("maestro-keep-ends", "canonical"),
}


def prepared(model: torch.nn.Module, how: str, calibration: list) -> torch.nn.Module:
    """The factorised model the front starts from."""
    model = copy.deepcopy(model).eval()
    if how == "svd":
        return ml.factorize(model, ml.FactorizeConfig(init="svd"))
    if how == "whitened":
        return ml.factorize(model, ml.FactorizeConfig(init="whitened"), calibration=calibration)
    if how == "canonical":
        return ml.canonicalize_(model)
    if how == "canonical-whitened":
        return ml.canonicalize_(model, calibration=calibration)
    return model


def run_seed(seed: int, epochs: int, rows: list[str]) -> dict[str, Any]:
    data = load_data("mnist5k")
    base = {**preset("lenet5-mnist5k"), "epochs": epochs, "seed": seed, "device": "cpu", "threads": 1}
    val = calibration_batches(data.val, len(data.val), 500)
    calibration = calibration_batches(data.train, seed=seed)
    trained, seconds = {}, {}
    for name in sorted({ROWS[row][0] for row in rows}):
        method, changes = TRAININGS[name]
        changes = dict(changes)
        if "warmup_share" in changes:
            changes["warmup_epochs"] = round(changes.pop("warmup_share") * epochs)
        seed_everything(seed)
        model = build_model("lenet5", data)
        started = time.perf_counter()
        trained[name] = fit(model, data.train, data.val, TrainConfig.from_dict({**base, **changes, "method": method})).model
        seconds[f"train {name}"] = time.perf_counter() - started
    fronts = {}
    for row in rows:
        training, how = ROWS[row]
        started = time.perf_counter()
        model = prepared(trained[training], how, calibration)
        front = greedy_front(model, calibration, "params")
        evaluate_front(front, model, val, calibration)
        seconds[f"front {row}"] = time.perf_counter() - started
        fronts[row] = [{"params": front.fraction(p, "params"), "macs": front.fraction(p, "macs"),
                        "accuracy": p.accuracy, "ranks": p.ranks} for p in front.points]
        print(f"seed {seed}: {row}: {seconds[f'front {row}']:.0f} s search", flush=True)
    return {"seed": seed, "fronts": fronts, "seconds": seconds}


def best(front: list[dict[str, Any]], axis: str, budget: float) -> float | None:
    return max((p["accuracy"] for p in front if p[axis] <= budget + 1e-9), default=None)


def summary(values: list[float | None]) -> str:
    if any(v is None for v in values) or not values:
        return "-"
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f}±{100 * se:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "recipe.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "threads": 1}
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"machine: {machine['platform']} ({machine['processor']}); torch {torch.__version__}; {date}")
    results = [run_seed(seed, args.epochs, args.rows) for seed in args.seeds]
    for axis, budgets in (("params", BUDGETS), ("macs", (0.3, 0.5, 1.0))):
        table = [(f"{axis} ≤ (× dense)", *(f"{b:g}" for b in budgets))]
        for row in args.rows:
            table.append((row, *(summary([best(r["fronts"][row], axis, b) for r in results]) for b in budgets)))
        print(f"\nbest validation accuracy (%) within a {axis} budget, mean ± s.e. over seeds {args.seeds}")
        print(format_table(table))
    seconds = {key: statistics.median(r["seconds"][key] for r in results) for key in results[0]["seconds"]}
    print("\nmedian seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    write_json_atomic(args.out, {"machine": machine, "torch": torch.__version__, "date": date, "epochs": args.epochs,
                                 "seeds": args.seeds, "runs": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
