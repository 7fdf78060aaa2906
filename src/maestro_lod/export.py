"""Export a factorised model to plain ``torch.nn`` modules for deployment.

A low-rank Linear/Conv is normally exported as a pair of layers (``nn.Sequential(first, second)``).
Code outside a layer that reads the layer's attributes (T5 compares ``wo.weight.dtype`` with its
activations, torchvision's Swin passes ``qkv.weight`` to a function, Whisper reads ``conv1.stride``)
would find a pair lacking them. Such layers are exported as one dense layer, which has every
attribute of the layer it replaced; :func:`export` finds them in one of two ways.

* Given example inputs, it runs the model once in eval mode and once in training mode while
  recording such reads (:func:`attribute_readers`) and merges exactly the layers read.
* Without them (what ``export(model)`` does), it reads the model's code instead
  (:func:`source_readers`): the methods of the class of every module enclosing a factorised layer,
  and of its bases, are parsed, and a layer is merged when that code reads an attribute of it that
  a pair lacks, on any code path (``self.qkv.weight``, ``self.wo.weight.dtype``,
  ``self.conv1.stride``, also through ``self.blocks[i]``, ``getattr`` with a constant name, and a
  local name bound to a sub-module, as in ``for block in self.blocks``). Where that code cannot be
  read (a class built at run time, code typed into ``python -c``, a ``forward`` replaced on the
  instance by a plain function), every factorised layer inside is merged. The result costs at most
  the savings of the layers read, and its forward does not fail on an attribute a pair lacks. Code
  that reaches a layer from elsewhere (a function handed the layer, another object holding it, code
  outside the model) is not seen; examples detect what their forward runs, whatever reads it.

The pair stays a plain ``nn.Sequential``, not a subclass that would also answer ``weight``,
``stride`` and the rest: ``export`` promises modules of ``torch.nn`` only, whose state dicts, pickles
and ``torch.export``/ONNX programs load without maestro_lod, and a computed ``weight`` would make code
that multiplies by it (Swin) recompute the product at every call while the pair's forward never
runs. Recording the reads when the model is factorised would need inputs too, which the factorising
call does not have. ``merge="never"`` keeps every layer without examples a pair, as asked, and warns
(:class:`PairsLackReadAttributes`) about the ones the model's code reads.

The form :mod:`maestro_lod.deploy` traces into ``.pt2``/ONNX (``keep_read=True``) keeps such a
layer factorised instead, when the outside code reads only its metadata: a factorised layer has
every attribute of its dense counterpart and its ``.weight`` answers dtype, shape and device without
computing anything, so the layer's own low-rank forward still runs. Only a layer whose dense weight
values the outside code computes with (its forward is then bypassed, as in Swin) is merged there.
"""

from __future__ import annotations

import ast
import copy
import inspect
import linecache
import os
import sys
import textwrap
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checks import check_module, shown
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


# ------------------------------------------------------------------ reads found in the model's code
_SOURCE_READS: "weakref.WeakKeyDictionary[type, dict[tuple[str, ...], frozenset[str]] | None]" = \
    weakref.WeakKeyDictionary()
"""Per class: what the methods of the class and its bases read of ``self``'s sub-modules (None: some
class's source could not be read)."""


def _self_paths(node: ast.AST, names: dict[str, set[tuple[str, ...]]]) -> set[tuple[str, ...]]:
    """The sub-module paths an expression may name from the instance: ``self.attn.qkv`` →
    ``("attn", "qkv")``, ``self.layers[0]`` → ``("layers", "0")``, ``getattr(self, "conv1")`` →
    ``("conv1",)``, and through a local name (``names``: ``self`` → ``{()}``, ``block`` bound by
    ``for block in self.blocks`` → ``{("blocks", "*")}``); empty for anything else."""
    if isinstance(node, ast.Name):
        return names.get(node.id, set())
    if isinstance(node, ast.Attribute):
        return {(*base, node.attr) for base in _self_paths(node.value, names)}
    if isinstance(node, ast.Subscript):
        index = node.slice.value if isinstance(node.slice, ast.Constant) else None
        part = str(index) if isinstance(index, (int, str)) and not isinstance(index, bool) else "*"
        return {(*base, part) for base in _self_paths(node.value, names)}
    attribute = _getattr_name(node)
    if attribute is not None:
        return {(*base, attribute) for base in _self_paths(node.args[0], names)}
    return set()


def _getattr_name(node: ast.AST) -> str | None:
    """``"x"`` for a call ``getattr(obj, "x")`` or ``getattr(obj, "x", default)``, else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" and \
            len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
        return node.args[1].value
    return None


def _local_names(function: ast.AST, self_name: str) -> dict[str, set[tuple[str, ...]]]:
    """The local names of ``function`` bound to sub-modules of the instance: ``layer = self.layers[0]``,
    ``for block in self.blocks`` (any element: ``"*"``), ``with``-free simple forms only; a name bound
    several times stands for every path it was bound to."""
    names: dict[str, set[tuple[str, ...]]] = {self_name: {()}}
    for _ in range(2):  # a second pass resolves a name bound from another local name
        for node in ast.walk(function):
            if isinstance(node, ast.Assign):
                targets, paths = node.targets, _self_paths(node.value, names)
            elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
                targets, paths = [node.target], _self_paths(node.value, names)
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                targets, paths = [node.target], {(*p, "*") for p in _self_paths(node.iter, names)}
            else:
                continue
            for target in targets:
                if isinstance(target, ast.Name) and target.id != self_name and paths:
                    names.setdefault(target.id, set()).update(paths)
    return names


def _function_reads(function: ast.AST, reads: dict[tuple[str, ...], set[str]]) -> None:
    """Add to ``reads`` every attribute that ``function`` (a method; its first argument is the
    instance) reads of a sub-module of the instance, nested functions and lambdas included."""
    arguments = function.args.posonlyargs + function.args.args
    if not arguments:
        return
    names = _local_names(function, arguments[0].arg)
    for node in ast.walk(function):
        if isinstance(node, ast.Attribute):
            paths, name = _self_paths(node.value, names), node.attr
        elif _getattr_name(node) is not None:
            paths, name = _self_paths(node.args[0], names), _getattr_name(node)
        else:
            continue
        for path in paths:
            if path:
                reads.setdefault(path, set()).add(name)


_FILE_CLASSES: dict[tuple[str, float], dict[str, ast.ClassDef | None]] = {}
"""Per source file (and its modification time): its class definitions by qualified name (None for
a name defined twice), so that each file is parsed once however many of its classes are read."""


def _index_classes(body: list[ast.stmt], prefix: str, table: dict[str, ast.ClassDef | None]) -> None:
    for node in body:
        if isinstance(node, ast.ClassDef):
            name = prefix + node.name
            table[name] = None if name in table else node
            _index_classes(node.body, name + ".", table)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            _index_classes(node.body, f"{prefix}{node.name}.<locals>.", table)
        else:  # classes defined under if/try/with blocks
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    _index_classes([n for n in inner if isinstance(n, ast.AST)], prefix, table)


def _class_definition(klass: type) -> ast.ClassDef | None:
    """The parsed definition of ``klass`` (None when its source cannot be found)."""
    try:
        filename = inspect.getsourcefile(klass)
    except TypeError:
        return None
    if filename:
        try:
            key = (filename, os.stat(filename).st_mtime)
        except OSError:
            key = (filename, 0.0)
        table = _FILE_CLASSES.get(key)
        if table is None:
            module = sys.modules.get(klass.__module__)
            lines = linecache.getlines(filename, None if module is None else vars(module))
            table = {}
            try:
                _index_classes(ast.parse("".join(lines)).body, "", table)
            except (SyntaxError, ValueError):
                pass
            _FILE_CLASSES[key] = table
        if table.get(klass.__qualname__) is not None:
            return table[klass.__qualname__]
    try:  # a class defined twice in its file, or found only by inspect's own search
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return None
    return next((node for node in tree.body if isinstance(node, ast.ClassDef)), None)


def _function_definition(function: Any) -> ast.AST | None:
    """The parsed definition of a Python function (None when its source cannot be read)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    return next((node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))), None)


def _defines_code(klass: type) -> bool:
    """Whether ``klass`` defines any Python function (a class of C methods, like ``object``, reads
    no sub-module by name)."""
    return any(inspect.isfunction(getattr(value, "__func__", getattr(value, "fget", value)))
               for value in vars(klass).values())


def _attached_functions(klass: type) -> list[tuple[str, Any]]:
    """Methods set on ``klass`` after its definition (``Cls.forward = function``): they are not in
    the class body, so their own source is read."""
    found = []
    for name, value in vars(klass).items():
        if name != "__init__" and inspect.isfunction(value) and value.__qualname__ != f"{klass.__qualname__}.{name}":
            found.append((name, inspect.unwrap(value)))
    return found


def _class_reads(cls: type) -> dict[tuple[str, ...], frozenset[str]] | None:
    """``{sub-module path: names}`` that the methods of ``cls`` and of its bases read, ``__init__``
    left out (it ran before the model was factorised; the exported copy never runs it again); None
    when the source of one of those classes, or of a ``forward`` set on it later, cannot be read."""
    if cls in _SOURCE_READS:
        return _SOURCE_READS[cls]
    reads: dict[tuple[str, ...], set[str]] | None = {}
    for klass in cls.__mro__:
        if klass in (object, nn.Module) or not _defines_code(klass):
            continue
        definition = _class_definition(klass)
        if definition is None:
            reads = None
            break
        for item in definition.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name != "__init__" and not any(
                    isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod") for d in item.decorator_list):
                _function_reads(item, reads)
        for name, function in _attached_functions(klass):
            attached = _function_definition(function)
            if attached is not None:
                _function_reads(attached, reads)
            elif name == "forward":
                reads = None
                break
        if reads is None:
            break
    result = None if reads is None else {path: frozenset(names) for path, names in reads.items()}
    try:
        _SOURCE_READS[cls] = result
    except TypeError:  # a class that cannot be weakly referenced is analysed again next time
        pass
    return result


def _module_reads(module: nn.Module) -> dict[tuple[str, ...], frozenset[str]] | None:
    """What the code of ``module`` reads of its sub-modules (see :func:`_class_reads`), a
    ``forward`` set on the instance included; a ``torch.fx.GraphModule`` is read from its
    generated code."""
    if isinstance(module, torch.fx.GraphModule):
        reads: dict[tuple[str, ...], set[str]] = {}
        try:
            tree = ast.parse(textwrap.dedent(module.code))
        except SyntaxError:
            return None
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                _function_reads(node, reads)
        return {path: frozenset(names) for path, names in reads.items()}
    found = _class_reads(type(module))
    forward = vars(module).get("forward")
    if found is None or forward is None:
        return found
    target = inspect.unwrap(forward)  # through functools.wraps wrappers, as hooks libraries install them
    function = getattr(target, "__func__", None)
    if function is None or getattr(target, "__self__", None) is not module:
        return None  # a plain function or closure: it reaches the module through names it closes over
    if function is getattr(type(module), "forward", None):
        return found
    definition = _function_definition(function)
    if definition is None:
        return None
    extra: dict[tuple[str, ...], set[str]] = {}
    _function_reads(definition, extra)
    merged = {path: set(names) for path, names in found.items()}
    for path, names in extra.items():
        merged.setdefault(path, set()).update(names)
    return {path: frozenset(names) for path, names in merged.items()}


def _reads_of(reads: dict[tuple[str, ...], frozenset[str]], path: tuple[str, ...]) -> set[str]:
    """The names read of the sub-module at ``path``, a ``"*"`` in a read path matching any part."""
    found = set(reads.get(path, ()))
    for read_path, names in reads.items():
        if "*" in read_path and len(read_path) == len(path) and all(r in ("*", p) for r, p in zip(read_path, path)):
            found |= names
    return found


def source_readers(model: nn.Module, skip: tuple[type, ...] = ()) -> tuple[dict[str, Reads], dict[str, str]]:
    """Which outermost factorised modules of ``model`` the code of the modules around them reads,
    found without running the model: ``({path: Reads(names)}, {path: why})``.

    The methods (``__init__`` aside) of every enclosing module's class and of its bases are parsed,
    and every read of ``self.<path to the module>.<name>`` (also through ``self.blocks[0]`` or
    ``getattr(self, "conv1")``) counts, on any code path: ``F.linear(x, self.qkv.weight)``,
    ``self.wo.weight.dtype``, ``self.conv1.stride``. Whether a read is of values is not known, so
    ``Reads.values`` is False. When the source of an enclosing class cannot be read (a class built
    at run time, code typed into ``python -c``), every factorised module inside it is reported as
    read (``"*"``), as its code could read any of them. Modules of a type in ``skip`` are left out.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    found: dict[str, Reads] = {}
    why: dict[str, str] = {}
    for path, module in outermost_factorized(model):
        if isinstance(module, skip) or path == "":
            continue
        parts = path.split(".")
        names: set[str] = set()
        readers: list[str] = []
        for depth in range(len(parts)):
            ancestor = modules[".".join(parts[:depth])]
            reads = _module_reads(ancestor)
            if reads is None:
                names.add("*")
                readers.append(f"{type(ancestor).__name__} (source unavailable)")
                continue
            read = _reads_of(reads, tuple(parts[depth:]))
            if read:
                names.update(read)
                readers.append(type(ancestor).__name__)
        if names:
            found[path] = Reads(frozenset(names))
            why[path] = ", ".join(dict.fromkeys(readers))
    return found, why


def _merges(module: Factorized, merge: str, weight_read: bool) -> bool:
    """Whether ``module`` is exported as one dense layer."""
    if weight_read or merge == "always":
        return True
    return merge == "auto" and module.merge_saves_params()


def _standard(module: Factorized, merges: bool, read: frozenset[str]) -> tuple[nn.Module, list[str]]:
    """``module``'s plain form and, where the chosen form lacks attributes that outside code reads
    but the merged form has, the merged form instead with those names (``"*"``: any attribute may
    be read, so a form that is not the merged one is replaced by it)."""
    new = module.to_standard(merges)
    if "*" in read and not merges:
        merged = module.to_standard(True)
        if type(merged) is not type(new):
            return merged, ["any attribute (the code around it could not be read)"]
    missing = sorted(name for name in read if name != "*" and not hasattr(new, name))
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


def _check_arguments(model: Any, merge: Any, keep: Any, example_inputs: Any, example_kwargs: Any,
                     keep_read: Any) -> tuple[type, ...]:
    """Refuse, naming it, an argument of :func:`export` of the wrong type or value; ``keep`` as a tuple."""
    check_module(model)
    if not isinstance(merge, str):
        raise ConfigTypeError(f"merge={shown(merge)} is not one of {', '.join(MERGE_MODES)} (got {type(merge).__name__})")
    if merge not in MERGE_MODES:
        raise ConfigError(f"merge={merge!r} is not one of {', '.join(MERGE_MODES)}")
    classes = (keep,) if isinstance(keep, type) else keep
    if not isinstance(classes, (tuple, list)) or not all(
            isinstance(c, type) and issubclass(c, (nn.Module, Factorized)) for c in classes):
        raise ConfigTypeError(f"keep={shown(keep)} must be a module class or a tuple of module classes")
    if not isinstance(keep_read, bool):
        raise ConfigTypeError(f"keep_read={shown(keep_read)} must be True or False, got {type(keep_read).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, (torch.Tensor, tuple, list)):
        hint = " (keyword inputs go in example_kwargs)" if isinstance(example_inputs, dict) else ""
        raise ConfigTypeError(f"example_inputs={shown(example_inputs)} must be a tensor or a tuple/list of the "
                              f"model's positional inputs, got {type(example_inputs).__name__}{hint}")
    if example_kwargs is not None:
        if not isinstance(example_kwargs, dict):
            raise ConfigTypeError(f"example_kwargs={shown(example_kwargs)} must be a dict of keyword inputs, "
                                  f"got {type(example_kwargs).__name__}")
        for key in example_kwargs:
            if not isinstance(key, str):
                raise ConfigTypeError(f"example_kwargs key {shown(key)} must be a string (a keyword of the model's "
                                      f"forward)")
    return tuple(classes)


class PairsLackReadAttributes(UserWarning):
    """``merge="never"`` exported layers as factor pairs although the code around them reads
    attributes a pair lacks; ``layers`` maps each layer's path to what is read. The exported
    model's forward fails where that code runs."""

    def __init__(self, message: str, layers: dict[str, str] | None = None):
        super().__init__(message)
        self.layers = dict(layers or {})


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

    Layers whose attributes the model's own code reads are exported merged, as a pair lacks them
    (see the module documentation); a :class:`MergedForReaders` warning names them and what is read:

    * with ``example_inputs`` and/or ``example_kwargs`` (what ``model(*example_inputs,
      **example_kwargs)`` takes; a tensor is one positional input), the copy is run in eval mode
      under no_grad and in training mode (:func:`attribute_readers`), and exactly the layers read
      on those runs are merged;
    * without them (``merge="auto"``), the code of the modules around each layer is read instead
      (:func:`source_readers`): every layer that code reads on any path is merged, and every layer
      inside a module whose code cannot be read. ``merge="never"`` without examples keeps every
      layer a pair, as asked, and warns (:class:`PairsLackReadAttributes`) about those whose
      attributes that code reads.

    ``keep_read=True`` gives the form :mod:`maestro_lod.deploy` traces: a layer read from outside
    (detected, or a feed-forward layer of ``nn.TransformerEncoderLayer``) stays factorised at its
    effective rank instead of merged, so its savings are kept, unless the outside code computes
    with its dense weight's values (then it is merged and named in the warning) or merging is no
    larger anyway. The result then holds maestro_lod modules.

    Factorised modules that are instances of a type in ``keep`` (a class or a tuple of classes)
    stay as they are (copied, at their effective rank): their own forward keeps the rank savings
    that the plain form would give up (``keep=(LowRankMultiheadAttention,)`` is the form
    :mod:`maestro_lod.deploy` hands to ``torch.export``, where no code reads the packed attention
    weights).

    Arguments of the wrong type or value raise :class:`~maestro_lod.errors.ConfigTypeError` or
    :class:`~maestro_lod.errors.ConfigError` naming them; inputs the model itself rejects raise
    whatever its forward raises.
    """
    keep = _check_arguments(model, merge, keep, example_inputs, example_kwargs, keep_read)
    result = copy.deepcopy(model)
    static = static_readers(result)
    reads: dict[int, Reads] = {}
    readers: dict[int, str] = {}  # who reads a layer, for layers found in the model's code
    unmerged: dict[int, Reads] = {}  # layers read by the model's code that merge="never" keeps as pairs
    if example_inputs is not None or example_kwargs is not None:
        for name, found in attribute_readers(result, example_inputs, example_kwargs, skip=keep).items():
            reads[id(result.get_submodule(name))] = found
    elif merge != "always":
        found, why = source_readers(result, skip=keep)
        for name, read in found.items():
            key = id(result.get_submodule(name))
            if merge == "never" and not keep_read:
                unmerged[key] = read
            else:
                reads[key] = Reads(reads[key].names | read.names) if key in reads else read
                readers[key] = why[name]
    replacements: dict[int, nn.Module] = {}
    merged_for: dict[str, str] = {}
    lacking: dict[str, str] = {}
    for name, module in outermost_factorized(result):
        if isinstance(module, keep):
            continue
        if id(module) not in replacements:
            new, why = _replacement(module, merge, name in static, reads.get(id(module)), keep_read)
            if new is None:
                replacements[id(module)] = module
                continue
            if why:
                by = readers.get(id(module))
                merged_for[name or "(the model)"] = f"{why}; read by the code of {by}" if by else why
            if id(module) in unmerged:
                names = sorted(n for n in unmerged[id(module)].names if n == "*" or not hasattr(new, n))
                if names:
                    lacking[name] = ", ".join(names)
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
    if lacking:
        listing = "; ".join(f"{name} ({names})" for name, names in lacking.items())
        message = (f"merge='never' exported {len(lacking)} layer(s) as factor pairs although the model's code reads "
                   f"attributes a pair lacks, so its forward will fail there: {listing}; use merge='auto' or pass "
                   f"example_inputs")
        warnings.warn(PairsLackReadAttributes(message, lacking), stacklevel=2)
    return result
