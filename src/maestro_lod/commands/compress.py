"""``maestro-lod compress RUN_DIR``: the accuracy–cost front of a trained run, and deployable
models for chosen budgets.

Reads the run's ``config.json`` and ``checkpoint.safetensors``, measures the latency table, runs
the greedy search on a fixed calibration set drawn from the training data, evaluates every point
on the validation data, and writes (under the run, or ``--out``) ``front.json``, ``front.png``,
``family.safetensors`` (the trained factors and the front: every point in one file, see
:mod:`maestro_lod.deploy.family`; not with ``--no-family``) and one folder per ``--target`` with
the artifacts of the point chosen for it. All options are checked
and every target resolved before the first file is written; existing files are replaced only with
``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data import load_data
from ..deploy.artifacts import FILES, FORMATS, build_artifacts, check_formats, write_files
from ..engine.costs import COSTS, deployable, layer_floor, measure_latency, repeat_batch, time_model, visited_ranks
from ..deploy.family import FAMILY_FILE, save_family
from ..engine.front import Front, FrontPoint
from ..engine.targets import COMPRESS, Target, parse_target
from ..engine.search import CALIBRATION_SIZE, calibration_batches, evaluate_front, greedy_front, materialize
from ..errors import CheckpointError, ConfigError, UsageError
from ..files import write_json_atomic
from ..layers import low_rank_layers
from ..models import build_model
from ..tables import format_table
from ..training.checkpoint import load_checkpoint
from ..training.train_config import TrainConfig
from ..training.loop import Trainer
from ..runs.directory import CHECKPOINT_FILE, CONFIG_FILE, SUMMARY_FILE

FRONT_FILE = "front.json"
PLOT_FILE = "front.png"
POINT_FILE = "point.json"
CHECK_SAMPLES = 64
"""Validation samples each artifact's outputs are compared on (and 3 more, as a second batch size)."""


def _target(text: str) -> Target:
    try:
        return parse_target(text, COMPRESS)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _formats(text: str) -> tuple[str, ...]:
    try:
        return check_formats([part.strip() for part in text.split(",") if part.strip()])
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compress`` sub-command."""
    parser = subparsers.add_parser("compress", help="accuracy-cost front of a trained run and models for budgets",
                                   description=__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory of a run written by maestro-lod train")
    parser.add_argument("--out", metavar="DIR", help="write here instead of RUN_DIR")
    parser.add_argument("--cost", choices=COSTS, default="macs", help="what a removal saves (default macs)")
    parser.add_argument("--step", type=float, default=0.25,
                        help="fraction of a layer's current rank removed per try, at least one rank (default 0.25)")
    parser.add_argument("--calibration-size", type=int, default=CALIBRATION_SIZE,
                        help=f"training samples that score candidates (default {CALIBRATION_SIZE})")
    parser.add_argument("--target", action="append", type=_target, default=[], metavar="KEY=VALUE",
                        help="export the point for a budget: macs=, params=, latency= (fraction of the dense "
                             "model) or max_drop= (accuracy drop from the trained model); repeatable")
    parser.add_argument("--formats", type=_formats, default=FORMATS, metavar="LIST",
                        help=f"artifacts per target, comma-separated (default {','.join(FORMATS)})")
    parser.add_argument("--latency-batch", type=int, default=32, help="batch size of latency measurements (default 32)")
    parser.add_argument("--no-family", action="store_true",
                        help=f"do not write {FAMILY_FILE} (the trained factors and every point's ranks in one file)")
    parser.add_argument("--force", action="store_true", help="replace front files and target folders that exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def target_folder(key: str, value: float) -> str:
    """Folder name of a target: ``macs-0.5``, ``max_drop-0.01``."""
    return f"{key}-{value:g}"


def _check_options(args: argparse.Namespace) -> None:
    if not 0 < args.step <= 1:
        raise UsageError(f"--step {args.step} must be a fraction in (0, 1]")
    if args.calibration_size < 1:
        raise UsageError(f"--calibration-size {args.calibration_size} must be a positive int")
    if args.latency_batch < 1:
        raise UsageError(f"--latency-batch {args.latency_batch} must be a positive int")


def _read_run(run_dir: Path) -> tuple[TrainConfig, dict[str, Any]]:
    if not run_dir.is_dir():
        raise UsageError(f"{str(run_dir)!r} is not a run directory")
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        if not (run_dir / name).is_file():
            raise UsageError(f"{str(run_dir)!r} has no {name}: compress reads a run written by maestro-lod train")
    try:
        config = TrainConfig.from_dict(json.loads((run_dir / CONFIG_FILE).read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {str(run_dir / CONFIG_FILE)!r}: {exc}") from None
    summary = {}
    if (run_dir / SUMMARY_FILE).is_file():
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    return config.replace(device="cpu"), summary


def _outputs(out: Path, targets: list[tuple[str, float]], force: bool, family: bool = True) -> list[Path]:
    paths = [out / FRONT_FILE, out / PLOT_FILE] + [out / FAMILY_FILE] * family + [out / target_folder(k, v) for k, v in targets]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise UsageError(f"{', '.join(str(p) for p in existing)} already exist; pass --force to replace them")
    return paths


def load_trained(config: TrainConfig, data, run_dir: Path) -> torch.nn.Module:
    """The run's model with its trained (shrunk) weights, rebuilt through the registries."""
    trainer = Trainer(build_model(config.model, data, **config.model_options), data.train, data.val, config,
                      kind=data.kind)
    try:
        trainer.load_state_dict(load_checkpoint(run_dir / CHECKPOINT_FILE))
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{str(run_dir / CHECKPOINT_FILE)!r} does not fit model {config.model!r}: "
                              f"{str(exc).strip().splitlines()[0]}") from None
    if not any(True for _ in low_rank_layers(trainer.model)):
        raise UsageError(f"the model of {str(run_dir)!r} has no low-rank layers (a dense run): nothing to compress")
    return trainer.model.eval()


class _Bar:
    """A tqdm bar driven by ``progress(done, total)`` callbacks (nothing when quiet)."""

    def __init__(self, description: str, quiet: bool):
        self.description, self.quiet, self.bar = description, quiet, None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.description, leave=False, dynamic_ncols=True, file=sys.stderr)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.bar.close()


def _cost(value: float, dense: float) -> str:
    return f"{value:,.0f} ({value / dense:.2f}x)" if dense else f"{value:,.0f}"


def _kib(size: int) -> str:
    return f"{size / 1024:,.1f} KiB"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def result_table(front: Front, chosen: list[tuple[str, FrontPoint]], dense_accuracy: float | None) -> str:
    """Dense model, trained model and every exported point: ranks, params, MACs, latency, accuracy."""
    latency = front.latency_table

    def row(label: str, point: FrontPoint | None) -> tuple:
        if point is None:
            return (label, "dense", f"{front.dense_params:,}", f"{front.dense_macs:,}",
                    "-" if latency is None else f"{1000 * latency.dense:.2f}", _percent(dense_accuracy), "")
        measured = (point.exported or {}).get("latency", point.latency)
        delta = "" if dense_accuracy is None or point.accuracy is None else f"{100 * (point.accuracy - dense_accuracy):+.2f}"
        return (label, point.label(), _cost(point.params, front.dense_params), _cost(point.macs, front.dense_macs),
                "-" if measured is None else f"{1000 * measured:.2f}", _percent(point.accuracy), delta)

    batch = "" if latency is None else f" (ms, batch {latency.batch_size})"
    rows = [("point", "ranks", "params", "MACs", f"latency{batch}", "accuracy", "vs dense (pp)"),
            row("dense model", None), row("trained (point 0)", front.trained)]
    rows += [row(f"{name} (point {p.index})", p) for name, p in chosen]
    return format_table(rows)


def run(args: argparse.Namespace) -> int:
    """Handler of ``maestro-lod compress``."""
    _check_options(args)
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir
    config, summary = _read_run(run_dir)
    _outputs(out, args.target, args.force, not args.no_family)
    data = load_data(config.data, root=config.data_root, download=config.download, seed=config.seed,
                     augment=config.augment, seq_len=config.seq_len)
    model = load_trained(config, data, run_dir)
    calibration = calibration_batches(data.train, args.calibration_size, seed=config.seed)
    example = calibration[0][0]
    example = tuple(x[:1] for x in example) if isinstance(example, (tuple, list)) else example[:1]
    layers = dict(low_rank_layers(model))
    visits = {name: visited_ranks(layer.rank, layer_floor(layer, layer.rank), args.step)
              for name, layer in layers.items()}
    print(f"measuring the latency table ({sum(map(len, visits.values()))} layer ranks, batch {args.latency_batch})",
          flush=True)
    latency = measure_latency(model, example, visits, args.latency_batch)
    front = greedy_front(model, calibration, args.cost, args.step, latency=latency, kind=data.kind,
                         progress=_Bar("greedy rounds", args.quiet))
    val = calibration_batches(data.val, len(data.val), config.eval_batch_size, seed=0)
    evaluate_front(front, model, val, calibration, progress=_Bar("evaluating points", args.quiet))
    chosen = [(target_folder(k, v), front.select(**{k: v})) for k, v in args.target]  # unreachable: fails here
    dense_accuracy = (summary.get("dense_reference") or {}).get("accuracy")
    front.metadata = {"run": str(run_dir), "model": config.model, "data": config.data,
                      "dense_accuracy": dense_accuracy, "torch": torch.__version__}
    checks = [calibration_batches(data.val, CHECK_SAMPLES, CHECK_SAMPLES, seed=1)[0][0],
              calibration_batches(data.val, 3, 3, seed=2)[0][0]]
    timing = repeat_batch(example, args.latency_batch)
    out.mkdir(parents=True, exist_ok=True)
    for folder, point in chosen:
        materialized = materialize(model, point, calibration)
        files, report = build_artifacts(materialized, args.formats, checks,
                                        lambda: build_model(config.model, data, **config.model_options))
        for fmt, why in report["skipped"].items():
            print(f"{folder}: {fmt} not written: {why}", flush=True)
        names = write_files(out / folder, files)
        measured = time_model(deployable(materialized, example), timing, latency.repeats, latency.warmup)
        point.exported = {"folder": folder, "files": names, "latency": measured, **report}
        write_json_atomic(out / folder / POINT_FILE, {"target": folder, "point": point.to_dict(),
                                                       "files": {f: FILES[f] for f in files}})
    if not args.no_family:
        size = save_family(model, front, out / FAMILY_FILE, calibration)
        separate = {fmt: sum((out / folder / FILES[fmt]).stat().st_size for folder, _ in chosen
                             if (out / folder / FILES[fmt]).is_file()) for fmt in args.formats}
        front.metadata["family"] = {"file": FAMILY_FILE, "bytes": size, "points": len(front.points),
                                    "separate": separate}
    front.save(out / FRONT_FILE)
    front.plot(out / PLOT_FILE, dense_accuracy)
    print()
    print(result_table(front, chosen, dense_accuracy))
    print(f"\nfront: {out / FRONT_FILE} ({len(front.points)} points), plot: {out / PLOT_FILE}")
    if not args.no_family:
        family = front.metadata["family"]
        against = ", ".join(f"{fmt} {_kib(n)}" for fmt, n in family["separate"].items() if n)
        print(f"family: {out / FAMILY_FILE} (all {len(front.points)} points, {_kib(family['bytes'])})"
              + (f"; the {len(chosen)} targets' separate exports: {against}" if against else ""))
    return 0

