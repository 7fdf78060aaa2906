"""``maestro-lod compress RUN_DIR``: the accuracy–cost front of a trained run, and deployable
models for chosen budgets.

Any run compresses: a dense run (``--method dense``) is factorised at full rank first (``--init``
whitened or svd, on the calibration set); the trained factors of any other run are re-factorised
at their ranks (``--order svd|whitened``; ``trained`` keeps them), which changes no output but puts
the ranks in the best order for removal. A model of one's own compresses from local files:
``--model-factory module:function`` (or ``file.py:function``, called without arguments) or
``--torchvision ARCH``, with ``--weights FILE.safetensors``, ``--data NAME`` and ``--out DIR``.

Reads the run's ``config.json`` and ``checkpoint.safetensors``, measures the latency table, runs
the greedy search on a fixed calibration set drawn from the training data, evaluates every point
on the validation data, and writes (under the run, or ``--out``) ``front.json``, ``front.png``,
``family.safetensors`` (the trained factors and the front: every point in one file, see
:mod:`maestro_lod.deploy.family`; not with ``--no-family``) and one folder per ``--target`` with
the artifacts of the point chosen for it. A second compress into the same place adds its targets
to the front: when ``front.json`` was computed from the same checkpoint and options, the new
folders are written beside the earlier ones without a new search (the latency table is reused
too; ``--remeasure-latency`` measures it again), and a front of other inputs is refused, naming
what differs. All options are checked and every target resolved before the first file is
written; existing files are replaced only with ``--force`` (which recomputes the front); each target folder appears whole (written under a temporary name, then renamed). The
run is locked while it is compressed (a run being trained is refused), and its data is read where
its config says, or from ``--data-root``, and downloaded only with ``--download``. The pipeline is
:func:`maestro_lod.runs.compress.compress_run` (on a run directory) and
:func:`maestro_lod.deploy.compress.compress_model` (on a model and its batches).
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
from ..deploy.api import INITS, ORDERS
from ..engine.search import CALIBRATION_SIZE, SEARCHES
from ..errors import ConfigError, RunDirectoryError, UsageError
from ..files import check_output_directory
from ..runs.compress import compress_files, compress_run
from ..runs.directory import SUMMARY_FILE, RunLock, run_status
from ..runs.healing import EPOCH_LIMIT as HEAL_EPOCH_LIMIT, describe
from ..runs.progress import is_terminal
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
    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="?",
                        help="directory of a run written by maestro-lod train (or use --model-factory/--torchvision)")
    parser.add_argument("--out", metavar="DIR", help="write here instead of RUN_DIR (required without RUN_DIR)")
    parser.add_argument("--init", choices=INITS, default="whitened",
                        help="how a dense model is factorised at full rank before the search: whitened SVD on the "
                             "calibration set, or plain SVD (default whitened)")
    parser.add_argument("--order", choices=ORDERS, default="svd",
                        help="how a factorised model's trained factors are ordered before the search: re-factorised "
                             "by SVD or whitened SVD at their ranks (same outputs), or as trained (default svd)")
    own = parser.add_argument_group("a model of one's own (instead of RUN_DIR; local files only)")
    own.add_argument("--model-factory", metavar="MODULE:FUNCTION",
                     help="function building the dense model, called without arguments (module:function or "
                          "path/to/file.py:function)")
    own.add_argument("--torchvision", metavar="ARCH",
                     help="a torchvision classifier (resnet18, mobilenet_v2, ...) with the dataset's classes")
    own.add_argument("--weights", metavar="FILE", help="its state dict, a .safetensors file (loaded strictly)")
    own.add_argument("--data", metavar="NAME", help="registered dataset for calibration and validation")
    own.add_argument("--seed", type=int, help="seed of the calibration sample (default 0; a run uses its own)")
    hf = parser.add_argument_group("a Hugging Face causal language model (instead of RUN_DIR; local files only)")
    hf.add_argument("--hf", metavar="FOLDER", help="a save_pretrained folder; each target is saved as a folder that "
                    "from_pretrained(..., trust_remote_code=True) reloads at its compressed size")
    hf.add_argument("--text", metavar="FILE", help="calibration and held-out text (default: the embedded pydoc text)")
    hf.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window (default 128)")
    healing = parser.add_argument_group("healing (a run only; on its training data, at a tenth of its learning rate)")
    healing.add_argument("--heal", type=int, metavar="N",
                         help="fine-tune each exported point at its fixed ranks for N epochs (one training per target)")
    healing.add_argument("--heal-maestro", type=int, metavar="N",
                         help="before the search, N epochs of MAESTRO on the factorised model (ordered dropout with "
                              "self-distillation, no group lasso, no shrinking): one training heals the whole front")
    parser.add_argument("--cost", choices=COSTS, default="macs", help="what a removal saves (default macs)")
    parser.add_argument("--search", choices=SEARCHES, default="lazy",
                        help="lazy (default): re-score only the most promising removals each round and cut several "
                             "layers per round far from the target, the exhaustive front in far fewer passes; "
                             "exhaustive: score every layer every round, cut one; allocate: ranks from each layer's "
                             "error curve, no search (fastest, less accurate)")
    parser.add_argument("--full-front", action="store_true",
                        help="search down to every layer's smallest rank even when --target is met earlier")
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
    parser.add_argument("--force", action="store_true",
                        help="recompute the front and replace front files and target folders that exist (without it, "
                             "new targets are added to the front.json of the same checkpoint and options)")
    parser.add_argument("--remeasure-latency", action="store_true",
                        help="measure the latency table again instead of reusing the one in front.json (and search "
                             "the front again with it)")
    parser.add_argument("--data-root", metavar="DIR",
                        help="where the data files are (default for a run: the data_root of its config.json; "
                             "image-folder: a folder with train/ and val/)")
    parser.add_argument("--download", action="store_true",
                        help="let an online dataset download missing files (never done otherwise)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (also off when stderr is not a terminal)")
    parser.set_defaults(handler=run)


def _check_hf_options(args: argparse.Namespace) -> None:
    others = [name for name, value in (("RUN_DIR", args.run_dir), ("--model-factory", args.model_factory),
                                       ("--torchvision", args.torchvision), ("--weights", args.weights),
                                       ("--data", args.data)) if value is not None]
    others += ["--remeasure-latency"] * args.remeasure_latency
    others += [name for name, value in (("--heal", args.heal), ("--heal-maestro", args.heal_maestro)) if value is not None]
    if others:
        raise UsageError(f"--hf compresses a Hugging Face folder; {', '.join(others)} cannot be given with it")
    if args.out is None:
        raise UsageError("--hf needs --out DIR (the compressed folders are written there)")
    if args.seq_len < 1:
        raise UsageError(f"--seq-len {args.seq_len} must be a positive int")


def _run_hf(args: argparse.Namespace) -> int:
    """``compress --hf FOLDER``: one reloadable folder per target, and their held-out perplexity."""
    from ..integrations.hf_folder import compress_hf_folder  # needs the hf extra: loaded only here

    targets = [f"{kind}={value:g}" for kind, value in args.target] or ["params=0.6"]
    result = compress_hf_folder(args.hf, args.out, text=args.text, targets=targets, init=args.init,
                                seq_len=args.seq_len, step=args.step, force=args.force, search=args.search,
                                progress=lambda stage: _Bar(stage, args.quiet))
    rows = [("folder", "params", "held-out perplexity"),
            ("dense model", f"{result.dense_params:,}", f"{result.dense_perplexity:.3f}")]
    rows += [(str(path), _cost(point.exported["params"], result.dense_params), f"{point.perplexity:.3f}")
             for path, point in result.chosen]
    print(format_table(rows))
    print("\nload with transformers.AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)")
    return 0


def _check_options(args: argparse.Namespace) -> None:
    if args.text is not None and args.hf is None:
        raise UsageError("--text is the calibration text of --hf")
    own = args.model_factory or args.torchvision
    flag = "--model-factory" if args.model_factory else "--torchvision"
    if args.model_factory and args.torchvision:
        raise UsageError("give either --model-factory or --torchvision, not both")
    if args.run_dir is not None and own:
        raise UsageError(f"give either RUN_DIR or {flag}, not both")
    if args.run_dir is None and not own:
        raise UsageError("give a RUN_DIR, or a model with --model-factory MODULE:FUNCTION or --torchvision ARCH")
    if own:
        missing = [name for name, value in (("--weights", args.weights), ("--data", args.data), ("--out", args.out))
                   if value is None]
        if missing:
            raise UsageError(f"{flag} needs {', '.join(missing)}")
    else:
        given = [name for name, value in (("--weights", args.weights), ("--data", args.data), ("--seed", args.seed))
                 if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to --model-factory/--torchvision; a run brings its own")
    if own and (args.heal is not None or args.heal_maestro is not None):
        raise UsageError(f"--heal and --heal-maestro train with a run's recipe: they need a RUN_DIR, not {flag}")
    for name, value in (("--heal", args.heal), ("--heal-maestro", args.heal_maestro)):
        if value is not None and not 1 <= value <= HEAL_EPOCH_LIMIT:
            raise UsageError(f"{name} {value} must be a whole number of epochs from 1 to {HEAL_EPOCH_LIMIT}")
    if not 0 < args.step <= 1:
        raise UsageError(f"--step {args.step} must be a fraction in (0, 1]")
    if args.calibration_size < 1:
        raise UsageError(f"--calibration-size {args.calibration_size} must be a positive int")
    if not 1 <= args.latency_batch <= LATENCY_BATCH_LIMIT:
        raise UsageError(f"--latency-batch {args.latency_batch} must be an int from 1 to {LATENCY_BATCH_LIMIT:,}")


class _Bar:
    """A tqdm bar driven by ``progress(done, total[, status])`` callbacks (nothing when quiet or when
    stderr is not a terminal). A search's ``total`` is an estimate that moves as it goes, and its
    status (the current point's cost fraction and calibration loss) shows beside the bar's
    estimate of the time left."""

    def __init__(self, description: str, quiet: bool):
        self.description, self.quiet, self.bar = description, quiet or not is_terminal(sys.stderr), None

    def __call__(self, done: int, total: int, status=None) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.description, leave=False, dynamic_ncols=True, file=sys.stderr)
        self.bar.total = max(total, done)
        if status is not None:
            self.bar.set_postfix_str(f"cost {status.cost:.3f}x, loss {status.loss:.4f}", refresh=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def _cost(value: float, dense: float) -> str:
    return f"{value:,.0f} ({value / dense:.2f}x)" if dense else f"{value:,.0f}"


def _kib(size: int) -> str:
    return f"{size / 1024:,.1f} KiB"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def result_table(front: Front, chosen: list[tuple[str, FrontPoint]], dense_accuracy: float | None,
                 earlier: list[tuple[str, FrontPoint]] = ()) -> str:
    """Dense model, trained model and every exported point (``earlier``: those of an earlier
    compress, marked so): ranks, params, MACs, latency, accuracy."""
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
    rows += [row(f"{name} (point {p.index}, earlier)", p) for name, p in earlier]
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
    for name in ("torch.onnx", "onnxscript"):  # notes on operator sets and constant folding: noise here
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.hf is not None:
        _check_hf_options(args)
        return _run_hf(args)
    _check_options(args)
    out = check_directory_argument("--out", args.out)
    data_root = check_directory_argument("--data-root", args.data_root)
    common = dict(targets=list(dict.fromkeys(args.target)),  # macs=0.5 and macs=0.50 are one target
                  cost=args.cost, step=args.step, calibration_size=args.calibration_size, formats=args.formats,
                  latency_batch=args.latency_batch, family=not args.no_family, force=args.force, init=args.init,
                  order=args.order, search=args.search, full_front=args.full_front,
                  remeasure_latency=args.remeasure_latency, say=print,
                  progress=lambda description: _Bar(description, args.quiet))
    if args.run_dir is None:
        check_output_directory(out, "--out")
        result = compress_files(out, weights=args.weights, data=args.data, model_factory=args.model_factory,
                                torchvision=args.torchvision, data_root=data_root,
                                seed=0 if args.seed is None else args.seed, **common)
    else:
        run_dir = check_directory_argument("RUN_DIR", args.run_dir)
        if not run_dir.is_dir():
            raise UsageError(f"RUN_DIR {str(run_dir)!r} is not a directory")
        check_output_directory(out or run_dir, "--out" if out is not None else "RUN_DIR")
        lock = _lock(run_dir)
        try:
            if run_status(run_dir) == "unfinished":
                print(f"note: {run_dir} has no {SUMMARY_FILE}: its training has not finished; compressing its last "
                      f"checkpoint (continue the training with maestro-lod train --resume {run_dir})", flush=True)
            result = compress_run(run_dir, out, data_root=data_root, download=args.download, heal=args.heal,
                                  heal_maestro=args.heal_maestro, **common)
        finally:
            if lock is not None:
                lock.release()
    front, chosen = result.front, result.chosen
    dense_accuracy = front.metadata["dense_accuracy"]
    print()
    print(result_table(front, chosen, dense_accuracy, result.earlier))
    if dense_accuracy is not None and args.run_dir is not None:
        print("dense model accuracy: the run's dense reference from its summary.json (recorded at training time), "
              "not measured by this command")
    elif dense_accuracy is not None:
        print("dense model accuracy: the model as loaded, measured by this command on the validation data")
    for folder, record in result.healing.items():
        for line in describe(folder, record):
            print(line)
    print(f"\nfront: {result.front_file} ({len(front.points)} points), plot: {result.plot_file}")
    if result.family_file is not None:
        family = front.metadata["family"]
        against = ", ".join(f"{fmt} {_kib(n)}" for fmt, n in family["separate"].items() if n)
        print(f"family: {result.family_file} (all {len(front.points)} points, {_kib(family['bytes'])})"
              + (f"; the {len(chosen) + len(result.earlier)} targets' separate exports: {against}" if against else ""))
    return 0
