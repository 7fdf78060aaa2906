"""The ``.weight`` of a factorised layer: a tensor that multiplies its factors only when read for values.

Model code often reads a child's ``weight`` for its metadata alone (T5 compares
``wo.weight.dtype`` with its activations in every block; ``nn.TransformerEncoder`` collects the
weights of its first layer to decide on a fused path). Returning ``up @ down`` there would make each
such read a dense matrix product. :class:`ComputedWeight` is a tensor subclass without storage that
answers dtype, shape, device and the other metadata queries directly and computes the product (with
autograd) the moment an operation needs its values. Writing to it would silently change nothing, so
every in-place operation, ``.data``/``.requires_grad`` assignment and ``out=`` use raises instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils import _pytree as pytree

from ..errors import ConfigError

# Tensor attributes and methods answered from the metadata alone (no values needed).
_METADATA = frozenset({
    "dtype", "device", "shape", "size", "dim", "ndim", "ndimension", "numel", "nelement", "requires_grad",
    "is_leaf", "layout", "is_cuda", "is_cpu", "is_meta", "is_mps", "is_xpu", "is_sparse", "is_quantized",
    "is_mkldnn", "is_nested", "is_floating_point", "is_complex", "is_signed", "element_size", "itemsize",
    "get_device", "grad", "grad_fn", "__hash__", "__len__",
})
# Views that stand for the same storage: writes through them must fail like writes to the weight.
_DETACHING = frozenset({"data", "detach"})
_AUGMENTED = frozenset(f"__i{op}__" for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow",
                                                 "lshift", "rshift", "and", "or", "xor"))


def _name(func: Callable) -> tuple[str, str]:
    """``(kind, name)`` of a torch-function call: ``("get", "dtype")``, ``("set", "data")`` or
    ``("call", "zero_")``."""
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__", "__delete__") and hasattr(func, "__self__"):
        return name.strip("_"), getattr(func.__self__, "__name__", "")
    return "call", name


def _writes(kind: str, name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the call writes into its first argument (in place, ``out=``, an attribute set)."""
    if kind in ("set", "delete"):
        return True
    in_place = name.endswith("_") and not name.startswith("_") or name == "__setitem__" or name in _AUGMENTED
    first_is_weight = bool(args) and isinstance(args[0], ComputedWeight)
    out = kwargs.get("out")
    return in_place and first_is_weight or isinstance(out, ComputedWeight) or (
        isinstance(out, (tuple, list)) and any(isinstance(o, ComputedWeight) for o in out))


class ComputedWeight(torch.Tensor):
    """A storage-less tensor standing for ``compute()`` (e.g. ``up @ down``) of a known shape and dtype.

    ``owner`` names the weight in error messages (e.g. ``"LowRankLinear.weight"``).
    """

    @staticmethod
    def __new__(cls, compute: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device, requires_grad: bool, owner: str) -> "ComputedWeight":
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=requires_grad)
        self._compute = compute
        self._owner = owner
        return self

    def materialize(self) -> torch.Tensor:
        """The values: a plain tensor computed now, connected to the factors by autograd."""
        return self._compute()

    def _detached(self) -> "ComputedWeight":
        """The same weight without gradient, still refusing writes (what ``.data``/``.detach()`` give)."""
        compute = self._compute

        def values() -> torch.Tensor:
            with torch.no_grad():
                return compute().detach()

        return ComputedWeight(values, tuple(self.shape), self.dtype, self.device, False, self._owner)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind, name = _name(func)
        if _writes(kind, name, args, kwargs):
            owner = next(a._owner for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, ComputedWeight))
            raise ConfigError(f"{owner} is computed from the factors up @ down, so {name!r} cannot write to it; "
                              f"change the factors (up, down) instead")
        if name in _METADATA and kind in ("get", "call"):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if name in _DETACHING and len(args) == 1 and isinstance(args[0], ComputedWeight):
            return args[0]._detached()
        args, kwargs = pytree.tree_map_only(ComputedWeight, ComputedWeight.materialize, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} reached a ComputedWeight below the torch-function layer; "
                           f"call .materialize() to get its values")
