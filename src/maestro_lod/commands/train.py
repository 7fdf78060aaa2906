"""``maestro-lod train``: train a registry model on a registry dataset with MAESTRO (or densely).

Options come from, in increasing precedence: the defaults (LeNet-5 on the offline ``mnist5k`` set),
``--preset``, ``--config FILE`` (TOML), and the flags. Every run writes into its own directory
(``--out``, default ``runs/<model>-<data>-<time>``); ``--resume DIR`` continues an interrupted one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..data import DATASETS, load_data
from ..errors import TrainingDiverged, UsageError
from ..models import MODELS, build_model
from ..tables import format_table
from ..training.checkpoint import load_checkpoint
from ..training.config import EXECUTION_KEYS, METHODS, TrainConfig, read_toml
from ..training.loop import FitResult, Trainer
from ..training.presets import PRESETS, preset
from ..training.progress import Progress
from ..training.reference import stored_reference
from ..training.rng import seed_everything
from ..training.rundir import CHECKPOINT_FILE, CONFIG_FILE, RunDirectory, clear_run_files, run_status

RUNS_ROOT = Path("runs")


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
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# (flag, config key, argparse keyword arguments); ``factorize.<field>`` keys go into the factorize table.
FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--model", "model", {"metavar": "NAME", "help": "model from the registry (default lenet5)"}),
    ("--data", "data", {"metavar": "NAME", "help": "dataset from the registry (default mnist5k)"}),
    ("--data-root", "data_root", {"metavar": "DIR", "help": "directory of local or downloaded data files"}),
    ("--download", "download", {"action": argparse.BooleanOptionalAction, "help": "let online datasets download"}),
    ("--augment", "augment", {"action": argparse.BooleanOptionalAction, "help": "training-set augmentation"}),
    ("--seq-len", "seq_len", {"type": int, "help": "context / maximum sequence length of language tasks"}),
    ("--method", "method", {"choices": METHODS, "help": "maestro (default) or dense training"}),
    ("--epochs", "epochs", {"type": int}),
    ("--batch-size", "batch_size", {"type": int}),
    ("--eval-batch-size", "eval_batch_size", {"type": int}),
    ("--seed", "seed", {"type": int}),
    ("--device", "device", {"choices": ("auto", "cpu", "cuda"), "help": "auto uses CUDA when present"}),
    ("--threads", "threads", {"type": int, "help": "torch.set_num_threads"}),
    ("--num-workers", "num_workers", {"type": int, "help": "DataLoader worker processes"}),
    ("--optimizer", "optimizer", {"choices": ("sgd", "adamw")}),
    ("--lr", "lr", {"type": float}),
    ("--momentum", "momentum", {"type": float}),
    ("--nesterov", "nesterov", {"action": argparse.BooleanOptionalAction}),
    ("--weight-decay", "weight_decay", {"type": float}),
    ("--betas", "betas", {"type": _floats, "metavar": "B1,B2", "help": "AdamW betas"}),
    ("--schedule", "schedule", {"choices": ("constant", "multistep", "cosine", "noam")}),
    ("--milestones", "milestones", {"type": _floats, "metavar": "F,...",
                                    "help": "multistep milestones as fractions of the epochs"}),
    ("--gamma", "gamma", {"type": float, "help": "multistep factor"}),
    ("--warmup-steps", "warmup_steps", {"type": int, "help": "linear LR warm-up (Noam: its warm-up)"}),
    ("--grad-clip", "grad_clip", {"type": float, "metavar": "NORM", "help": "clip the global gradient norm"}),
    ("--amp", "amp", {"action": argparse.BooleanOptionalAction, "help": "mixed precision (CUDA only)"}),
    ("--sampler", "sampler", {"choices": ("single", "independent", "fixed"), "help": "rank sampler"}),
    ("--sample-fraction", "sample_fraction", {"type": float, "help": "rank fraction of the fixed sampler"}),
    ("--full-pass", "full_pass", {"action": argparse.BooleanOptionalAction,
                                  "help": "--no-full-pass: only the sampled pass, on hard labels"}),
    ("--reuse-prefix", "reuse_prefix", {"choices": ("auto", "on", "off"),
                                        "help": "reuse the full pass's prefix in the sampled pass"}),
    ("--lambda-gl", "lambda_gl", {"type": float, "help": "group-lasso weight"}),
    ("--hierarchical", "hierarchical", {"action": argparse.BooleanOptionalAction,
                                        "help": "--no-hierarchical: plain group lasso"}),
    ("--eps-ps", "eps_ps", {"type": float, "help": "progressive-shrinking threshold"}),
    ("--shrink-every", "shrink_every", {"type": int, "metavar": "EPOCHS"}),
    ("--warmup-epochs", "warmup_epochs", {"type": int, "help": "dense epochs before factorising"}),
    ("--target-modules", "factorize.target_modules", {"type": _names, "metavar": "NAMES",
                                                      "help": "comma-separated module names to factorise"}),
    ("--exclude-modules", "factorize.exclude_modules", {"type": _names, "metavar": "NAMES"}),
    ("--start-rank", "factorize.rank", {"type": _rank, "metavar": "R",
                                        "help": "start rank: an int, or a fraction of full rank"}),
    ("--min-rank", "factorize.min_rank", {"type": int}),
    ("--init", "factorize.init", {"choices": ("svd", "random")}),
    ("--bn-recal-batches", "bn_recal_batches", {"type": int}),
    ("--reference", "reference", {"choices": ("stored", "run", "none"),
                                  "help": "dense accuracy to compare with: stored figure, a dense run, or none"}),
]
RESUME_FLAGS = set(EXECUTION_KEYS)


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
                        help="no progress bars, one log line per epoch")
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


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``--preset`` < ``--config`` < flags; tables (factorize, model_options) merge key by key."""
    layers = [preset(args.preset) if "preset" in args else {}, read_toml(args.config) if "config" in args else {},
              _given(args)]
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in ("factorize", "model_options") and isinstance(value, dict):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
    config = TrainConfig.from_dict(merged)
    MODELS.lookup(config.model)  # unknown names fail here, before any work, listing the known ones
    DATASETS.lookup(config.data)
    return config


def _fresh_directory(config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = RUNS_ROOT / f"{config.model}-{config.data}-{stamp}"
    path, suffix = base, 1
    while path.exists():
        suffix += 1
        path = base.with_name(f"{base.name}-{suffix}")
    return path


def _prepare_out(args: argparse.Namespace, config: TrainConfig) -> Path:
    if "out" not in args:
        return _fresh_directory(config)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a directory")
    status = run_status(out) if out.is_dir() else "empty"
    if status != "empty" and not args.force:
        if status == "finished":
            raise UsageError(f"--out {str(out)!r} holds a finished run; choose another directory or pass --force")
        raise UsageError(f"--out {str(out)!r} holds an unfinished run; continue it with --resume {out} or pass --force")
    if status != "empty":
        clear_run_files(out)
    return out


def _resume_config(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    directory = Path(args.resume)
    not_allowed = sorted(set(_given(args)) - RESUME_FLAGS) + [f for f in ("preset", "config", "out") if f in args]
    not_allowed += ["force"] if args.force else []
    if not_allowed:
        raise UsageError(f"--resume continues the run with its saved options; drop {', '.join(not_allowed)} "
                         f"(only --device, --threads, --num-workers, --quiet may change)")
    if not (directory / CONFIG_FILE).is_file() or not (directory / CHECKPOINT_FILE).is_file():
        raise UsageError(f"--resume {str(directory)!r}: no {CONFIG_FILE} and {CHECKPOINT_FILE} there to resume from")
    if run_status(directory) == "finished":
        raise UsageError(f"--resume {str(directory)!r}: that run has already finished")
    try:
        saved = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {str(directory / CONFIG_FILE)!r}: {exc}") from None
    saved.update({k: v for k, v in _given(args).items() if k in RESUME_FLAGS})
    return TrainConfig.from_dict(saved), directory


def _train(config: TrainConfig, data, callbacks: list, checkpoint: Path | None = None) -> FitResult:
    seed_everything(config.seed)
    model = build_model(config.model, data, **config.model_options)
    trainer = Trainer(model, data.train, data.val, config, kind=data.kind, callbacks=callbacks)
    if checkpoint is not None:
        trainer.load_state_dict(load_checkpoint(checkpoint))
    return trainer.fit()


def _dense_reference(config: TrainConfig, data, quiet: bool) -> dict[str, Any] | None:
    if config.reference == "none" or config.method == "dense":
        return None
    if config.reference == "stored":
        stored = stored_reference(config)
        if stored is None:
            return {"source": "none stored for this recipe (use --reference run to measure one)"}
        return {"accuracy": stored.accuracy, "source": f"stored figure: {stored.source}"}
    print("dense reference: training the dense model with the same recipe first", flush=True)
    dense = config.replace(method="dense", reference="none")
    try:
        summary = _train(dense, data, [Progress(bars=not quiet, prefix="[dense] ")]).summary
    except TrainingDiverged as exc:
        raise UsageError(f"dense reference run: {exc}") from None
    reference = {"accuracy": summary["final_accuracy"], "train_time": summary["train_time"],
                 "source": "dense run with the same recipe and seed (this command)"}
    if "final_perplexity" in summary:
        reference["perplexity"] = summary["final_perplexity"]
    return reference


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _cost(value: int, dense: int) -> str:
    return f"{value:,} ({value / max(dense, 1):.2f}x)"


def result_table(summary: dict[str, Any], reference: dict[str, Any] | None) -> str:
    """The closing report: dense reference vs result, ranks per layer before → after."""
    reference = reference or {}
    method = "MAESTRO" if summary["method"] == "maestro" else "dense"
    rows = [("", "dense model", method),
            ("validation accuracy", _percent(reference.get("accuracy")), _percent(summary["final_accuracy"]))]
    if "final_perplexity" in summary:
        ppl = reference.get("perplexity")
        rows.append(("validation perplexity", "-" if ppl is None else f"{ppl:.3f}", f"{summary['final_perplexity']:.3f}"))
    rows += [("parameters", f"{summary['dense_params']:,}", _cost(summary["params"], summary["dense_params"])),
             ("MACs per sample", f"{summary['dense_macs']:,}", _cost(summary["macs"], summary["dense_macs"])),
             ("exported parameters", "", _cost(summary["exported_params"], summary["dense_params"])),
             ("exported MACs per sample", "", _cost(summary["exported_macs"], summary["dense_macs"])),
             ("training time", f"{reference['train_time']:.1f} s" if "train_time" in reference else "-",
              f"{summary['train_time']:.1f} s")]
    text = format_table(rows)
    if summary["initial_ranks"]:
        ranks = [("layer", "rank before", "rank after")]
        ranks += [(name, str(before), str(summary["final_ranks"].get(name, "-")))
                  for name, before in summary["initial_ranks"].items()]
        ranks.append(("total", str(summary["initial_total_rank"]), str(summary["final_total_rank"])))
        text += "\n\n" + format_table(ranks)
    if reference.get("source"):
        text += f"\n\ndense reference: {reference['source']}"
    return text


def run(args: argparse.Namespace) -> int:
    """Handler of ``maestro-lod train``."""
    if "resume" in args:
        config, out = _resume_config(args)
        checkpoint = out / CHECKPOINT_FILE
    else:
        config = build_config(args)
        out, checkpoint = _prepare_out(args, config), None
    data = load_data(config.data, root=config.data_root, download=config.download, seed=config.seed,
                     augment=config.augment, seq_len=config.seq_len)
    reference = _dense_reference(config, data, args.quiet)
    print(f"training {config.model} on {config.data} ({config.method}, {config.epochs} epochs) into {out}", flush=True)
    callbacks = [RunDirectory(out, {"dense_reference": reference}), Progress(bars=not args.quiet)]
    try:
        result = _train(config, data, callbacks, checkpoint)
    except TrainingDiverged as exc:
        kept = (f"the last good checkpoint (epoch {exc.epoch - 1}) is kept in {out}" if exc.epoch > 1
                else f"no epoch finished, so {out} holds no checkpoint")
        raise UsageError(f"{exc}; {kept}") from None
    print()
    print(result_table(result.summary, reference))
    print(f"\nrun files: {out}")
    return 0
