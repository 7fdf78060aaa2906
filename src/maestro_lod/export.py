"""Export a factorised model to plain ``torch.nn`` modules for deployment.

A low-rank Linear/Conv is normally exported as a pair of layers (``nn.Sequential(first, second)``).
Code outside a layer that reads the layer's attributes (T5 compares ``wo.weight.dtype`` with its
activations, torchvision's Swin passes ``qkv.weight`` to a function, Whisper reads ``conv1.stride``)
would find a pair lacking them. Given example inputs, :func:`export` runs the model once in eval
mode and once in training mode while recording such reads (:func:`attribute_readers`) and exports
exactly those layers as one dense layer, which has every attribute of the layer it replaced.

The form :mod:`maestro_lod.deploy` traces into ``.pt2``/ONNX (``keep_read=True``) keeps such a
layer factorised instead, when the outside code reads only its metadata: a factorised layer has
every attribute of its dense counterpart and its ``.weight`` answers dtype, shape and device without
computing anything, so the layer's own low-rank forward still runs. Only a layer whose dense weight
values the outside code computes with (its forward is then bypassed, as in Swin) is merged there.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ConfigTypeError
from .layers import Factorized, outermost_factorized
from .layers.hooks import carry_hooks

MERGE_MODES = ("auto", "always", "never")

# Parents whose forward reads these children's ``.weight`` directly (PyTorch's fused encoder fast
# path), so the exported children must stay single dense layers rather than a pair. Kept without
# example inputs too: the fast path reads them only in eval mode, under no_grad, for batch-first
# inputs without masks, which a given example need not meet. It reads them to decide whether to
# take the fused path, and a factorised layer's ``.weight`` (a tensor subclass) makes it take the
# ordinary one, so ``keep_read=True`` keeps these children factorised.
WEIGHT_READERS: dict[type, tuple[str, ...]] = {nn.TransformerEncoderLayer: ("linear1", "linear2")}

# Names every module answers alike whatever its form (methods and state of nn.Module): reading them
# from outside says nothing about the layer's own attributes.
_MODULE_NAMES = frozenset(dir(nn.Module)) | {"training"}


class MergedForReaders(UserWarning):
    """Layers were exported as single dense layers because code outside them reads their attributes;
    ``layers`` maps each layer's path to what was read."""

    def __init__(self, message: str, layers: dict[str, str] | None = None):
        super().__init__(message)
        self.layers = dict(layers or {})


class TrainingReadsUnchecked(UserWarning):
    """The training-mode forward of the detection failed, so reads made only in training mode are not known."""


@dataclass(frozen=True)
class Reads:
    """What code outside one factorised module read of it: public attribute ``names``, and whether
    it computed with the dense weight's ``values`` (then the module's own forward, and with it the
    low-rank computation, is bypassed: the outside code multiplies by the dense weight)."""

    names: frozenset[str]
    values: bool = False


class _Recorder:
    """Per module (by id): how deep its own forward or attribute lookup is, the names read from
    outside both, and whether its dense weight was computed from outside its forward."""

    def __init__(self) -> None:
        self.inside: dict[int, int] = {}
        self.reads: dict[int, set[str]] = {}
        self.values: set[int] = set()


def _recording_class(cls: type, recorder: _Recorder) -> type:
    """A subclass of ``cls`` that records, in ``recorder``, each public attribute read made while the
    instance's own ``forward`` is not running, and each computation of its dense weight
    (``dense_weight``, what a ``.weight`` read for values calls) made then. A lookup's own nested
    reads (a property reading ``self.up``) and those of an assignment (``Factorized.__setattr__``
    checking ``computed_weights``) are not recorded, so only what the outside code asked for is."""

    def __getattribute__(self, name: str):
        key = id(self)
        if name.startswith("_") or name in _MODULE_NAMES or recorder.inside.get(key, 0):
            return cls.__getattribute__(self, name)
        recorder.reads.setdefault(key, set()).add(name)
        recorder.inside[key] = recorder.inside.get(key, 0) + 1
        try:
            return cls.__getattribute__(self, name)
        finally:
            recorder.inside[key] -= 1

    def own(method):
        def run(self, *args, **kwargs):
            key = id(self)
            recorder.inside[key] = recorder.inside.get(key, 0) + 1
            try:
                return method(self, *args, **kwargs)
            finally:
                recorder.inside[key] -= 1
        return run

    members = {"__getattribute__": __getattribute__, "forward": own(cls.forward), "__setattr__": own(cls.__setattr__),
               "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    if hasattr(cls, "dense_weight"):
        def dense_weight(self):
            if not recorder.inside.get(id(self), 0):
                recorder.values.add(id(self))
            return own(cls.dense_weight)(self)
        members["dense_weight"] = dense_weight
    return type(cls.__name__, (cls,), members)


def _buffers(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor]]]:
    """Per module: its buffer table and a copy of every buffer's values, to undo a forward's updates."""
    return [(module, dict(module._buffers), {key: value.detach().clone() for key, value in module._buffers.items()
                                             if value is not None})
            for module in model.modules()]


@torch.no_grad()
def _restore_buffers(saved: list[tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor]]]) -> None:
    for module, table, values in saved:
        module._buffers.clear()
        module._buffers.update(table)
        for key, value in values.items():
            table[key].copy_(value)


def _cuda_devices(model: nn.Module) -> list[int]:
    tensors = [*model.parameters(), *model.buffers()]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _train_pass(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """One training-mode forward with gradients enabled; a failure is a warning (the eval-mode reads
    still count), as some models need more than the inputs (targets, a larger batch) to train."""
    model.train()
    try:
        with torch.enable_grad():
            model(*args, **kwargs)
    except Exception as exc:  # any failure of the user's own forward: say what is not covered
        text = str(exc).strip()
        reason = f": {text.splitlines()[0]}" if text else ""
        warnings.warn(f"the training-mode forward on the example inputs failed ({type(exc).__name__}{reason}); "
                      f"attributes read only in training mode are not detected", TrainingReadsUnchecked, stacklevel=3)


def attribute_readers(model: nn.Module, example_inputs: Any = None, example_kwargs: dict[str, Any] | None = None,
                      skip: tuple[type, ...] = ()) -> dict[str, Reads]:
    """``{path: Reads}`` of the outermost factorised modules of ``model`` whose public attributes
    (``weight``, ``bias``, ``in_features``, ``stride``, …) are read while their own forward is not
    running, during ``model(*example_inputs, **example_kwargs)`` run twice: in eval mode under
    ``torch.no_grad()`` (the deployment setting, where fused inference paths read weights) and in
    training mode with gradients (parents may read attributes only while training). A failing
    training-mode forward is a :class:`TrainingReadsUnchecked` warning.

    A tensor ``example_inputs`` is the single positional input; a tuple or list, the positional
    inputs. The modules' classes are swapped for recording subclasses during the calls; afterwards
    the classes, every module's training flag, every buffer (BatchNorm running statistics and
    ``num_batches_tracked`` included) and the random number generators' states are restored, so
    the model's state dict and later outputs are those it had. Other side effects of the model's
    own forward (hooks, attributes it sets) are not undone. Modules of a type in ``skip`` are not
    watched.
    """
    if isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        args = () if example_inputs is None else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    watched = [(name, module) for name, module in outermost_factorized(model) if not isinstance(module, skip)]
    recorder = _Recorder()
    classes: dict[type, type] = {}
    originals: dict[int, tuple[nn.Module, type]] = {}
    modes = [(module, module.training) for module in model.modules()]
    buffers = _buffers(model)
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        try:
            for _, module in watched:
                cls = type(module)
                if id(module) not in originals:
                    originals[id(module)] = (module, cls)
                    module.__class__ = classes.setdefault(cls, _recording_class(cls, recorder))
            model.eval()
            with torch.no_grad():
                model(*args, **kwargs)
            _train_pass(model, args, kwargs)
        finally:
            for module, cls in originals.values():
                module.__class__ = cls
            for module, training in modes:
                module.training = training
            _restore_buffers(buffers)
    return {name: Reads(frozenset(recorder.reads[id(module)]), id(module) in recorder.values)
            for name, module in watched if recorder.reads.get(id(module))}


def static_readers(model: nn.Module) -> set[str]:
    """Paths of the children that a parent in :data:`WEIGHT_READERS` reads (known without running
    the model): ``layers.0.linear1`` of an ``nn.TransformerEncoder``, …"""
    return {f"{parent}.{child}" if parent else child for parent, module in model.named_modules(remove_duplicate=False)
            for kind, children in WEIGHT_READERS.items() if isinstance(module, kind) for child in children}


def _merges(module: Factorized, merge: str, weight_read: bool) -> bool:
    """Whether ``module`` is exported as one dense layer."""
    if weight_read or merge == "always":
        return True
    return merge == "auto" and module.merge_saves_params()


def _standard(module: Factorized, merges: bool, read: frozenset[str]) -> tuple[nn.Module, list[str]]:
    """``module``'s plain form and, where the chosen form lacks attributes that outside code reads
    but the merged form has, the merged form instead with those names."""
    new = module.to_standard(merges)
    missing = sorted(name for name in read if not hasattr(new, name))
    if merges or not missing:
        return new, []
    merged = module.to_standard(True)
    served = [name for name in missing if hasattr(merged, name)]
    return (merged, served) if served else (new, [])


def _replacement(module: Factorized, merge: str, static: bool, reads: Reads | None,
                 keep_read: bool) -> tuple[nn.Module | None, str]:
    """What ``module`` is exported as (None: itself, kept factorised) and, when it is merged because
    of outside reads that another form would fail or lose its savings to, why (else "")."""
    if reads is not None and reads.values:
        return module.to_standard(True), f"{', '.join(sorted(reads.names))}; outside code multiplies by its weight"
    if keep_read and (static or reads is not None) and not _merges(module, merge, False):
        return None, ""
    names = reads.names if reads else frozenset()
    new, served = _standard(module, _merges(module, merge, static), names)
    return new, ", ".join(served)


def export(model: nn.Module, merge: str = "auto", keep: tuple[type, ...] = (), example_inputs: Any = None,
           example_kwargs: dict[str, Any] | None = None, keep_read: bool = False) -> nn.Module:
    """A deep copy of ``model`` made only of standard ``torch.nn`` modules, with the same outputs.

    Each factorised module is replaced by its :meth:`~maestro_lod.layers.Factorized.to_standard`
    form at its effective rank: a low-rank layer becomes two stacked Linear/Conv layers, or one dense
    layer when ``merge="always"`` or (``"auto"``) when that has no more parameters
    (``r·(m+n) ≥ m·n`` per group). Attention modules become dense ``nn.MultiheadAttention``: PyTorch
    reads their packed projection weights directly, so they cannot hold a pair of layers; for the same
    reason the feed-forward layers of ``nn.TransformerEncoderLayer`` are exported merged, and so is a
    convolution at rank 0 (PyTorch has no zero-channel convolution). Forward and full backward hooks
    move to the exported modules. A model without factorised modules is returned as a plain copy.

    With ``example_inputs`` and/or ``example_kwargs`` (what ``model(*example_inputs,
    **example_kwargs)`` takes; a tensor is one positional input), the copy is run in eval mode under
    no_grad and in training mode (:func:`attribute_readers`); every layer whose attributes
    (``weight``, ``in_features``, ``stride``, …) are read from outside its own forward and which
    would otherwise become a pair lacking them is exported merged, and a :class:`MergedForReaders`
    warning names those layers and attributes. Without examples no such reads are detected.

    ``keep_read=True`` gives the form :mod:`maestro_lod.deploy` traces: a layer read from outside
    (detected, or a feed-forward layer of ``nn.TransformerEncoderLayer``) stays factorised at its
    effective rank instead of merged, so its savings are kept, unless the outside code computes
    with its dense weight's values (then it is merged and named in the warning) or merging is no
    larger anyway. The result then holds maestro_lod modules.

    Factorised modules that are instances of a type in ``keep`` stay as they are (copied, at their
    effective rank): their own forward keeps the rank savings that the plain form would give up
    (``keep=(LowRankMultiheadAttention,)`` is the form :mod:`maestro_lod.deploy` hands to
    ``torch.export``, where no code reads the packed attention weights).
    """
    if merge not in MERGE_MODES:
        raise ConfigError(f"merge={merge!r} is not one of {', '.join(MERGE_MODES)}")
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise ConfigTypeError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    result = copy.deepcopy(model)
    static = static_readers(result)
    reads: dict[int, Reads] = {}
    if example_inputs is not None or example_kwargs is not None:
        for name, found in attribute_readers(result, example_inputs, example_kwargs, skip=keep).items():
            reads[id(result.get_submodule(name))] = found
    replacements: dict[int, nn.Module] = {}
    merged_for: dict[str, str] = {}
    for name, module in outermost_factorized(result):
        if isinstance(module, keep):
            continue
        if id(module) not in replacements:
            new, why = _replacement(module, merge, name in static, reads.get(id(module)), keep_read)
            if new is None:
                replacements[id(module)] = module
                continue
            if why:
                merged_for[name or "(the model)"] = why
            new.train(module.training)
            carry_hooks(module, new)
            replacements[id(module)] = new
        if name == "":
            result = replacements[id(module)]
            break
        parent, _, child = name.rpartition(".")
        setattr(result.get_submodule(parent), child, replacements[id(module)])
    if merged_for:
        listing = "; ".join(f"{name} ({why})" for name, why in merged_for.items())
        message = (f"exported {len(merged_for)} layer(s) as single dense layers instead of factor pairs, because code "
                   f"outside them reads these attributes, which a pair lacks (or multiplies by the dense weight, "
                   f"which bypasses the factors): {listing}")
        warnings.warn(MergedForReaders(message, merged_for), stacklevel=2)
    return result
