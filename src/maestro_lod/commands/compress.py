"""``maestro-lod compress RUN_DIR``: the accuracy–cost front of a trained run, and deployable
models for chosen budgets.

Reads the run's ``config.json`` and ``checkpoint.safetensors``, measures the latency table, runs
the greedy search on a fixed calibration set drawn from the training data, evaluates every point
on the validation data, and writes (under the run, or ``--out``) ``front.json``, ``front.png``,
``family.safetensors`` (the trained factors and the front: every point in one file, see
:mod:`maestro_lod.deploy.family`; not with ``--no-family``) and one folder per ``--target`` with
the artifacts of the point chosen for it. All options are checked
and every target resolved before the first file is written; existing files are replaced only with
``--force``. The pipeline is :func:`maestro_lod.runs.compress.compress_run` (on a run directory)
and :func:`maestro_lod.deploy.compress.compress_model` (on a model and its batches).
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from ..deploy.artifacts import FORMATS, check_formats
from ..deploy.family import FAMILY_FILE
from ..engine.costs import COSTS
from ..engine.front import Front, FrontPoint
from ..engine.targets import COMPRESS, Target, parse_target
from ..engine.search import CALIBRATION_SIZE
from ..errors import ConfigError, UsageError
from ..runs.compress import compress_run
from ..tables import format_table


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


def _check_options(args: argparse.Namespace) -> None:
    if not 0 < args.step <= 1:
        raise UsageError(f"--step {args.step} must be a fraction in (0, 1]")
    if args.calibration_size < 1:
        raise UsageError(f"--calibration-size {args.calibration_size} must be a positive int")
    if args.latency_batch < 1:
        raise UsageError(f"--latency-batch {args.latency_batch} must be a positive int")


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
    result = compress_run(args.run_dir, args.out, targets=args.target, cost=args.cost, step=args.step,
                          calibration_size=args.calibration_size, formats=args.formats,
                          latency_batch=args.latency_batch, family=not args.no_family, force=args.force,
                          say=print, progress=lambda description: _Bar(description, args.quiet))
    front, chosen = result.front, result.chosen
    dense_accuracy = front.metadata["dense_accuracy"]
    print()
    print(result_table(front, chosen, dense_accuracy))
    print(f"\nfront: {result.front_file} ({len(front.points)} points), plot: {result.plot_file}")
    if result.family_file is not None:
        family = front.metadata["family"]
        against = ", ".join(f"{fmt} {_kib(n)}" for fmt, n in family["separate"].items() if n)
        print(f"family: {result.family_file} (all {len(front.points)} points, {_kib(family['bytes'])})"
              + (f"; the {len(chosen)} targets' separate exports: {against}" if against else ""))
    return 0
