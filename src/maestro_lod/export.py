"""Export a factorised model to plain ``torch.nn`` modules for deployment.

A low-rank Linear/Conv is normally exported as a pair of layers (``nn.Sequential(first, second)``).
Code outside a layer that reads the layer's attributes (T5 compares ``wo.weight.dtype`` with its
activations, torchvision's Swin passes ``qkv.weight`` to a function, Whisper reads ``conv1.stride``)
would find a pair lacking them. Given example inputs, :func:`export` runs the model once while
recording such reads (:func:`attribute_readers`) and exports exactly those layers as one dense
layer, which has every attribute of the layer it replaced.
"""

from __future__ import annotations

import copy
import warnings
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
# inputs without masks, which a given example need not meet.
WEIGHT_READERS: dict[type, tuple[str, ...]] = {nn.TransformerEncoderLayer: ("linear1", "linear2")}

# Names every module answers alike whatever its form (methods and state of nn.Module): reading them
# from outside says nothing about the layer's own attributes.
_MODULE_NAMES = frozenset(dir(nn.Module)) | {"training"}


class MergedForReaders(UserWarning):
    """Layers were exported as single dense layers because code outside them reads their attributes."""


class _Recorder:
    """Per module (by id): how deep its own forward or attribute lookup is, and the names read
    from outside both."""

    def __init__(self) -> None:
        self.inside: dict[int, int] = {}
        self.reads: dict[int, set[str]] = {}


def _recording_class(cls: type, recorder: _Recorder) -> type:
    """A subclass of ``cls`` that records, in ``recorder``, each public attribute read made while the
    instance's own ``forward`` is not running. A lookup's own nested reads (a property reading
    ``self.up``) and those of an assignment (``Factorized.__setattr__`` checking
    ``computed_weights``) are not recorded, so only what the outside code asked for is."""

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

    return type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "forward": own(cls.forward),
                                       "__setattr__": own(cls.__setattr__),
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


@torch.no_grad()
def attribute_readers(model: nn.Module, example_inputs: Any = None, example_kwargs: dict[str, Any] | None = None,
                      skip: tuple[type, ...] = ()) -> dict[str, set[str]]:
    """``{path: attribute names}`` of the outermost factorised modules of ``model`` whose public
    attributes (``weight``, ``bias``, ``in_features``, ``stride``, …) are read while their own
    forward is not running, during one ``model(*example_inputs, **example_kwargs)`` in eval mode
    under ``torch.no_grad()`` (the deployment setting, where fused inference paths read weights).

    A tensor ``example_inputs`` is the single positional input; a tuple or list, the positional
    inputs. The modules' classes are swapped for recording subclasses during the call and restored
    after it; training flags are restored too. Modules of a type in ``skip`` are not watched. The
    call runs on ``model`` itself: pass a copy if its forward has side effects worth avoiding.
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
    try:
        for _, module in watched:
            cls = type(module)
            if id(module) not in originals:
                originals[id(module)] = (module, cls)
                module.__class__ = classes.setdefault(cls, _recording_class(cls, recorder))
        model.eval()
        model(*args, **kwargs)
    finally:
        for module, cls in originals.values():
            module.__class__ = cls
        for module, training in modes:
            module.training = training
    return {name: set(recorder.reads[id(module)]) for name, module in watched if recorder.reads.get(id(module))}


def _merges(module: Factorized, merge: str, weight_read: bool) -> bool:
    """Whether ``module`` is exported as one dense layer."""
    if weight_read or merge == "always":
        return True
    return merge == "auto" and module.merge_saves_params()


def _standard(module: Factorized, merges: bool, read: set[str]) -> tuple[nn.Module, list[str]]:
    """``module``'s plain form and, where the chosen form lacks attributes that outside code reads
    but the merged form has, the merged form instead with those names."""
    new = module.to_standard(merges)
    missing = sorted(name for name in read if not hasattr(new, name))
    if merges or not missing:
        return new, []
    merged = module.to_standard(True)
    served = [name for name in missing if hasattr(merged, name)]
    return (merged, served) if served else (new, [])


def export(model: nn.Module, merge: str = "auto", keep: tuple[type, ...] = (), example_inputs: Any = None,
           example_kwargs: dict[str, Any] | None = None) -> nn.Module:
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
    **example_kwargs)`` takes; a tensor is one positional input), the copy is run once in eval mode
    under no_grad (:func:`attribute_readers`); every layer whose attributes (``weight``,
    ``in_features``, ``stride``, …) are read from outside its own forward and which would otherwise
    become a pair lacking them is exported merged, and a :class:`MergedForReaders` warning names
    those layers and attributes. Without examples no such reads are detected.

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
    weight_read = {f"{parent}.{child}" if parent else child
                   for parent, module in result.named_modules(remove_duplicate=False)
                   for kind, children in WEIGHT_READERS.items() if isinstance(module, kind) for child in children}
    reads: dict[int, set[str]] = {}
    if example_inputs is not None or example_kwargs is not None:
        for name, names in attribute_readers(result, example_inputs, example_kwargs, skip=keep).items():
            reads.setdefault(id(result.get_submodule(name)), set()).update(names)
    replacements: dict[int, nn.Module] = {}
    merged_for: dict[str, list[str]] = {}
    for name, module in outermost_factorized(result):
        if isinstance(module, keep):
            continue
        if id(module) not in replacements:
            new, served = _standard(module, _merges(module, merge, name in weight_read), reads.get(id(module), set()))
            if served:
                merged_for[name or "(the model)"] = served
            new.train(module.training)
            carry_hooks(module, new)
            replacements[id(module)] = new
        if name == "":
            result = replacements[id(module)]
            break
        parent, _, child = name.rpartition(".")
        setattr(result.get_submodule(parent), child, replacements[id(module)])
    if merged_for:
        listing = "; ".join(f"{name} ({', '.join(attrs)})" for name, attrs in merged_for.items())
        warnings.warn(f"exported {len(merged_for)} layer(s) as single dense layers instead of factor pairs, because "
                      f"code outside them reads these attributes, which a pair lacks: {listing}",
                      MergedForReaders, stacklevel=2)
    return result
