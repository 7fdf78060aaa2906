"""Every option of a training run in one validated, JSON-serialisable dataclass (+ TOML loading)."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..checks import dataclass_from_dict
from ..config import FactorizeConfig
from ..errors import ConfigError, ConfigTypeError
from ..sampling import SAMPLERS
from .budget import parse_target
from .methods import METHODS
from .optim import OPTIMIZERS, SCHEDULES
from .rng import SEED_LIMIT

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as ``tomli``
    import tomli as tomllib

DEVICES = ("auto", "cpu", "cuda")
REFERENCES = ("stored", "run", "none")
REUSE_MODES = ("auto", "on", "off")
EXECUTION_KEYS = ("device", "world_size")
"""Options a resumed run may change: where it executes, not what it computes on one device type
(``auto`` and the device it resolves to are the same), and ``world_size``, the number of processes
``torchrun`` started. A checkpoint holds no state specific to a process, so a run checkpointed by 2
processes continues on 1 and vice versa (each process's ``batch_size`` stays, so the global batch
changes with the processes). ``threads`` is not one: the number of threads changes the order of
float reductions (a sum over ten million numbers differs in its last digits between 1 and 2
threads), and ``num_workers`` moves random augmentations from the global generator to per-worker
ones."""


INT_LIMIT = 2**31 - 1
"""Largest accepted count (epochs, batch sizes, steps, batches): far beyond any real run, and small
enough for every library these counts reach (floats, C ints)."""
FLOAT_LIMIT = 1e6
"""Largest accepted rate or weight (lr, weight_decay, gamma, grad_clip, lambda_gl, eps_ps): far beyond
any useful value, and small enough that products of two stay finite in float32, where tensors hold them."""
EPOCH_LIMIT = 1_000_000
SEQ_LEN_LIMIT = 1_000_000
THREAD_LIMIT = 1024
WORKER_LIMIT = 256
NESTING_LIMIT = 32
"""Deepest nesting of lists and tables accepted in a config value (real ones nest two or three deep)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _check_int(name: str, value: Any, low: int, high: int = INT_LIMIT) -> None:
    if not _is_int(value) or not low <= value <= high:
        shown = value if not _is_int(value) or abs(value) < 10**30 else f"an int of {len(str(value))} digits"
        raise ConfigError(f"{name}={shown!r} must be an int >= {low} and <= {high}")


def _check_number(name: str, value: Any, low: float, *, strict: bool = False, high: float = FLOAT_LIMIT) -> None:
    if _is_int(value) and abs(value) > 10**30:
        value = float("inf")  # shown as inf rather than hundreds of digits
    if not _is_number(value) or value < low or (strict and value == low) or value > high:
        raise ConfigError(f"{name}={value!r} must be a number {'>' if strict else '>='} {low} and <= {high:g}")


def nesting_depth(value: Any) -> int:
    """How deeply lists/tuples and dicts nest in ``value`` (a scalar is 0), found without recursion."""
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, (list, tuple, dict))]
        if not containers:
            return depth
        depth += 1
        level = [item for c in containers for item in (c.values() if isinstance(c, dict) else c)]


def check_nesting(value: Any, what: str) -> None:
    """Refuse ``value`` when its lists and tables nest deeper than :data:`NESTING_LIMIT`."""
    if nesting_depth(value) > NESTING_LIMIT:
        raise ConfigError(f"{what} is nested more than {NESTING_LIMIT} levels deep; flatten it")


def _check_json_value(name: str, value: Any) -> None:
    """``value`` must be made of JSON types only (so config.json can hold it)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{name} holds {item!r}; only finite numbers can be stored")
        elif not (item is None or isinstance(item, (bool, int, float, str))):
            raise ConfigTypeError(f"{name} holds a {type(item).__name__} ({item!r}); use numbers, strings, "
                                  f"booleans, lists and tables")


@dataclass
class TrainConfig:
    """A complete description of one training run; ``from_dict(to_dict())`` gives an equal config.

    The defaults are the offline LeNet-5 / mnist5k recipe of the benchmark (preset ``lenet5-mnist5k``).

    Attributes (grouped):
        model, data, model_options, data_root, download, augment, seq_len: what to train on what
            (names from the model / dataset registries; ``model_options`` go to ``build_model``).
        method: ``"maestro"`` (factorise and train with ordered dropout + group lasso + shrinking),
            ``"dense"`` (the same loop without factorisation: the reference to compare against), an
            ablation (``maestro-no-shrink``, ``maestro-full``) or a baseline (``pufferfish``,
            ``cuttlefish``, ``svd``); see :data:`maestro_lod.training.METHODS`.
        epochs, batch_size, eval_batch_size, seed, device, threads, num_workers: the run's budget
            and execution; ``device="auto"`` picks CUDA when present; ``threads`` sets
            ``torch.set_num_threads`` (None leaves PyTorch's default). The default, 1 thread, is the
            fastest for small models on CPU and avoids oversubscribing a shared machine (two
            threads on two busy cores ran LeNet-5 epochs 10-30x slower); raise it for wide models.
        world_size: the number of processes training the run (1 for a plain run): a record, which
            ``torchrun`` decides and ``maestro-lod train`` and the run directory's ``config.json``
            fill in, so a config.json says how its run was launched (the last launch, for a resumed
            run). ``batch_size`` is per process: the global batch is ``batch_size × world_size``.
        optimizer, lr, momentum, nesterov, weight_decay, betas: SGD or AdamW.
        schedule, milestones, gamma, warmup_steps: LR per optimisation step. ``multistep`` multiplies
            by ``gamma`` at each milestone (fractions of the total epochs); ``cosine`` anneals to 0;
            ``noam`` is the Transformer schedule ``lr·min(s/w, sqrt(w/s))`` (peak ``lr`` at step w);
            ``warmup_steps`` > 0 adds a linear warm-up to the other schedules.
        grad_clip: maximum global gradient norm (None = no clipping). amp: mixed precision (CUDA only).
        sampler, sample_fraction: rank sampler of the sampled pass (``single``: one (layer, rank) pair
            per step, the paper's default; ``independent``: every layer draws a rank; ``fixed``:
            every layer at ``ceil(sample_fraction · rank)``).
        full_pass: False = only the sampled pass, on hard labels (``--no-full-pass``).
        reuse_prefix: let the sampled pass reuse the full pass's outputs of the layers before the
            first layer whose rank was sampled (identical computation). ``auto`` turns it on when
            the model has no dropout, which would make the two passes differ.
        lambda_gl, hierarchical: weight of the group lasso, hierarchical (nested tails) or plain.
        eps_ps, shrink_every: progressive-shrinking threshold and period in epochs.
        warmup_epochs: dense (unfactorised) epochs before factorising.
        rank_ratio: Pufferfish's fixed rank, a fraction of each layer's full rank (¼ in the paper),
            and the uniform rank fraction of ``svd`` when ``svd_energy`` is None.
        dense_share: share of the epochs Pufferfish trains at full rank before factorising
            (``round(dense_share · epochs)`` epochs; at least one factorised epoch must remain).
        svd_energy: ``svd`` keeps per layer the fewest singular values holding this fraction of
            ``Σσ²`` (None: the uniform ``rank_ratio``). svd_finetune_epochs: epochs trained after
            ``svd`` truncates (the run's last ones; 0 truncates after the last epoch's steps).
        stable_window, stable_ema, stable_min_epoch, stable_tolerance, stable_reference_epochs:
            Cuttlefish's stabilisation rule (11 epochs of history, an EMA over 15, never before
            epoch 15, mean |slope| ≤ 0.1 — 0.25 / 0.5 when two / one layers remain unstable). The
            three epoch counts are for a run of ``stable_reference_epochs`` epochs (300, as in
            the paper); a shorter run scales them by ``epochs / stable_reference_epochs``, rounded,
            at least 2.
        factorize: :class:`maestro_lod.FactorizeConfig` fields (which layers, start ranks, ...).
        bn_recal_batches: training batches used to recalibrate BatchNorm statistics after each
            epoch (0 = never); only models with BatchNorm are affected.
        target, target_by: ask for a size instead of a λ: ``"params=0.3"`` / ``"macs=0.3"`` is the
            exported model's cost as a fraction of the dense model's; ``lambda_gl`` is then only
            the starting weight, steered each epoch so the cost follows a plan that reaches the
            target after ``target_by`` of the factorised epochs (see :mod:`.budget`; MAESTRO only).
        reference: the dense accuracy shown next to the result: ``stored`` (a figure measured with
            the same recipe, when one exists), ``run`` (train the dense model first), ``none``.
    """

    model: str = "lenet5"
    data: str = "mnist5k"
    model_options: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    download: bool = False
    augment: bool = True
    seq_len: int | None = None
    method: str = "maestro"
    epochs: int = 30
    batch_size: int = 64
    eval_batch_size: int = 500
    seed: int = 0
    device: str = "auto"
    threads: int | None = 1
    num_workers: int = 0
    world_size: int = 1
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "constant"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    warmup_steps: int = 0
    grad_clip: float | None = None
    amp: bool = False
    sampler: str = "single"
    sample_fraction: float = 0.5
    full_pass: bool = True
    reuse_prefix: str = "auto"
    lambda_gl: float = 1e-3
    hierarchical: bool = True
    eps_ps: float = 1e-3
    shrink_every: int = 1
    warmup_epochs: int = 0
    rank_ratio: float = 0.25
    dense_share: float = 0.25
    svd_energy: float | None = None
    svd_finetune_epochs: int = 0
    stable_window: int = 11
    stable_ema: int = 15
    stable_min_epoch: int = 15
    stable_tolerance: float = 0.1
    stable_reference_epochs: int = 300
    target: str | None = None
    target_by: float = 0.6
    factorize: dict[str, Any] = field(default_factory=dict)
    bn_recal_batches: int = 20
    reference: str = "stored"

    def __post_init__(self) -> None:
        for name in ("model", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a non-empty name")
        if not isinstance(self.model_options, dict):
            raise ConfigTypeError(f"model_options must be a table of option = value, got {self.model_options!r}")
        check_nesting(self.model_options, "model_options")
        _check_json_value("model_options", self.model_options)
        if self.data_root is not None and not isinstance(self.data_root, str):
            raise ConfigTypeError(f"data_root must be a path string, got {self.data_root!r}")
        for name in ("download", "augment", "nesterov", "amp", "full_pass", "hierarchical"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigTypeError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.seq_len is not None:
            _check_int("seq_len", self.seq_len, 2, SEQ_LEN_LIMIT)
        _check_choice("method", self.method, METHODS)
        _check_int("epochs", self.epochs, 1, EPOCH_LIMIT)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("eval_batch_size", self.eval_batch_size, 1)
        _check_int("seed", self.seed, 0, SEED_LIMIT - 1)
        _check_choice("device", self.device, DEVICES)
        if self.threads is not None:
            _check_int("threads", self.threads, 1, THREAD_LIMIT)
        _check_int("num_workers", self.num_workers, 0, WORKER_LIMIT)
        _check_int("world_size", self.world_size, 1)
        self._check_optimisation()
        self._check_method()
        _check_int("bn_recal_batches", self.bn_recal_batches, 0)
        _check_choice("reference", self.reference, REFERENCES)

    def _check_optimisation(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_number("lr", self.lr, 0.0, strict=True)
        _check_number("momentum", self.momentum, 0.0, high=1.0)
        if self.momentum == 1:
            raise ConfigError(f"momentum={self.momentum!r} must be below 1")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError("nesterov=true needs optimizer='sgd' with momentum > 0")
        _check_number("weight_decay", self.weight_decay, 0.0)
        if (not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2
                or not all(_is_number(b) and 0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"betas={self.betas!r} must be two numbers in [0, 1)")
        self.betas = [float(b) for b in self.betas]
        _check_choice("schedule", self.schedule, SCHEDULES)
        if (not isinstance(self.milestones, (list, tuple))
                or not all(_is_number(m) and 0 < m < 1 for m in self.milestones)
                or list(self.milestones) != sorted(self.milestones)):
            raise ConfigError(f"milestones={self.milestones!r} must be increasing fractions of the epochs in (0, 1)")
        self.milestones = [float(m) for m in self.milestones]
        _check_number("gamma", self.gamma, 0.0, strict=True)
        _check_int("warmup_steps", self.warmup_steps, 0)
        if self.schedule == "noam" and self.warmup_steps == 0:
            raise ConfigError("schedule='noam' needs warmup_steps > 0")
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, 0.0, strict=True)

    def _check_method(self) -> None:
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_number("sample_fraction", self.sample_fraction, 0.0, strict=True, high=1.0)
        _check_choice("reuse_prefix", self.reuse_prefix, REUSE_MODES)
        _check_number("lambda_gl", self.lambda_gl, 0.0)
        _check_number("eps_ps", self.eps_ps, 0.0)
        _check_int("shrink_every", self.shrink_every, 1)
        _check_int("warmup_epochs", self.warmup_epochs, 0)
        self._check_baselines()
        self._check_target()
        METHODS[self.method].check_config(self)
        if not isinstance(self.factorize, dict):
            raise ConfigTypeError(f"factorize must be a table of FactorizeConfig fields, got {self.factorize!r}")
        check_nesting(self.factorize, "factorize")
        _check_json_value("factorize", self.factorize)
        if self.factorize.get("seed") is not None:
            _check_int("factorize.seed", self.factorize["seed"], 0, SEED_LIMIT - 1)
        self.factorize_config()  # validates the table

    def _check_target(self) -> None:
        parse_target(self.target)
        _check_number("target_by", self.target_by, 0.0, strict=True, high=1.0)
        if self.target is not None and self.method != "maestro":
            raise ConfigError(f"target={self.target!r} steers MAESTRO's group lasso; it needs method='maestro', "
                              f"not {self.method!r}")
        if self.target is not None and self.lambda_gl == 0:
            raise ConfigError(f"target={self.target!r} steers the group-lasso weight, which starts at lambda_gl; "
                              f"give lambda_gl > 0")

    def _check_baselines(self) -> None:
        _check_number("rank_ratio", self.rank_ratio, 0.0, strict=True, high=1.0)
        _check_number("dense_share", self.dense_share, 0.0, high=1.0)
        if self.svd_energy is not None:
            _check_number("svd_energy", self.svd_energy, 0.0, strict=True, high=1.0)
        _check_int("svd_finetune_epochs", self.svd_finetune_epochs, 0, EPOCH_LIMIT)
        for name in ("stable_window", "stable_ema", "stable_reference_epochs"):
            _check_int(name, getattr(self, name), 2, EPOCH_LIMIT)
        _check_int("stable_min_epoch", self.stable_min_epoch, 1, EPOCH_LIMIT)
        _check_number("stable_tolerance", self.stable_tolerance, 0.0, strict=True)

    def factorize_config(self) -> FactorizeConfig:
        """The :class:`maestro_lod.FactorizeConfig` described by ``factorize`` (seeded by ``seed``)."""
        return FactorizeConfig.from_dict({"seed": self.seed, **self.factorize})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, refusing unknown keys by name."""
        return dataclass_from_dict(cls, data, "training option")

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def config_keys() -> set[str]:
    """Names of every :class:`TrainConfig` field."""
    return {f.name for f in fields(TrainConfig)}


def read_toml(path: str | Path) -> dict[str, Any]:
    """The table of a TOML config file, keys checked against :class:`TrainConfig` (not yet validated).

    Unreadable or non-UTF-8 files, TOML syntax errors, values nested more than :data:`NESTING_LIMIT`
    deep and unknown keys raise a ConfigError (a ValueError) naming the file.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            table = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(path)!r} nests lists or tables too deeply to read") from None
    check_nesting(table, f"config file {str(path)!r}")
    unknown = sorted(set(table) - config_keys())
    if unknown:
        raise ConfigError(f"config file {str(path)!r}: unknown option(s) {', '.join(unknown)}")
    return table
