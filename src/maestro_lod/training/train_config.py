"""Every option of a training run in one validated, JSON-serialisable dataclass (+ TOML loading).

:class:`TrainConfig` holds the options every run has and, as ``method_options``, those of its
training method (a :class:`~.options.MethodConfig` such as :class:`~.options.MaestroConfig`). Config
files and ``config.json`` keep one flat table: a method's options sit next to the general ones
(``lambda_gl = 1e-3`` at top level), or in a ``[method_options]`` table; both layouts load.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import FactorizeConfig
from ..errors import ConfigError, ConfigTypeError
from .options import EPOCH_LIMIT, MethodConfig, check_bool, check_choice, check_int, check_number, is_number
from .registries import METHODS, OPTIMIZERS, SCHEDULES
from .rng import SEED_LIMIT

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as ``tomli``
    import tomli as tomllib

DEVICES = ("auto", "cpu", "cuda")
REFERENCES = ("stored", "run", "none")
EXECUTION_KEYS = ("device", "world_size")
"""Options a resumed run may change: where it executes, not what it computes on one device type
(``auto`` and the device it resolves to are the same), and ``world_size``, the number of processes
``torchrun`` started. A checkpoint holds no state specific to a process, so a run checkpointed by 2
processes continues on 1 and vice versa (each process's ``batch_size`` stays, so the global batch
changes with the processes). ``threads`` is not one: the number of threads changes the order of
float reductions (a sum over ten million numbers differs in its last digits between 1 and 2
threads), and ``num_workers`` moves random augmentations from the global generator to per-worker
ones."""


SEQ_LEN_LIMIT = 1_000_000
THREAD_LIMIT = 1024
WORKER_LIMIT = 256
NESTING_LIMIT = 32
"""Deepest nesting of lists and tables accepted in a config value (real ones nest two or three deep)."""


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
        method_options: the method's own options, an instance of its ``config_class``
            (:class:`~.options.MaestroConfig` for MAESTRO and its ablations,
            :class:`~maestro_lod.baselines.PufferfishConfig`, ...; none for ``dense``). None gives the
            class's defaults; a dict is read as its fields. :meth:`from_dict` also takes them flat.
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
            by ``gamma`` at each milestone (fractions of the total epochs; the default drops ×0.1
            for the last 10 % of the epochs, a low-learning-rate phase that settles every method); ``cosine`` anneals to 0;
            ``noam`` is the Transformer schedule ``lr·min(s/w, sqrt(w/s))`` (peak ``lr`` at step w);
            ``warmup_steps`` > 0 adds a linear warm-up to the other schedules.
        grad_clip: maximum global gradient norm (None = no clipping). amp: mixed precision (CUDA only).
        factorize: :class:`maestro_lod.FactorizeConfig` fields (which layers, start ranks, ...).
        bn_recal_batches: training batches used to recalibrate BatchNorm statistics after each
            epoch (0 = never); only models with BatchNorm are affected.
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
    method_options: MethodConfig | dict[str, Any] | None = None
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
    schedule: str = "multistep"
    milestones: list[float] = field(default_factory=lambda: [0.9])
    gamma: float = 0.1
    warmup_steps: int = 0
    grad_clip: float | None = None
    amp: bool = False
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
        for name in ("download", "augment", "nesterov", "amp"):
            check_bool(name, getattr(self, name))
        if self.seq_len is not None:
            check_int("seq_len", self.seq_len, 2, SEQ_LEN_LIMIT)
        check_choice("method", self.method, METHODS)
        check_int("epochs", self.epochs, 1, EPOCH_LIMIT)
        check_int("batch_size", self.batch_size, 1)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("seed", self.seed, 0, SEED_LIMIT - 1)
        check_choice("device", self.device, DEVICES)
        if self.threads is not None:
            check_int("threads", self.threads, 1, THREAD_LIMIT)
        check_int("num_workers", self.num_workers, 0, WORKER_LIMIT)
        check_int("world_size", self.world_size, 1)
        self._check_optimisation()
        self._check_method()
        check_int("bn_recal_batches", self.bn_recal_batches, 0)
        check_choice("reference", self.reference, REFERENCES)

    def _check_optimisation(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_number("lr", self.lr, 0.0, strict=True)
        check_number("momentum", self.momentum, 0.0, high=1.0)
        if self.momentum == 1:
            raise ConfigError(f"momentum={self.momentum!r} must be below 1")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError("nesterov=true needs optimizer='sgd' with momentum > 0")
        check_number("weight_decay", self.weight_decay, 0.0)
        if (not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2
                or not all(is_number(b) and 0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"betas={self.betas!r} must be two numbers in [0, 1)")
        self.betas = [float(b) for b in self.betas]
        check_choice("schedule", self.schedule, SCHEDULES)
        if (not isinstance(self.milestones, (list, tuple))
                or not all(is_number(m) and 0 < m < 1 for m in self.milestones)
                or list(self.milestones) != sorted(self.milestones)):
            raise ConfigError(f"milestones={self.milestones!r} must be increasing fractions of the epochs in (0, 1)")
        self.milestones = [float(m) for m in self.milestones]
        check_number("gamma", self.gamma, 0.0, strict=True)
        check_int("warmup_steps", self.warmup_steps, 0)
        if self.schedule == "noam" and self.warmup_steps == 0:
            raise ConfigError("schedule='noam' needs warmup_steps > 0")
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, 0.0, strict=True)

    def _check_method(self) -> None:
        """The method's options as its own config class (built from a dict or the defaults), then
        the method's checks of them against the rest of the run (e.g. a warm-up shorter than it)."""
        method = METHODS[self.method]
        options = self.method_options
        if options is None:
            options = method.config_class()
        elif isinstance(options, dict):
            check_nesting(options, "method_options")
            options = method.config_class.from_dict(options)
        if type(options) is not method.config_class:
            raise ConfigTypeError(f"method_options of method={self.method!r} must be a {method.config_class.__name__} "
                                  f"or a table of its options, got {type(options).__name__}")
        self.method_options = options
        method.check_config(self)
        if not isinstance(self.factorize, dict):
            raise ConfigTypeError(f"factorize must be a table of FactorizeConfig fields, got {self.factorize!r}")
        check_nesting(self.factorize, "factorize")
        _check_json_value("factorize", self.factorize)
        if self.factorize.get("seed") is not None:
            check_int("factorize.seed", self.factorize["seed"], 0, SEED_LIMIT - 1)
        self.factorize_config()  # validates the table

    def factorize_config(self) -> FactorizeConfig:
        """The :class:`maestro_lod.FactorizeConfig` described by ``factorize`` (seeded by ``seed``)."""
        return FactorizeConfig.from_dict({"seed": self.seed, **self.factorize})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field, the method's options flat among the general ones
        (the layout of ``config.json``; :meth:`from_dict` reads it back)."""
        data = asdict(self)
        options = data.pop("method_options")
        return {**data, **options}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, refusing unknown keys by name.

        The method's options may be given flat (``{"method": "maestro", "lambda_gl": 1e-3}``, the
        layout of config files and ``config.json``) or as ``method_options``. Flat options of
        another method are checked and left out, as recipes (presets, a benchmark task) set
        MAESTRO's options for every method they are run with, except those the other method's
        config marks exclusive (a size ``target`` for a dense run is refused).
        """
        if not isinstance(data, dict):
            raise ConfigTypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        general = {f.name for f in fields(cls)}
        table = {key: value for key, value in data.items() if key in general}
        flat = {key: value for key, value in data.items() if key not in general}
        unknown = sorted(set(flat) - method_option_keys())
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(config_keys()))}")
        method = table.get("method", cls.method)
        check_choice("method", method, METHODS)
        own = METHODS[method].config_class
        _check_other_methods_options(method, own, {k: v for k, v in flat.items() if k not in own.keys()})
        given = {key: value for key, value in flat.items() if key in own.keys()}
        if given:
            if table.get("method_options") is not None:
                raise ConfigError(f"options of method={method!r} given both flat ({', '.join(sorted(given))}) and "
                                  f"in method_options; give each once")
            table["method_options"] = given
        return cls(**table)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed (general fields, ``method_options``, or
        options of the method, flat)."""
        data = self.to_dict()
        if "method_options" in changes:
            data = {key: value for key, value in data.items() if key not in self.method_options.keys()}
        return TrainConfig.from_dict({**data, **changes})


def _method_configs() -> list[type[MethodConfig]]:
    """The options classes of the registered methods, each once."""
    return list(dict.fromkeys(method.config_class for method in METHODS.values()))


def method_option_keys() -> set[str]:
    """Names of the options of every registered method."""
    return {key for config_class in _method_configs() for key in config_class.keys()}


def _check_other_methods_options(method: str, own: type[MethodConfig], options: dict[str, Any]) -> None:
    """Check flat ``options`` that belong to other methods than ``method`` (whose class is ``own``)
    with their classes; refuse those a class marks exclusive when they are not at their default."""
    for config_class in _method_configs():
        if config_class is own:
            continue
        theirs = {key: value for key, value in options.items() if key in config_class.keys()}
        if not theirs:
            continue
        defaults = config_class()
        for key, why in config_class.exclusive.items():
            if key in theirs and theirs[key] != getattr(defaults, key):
                raise ConfigError(f"{key}={theirs[key]!r} {why}, not {method!r}")
        config_class.from_dict(theirs)


def config_keys() -> set[str]:
    """Every key a config table may hold: :class:`TrainConfig` fields and the methods' options."""
    return {f.name for f in fields(TrainConfig)} | method_option_keys()


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
