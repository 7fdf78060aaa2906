"""How fast the accuracy–cost front comes, and how good it is: the exhaustive greedy search
scoring every candidate on every calibration position (the reference), against the exhaustive and
lazy searches scoring on the default ``scoring_positions`` (the lazy one also with one removal
per round, ``share=0``, as before rounds cut several layers) and rank allocation without search
(``greedy_front(search=...)``).

Setups (parameters as the cost throughout):

* ``lenet5``: LeNet-5 trained with MAESTRO on mnist5k (the ``lenet5-mnist5k`` preset, ``--epochs``);
* ``charlm``: the character Transformer LM trained with MAESTRO on pydoc-text (``char-lm-pydoc``,
  ``--charlm-epochs``);
* ``cnn4``: the four-convolution CNN with BatchNorm trained with MAESTRO on mnist5k (the ``fronts``
  suite's ``cnn4-mnist5k`` recipe shared by every family, so the paper's objective with every
  layer factorised, ``--cnn4-epochs``); BatchNorm statistics are recomputed at every point;
* ``gpt2``: a GPT-2-style model (12 blocks, width 256, 4 heads; ``transformers.GPT2LMHeadModel`` from
  a config, random weights) factorised at full rank, calibrated on windows of the pydoc text
  (``--gpt2-calibration`` windows of 64 characters). Random weights have no low-rank structure:
  this setup measures speed, and its perplexities say little. Its exhaustive front would take
  hours (48 layers of rank 256): the searches stop at ``params=0.5``, one exhaustive round is timed
  and extrapolated over the rounds the one-removal lazy search needed to get there, and the default
  lazy search also walks the whole front.

For every method: the search time, the number of calibration evaluations (candidates scored), and
at budgets 0.1, 0.15, 0.2, 0.3, 0.5 and 1.0 of the dense model's parameters the point of least
calibration loss within the budget, evaluated on the validation split (accuracy; loss and
perplexity for the language models). Also timed: the lazy search stopping at ``params=0.5`` (what
``compress --target params=0.5`` needs). Prints a table and writes JSON (machine, torch version,
date) to ``benchmarks/results/front_speed.json``.

    python benchmarks/front_speed.py                         # lenet5 and gpt2 (minutes)
    python benchmarks/front_speed.py --setups lenet5,charlm,gpt2 --threads 1
    python benchmarks/front_speed.py --setups charlm --calibration 512  # the char LM's exhaustive front in minutes
    python benchmarks/front_speed.py --setups charlm --methods "lazy;lazy, stop at params=0.5"  # some rows again
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import maestro_lod as ml
from maestro_lod.bench.fronts import TASKS as FRONT_TASKS
from maestro_lod.data import load_data
from maestro_lod.data.text import pydoc_corpus
from maestro_lod.deploy import calibration_batches, deployable, materialize
from maestro_lod.engine.evaluation import evaluate
from maestro_lod.engine.search import allocated_front, greedy_front
from maestro_lod.files import write_json_atomic
from maestro_lod.models import build_model
from maestro_lod.runs.presets import preset
from maestro_lod.tables import format_table
from maestro_lod.training import TrainConfig, fit
from maestro_lod.training.rng import seed_everything

BUDGETS = (0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
REFERENCE = "exhaustive, every position"
"""The quality reference: every candidate scored every round on the whole calibration set."""
LENGTH = 64
ONE_PER_ROUND = "lazy, one removal per round, stop at params=0.5"


class LogitsOnly(nn.Module):
    """A Hugging Face causal LM called with token ids, returning the logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def recipe(name: str) -> dict[str, Any]:
    """The training options of a trained setup: a preset, or the ``fronts`` suite's cnn4 task."""
    if name == "cnn4":
        return dict(next(task for task in FRONT_TASKS if task.name == "cnn4-mnist5k").options)
    return preset({"lenet5": "lenet5-mnist5k", "charlm": "char-lm-pydoc"}[name])


def trained(name: str, epochs: int, threads: int | None, calibration: int) -> dict[str, Any]:
    options = recipe(name)
    data = load_data(options["data"])
    config = TrainConfig.from_dict({**options, "epochs": epochs, "device": "cpu", "threads": threads})
    seed_everything(0)
    started = time.perf_counter()
    model = fit(build_model(options["model"], data), data.train, data.val, config, kind=data.kind).model.eval()
    return {"model": model, "train_s": time.perf_counter() - started, "kind": data.kind,
            "calibration": calibration_batches(data.train, calibration, seed=config.seed),
            "val": calibration_batches(data.val, min(len(data.val), 2000), config.eval_batch_size, seed=0)}


def gpt2(windows: int) -> dict[str, Any]:
    import transformers

    text = pydoc_corpus()
    symbols = sorted(set(text))
    ids = torch.tensor([symbols.index(c) for c in text[:LENGTH * 4 * (windows + 512)]])
    rows = ids[:(len(ids) // (LENGTH + 1)) * (LENGTH + 1)].view(-1, LENGTH + 1)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=256, n_head=4, vocab_size=len(symbols), n_positions=LENGTH,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = ml.factorize(LogitsOnly(transformers.GPT2LMHeadModel(config)),
                         ml.FactorizeConfig(exclude_modules=["model.lm_head"])).eval()
    train, val = rows[:windows], rows[-256:]
    return {"model": model, "train_s": 0.0, "kind": "language-model",
            "calibration": [(train[i:i + 16, :-1], train[i:i + 16, 1:]) for i in range(0, len(train), 16)],
            "val": [(val[i:i + 64, :-1], val[i:i + 64, 1:]) for i in range(0, len(val), 64)]}


def quality(setup: dict[str, Any], front, cache: dict) -> dict[str, Any]:
    """At every budget: the point of least calibration loss within it, evaluated on validation data."""
    result = {}
    for budget in BUDGETS:
        feasible = [p for p in front.points if p.params <= budget * front.dense_params * (1 + 1e-12)]
        if not feasible:
            result[str(budget)] = None
            continue
        point = min(feasible, key=lambda p: (p.calibration_loss, p.index))
        key = tuple(point.ranks.items())
        if key not in cache:
            model = deployable(materialize(setup["model"], point, setup["calibration"]))
            cache[key] = evaluate(model, setup["val"], lambda b, m=model: (m(b[0]), b[1]), setup["kind"])
        metrics = cache[key]
        result[str(budget)] = {"params": point.params / front.dense_params, "ranks": point.label(),
                               "calibration_loss": point.calibration_loss, "accuracy": metrics["accuracy"],
                               "loss": metrics["loss"], "perplexity": metrics.get("perplexity")}
    return result


def timed(run) -> tuple[Any, float, int]:
    scored = []

    def progress(done, total, status):
        scored[:] = [status.scored]

    started = time.perf_counter()
    front = run(progress)
    return front, time.perf_counter() - started, (scored or [0])[0]


def methods(large: bool) -> dict[str, Any]:
    """The searches compared; for a large model only those that stop at ``params=0.5`` and allocation."""
    table = {}
    if not large:
        table[REFERENCE] = lambda m, c, p: greedy_front(m, c, "params", progress=p, scoring_positions=None)
        table["exhaustive"] = lambda m, c, p: greedy_front(m, c, "params", progress=p)
        table["lazy, one removal per round"] = lambda m, c, p: greedy_front(m, c, "params", search="lazy", share=0,
                                                                            progress=p)
        table["lazy"] = lambda m, c, p: greedy_front(m, c, "params", search="lazy", progress=p)
        table["lazy, share 0.04"] = lambda m, c, p: greedy_front(m, c, "params", search="lazy", share=0.04,
                                                                 progress=p)
        table["lazy, 16,384 positions"] = lambda m, c, p: greedy_front(m, c, "params", search="lazy", progress=p,
                                                                       scoring_positions=16384)
    table[ONE_PER_ROUND] = lambda m, c, p: greedy_front(
        m, c, "params", search="lazy", share=0, targets={"params": 0.5}, progress=p)
    table["lazy, stop at params=0.5"] = lambda m, c, p: greedy_front(m, c, "params", search="lazy",
                                                                      targets={"params": 0.5}, progress=p)
    if large:
        table["lazy, the whole front"] = lambda m, c, p: greedy_front(m, c, "params", search="lazy", progress=p)
    table["allocate (measured), target params=0.5"] = lambda m, c, p: allocated_front(
        m, c, "params", weighting="measured", targets={"params": 0.5}, progress=p)
    for weighting in ("measured", "probe", "relative", "none"):
        table[f"allocate ({weighting})"] = lambda m, c, p, w=weighting: allocated_front(
            m, c, "params", weighting=w, budgets=BUDGETS, progress=p)
    if not large:
        table["allocate (probe, unwhitened)"] = lambda m, c, p: allocated_front(m, c, "params", whiten=False,
                                                                                budgets=BUDGETS, progress=p)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default="lenet5,gpt2")
    parser.add_argument("--epochs", type=int, default=4, help="LeNet-5 epochs")
    parser.add_argument("--charlm-epochs", type=int, default=1)
    parser.add_argument("--cnn4-epochs", type=int, default=8)
    parser.add_argument("--calibration", type=int, default=2048, help="calibration samples (LeNet-5, char LM)")
    parser.add_argument("--gpt2-calibration", type=int, default=16, help="64-character windows")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", default=None,
                        help="only these methods, separated by ';' (the setup's other methods measured earlier on "
                             "the same trained model stay in the JSON)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "front_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()},
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "setups": {}}
    if args.out.is_file():  # setups measured earlier (other --setups) stay, each with its own date
        results["setups"] = json.loads(args.out.read_text()).get("setups", {})
    for name in args.setups.split(","):
        epochs = {"charlm": args.charlm_epochs, "cnn4": args.cnn4_epochs}.get(name, args.epochs)
        setup = gpt2(args.gpt2_calibration) if name == "gpt2" else trained(name, epochs, args.threads, args.calibration)
        digest = model_digest(setup["model"])
        before = results["setups"].get(name, {})
        earlier = before.get("methods", {}) if args.methods else {}
        if earlier and before.get("model_digest", digest) != digest:
            print(f"{name}: the trained model differs from the one the earlier rows were measured on: they are "
                  f"dropped", flush=True)
            earlier = {}
        entry = results["setups"][name] = {"train_s": setup["train_s"], "model_digest": digest,
                                           "methods": dict(earlier),
                                           "date": results["date"], "calibration_batches": len(setup["calibration"]),
                                           "calibration_samples": sum(len(t) for _, t in setup["calibration"])}
        cache: dict = {}
        fronts = {}
        chosen = methods(name == "gpt2")
        if args.methods:
            unknown = set(args.methods.split(";")) - set(chosen)
            if unknown:
                parser.error(f"unknown method(s) {sorted(unknown)}; choose from {'; '.join(chosen)}")
            chosen = {method: run for method, run in chosen.items() if method in args.methods.split(";")}
        for method, run in chosen.items():
            front, seconds, scored = timed(lambda p: run(setup["model"], setup["calibration"], p))
            fronts[method] = front
            if method == "lazy" and REFERENCE in fronts:  # where the lazy path leaves the reference
                paths = [[p.ranks for p in f.points] for f in (fronts[REFERENCE], front)]
                same = next((i for i, (a, b) in enumerate(zip(*paths)) if a != b), min(map(len, paths)))
                shared = sum(ranks in paths[0] for ranks in paths[1])
                entry["lazy_path"] = {"rounds_before_divergence": same - 1 if same else 0,
                                      "points_shared": shared, "points": len(paths[1])}
                print(f"{name}: the lazy path follows the exhaustive one for {max(0, same - 1)} rounds; "
                      f"{shared} of its {len(paths[1])} points are exhaustive points", flush=True)
            entry["methods"][method] = {"seconds": seconds, "scored": scored, "points": len(front.points),
                                        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "budgets": quality(setup, front, cache)}
            print(f"{name}: {method}: {seconds:.1f} s, {len(front.points)} points, {scored} candidates scored",
                  flush=True)
        if name == "gpt2" and ONE_PER_ROUND in fronts:  # one exhaustive round, extrapolated over that search's rounds
            front, seconds, scored = timed(lambda p: greedy_front(
                setup["model"], setup["calibration"], "params", progress=p,
                targets={"params": front_start(fronts) * (1 - 1e-9)}))
            rounds = entry["methods"][ONE_PER_ROUND]["points"] - 1
            entry["methods"]["exhaustive (estimated)"] = {
                "seconds": seconds / max(1, len(front.points) - 1) * rounds, "scored": None, "points": rounds + 1,
                "budgets": {}, "measured_rounds": len(front.points) - 1, "measured_s": seconds}
        print_table(name, entry)
        results["setups"][name] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, results)
    print(f"\nwrote {args.out}")


def model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's weights: rows measured in separate calls compare only on the same model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def front_start(fronts: dict[str, Any]) -> float:
    front = next(iter(fronts.values()))
    return front.fraction(front.trained, "params")


def print_table(name: str, entry: dict[str, Any]) -> None:
    language = any((b or {}).get("perplexity") for m in entry["methods"].values() for b in m["budgets"].values())
    metric = "perplexity" if language else "accuracy"
    rows = [("method", "search (s)", "scored", "points", *(f"{b}x" for b in BUDGETS))]
    reference = entry["methods"].get(REFERENCE, {}).get("budgets", {})
    for method, result in entry["methods"].items():
        cells = []
        for budget in BUDGETS:
            got = result["budgets"].get(str(budget))
            if got is None:
                cells.append("-")
                continue
            value = got[metric]
            text = f"{value:.3f}" if language else f"{100 * value:.2f}%"
            ref = reference.get(str(budget))
            if ref and method != REFERENCE:
                delta = (value / ref[metric] - 1) * 100 if language else 100 * (value - ref[metric])
                text += f" ({delta:+.2f}{'%' if language else ''})"
            cells.append(text)
        rows.append((method, f"{result['seconds']:.1f}", str(result["scored"]), str(result["points"]), *cells))
    print(f"\n{name} (trained in {entry['train_s']:.0f} s), validation {metric} at params budgets "
          f"(in brackets: against {REFERENCE}, {'relative %' if language else 'points'}):")
    print(format_table(rows))


if __name__ == "__main__":
    main()
