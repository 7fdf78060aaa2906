"""One training run, many models: is the greedy front of one MAESTRO model as good as the alternatives?

For each setup (LeNet-5 on mnist5k with parameters as the cost, since LeNet-5's MACs sit in its two
small convolutions; the MLP on the 8×8 digits with MACs as the cost, since its linear layers hold
the MACs), with the same optimiser, epochs and seed everywhere:

(a) MAESTRO: the model trained with MAESTRO (ordered dropout, group lasso, shrinking), then the
    greedy front (``greedy_front``, step 0.25, the default 2,048-sample calibration set);
(b) uniform: the same MAESTRO model with every layer truncated to the same fraction of its
    trained rank;
(c) dense + SVD: the same architecture trained dense (plain cross-entropy, no factorisation),
    factorised by SVD at full rank (``ml.factorize``, ``init="svd"``), then the same greedy front;
(d) separately trained: for three points of the MAESTRO front, a freshly initialised dense model
    (seed of the run) factorised by SVD at that point's rank pattern
    (``FactorizeConfig(rank_pattern=...)``) and trained at those fixed ranks with plain
    cross-entropy (``method="dense"``: no ordered dropout, no group lasso, no shrinking) for the
    same epochs: one training run per budget.

Every accuracy is on the validation split, of the deployed form. Prints, per setup, the best
accuracy each curve reaches within a grid of budgets, and the three separately trained models
against the front at the same ranks; writes JSON (machine, torch version, date, every curve) to
``benchmarks/results/front_evidence.json``.

    python benchmarks/front_evidence.py                       # a few minutes on 2 CPU cores
    python benchmarks/front_evidence.py --lenet-epochs 12 --mlp-epochs 8 --threads 2
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

import maestro_lod as ml
from maestro_lod.data import load_data
from maestro_lod.deploy import calibration_batches, deployable, evaluate_front, greedy_front, materialize
from maestro_lod.engine import targets
from maestro_lod.engine.costs import layer_floor
from maestro_lod.files import write_json_atomic
from maestro_lod.layers import low_rank_layers
from maestro_lod.engine.counting import count_macs, count_params
from maestro_lod.models import build_model
from maestro_lod.tables import format_table
from maestro_lod.training import TrainConfig, fit
from maestro_lod.runs.presets import preset
from maestro_lod.engine.evaluation import evaluate
from maestro_lod.training.rng import seed_everything

UNIFORM = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05)
GRID = (1.0, 0.5, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03)
SEPARATE = (0.7, 0.4, 0.2)
"""The separately trained budgets, as fractions of the MAESTRO model's own (trained-point) cost."""
SETUPS = {"lenet5-mnist5k": {"model": "lenet5", "data": "mnist5k", "cost": "params"},
          "mlp-digits": {"model": "mlp", "data": "digits", "cost": "macs"}}


def _accuracy(model: torch.nn.Module, val: list) -> float:
    deployed = deployable(model.eval()) if any(True for _ in low_rank_layers(model)) else model.eval()
    return evaluate(deployed, val, lambda b, m=deployed: (m(b[0]), b[1]), "classification")["accuracy"]


def _cost(model: torch.nn.Module, example: torch.Tensor, cost: str) -> int:
    deployed = deployable(model.eval()) if any(True for _ in low_rank_layers(model)) else model.eval()
    return count_macs(deployed, example) if cost == "macs" else count_params(deployed)


def _best(curve: list[dict[str, Any]], budget: float) -> float | None:
    """The best accuracy of ``curve`` (entries with ``fraction`` and ``accuracy``) within ``budget``."""
    return max((p["accuracy"] for p in curve if p["fraction"] <= budget + 1e-12), default=None)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _front_curve(front, cost: str) -> list[dict[str, Any]]:
    return [{"fraction": front.fraction(p, cost), "accuracy": p.accuracy, "ranks": p.ranks} for p in front.points]


def run_setup(name: str, spec: dict[str, Any], epochs: int, threads: int | None) -> dict[str, Any]:
    cost = spec["cost"]
    data = load_data(spec["data"])
    base = {**preset("lenet5-mnist5k"), "model": spec["model"], "data": spec["data"], "epochs": epochs,
            "device": "cpu", "threads": threads}
    seconds: dict[str, float] = {}

    def train(model: torch.nn.Module, method: str, what: str) -> torch.nn.Module:
        started = time.perf_counter()
        trained = fit(model, data.train, data.val, TrainConfig.from_dict({**base, "method": method})).model.eval()
        seconds[what] = seconds.get(what, 0.0) + time.perf_counter() - started
        return trained

    seed = TrainConfig.from_dict(base).seed

    def fresh() -> torch.nn.Module:
        seed_everything(seed)
        return build_model(spec["model"], data)

    val = calibration_batches(data.val, len(data.val), 500)
    calibration = calibration_batches(data.train, seed=seed)
    example = calibration[0][0][:1]

    # (a) MAESTRO and its greedy front
    maestro = train(fresh(), "maestro", "train maestro")
    started = time.perf_counter()
    front = greedy_front(maestro, calibration, cost)
    evaluate_front(front, maestro, val, calibration)
    seconds["front maestro"] = time.perf_counter() - started
    dense_cost = targets.dense_cost(front, cost)

    # (b) uniform truncation of the same model
    uniform = []
    layers = dict(low_rank_layers(maestro))
    trained_ranks = ml.rank_pattern(maestro)
    for fraction in UNIFORM:
        ranks = {n: max(layer_floor(layers[n], r), math.ceil(fraction * r)) for n, r in trained_ranks.items()}
        model = materialize(maestro, ranks, calibration)
        uniform.append({"rank_fraction": fraction, "ranks": ranks, "fraction": _cost(model, example, cost) / dense_cost,
                        "accuracy": _accuracy(model, val)})

    # (c) dense training, SVD at full rank, the same greedy front
    dense = train(fresh(), "dense", "train dense")
    dense_accuracy = _accuracy(dense, val)
    svd = ml.factorize(dense, ml.FactorizeConfig(init="svd")).eval()
    started = time.perf_counter()
    svd_front = greedy_front(svd, calibration, cost)
    evaluate_front(svd_front, svd, val, calibration)
    seconds["front dense+svd"] = time.perf_counter() - started

    # (d) separately trained at three points of the MAESTRO front
    separate = []
    trained_fraction = front.fraction(front.trained, cost)
    for share in SEPARATE:
        point = front.select(**{cost: min(1.0, share * trained_fraction)})
        model = ml.factorize(fresh(), ml.FactorizeConfig(init="svd", rank_pattern=dict(point.ranks)))
        assert ml.rank_pattern(model) == point.ranks, (ml.rank_pattern(model), point.ranks)
        model = train(model, "dense", "train separate")
        separate.append({"budget": share * trained_fraction, "point": point.index, "ranks": point.ranks,
                         "fraction": _cost(model, example, cost) / dense_cost, "accuracy": _accuracy(model, val),
                         "maestro_point_accuracy": point.accuracy})

    curves = {"maestro": _front_curve(front, cost), "uniform": uniform, "dense_svd": _front_curve(svd_front, cost),
              "separate": separate}
    return {"setup": name, **spec, "epochs": epochs, "dense_accuracy": dense_accuracy,
            "maestro_trained": {"ranks": front.trained.ranks, "fraction": trained_fraction,
                                "accuracy": front.trained.accuracy},
            "curves": curves, "seconds": seconds, "front": front.to_dict(), "dense_svd_front": svd_front.to_dict()}


def print_setup(result: dict[str, Any]) -> None:
    cost, curves = result["cost"], result["curves"]
    trained = result["maestro_trained"]
    print(f"\n== {result['setup']} ({result['epochs']} epochs, cost: {cost}) ==")
    print(f"dense model: {_percent(result['dense_accuracy'])}; MAESTRO trained point: ranks "
          f"{'/'.join(map(str, trained['ranks'].values()))}, {trained['fraction']:.3f}x {cost}, "
          f"{_percent(trained['accuracy'])}")
    rows = [(f"{cost} ≤ (x dense)", "(a) MAESTRO greedy", "(b) MAESTRO uniform", "(c) dense+SVD greedy")]
    for budget in GRID:
        rows.append((f"{budget:g}", *(_percent(_best(curves[k], budget)) for k in ("maestro", "uniform", "dense_svd"))))
    print(format_table(rows))
    rows = [("budget (x dense)", "ranks", "(d) trained separately", "(a) MAESTRO point", "(b) uniform ≤",
             "(c) dense+SVD ≤")]
    for entry in curves["separate"]:
        budget = entry["fraction"]
        rows.append((f"{budget:.3f}", "/".join(map(str, entry["ranks"].values())), _percent(entry["accuracy"]),
                     _percent(entry["maestro_point_accuracy"]), _percent(_best(curves["uniform"], budget)),
                     _percent(_best(curves["dense_svd"], budget))))
    print(format_table(rows))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lenet-epochs", type=int, default=10)
    parser.add_argument("--mlp-epochs", type=int, default=6)
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "front_evidence.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads()}
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"machine: {machine['platform']} ({machine['processor']}, {machine['threads']} threads); "
          f"torch {torch.__version__}; {date}")
    epochs = {"lenet5-mnist5k": args.lenet_epochs, "mlp-digits": args.mlp_epochs}
    results = []
    for name in args.setups:
        results.append(run_setup(name, SETUPS[name], epochs[name], args.threads))
        print_setup(results[-1])
    write_json_atomic(args.out, {"machine": machine, "torch": torch.__version__, "date": date, "setups": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
