"""Compressed Hugging Face models as ``save_pretrained`` folders that reload at their compressed size.

:func:`save_compressed` writes a factorised ``transformers`` model as a folder that
``AutoModel….from_pretrained(folder, trust_remote_code=True)`` loads with every factorised layer
still a pair of thin linear maps at its rank, not merged back to the dense size. The folder holds:

* ``config.json``: the architecture's config plus ``low_rank`` (``{layer name: rank}``), a
  ``model_type`` of ``low_rank_<model type>`` and an ``auto_map`` naming the two classes below;
* ``modeling_low_rank.py`` (:data:`MODELING_FILE`): a config class and a model class that subclass
  the architecture's own ones from ``transformers``; the model's ``__init__`` builds the usual
  model and then replaces each layer listed in ``low_rank`` by a ``LowRankLinear`` (a
  ``down: Linear(in, rank, bias=False)`` followed by ``up: Linear(rank, out)``, GPT-2's ``Conv1D``
  included), so the state-dict keys are those of the saved weights. It imports only torch and
  transformers: loading needs neither maestro-lod nor any other package;
* ``model.safetensors`` (and ``generation_config.json``, and the tokenizer when one is given).

The model type of its own makes a load without ``trust_remote_code=True`` fail with
transformers' request to pass it, rather than build the dense architecture and leave the
factorised layers uninitialised.

:func:`compress_hf_folder` runs the whole pipeline on a local ``save_pretrained`` folder of a
causal language model: calibration text through the folder's tokenizer, (whitened) factorisation,
the greedy accuracy–cost front on the language-model loss, one compressed folder per size target,
and the held-out perplexity of each folder as reloaded.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers
    from transformers import PreTrainedModel
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("maestro_lod.integrations.hf_folder needs the hf extra: pip install 'maestro-lod[hf]'") from error

from ..checks import check_positive_int
from ..config import FactorizeConfig
from ..data.text import pydoc_corpus
from ..engine.counting import count_params
from ..engine.front import Front, FrontPoint
from ..engine.search import greedy_front, materialize
from ..engine.targets import COMPRESS, Target, check_target, parse_target
from ..errors import ConfigError, ConfigTypeError, MissingFileError, UsageError
from ..inject import factorize
from ..layers import LowRankLinear, low_rank_layers

MODELING_FILE = "modeling_low_rank.py"
"""The module file a compressed folder carries (``auto_map`` points into it)."""
RANKS_KEY = "low_rank"
"""The ``config.json`` entry listing the layers held as pairs and their ranks."""
MODEL_TYPE_PREFIX = "low_rank_"
FRONT_FILE = "front.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
HELD_OUT_FRACTION = 0.1
"""The last tenth of the token stream measures perplexity; calibration windows come from the rest."""
SEARCH_TARGETS = ("params", "macs")

__all__ = ["save_compressed", "load_compressed", "compress_hf_folder", "HFCompressResult", "modeling_source",
           "perplexity", "MODELING_FILE", "RANKS_KEY"]

_MODELING_TEMPLATE = '''"""Low-rank {model_class}: transformers' ``{model_class}`` with the layers that
``config.low_rank`` names replaced by pairs of thin linear maps (``LowRankLinear``) of the rank it
gives. Load this folder with ``trust_remote_code=True``; it needs only torch and transformers.
"""

from torch import nn
from transformers import {config_class} as _BaseConfig
from transformers import {model_class} as _BaseModel


class LowRankLinear(nn.Module):
    """``up(down(x))``: ``down`` maps ``in_features`` to ``rank`` without bias, ``up`` maps ``rank``
    to ``out_features`` with the replaced layer's bias. ``weight`` and ``bias`` read like those of
    the replaced layer (``weight`` computed from the factors, stored as in x out when
    ``transposed``, like GPT-2's ``Conv1D``)."""

    def __init__(self, in_features, out_features, rank, bias=True, transposed=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.transposed = transposed
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.up(self.down(x))

    @property
    def weight(self):
        weight = self.up.weight @ self.down.weight
        return weight.t() if self.transposed else weight

    @property
    def bias(self):
        return self.up.bias

    def extra_repr(self):
        return f"in_features={{self.in_features}}, out_features={{self.out_features}}, rank={{self.rank}}"


def low_rank_linear(layer, rank):
    """The ``LowRankLinear`` of ``rank`` standing in for ``layer`` (an ``nn.Linear`` or a ``Conv1D``)."""
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        return LowRankLinear(layer.in_features, layer.out_features, rank, layer.bias is not None,
                             device=weight.device, dtype=weight.dtype)
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nx") and hasattr(layer, "nf"):
        return LowRankLinear(layer.nx, layer.nf, rank, layer.bias is not None, transposed=True,
                             device=weight.device, dtype=weight.dtype)
    raise TypeError(f"cannot hold a {{type(layer).__name__}} as a low-rank pair")


class {config_name}(_BaseConfig):
    model_type = "{model_type}"


class {model_name}(_BaseModel):
    config_class = {config_name}

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        for name, rank in (getattr(config, "low_rank", None) or {{}}).items():
            parent, _, child = name.rpartition(".")
            owner = self.get_submodule(parent)
            setattr(owner, child, low_rank_linear(getattr(owner, child), int(rank)))
'''


# ------------------------------------------------------------------------------------ the folder form
def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nx") and hasattr(module, "nf")


def _transformers_class(cls: type, what: str) -> str:
    """``cls.__name__`` when ``transformers`` exports ``cls`` under that name (the modelling file
    imports it from there), else a ConfigError."""
    if getattr(transformers, cls.__name__, None) is not cls:
        raise ConfigError(f"{what} {cls.__module__}.{cls.__name__} is not a class transformers exports; a compressed "
                          f"folder subclasses one of transformers' own architectures")
    return cls.__name__


def _auto_classes(model: PreTrainedModel) -> list[str]:
    """The ``AutoModel…`` classes that load ``type(model)`` for its model type."""
    name, model_type = type(model).__name__, model.config.model_type
    found = []
    for auto in sorted(n for n in dir(transformers) if n.startswith("AutoModel")):
        mapping = getattr(getattr(getattr(transformers, auto), "_model_mapping", None), "_model_mapping", None)
        entry = mapping.get(model_type) if isinstance(mapping, dict) else None
        if name in (entry if isinstance(entry, (tuple, list)) else (entry,)):
            found.append(auto)
    return found


def modeling_source(model: PreTrainedModel) -> tuple[str, str, str]:
    """``(source, config class name, model class name)`` of the modelling file for ``model``'s
    architecture: the same text for every model of one architecture."""
    config_class = _transformers_class(type(model.config), "the config class")
    model_class = _transformers_class(type(model), "the model class")
    names = dict(model_class=model_class, config_class=config_class, config_name=f"LowRank{config_class}",
                 model_name=f"LowRank{model_class}", model_type=MODEL_TYPE_PREFIX + model.config.model_type)
    return _MODELING_TEMPLATE.format(**names), names["config_name"], names["model_name"]


def _import_modeling(path: Path) -> Any:
    """The modelling file at ``path`` as a module (one module per distinct source text, kept in
    ``sys.modules`` so classes compare equal across folders)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    name = f"maestro_lod._low_rank_modeling_{digest}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def _check_model(model: Any) -> dict[str, LowRankLinear]:
    if not isinstance(model, PreTrainedModel):
        raise ConfigTypeError(f"save_compressed needs a transformers PreTrainedModel, got {type(model).__name__}")
    if str(getattr(model.config, "model_type", "")).startswith(MODEL_TYPE_PREFIX):
        raise ConfigError(f"{type(model).__name__} was loaded from a compressed folder; save it with save_pretrained")
    layers = dict(low_rank_layers(model))
    others = sorted(name for name, layer in layers.items() if not isinstance(layer, LowRankLinear))
    if others:
        raise ConfigError(f"save_compressed holds low-rank Linear and Conv1D layers only; "
                          f"{', '.join(others)} {'is' if len(others) == 1 else 'are'} "
                          f"{type(layers[others[0]]).__name__}")
    return layers


def _compressed_state(model: PreTrainedModel, layers: dict[str, LowRankLinear], pairs: dict[str, int],
                      skeleton: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The state dict of the compressed class: factor pairs for the layers in ``pairs``, the
    product in the original layout (``Conv1D``: in × out) for the other factorised layers, and
    every other entry of ``model``'s state dict as it is."""
    def tensor(value: torch.Tensor) -> torch.Tensor:
        value = value.detach()
        return (value if dtype is None else value.to(dtype)).clone().contiguous()

    state = {}
    prefixes = tuple(f"{name}." for name in layers)
    for key, value in model.state_dict().items():
        if not key.startswith(prefixes):
            state[key] = tensor(value)
    for name, layer in layers.items():
        up, down = layer.factors()
        if name in pairs:
            state[f"{name}.down.weight"], state[f"{name}.up.weight"] = tensor(down), tensor(up)
            if layer.bias is not None:
                state[f"{name}.up.bias"] = tensor(layer.bias)
        else:
            weight = up @ down
            state[f"{name}.weight"] = tensor(weight.t() if _is_conv1d(skeleton.get_submodule(name)) else weight)
            if layer.bias is not None:
                state[f"{name}.bias"] = tensor(layer.bias)
    return state


def _empty_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{str(folder)!r} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UsageError(f"{str(folder)!r} is not empty; pass overwrite=True to replace it")


def save_compressed(model: PreTrainedModel, folder: str | Path, *, tokenizer: Any = None,
                    dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (a ``transformers`` model factorised by :func:`maestro_lod.factorize`, at the
    ranks :func:`maestro_lod.truncate_` or ``active_rank`` left it) as a ``save_pretrained`` folder
    that ``AutoModel….from_pretrained(folder, trust_remote_code=True)`` loads at its compressed size.

    Each factorised layer is kept as a factor pair at its effective rank where the pair has fewer
    parameters than the dense layer (``r·(m+n) < m·n``), and saved dense in the architecture's own
    layout otherwise (the rule of ``maestro_lod.export(merge="auto")``), so the folder's parameter
    count is that of the deployed form the greedy search costs. The layers kept as pairs and their
    ranks go to ``config.low_rank``; the modelling file (:data:`MODELING_FILE`, see the module
    documentation) rebuilds them on load. Weights are written in safetensors, in ``dtype`` when
    given (else the model's). ``tokenizer`` (anything with ``save_pretrained``) is saved alongside.

    Supported: architectures ``transformers`` exports with an ``AutoModel…`` class (GPT-2 with
    its ``Conv1D``, Llama/Mistral-style ``nn.Linear`` projections, BERT and other encoders), whose
    factorised layers are low-rank Linear or ``Conv1D`` layers. Anything else, or a non-empty
    ``folder`` without ``overwrite=True``, raises a :class:`~maestro_lod.errors.ConfigError` before
    anything is written; the folder appears complete or not at all (it is written next to its final
    place and renamed). Returns the folder's path.
    """
    layers = _check_model(model)
    folder = Path(folder)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigTypeError(f"dtype={dtype!r} must be a floating torch.dtype or None")
    _empty_folder(folder, overwrite)
    autos = _auto_classes(model)
    if not autos:
        raise ConfigError(f"no transformers AutoModel class loads {type(model).__name__} "
                          f"(model type {model.config.model_type!r})")
    source, config_name, model_name = modeling_source(model)
    pairs = {}
    for name, layer in layers.items():
        saved = layer.active_rank
        if not layer.merge_saves_params():
            pairs[name] = layer.effective_rank
        layer.active_rank = saved
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        (work / MODELING_FILE).write_text(source)
        module = _import_modeling(work / MODELING_FILE)
        settings = {k: v for k, v in model.config.to_dict().items()
                    if k not in ("model_type", "architectures", "auto_map", "transformers_version", RANKS_KEY)}
        config = getattr(module, config_name).from_dict(settings)
        setattr(config, RANKS_KEY, pairs)
        stem = MODELING_FILE.removesuffix(".py")
        config.auto_map = {"AutoConfig": f"{stem}.{config_name}", **{auto: f"{stem}.{model_name}" for auto in autos}}
        with torch.device("meta"):
            compressed = getattr(module, model_name)(config)
        state = _compressed_state(model, layers, pairs, compressed, dtype)
        compressed.load_state_dict(state, strict=True, assign=True)
        for name, buffer in list(compressed.named_buffers()):  # non-persistent buffers (rotary frequencies, ...)
            if buffer.is_meta:
                owner, _, leaf = name.rpartition(".")
                compressed.get_submodule(owner)._buffers[leaf] = model.get_buffer(name).detach().clone()
        compressed.tie_weights()
        if getattr(model, "generation_config", None) is not None and compressed.can_generate():
            compressed.generation_config = copy.deepcopy(model.generation_config)
        compressed.eval().save_pretrained(work)
        if tokenizer is not None:
            tokenizer.save_pretrained(work)
        mask = os.umask(0o022)
        os.umask(mask)
        work.chmod(0o777 & ~mask)  # a folder as mkdir makes it, not mkdtemp's private one
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return folder


def load_compressed(folder: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The model of a folder :func:`save_compressed` wrote, built by the folder's own modelling file
    (as ``from_pretrained(folder, trust_remote_code=True)`` builds it, without copying the file into
    transformers' module cache), in eval mode."""
    folder = Path(folder)
    config = _read_config(folder)
    if RANKS_KEY not in config or not (folder / MODELING_FILE).is_file():
        raise ConfigError(f"{str(folder)!r} is not a compressed folder (no {RANKS_KEY!r} in config.json or no "
                          f"{MODELING_FILE})")
    module = _import_modeling(folder / MODELING_FILE)
    architectures = config.get("architectures") or []
    cls = getattr(module, architectures[0], None) if architectures else None
    if cls is None:
        raise ConfigError(f"{str(folder / 'config.json')!r}: architectures={architectures!r} names no class of "
                          f"{MODELING_FILE}")
    options = {} if dtype is None else {"dtype": dtype}
    return cls.from_pretrained(str(folder), local_files_only=True, **options).eval()


# ------------------------------------------------------------------------------------ the pipeline
def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise MissingFileError(f"no folder at {str(folder)!r}")
    path = folder / "config.json"
    if not folder.is_dir() or not path.is_file():
        raise ConfigError(f"{str(folder)!r} is not a save_pretrained folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{str(path)!r} is not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{str(path)!r} does not hold a JSON object")
    return config


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _check_source(folder: Path) -> dict[str, Any]:
    """The folder's config.json, after checking that the folder can be compressed at all."""
    config = _read_config(folder)
    if RANKS_KEY in config or str(config.get("model_type", "")).startswith(MODEL_TYPE_PREFIX):
        raise ConfigError(f"{str(folder)!r} is already a compressed folder (its config.json has {RANKS_KEY!r})")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"{str(folder)!r} is not a save_pretrained folder (no weights: {', '.join(WEIGHT_FILES)})")
    model_type = config.get("model_type")
    mapping = transformers.AutoModelForCausalLM._model_mapping._model_mapping
    if model_type not in mapping:
        known = model_type in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES
        why = "has no causal language model class" if known else "is not an architecture this transformers knows"
        raise ConfigError(f"{str(folder / 'config.json')!r}: model_type={model_type!r} {why} "
                          f"(transformers {transformers.__version__})")
    return config


def _load_model(folder: Path) -> PreTrainedModel:
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                                   dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ConfigError(f"cannot load {str(folder)!r} with AutoModelForCausalLM: {_one_line(error)}") from None
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            raise ConfigError(f"{str(folder)!r}: weight {name!r} holds {bad} values")
    return model.eval()


def _load_tokenizer(folder: Path) -> Any:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{str(folder)!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}) to tokenise the "
                          f"calibration text; save one with tokenizer.save_pretrained or pass tokens=")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"cannot load the tokenizer of {str(folder)!r}: {_one_line(error)}") from None


def _text(text: str | Path | None) -> str:
    if text is None:
        return pydoc_corpus()
    path = Path(text)
    if not path.is_file():
        raise MissingFileError(f"no text file at {str(path)!r}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {str(path)!r} as UTF-8 text: {error}") from None


def _tokens(tokens: Any, vocab_size: int, source: str) -> torch.Tensor:
    if isinstance(tokens, (list, tuple)):
        tokens = torch.tensor(tokens)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point() \
            or tokens.is_complex() or tokens.dtype == torch.bool:
        got = f" {tokens.dtype} of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else ""
        raise ConfigTypeError(f"tokens must be a 1-D integer tensor of token ids, got {type(tokens).__name__}{got}")
    tokens = tokens.long()
    if len(tokens):
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            raise ConfigError(f"{source} has token id {high if high >= vocab_size else low} outside the model's "
                              f"vocabulary of {vocab_size}")
    return tokens


def _windows(stream: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """``count`` windows of ``seq_len + 1`` tokens, evenly spread over ``stream`` (non-overlapping
    when it is long enough)."""
    starts = torch.linspace(0, len(stream) - seq_len - 1, count).round().long()
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


def _batches(windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()) for chunk in windows.split(batch_size)]


class _Logits(nn.Module):
    """A causal language model as the search calls models: ``model(input_ids)`` → logits."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@torch.no_grad()
def perplexity(model: PreTrainedModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """``(perplexity, mean next-token cross-entropy)`` of a causal language model on ``batches``
    of ``(input_ids, next ids)``, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    try:
        for inputs, targets in batches:
            logits = model(input_ids=inputs, use_cache=False).logits
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                     reduction="sum").double()
            count += targets.numel()
    finally:
        model.train(was_training)
    loss = float(total) / count
    return math.exp(loss), loss


def _linear_layers(model: PreTrainedModel, target_modules: str | list[str] | None) -> str | list[str]:
    """``target_modules`` as given, or a regex of every ``nn.Linear`` and ``Conv1D`` of ``model``
    except the output head (tied to the input embeddings in most language models)."""
    if target_modules is not None:
        return target_modules
    head = model.get_output_embeddings()
    names = [name for name, module in model.named_modules()
             if name and (isinstance(module, nn.Linear) or _is_conv1d(module)) and module is not head]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no Linear or Conv1D layer besides its output head to factorise")
    return "|".join(re.escape(name) for name in names)


def _targets(targets: Sequence[str | tuple[str, float]]) -> list[Target]:
    if isinstance(targets, str):
        targets = (targets,)
    if not targets:
        raise ConfigError("compress_hf_folder needs at least one target such as 'params=0.6'")
    parsed = []
    for target in targets:
        found = parse_target(target, COMPRESS) if isinstance(target, str) else check_target(*target, COMPRESS)
        if found.kind not in SEARCH_TARGETS:
            raise ConfigError(f"target {found.kind}={found.value:g}: a Hugging Face folder is compressed to "
                              f"{' or '.join(f'{k}=FRACTION' for k in SEARCH_TARGETS)}")
        parsed.append(Target(found.kind, float(found.value)))
    return list(dict.fromkeys(parsed))


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        check_positive_int(name, value)


def target_folder(target: Target) -> str:
    """Folder name of a target under ``out``: ``params-0.6``."""
    return f"{target.kind}-{target.value:g}"


Progress = Callable[[str], Callable[[int, int], None]]


@dataclass
class HFCompressResult:
    """What :func:`compress_hf_folder` computed and wrote: the front (``front.json``; each saved
    point with its held-out ``perplexity``/``val_loss`` and ``exported`` = its folders and parameter
    count), ``chosen`` (folder, point) per target, the dense model's held-out perplexity and
    parameter count, and ``model``: the factorised model the front was searched on (at full rank;
    ``materialize(model, point)`` is the model a folder holds)."""

    front: Front
    chosen: list[tuple[Path, FrontPoint]]
    out: Path
    dense_perplexity: float
    dense_params: int
    model: PreTrainedModel
    metadata: dict[str, Any] = field(default_factory=dict)


def compress_hf_folder(folder: str | Path, out: str | Path, *, text: str | Path | None = None,
                       tokens: torch.Tensor | None = None, targets: Sequence[str] = ("params=0.6",),
                       init: str = "whitened", calibration_tokens: int = 16384, eval_tokens: int = 32768,
                       seq_len: int = 128, batch_size: int = 16, step: float = 0.25, damping: float | None = None,
                       target_modules: str | list[str] | None = None, force: bool = False,
                       progress: Progress | None = None, search: str = "lazy") -> HFCompressResult:
    """Compress the causal language model of a local ``save_pretrained`` folder to each of
    ``targets`` and write one :func:`save_compressed` folder per target under ``out``.

    Steps: load ``folder`` with ``AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)``
    in float32; tokenise ``text`` (a UTF-8 text file; None: the CPython pydoc topics that
    ``pydoc-text`` uses) with the folder's tokenizer, or take ``tokens`` (a 1-D tensor of token ids)
    instead; keep the last tenth of the stream for held-out perplexity (at most ``eval_tokens``
    tokens, in windows of ``seq_len``) and draw ``calibration_tokens`` tokens of windows from the
    rest; factorise every ``nn.Linear`` / ``Conv1D`` but the output head (or ``target_modules``,
    in :class:`~maestro_lod.FactorizeConfig`'s forms) with ``init`` (``"whitened"``: data-aware SVD on
    the calibration windows; ``"svd"``: plain SVD; ``damping`` for whitening); run the greedy
    front (:func:`~maestro_lod.engine.search.greedy_front`, removing ``step`` of a layer's rank per
    try) on the next-token cross-entropy of the calibration windows, with no training; pick each
    target's point (``"params=0.6"`` / ``"macs=0.5"``: at most that fraction of the dense model's
    parameters / MACs, the lowest calibration loss among those); save each as
    ``out/<key>-<value>/`` (with the tokenizer, in the folder's dtype) and measure the held-out
    perplexity of the folder as reloaded; write ``out/front.json``.

    The search (``search``: ``"lazy"``, ``"exhaustive"`` or ``"allocate"``, as
    :func:`~maestro_lod.engine.search.greedy_front` takes it) stops once the smallest target of
    each kind is met; an exhaustive one scores every layer once per round on the calibration
    windows, about ``rounds × layers`` forward passes over ``calibration_tokens`` tokens
    (``rounds``: about ``layers · log(rank) / step``), a lazy one only the most promising layers.

    One-line :class:`~maestro_lod.errors.ConfigError` (nothing written) for: a folder that is not a
    ``save_pretrained`` folder, already compressed, of an architecture transformers does not know
    or without a causal language model class; a model with NaN or infinite weights; no tokenizer
    in the folder when ``tokens`` is not given; token ids outside the vocabulary; text too short
    for the windows; a target other than ``params``/``macs`` or one no point meets; outputs that
    exist already (:class:`~maestro_lod.errors.UsageError`, unless ``force``).

    This is the library function behind a ``--hf`` compress command: ``progress(stage)`` (stages
    ``"search"`` and ``"save"``), when given, returns a ``callback(done, total)``.
    """
    folder, out = Path(folder), Path(out)
    _check_positive(calibration_tokens=calibration_tokens, eval_tokens=eval_tokens, seq_len=seq_len,
                    batch_size=batch_size)
    chosen_targets = _targets(targets)
    if init not in ("svd", "whitened"):
        raise ConfigError(f"init={init!r}: compress_hf_folder does not train, so it starts from 'svd' or 'whitened'")
    settings = FactorizeConfig(init=init, **({} if damping is None else {"damping": damping}))
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
        raise ConfigError(f"step={step!r} must be a fraction in (0, 1]")
    if text is not None and tokens is not None:
        raise ConfigError("give the calibration text either as text= (a file to tokenise) or as tokens=, not both")
    config = _check_source(folder)
    existing = [p for p in [out / FRONT_FILE] + [out / target_folder(t) for t in chosen_targets] if p.exists()]
    if existing and not force:
        raise UsageError(f"{', '.join(str(p) for p in existing)} already exist; pass force=True to replace them")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{str(out)!r} exists and is not a folder")
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = _load_tokenizer(folder) if tokens is None or has_tokenizer else None
    vocab_size = int(config.get("vocab_size") or 0) or None
    if tokens is None:
        stream = tokenizer(_text(text), add_special_tokens=False, return_attention_mask=False)["input_ids"]
        source = f"the text tokenised by {str(folder)!r}'s tokenizer"
        stream = _tokens(torch.tensor(stream, dtype=torch.long), vocab_size or len(tokenizer), source)
    else:
        stream = _tokens(tokens, vocab_size or 2 ** 63 - 1, "tokens")
    held = max(seq_len + 1, int(len(stream) * HELD_OUT_FRACTION))
    pool, held_out = stream[:-held], stream[-held:]
    if len(pool) < seq_len + 1:
        raise ConfigError(f"{len(stream):,} tokens are too few for calibration and held-out windows of {seq_len} "
                          f"tokens (at least {2 * (seq_len + 1):,} needed)")
    calibration = _batches(_windows(pool, seq_len, max(1, calibration_tokens // seq_len)), batch_size)
    evaluation_count = max(1, min(eval_tokens, len(held_out) - 1) // seq_len)
    evaluation = _batches(_windows(held_out, seq_len, evaluation_count), batch_size)

    model = _load_model(folder)
    saved_dtype = _saved_dtype(config)
    dense_params = count_params(model)
    dense_perplexity, dense_loss = perplexity(model, evaluation)
    layer_names = _linear_layers(model, target_modules)
    factorize_config = FactorizeConfig(**{**settings.to_dict(), "target_modules": layer_names})
    whitening = [{"input_ids": inputs, "use_cache": False} for inputs, _ in calibration] if init == "whitened" else None
    factorize(model, factorize_config, calibration=whitening)

    cost = chosen_targets[0].kind
    wrapped = _Logits(model)
    stops = {kind: min(t.value for t in chosen_targets if t.kind == kind) for kind in {t.kind for t in chosen_targets}}
    front = greedy_front(wrapped, calibration, cost=cost, step=step, kind="language-model", search=search,
                         targets=stops, progress=None if progress is None else progress("search"))
    prefix = "model."
    for point in front.points:
        point.ranks = {name.removeprefix(prefix): rank for name, rank in point.ranks.items()}
    front.max_ranks = {name.removeprefix(prefix): rank for name, rank in front.max_ranks.items()}
    picks = [(t, front.select(**{t.kind: t.value})) for t in chosen_targets]

    out.mkdir(parents=True, exist_ok=True)
    chosen = []
    report = None if progress is None else progress("save")
    for done, (target, point) in enumerate(picks, start=1):
        path = save_compressed(materialize(model, point), out / target_folder(target), tokenizer=tokenizer,
                               dtype=saved_dtype, overwrite=True)
        if point.exported is None:  # a point chosen for several targets is measured once
            reloaded = load_compressed(path)
            point.perplexity, point.val_loss = perplexity(reloaded, evaluation)
            point.exported = {"folders": [], "params": count_params(reloaded)}
            del reloaded
        point.exported["folders"].append(path.name)
        chosen.append((path, point))
        if report is not None:
            report(done, len(picks))
    metadata = {"source": str(folder), "model_type": config.get("model_type"), "init": init,
                "damping": factorize_config.damping, "seq_len": seq_len,
                "calibration_tokens": sum(t.numel() for _, t in calibration),
                "eval_tokens": sum(t.numel() for _, t in evaluation),
                "text": "tokens" if tokens is not None else "pydoc-text" if text is None else str(text),
                "dense": {"params": dense_params, "perplexity": dense_perplexity, "loss": dense_loss},
                "targets": {target_folder(t): p.index for t, p in picks},
                "transformers": transformers.__version__, "torch": torch.__version__}
    front.metadata = metadata
    front.save(out / FRONT_FILE)
    return HFCompressResult(front, chosen, out, dense_perplexity, dense_params, model, metadata)


def _saved_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The floating dtype the source folder's config names (``dtype`` / ``torch_dtype``), if any."""
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
