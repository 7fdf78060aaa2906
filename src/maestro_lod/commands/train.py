"""``maestro-lod train``: train a registry model on a registry dataset with MAESTRO (or densely).

Options come from, in increasing precedence: the defaults (LeNet-5 on the offline ``mnist5k`` set),
``--preset``, ``--config FILE`` (TOML), and the flags. Every run writes into its own directory
(``--out``, default ``runs/<model>-<data>-<time>``); ``--resume DIR`` continues an interrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..config import INITS
from ..data import DATASETS
from ..errors import ConfigError, UsageError
from ..models import MODELS
from ..sampling import SAMPLERS
from ..training.distributed import Distributed, DistributedError, env_rank, launched_by_torchrun
from ..training.options import GROUP_WEIGHTS, REUSE_MODES
from ..training.train_config import DEVICES, EXECUTION_KEYS, METHODS, REFERENCES, TrainConfig, check_nesting, read_toml
from ..training.optim import OPTIMIZERS, SCHEDULES
from ..runs.presets import PRESETS, method_options, preset
from ..training.loop import resolve_device
from ..runs.directory import CONFIG_FILE, RunDirectory, RunLock
from ..runs.loading import Claim, DataAccess, claim_output, claim_resume
from ..runs.report import result_table
from ..runs.training import train_claimed
from ..training.methods import METHODS as METHOD_REGISTRY, DenseMethod
from ..training.train_config import method_option_keys
from . import check_directory_argument, exit_code, one_line_warnings, terminations_interrupt, warn

BUILT_IN_DATA = ("mnist5k", "digits", "pydoc-text", "reverse")
"""Datasets that ship with the package or are generated: they read no files and download nothing."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number of seconds")
    return value


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _rank(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int rank or a fraction, got {text!r}") from None


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return key, value
    except RecursionError:
        raise argparse.ArgumentTypeError(f"{key}=... is nested too deeply") from None
    try:
        check_nesting(parsed, f"--model-option {key}")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return key, parsed


# (flag, config key, argparse keyword arguments); ``factorize.<field>`` keys go into the factorize table.
FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--model", "model", {"metavar": "NAME", "help": "model from the registry (default lenet5)"}),
    ("--data", "data", {"metavar": "NAME", "help": "dataset from the registry (default mnist5k)"}),
    ("--data-root", "data_root", {"metavar": "DIR", "help": "directory of local or downloaded data files"}),
    ("--download", "download", {"action": argparse.BooleanOptionalAction, "help": "let online datasets download"}),
    ("--augment", "augment", {"action": argparse.BooleanOptionalAction, "help": "training-set augmentation"}),
    ("--seq-len", "seq_len", {"type": int, "help": "context / maximum sequence length of language tasks"}),
    ("--method", "method", {"choices": METHODS, "help": "training method (default maestro; dense, baselines, ablations)"}),
    ("--epochs", "epochs", {"type": int}),
    ("--batch-size", "batch_size", {"type": int}),
    ("--eval-batch-size", "eval_batch_size", {"type": int}),
    ("--seed", "seed", {"type": int}),
    ("--device", "device", {"choices": DEVICES, "help": "auto uses CUDA when present"}),
    ("--threads", "threads", {"type": int, "help": "torch.set_num_threads"}),
    ("--num-workers", "num_workers", {"type": int, "help": "DataLoader worker processes"}),
    ("--optimizer", "optimizer", {"choices": OPTIMIZERS}),
    ("--lr", "lr", {"type": float}),
    ("--momentum", "momentum", {"type": float}),
    ("--nesterov", "nesterov", {"action": argparse.BooleanOptionalAction}),
    ("--weight-decay", "weight_decay", {"type": float}),
    ("--betas", "betas", {"type": _floats, "metavar": "B1,B2", "help": "AdamW betas"}),
    ("--schedule", "schedule", {"choices": SCHEDULES}),
    ("--milestones", "milestones", {"type": _floats, "metavar": "F,...",
                                    "help": "multistep milestones as fractions of the epochs"}),
    ("--gamma", "gamma", {"type": float, "help": "multistep factor"}),
    ("--warmup-steps", "warmup_steps", {"type": int, "help": "linear LR warm-up (Noam: its warm-up)"}),
    ("--grad-clip", "grad_clip", {"type": float, "metavar": "NORM", "help": "clip the global gradient norm"}),
    ("--amp", "amp", {"action": argparse.BooleanOptionalAction, "help": "mixed precision (CUDA only)"}),
    ("--sampler", "sampler", {"choices": SAMPLERS, "help": "rank sampler"}),
    ("--sample-fraction", "sample_fraction", {"type": float, "help": "rank fraction of the fixed sampler"}),
    ("--sampled-batch", "sampled_batch", {"type": float, "metavar": "SHARE",
                                          "help": "share of each batch the sampled pass trains on (1: all; 0.25 "
                                                  "makes a step cost about 1.25 passes instead of 2)"}),
    ("--sampled-weight", "sampled_weight", {"type": float, "metavar": "W",
                                            "help": "weight of the sampled pass's distillation loss (1: the paper's)"}),
    ("--full-pass", "full_pass", {"action": argparse.BooleanOptionalAction,
                                  "help": "--no-full-pass: only the sampled pass, on hard labels"}),
    ("--reuse-prefix", "reuse_prefix", {"choices": REUSE_MODES,
                                        "help": "reuse the full pass's prefix in the sampled pass"}),
    ("--lambda-gl", "lambda_gl", {"type": float, "help": "group-lasso weight"}),
    ("--lambda-epochs", "lambda_epochs", {"type": int, "help": "the run length --lambda-gl is meant for; other "
                                          "lengths scale it by LAMBDA_EPOCHS / epochs"}),
    ("--group-weights", "group_weights", {"choices": GROUP_WEIGHTS,
                                          "help": "weigh each layer's group lasso by what its rank costs (macs, "
                                                  "params) or alike (uniform, the default)"}),
    ("--hierarchical", "hierarchical", {"action": argparse.BooleanOptionalAction,
                                        "help": "--no-hierarchical: plain group lasso"}),
    ("--eps-ps", "eps_ps", {"type": float, "help": "progressive-shrinking threshold"}),
    ("--shrink-every", "shrink_every", {"type": int, "metavar": "EPOCHS"}),
    ("--target", "target", {"metavar": "COST=FRACTION",
                            "help": "exported size to reach, e.g. macs=0.3 or params=0.3 (steers --lambda-gl)"}),
    ("--target-by", "target_by", {"type": float, "metavar": "SHARE",
                                  "help": "share of the factorised epochs by which the target is planned (0.6)"}),
    ("--warmup-epochs", "warmup_epochs", {"type": int, "help": "dense epochs before factorising"}),
    ("--target-modules", "factorize.target_modules", {"type": _names, "metavar": "NAMES",
                                                      "help": "comma-separated module names to factorise"}),
    ("--exclude-modules", "factorize.exclude_modules", {"type": _names, "metavar": "NAMES"}),
    ("--keep-ends", "factorize.keep_ends", {"action": argparse.BooleanOptionalAction,
                                            "help": "keep the first and the last factorisable layer dense"}),
    ("--start-rank", "factorize.rank", {"type": _rank, "metavar": "R",
                                        "help": "start rank: an int, or a fraction of full rank"}),
    ("--min-rank", "factorize.min_rank", {"type": int}),
    ("--init", "factorize.init", {"choices": INITS}),
    ("--bn-recal-batches", "bn_recal_batches", {"type": int}),
    ("--reference", "reference", {"choices": REFERENCES,
                                  "help": "dense accuracy to compare with: stored figure, a dense run, or none"}),
]
RESUME_FLAGS = {key for _, key, _ in FLAGS} & {*EXECUTION_KEYS, "data_root", "download"}
"""The config flags ``--resume`` accepts: those that do not change what the run computes (and where
its data is, and whether it may be downloaded: a run's own ``config.json`` is not trusted with that)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser("train", help="train a model with MAESTRO (default: LeNet-5 on mnist5k)",
                                   description=__doc__, argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset", metavar="NAME", help=f"named recipe: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--config", metavar="FILE", help="TOML file of options (flags override it)")
    for flag, key, kwargs in FLAGS:
        parser.add_argument(flag, dest=key, **kwargs)
    parser.add_argument("--model-option", dest="model_options", action="append", type=_option, metavar="KEY=VALUE",
                        help="option of the model builder (repeatable; VALUE parsed as JSON when it can be)")
    parser.add_argument("--out", metavar="DIR", help="run directory (default runs/<model>-<data>-<time>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR")
    parser.add_argument("--force", action="store_true", default=False,
                        help="replace the run files in an existing --out")
    parser.add_argument("--quiet", action="store_true", default=False,
                        help="no progress bars, one log line per epoch (bars are also off when stderr is not "
                             "a terminal)")
    parser.add_argument("--dist-timeout", type=_seconds, metavar="SECONDS",
                        help="under torchrun: how long a collective waits for a silent peer (default 300)")
    parser.set_defaults(handler=run)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The config values set by flags, with ``factorize.*`` flags nested into a table."""
    keys = {key for _, key, _ in FLAGS} | {"model_options"}
    values: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key not in keys:
            continue
        if key == "model_options":
            values["model_options"] = dict(value)
        elif key.startswith("factorize."):
            values.setdefault("factorize", {})[key.split(".", 1)[1]] = value
        else:
            values[key] = value
    return values


def _merged(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Later layers over earlier ones; tables (factorize, model_options) merge key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in ("factorize", "model_options") and isinstance(value, dict):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
    return merged


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``--preset`` (with its options for the run's method) < ``--config`` < flags."""
    above = [read_toml(args.config) if "config" in args else {}, _given(args)]
    merged = _merged([preset(args.preset) if "preset" in args else {}, *above])
    method = merged.get("method", TrainConfig.method)
    own = method_options(args.preset, method) if "preset" in args and isinstance(method, str) else {}
    if not own:
        config = TrainConfig.from_dict(merged)
    else:
        try:
            config = TrainConfig.from_dict(_merged([preset(args.preset, method), *above]))
        except ConfigError as error:
            TrainConfig.from_dict(merged)  # an error of the other options is reported as it is
            given = ", ".join(f"{key}={value!r}" for key, value in own.items())
            raise ConfigError(f"{error} ({given} comes from --preset {args.preset} for --method {method}; "
                              f"set it with a flag to override)") from None
    MODELS.lookup(config.model)  # unknown names fail here, before any work, listing the known ones
    DATASETS.lookup(config.data)
    return config


def _resume(args: argparse.Namespace, lock: bool = True) -> Claim:
    """Claim ``--resume DIR``; only the execution flags (and ``--quiet``) may be given with it."""
    given = _given(args)
    not_allowed = sorted(set(given) - RESUME_FLAGS) + [f for f in ("preset", "config", "out") if f in args]
    not_allowed += ["force"] if args.force else []
    if not_allowed:
        allowed = ", ".join(f"--{key.replace('_', '-')}" for key in sorted(RESUME_FLAGS))
        raise UsageError(f"--resume continues the run with its saved options; drop {', '.join(not_allowed)} "
                         f"(only {allowed} and --quiet may be given)")
    directory = check_directory_argument("--resume", args.resume)
    access = DataAccess(given.get("data_root"), bool(given.get("download", False)))
    return claim_resume(directory, given, lock, access)


def unused_options(args: argparse.Namespace, config: TrainConfig) -> list[str]:
    """One line per flag given on the command line that does nothing with the rest of the options."""
    given, flags = _given(args), {key: flag for flag, key, _ in FLAGS}
    method = METHOD_REGISTRY[config.method]
    own = set(method.config_class.keys())
    notes = [f"{flags[key]} does nothing with --method {config.method} (an option of another method)"
             for key in given if key in method_option_keys() and key not in own and key in flags]
    if method is DenseMethod:
        notes += [f"{flags['factorize.' + key]} does nothing with --method dense (the model is not factorised)"
                  for key in given.get("factorize", {})]
        if "reference" in given and config.reference != "none":
            notes.append("--reference does nothing with --method dense (a dense run is its own reference)")
    options = config.method_options
    if "sample_fraction" in given and getattr(options, "sampler", "fixed") != "fixed":
        notes.append(f"--sample-fraction does nothing with --sampler {options.sampler} (only the fixed sampler uses it)")
    if "target_by" in given and "target_by" in own and getattr(options, "target", None) is None:
        notes.append("--target-by does nothing without --target")
    if config.schedule != "multistep":
        notes += [f"{flags[key]} does nothing with --schedule {config.schedule} (multistep only)"
                  for key in ("milestones", "gamma") if key in given]
    if config.optimizer != "sgd":
        notes += [f"{flags[key]} does nothing with --optimizer {config.optimizer} (SGD only)"
                  for key in ("momentum", "nesterov") if key in given]
    if config.optimizer != "adamw" and "betas" in given:
        notes.append(f"--betas does nothing with --optimizer {config.optimizer} (AdamW only)")
    if config.data in BUILT_IN_DATA:
        notes += [f"{flags[key]} does nothing with --data {config.data} (built into the package: no files are "
                  f"read or downloaded)" for key in ("data_root", "download") if given.get(key)]
    if "dist_timeout" in args and not launched_by_torchrun():
        notes.append("--dist-timeout does nothing outside torchrun (one process waits for no peer)")
    return notes


def _interrupted(claim: Claim, files: RunDirectory) -> str:
    """The line printed after Ctrl-C: where the last checkpoint is and how to continue."""
    directory = claim.directory
    if files.restored:
        return f"interrupted before the first epoch ended; the run that was in {directory} is restored"
    if files.saved_epoch is not None:
        return (f"interrupted; the checkpoint of epoch {files.saved_epoch} is in {directory}: continue with "
                f"maestro-lod train --resume {directory}")
    if (directory / CONFIG_FILE).is_file():
        return f"interrupted before the first epoch ended; maestro-lod train --resume {directory} starts it again"
    return "interrupted before training started; nothing was written"


def run(args: argparse.Namespace) -> int:
    """Handler of ``maestro-lod train``: options → config → a claimed run directory → training → report."""
    with one_line_warnings(), terminations_interrupt():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    main = env_rank() == 0  # under torchrun only rank 0 claims the directory (and writes into it)
    out = check_directory_argument("--out", getattr(args, "out", None))
    if "resume" in args:
        claim = _resume(args, lock=main)
    else:
        config = build_config(args)
        if main:
            for note in unused_options(args, config):
                warn(note)
        claim = claim_output(config, out, args.force) if main else Claim(RunLock(out or Path(".")), config)
    files = RunDirectory(claim.directory)
    failure = None
    with claim.lock if main else contextlib.nullcontext():
        distributed = Distributed()
        try:
            if launched_by_torchrun():
                distributed = Distributed.from_env(resolve_device(claim.config.device).type,
                                                   getattr(args, "dist_timeout", None))
            say = print if distributed.is_main else (lambda *a, **k: None)
            trained = train_claimed(claim, files, distributed, resumed="resume" in args, quiet=args.quiet, say=say)
            say()
            say(result_table(trained.summary, trained.reference))
            say(f"\nrun files: {trained.directory}")
            return 0
        except KeyboardInterrupt as interruption:
            print(f"maestro-lod: {_interrupted(claim, files)}", file=sys.stderr)
            return exit_code(interruption)
        except DistributedError as exc:
            failure = f"{exc}; " + (f"the last checkpoint (epoch {files.saved_epoch}) is kept in {claim.directory}"
                                    if files.saved_epoch else "no checkpoint was written")
        finally:
            if failure is None:
                distributed.close()
    # A peer process died: the process group cannot be torn down (its threads would abort the
    # interpreter at exit), so once the run directory is released the process ends here.
    print(f"maestro-lod: error: {failure}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)
