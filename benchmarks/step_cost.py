"""What the parts of a MAESTRO step cost, one measurement per change made to make it cheaper.

Each measurement times two ways of computing the same thing in one process, interleaved (A, B,
A, B, ...), on one torch thread, and reports the median of ``--repeats`` runs after two warm-up
runs, so load from other processes on a shared machine falls on both alike:

* ``compose``: forward and backward of the whole model on one training batch (cnn4 on mnist5k,
  batch 64; the character LM on pydoc-text, batch 32): the dense model, the factorised model as
  its layers choose (a factor pair, or one dense op with the composed weight where that costs
  fewer MACs), and the factorised model with every layer forced to run its pair; then the whole
  MAESTRO step (full pass, sampled pass, as the trainer builds it, without the optimiser) against
  the dense step, each variant drawing the same sub-models from its own identically seeded sampler.
* ``soft-loss``: the masked distillation loss and its backward on ``[positions, classes]`` logits
  with a tenth of the positions ignored, for the character LM's batch (2,048 × 103) and a
  word-piece vocabulary (512 × 32,000): boolean-mask indexing of both matrices (the formulation
  it replaced) against the per-position losses selected by ``torch.where``.
* ``backward-order``: a MAESTRO step of the character LM (dropout, so no prefix reuse): one
  backward of ``loss_full + loss_sampled`` after both passes (the formulation it replaced)
  against the step's backward of the full loss before the sampled pass. Time, and the peak of
  the bytes autograd holds for backward (distinct storages of the saved tensors, parameters
  included).
* ``sampler``: entering and leaving the sampled-rank scope on the 97-layer Transformer-base
  (``transformer`` size ``base``), for the single-layer and the independent sampler: walking the
  model's modules for its layers (``sampled_ranks(model, sampler)``) against the layers the step
  holds (``sampled_ranks(model, sampler, layers)``); and the draw alone.
* ``group-lasso``: the closed-form group-lasso gradient over the 194 factors of Transformer-base
  (69 M factor elements): per-factor ``vector_norm`` and ``addcmul_`` (the formulation it
  replaced) against ``GroupLassoGradient.add_to_grads_`` (rank norms by squares where the rank is
  the last dimension, one ``torch._foreach_addcmul_``).
* ``sampled-batch``: a cnn4 step with the default independent sampler, its sampled pass on one
  example, a quarter and the whole batch, against the dense step and the factorised full pass
  alone: what the sampled pass costs at each share.
* ``slices``: a sampled layer's forward and backward over a batch with the factors as views of
  the leading ``b`` ranks (``up[..., :b]`` is not contiguous) against the same with contiguous
  copies made beforehand; the difference is what copying the slices costs.

    python benchmarks/step_cost.py                       # every measurement; table + JSON
    python benchmarks/step_cost.py --only compose --repeats 15
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import default_collate

import maestro_lod as ml
from maestro_lod.data import IGNORE_INDEX, load_data
from maestro_lod.files import write_json_atomic
from maestro_lod.models import build_model
from maestro_lod.regularization import GroupLassoGradient
from maestro_lod.tables import format_table
from maestro_lod.engine.reuse import PrefixReuse, prefix_reuse_supported
from maestro_lod.training.steps import DenseStep, MaestroStep
from maestro_lod.engine.passes import hard_loss, soft_loss

TASKS = {"cnn4": ("mnist5k", 64), "char-lm": ("pydoc-text", 32)}


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each variant over ``repeats`` interleaved runs (after two warm-up rounds)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 2):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            if round_ >= 2:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def batch(task: str):
    """A model of ``task``, its first training batch and the data."""
    data_name, size = TASKS[task]
    data = load_data(data_name)
    torch.manual_seed(0)
    model = build_model(task, data)
    inputs, targets = default_collate([data.train[i] for i in range(size)])
    return model, inputs, targets


def train_pass(model, inputs, targets) -> Callable[[], None]:
    """One forward and backward pass of ``model`` on the batch (cross-entropy on the labels)."""
    def run() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(inputs)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
    return run


def forcing_pairs(model, run: Callable[[], None]) -> Callable[[], None]:
    """``run`` with every factorised layer made to run its factor pair (an instance attribute
    shadows the layer's choice for the duration)."""
    layers = [layer for _, layer in ml.low_rank_layers(model)]

    def forced() -> None:
        for layer in layers:
            layer.composes = lambda positions: False
        try:
            run()
        finally:
            for layer in layers:
                del layer.composes
    return forced


def maestro_step(model, task: str, inputs, targets, sampler: ml.RankSampler | None = None,
                 sampled_batch: float = 1.0, reuse: bool = True) -> Callable[[], None]:
    """One MAESTRO step as the trainer runs it for ``task`` (with ``reuse``, prefix reuse where the
    model is deterministic; masked distillation for the language model), with ``sampler`` (the
    single-layer one by default) and the sampled pass on ``sampled_batch`` of the batch, without
    the optimiser update."""
    layers = list(ml.low_rank_layers(model))
    reuse_prefix = PrefixReuse(model) if reuse and prefix_reuse_supported(model) is None else None
    step = MaestroStep(model, layers, sampler or ml.SingleLayerSampler(0), contextlib.nullcontext,
                       masked=task == "char-lm", reuse=reuse_prefix,
                       penalty=GroupLassoGradient([layer for _, layer in layers], 1e-3), sampled_batch=sampled_batch)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        step(inputs, targets, torch.Tensor.backward)
        step.add_penalty_gradients_()
    return run


def dense_step(model, inputs, targets) -> Callable[[], None]:
    """One dense training step as the trainer runs it, without the optimiser update."""
    step = DenseStep(model, contextlib.nullcontext)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        step(inputs, targets, torch.Tensor.backward)
    return run


def rows_of(lead: str, case: str, times: dict[str, float]) -> list[dict]:
    """Table rows of one case, each variant's time also as a ratio to the first variant's."""
    first = next(iter(times.values()))
    return [{"lead": lead, "case": case, "variant": name, "ms": 1000 * t, "vs_first": t / first}
            for name, t in times.items()]


def measure_compose(repeats: int) -> list[dict]:
    """Dense, pairs forced and the layers' own choice, for a training pass and a whole step."""
    rows = []
    for task in TASKS:
        model, inputs, targets = batch(task)
        dense = copy.deepcopy(model)
        factorised = ml.factorize(model)
        run = train_pass(factorised, inputs, targets)
        rows += rows_of("compose", f"{task} forward+backward", interleaved(
            {"dense": train_pass(dense, inputs, targets), "factorised, pairs": forcing_pairs(factorised, run),
             "factorised, as chosen": run}, repeats))
        paired, chosen = factorised, copy.deepcopy(factorised)
        rows += rows_of("compose", f"{task} step", interleaved(
            {"dense": dense_step(dense, inputs, targets),
             "MAESTRO, pairs": forcing_pairs(paired, maestro_step(paired, task, inputs, targets)),
             "MAESTRO, as chosen": maestro_step(chosen, task, inputs, targets)}, repeats))
    return rows


def indexed_soft_loss(logits, teacher_logits, targets):
    """The masked distillation loss by boolean-mask indexing (the formulation soft_loss replaced)."""
    valid = targets.reshape(-1) != IGNORE_INDEX
    logits = logits.reshape(-1, logits.shape[-1]).float()[valid]
    teacher = teacher_logits.detach().reshape(-1, logits.shape[-1]).float()[valid]
    return F.cross_entropy(logits, teacher.softmax(-1))


def measure_soft_loss(repeats: int) -> list[dict]:
    """Indexed against masked-by-``torch.where`` distillation loss, forward and backward."""
    rows = []
    for positions, classes in ((2048, 103), (512, 32000)):
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(positions, classes, generator=generator).requires_grad_(True)
        teacher = torch.randn(positions, classes, generator=generator)
        targets = torch.randint(0, classes, (positions,), generator=generator)
        targets[torch.rand(positions, generator=generator) < 0.1] = IGNORE_INDEX

        def indexed() -> None:
            indexed_soft_loss(logits, teacher, targets).backward()

        def selected() -> None:
            soft_loss(logits, teacher, targets, masked=True).backward()
        rows += rows_of("soft-loss", f"{positions} x {classes}", interleaved(
            {"boolean-mask indexing": indexed, "torch.where": selected}, repeats))
    return rows


class SavedBytes:
    """Counts the bytes of the distinct storages autograd saves for backward while they are alive,
    and their peak (use as ``with torch.autograd.graph.saved_tensors_hooks(*counter.hooks())``)."""

    def __init__(self) -> None:
        self.live, self.peak, self.storages = 0, 0, {}

    def hooks(self):
        counter = self

        class Saved:
            def __init__(self, tensor: torch.Tensor):
                self.tensor, storage = tensor, tensor.untyped_storage()
                key = storage.data_ptr()
                count, size = counter.storages.get(key, (0, storage.nbytes()))
                if count == 0:
                    counter.live += size
                    counter.peak = max(counter.peak, counter.live)
                counter.storages[key] = (count + 1, size)
                weakref.finalize(self, counter.release, key)
        return Saved, lambda saved: saved.tensor

    def release(self, key: int) -> None:
        count, size = self.storages[key]
        self.storages[key] = (count - 1, size)
        if count == 1:
            self.live -= size


def summed_backward_step(model, sampler, inputs, targets) -> None:
    """The step without reuse as it was: both passes, then one backward of the sum."""
    full = model(inputs)
    loss_full = hard_loss(full, targets)
    with ml.sampled_ranks(model, sampler):
        loss_sampled = soft_loss(model(inputs), full, targets, masked=True)
        (loss_full + loss_sampled).backward()


def measure_backward_order(repeats: int) -> list[dict]:
    """Time and peak saved bytes of one backward of the sum against the full loss first."""
    model, inputs, targets = batch("char-lm")
    summed = ml.factorize(model)
    first = copy.deepcopy(summed)
    step = MaestroStep(first, list(ml.low_rank_layers(first)), ml.SingleLayerSampler(0), contextlib.nullcontext,
                       masked=True)
    sampler = ml.SingleLayerSampler(0)
    variants = {"one backward of the sum": lambda: summed_backward_step(summed, sampler, inputs, targets),
                "full loss first": lambda: step(inputs, targets, torch.Tensor.backward)}
    rows = rows_of("backward-order", "char-lm step", interleaved(variants, repeats))
    peaks = {}
    for name, run in variants.items():
        counter = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(*counter.hooks()):
            run()
        peaks[name] = counter.peak
    first_peak = next(iter(peaks.values()))
    rows += [{"lead": "backward-order", "case": "char-lm step, peak saved for backward", "variant": name,
              "value": f"{peak / 2**20:.1f} MiB", "vs_first": peak / first_peak} for name, peak in peaks.items()]
    return rows


def measure_sampler(repeats: int) -> list[dict]:
    """The sampled-rank scope walking the model against given the layers, and the draw alone."""
    torch.manual_seed(0)
    model = ml.factorize(build_model("transformer", load_data("reverse"), size="base"))
    layers = list(ml.low_rank_layers(model))
    rows = []
    for sampler in (ml.SingleLayerSampler(0), ml.IndependentSampler(0)):
        def walking() -> None:
            for _ in range(100):
                with ml.sampled_ranks(model, sampler):
                    pass

        def given() -> None:
            for _ in range(100):
                with ml.sampled_ranks(model, sampler, layers):
                    pass

        def draw() -> None:
            for _ in range(100):
                sampler.draw(layers)
        times = interleaved({"scope, walking the model": walking, "scope, given the layers": given,
                             "draw alone": draw}, repeats)
        rows += rows_of("sampler", f"{len(layers)} layers, {type(sampler).__name__}, per scope",
                        {name: t / 100 for name, t in times.items()})
    return rows


def per_factor_group_lasso(factors, weight: float) -> None:
    """The closed-form gradient as it was: one ``vector_norm`` and one ``addcmul_`` per factor."""
    live = [(p, dim) for p, dim in factors if p.shape[dim] > 0]
    norms = pad_sequence([torch.linalg.vector_norm(p, dim=tuple(d for d in range(p.dim()) if d != dim % p.dim()))
                          for p, dim in live], batch_first=True)
    terms = norms.square().flip(1).cumsum(1).flip(1).sqrt()
    per_rank = torch.where(terms > 0, terms.reciprocal(), 0.0).cumsum(1)
    for row, (p, dim) in enumerate(live):
        shape = [1] * p.dim()
        shape[dim % p.dim()] = p.shape[dim]
        p.grad.addcmul_(p, per_rank[row, :p.shape[dim]].view(shape), value=weight)


def measure_group_lasso(repeats: int) -> list[dict]:
    """The per-factor group-lasso gradient against ``GroupLassoGradient.add_to_grads_``."""
    torch.manual_seed(0)
    model = ml.factorize(build_model("transformer", load_data("reverse"), size="base"))
    layers = [layer for _, layer in ml.low_rank_layers(model)]
    for layer in layers:
        layer.up.grad, layer.down.grad = torch.zeros_like(layer.up), torch.zeros_like(layer.down)
    penalty = GroupLassoGradient(layers, 1e-4)
    return rows_of("group-lasso", f"Transformer-base, {len(penalty.factors)} factors", interleaved(
        {"per factor": lambda: per_factor_group_lasso(penalty.factors, 1e-4), "add_to_grads_": penalty.add_to_grads_},
        repeats))


def measure_slices(repeats: int) -> list[dict]:
    """A layer at a sampled rank with its factors as views against contiguous copies."""
    rows = []
    cases = (("cnn4 conv4 at rank 64 of 128", nn.Conv2d(128, 128, 3, padding=1), (64, 128, 7, 7), 64),
             ("char-LM linear1 at rank 32 of 64", nn.Linear(64, 256), (32, 64, 64), 32))
    for case, dense, shape, rank in cases:
        torch.manual_seed(0)
        viewed = ml.factorize(nn.Sequential(dense))[0]
        viewed.active_rank = rank
        copied = copy.deepcopy(viewed)
        copied.truncate_(rank)  # the same leading ranks, stored contiguously
        x = torch.randn(shape)

        def run(layer) -> Callable[[], None]:
            return lambda: layer(x).square().sum().backward()
        rows += rows_of("slices", case, interleaved({"views": run(viewed), "contiguous": run(copied)}, repeats))
    return rows


def measure_sampled_batch(repeats: int) -> list[dict]:
    """cnn4: what the sampled pass adds to the full pass, on one example, a quarter and the whole
    batch (the default independent sampler, which truncates the first layer in almost every step,
    so no prefix reuse)."""
    model, inputs, targets = batch("cnn4")
    factorised = ml.factorize(copy.deepcopy(model))

    def independent_step(share: float) -> Callable[[], None]:
        return maestro_step(factorised, "cnn4", inputs, targets, ml.IndependentSampler(0), share, reuse=False)
    return rows_of("sampled-batch", "cnn4 step, independent sampler", interleaved(
        {"dense": dense_step(model, inputs, targets),
         "factorised full pass alone": train_pass(factorised, inputs, targets),
         "MAESTRO, sampled pass on 1 example": independent_step(1 / inputs.shape[0]),
         "MAESTRO, sampled pass on a quarter": independent_step(0.25),
         "MAESTRO, sampled pass on the whole batch": independent_step(1.0)}, repeats))


MEASUREMENTS = {"compose": measure_compose, "soft-loss": measure_soft_loss, "backward-order": measure_backward_order,
                "sampler": measure_sampler, "group-lasso": measure_group_lasso, "slices": measure_slices,
                "sampled-batch": measure_sampled_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=tuple(MEASUREMENTS), default=list(MEASUREMENTS))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "step_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for name in args.only for row in MEASUREMENTS[name](args.repeats)]
    table = [("lead", "case", "variant", "median", "vs first")]
    table += [(r["lead"], r["case"], r["variant"], f"{r['ms']:.4g} ms" if "ms" in r else r["value"],
               f"{r['vs_first']:.2f}") for r in rows]
    print(format_table(table))
    machine = {"python": platform.python_version(), "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": 1}
    print(f"\n{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {machine['cpu']}, {machine['cpu_count']} cores, "
          f"1 thread, median of {args.repeats} interleaved runs")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, {"rows": rows, "repeats": args.repeats, "machine": machine,
                                  "date": time.strftime("%Y-%m-%d")})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
