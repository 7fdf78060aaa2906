"""``maestro-lod compress RUN_DIR``: the accuracy–cost front of a trained run, and deployable
models for chosen budgets.

Reads the run's ``config.json`` and ``checkpoint.safetensors``, measures the latency table, runs
the greedy search on a fixed calibration set drawn from the training data, evaluates every point
on the validation data, and writes (under the run, or ``--out``) ``front.json``, ``front.png``,
``family.safetensors`` (the trained factors and the front: every point in one file, see
:mod:`maestro_lod.deploy.family`; not with ``--no-family``) and one folder per ``--target`` with
the artifacts of the point chosen for it. All options are checked
and every target resolved before the first file is written; existing files are replaced only with
``--force``; each target folder appears whole (written under a temporary name, then renamed). The
run is locked while it is compressed (a run being trained is refused), and its data is read where
its config says, or from ``--data-root``, and downloaded only with ``--download``. The pipeline is :func:`maestro_lod.runs.compress.compress_run` (on a run directory)
and :func:`maestro_lod.deploy.compress.compress_model` (on a model and its batches).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..deploy.artifacts import FORMATS, check_formats
from ..deploy.compress import LATENCY_BATCH_LIMIT
from ..deploy.family import FAMILY_FILE
from ..engine.costs import COSTS
from ..engine.front import Front, FrontPoint
from ..engine.targets import COMPRESS, Target, parse_target
from ..engine.search import CALIBRATION_SIZE
from ..errors import ConfigError, RunDirectoryError, UsageError
from ..runs.compress import compress_run
from ..runs.progress import is_terminal
from ..files import check_output_directory
from ..runs.directory import SUMMARY_FILE, RunLock, run_status
from ..tables import format_table
from . import caused_by_interrupt, check_directory_argument, exit_code, one_line_warnings, terminations_interrupt


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
    parser.add_argument("--data-root", metavar="DIR",
                        help="where the run's data files are (default: the data_root of its config.json)")
    parser.add_argument("--download", action="store_true",
                        help="let an online dataset download missing files (never done otherwise)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (also off when stderr is not a terminal)")
    parser.set_defaults(handler=run)


def _check_options(args: argparse.Namespace) -> None:
    if not 0 < args.step <= 1:
        raise UsageError(f"--step {args.step} must be a fraction in (0, 1]")
    if args.calibration_size < 1:
        raise UsageError(f"--calibration-size {args.calibration_size} must be a positive int")
    if not 1 <= args.latency_batch <= LATENCY_BATCH_LIMIT:
        raise UsageError(f"--latency-batch {args.latency_batch} must be an int from 1 to {LATENCY_BATCH_LIMIT:,}")


class _Bar:
    """A tqdm bar driven by ``progress(done, total)`` callbacks (nothing when quiet or when stderr is
    not a terminal)."""

    def __init__(self, description: str, quiet: bool):
        self.description, self.quiet, self.bar = description, quiet or not is_terminal(sys.stderr), None

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


def _lock(run_dir: Path) -> RunLock | None:
    """Lock the run for this command (refusing one being trained, naming the process). A run
    directory where no lock file can be made (read-only) is only checked: nobody trains there."""
    lock = RunLock(run_dir)
    try:
        return lock.acquire()
    except RunDirectoryError:
        lock.check_free()  # in use: raises, naming the process
        return None


def run(args: argparse.Namespace) -> int:
    """Handler of ``maestro-lod compress``: Ctrl-C (or SIGTERM) at any point ends with one line."""
    try:
        with one_line_warnings(), terminations_interrupt():
            return _run(args)
    except KeyboardInterrupt as interruption:
        print("maestro-lod: compress interrupted; the files already written are complete and no temporary "
              "is left", file=sys.stderr)
        return exit_code(interruption)
    except RuntimeError as exc:  # torch.export re-raises a Ctrl-C as a RuntimeError
        if caused_by_interrupt(exc):
            print("maestro-lod: compress interrupted; the files already written are complete and no temporary "
                  "is left", file=sys.stderr)
            return 130
        if "can't allocate memory" in str(exc) or isinstance(exc, torch.OutOfMemoryError):
            raise UsageError(f"out of memory: {str(exc).strip().splitlines()[-1][:200]} (a smaller --latency-batch "
                             f"or --calibration-size needs less)") from None
        raise


def _run(args: argparse.Namespace) -> int:
    _check_options(args)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its notes on optional operator sets are noise here
    run_dir = check_directory_argument("RUN_DIR", args.run_dir)
    out = check_directory_argument("--out", args.out)
    data_root = check_directory_argument("--data-root", args.data_root)
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {str(run_dir)!r} is not a directory")
    check_output_directory(out or run_dir, "--out" if out is not None else "RUN_DIR")
    targets = list(dict.fromkeys(args.target))  # macs=0.5 and macs=0.50 are one target
    lock = _lock(run_dir)
    try:
        if run_status(run_dir) == "unfinished":
            print(f"note: {run_dir} has no {SUMMARY_FILE}: its training has not finished; compressing its last "
                  f"checkpoint (continue the training with maestro-lod train --resume {run_dir})", flush=True)
        result = compress_run(run_dir, out, targets=targets, cost=args.cost, step=args.step,
                              calibration_size=args.calibration_size, formats=args.formats,
                              latency_batch=args.latency_batch, family=not args.no_family, force=args.force,
                              say=print, progress=lambda description: _Bar(description, args.quiet),
                              data_root=data_root, download=args.download)
    finally:
        if lock is not None:
            lock.release()
    front, chosen = result.front, result.chosen
    dense_accuracy = front.metadata["dense_accuracy"]
    print()
    print(result_table(front, chosen, dense_accuracy))
    if dense_accuracy is not None:
        print("dense model accuracy: the run's dense reference from its summary.json (recorded at training time), "
              "not measured by this command")
    print(f"\nfront: {result.front_file} ({len(front.points)} points), plot: {result.plot_file}")
    if result.family_file is not None:
        family = front.metadata["family"]
        against = ", ".join(f"{fmt} {_kib(n)}" for fmt, n in family["separate"].items() if n)
        print(f"family: {result.family_file} (all {len(front.points)} points, {_kib(family['bytes'])})"
              + (f"; the {len(chosen)} targets' separate exports: {against}" if against else ""))
    return 0
