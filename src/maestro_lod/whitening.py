"""Data-aware (whitened) SVD initialisation: the input statistics of the layers to factorise.

Why whitening: plain SVD truncation minimises the *weight* error ``‖W − W_r‖_F``, as if every
input direction mattered equally. What a truncation costs the network is the error of the layer's
*outputs* on the inputs it actually sees, ``‖(W − W_r) X‖_F``. With the inputs' second moment
``C = Σ x xᵀ = L Lᵀ`` that error is ``‖(W − W_r) L‖_F``, so truncating the SVD of ``W L`` (and
undoing ``L`` in the ``down`` factor) gives the rank-r weight with the smallest output error on
the data, in closed form: with ``W L = P S Qᵀ`` the error at rank r is ``√(Σ_{j>r} s_j²)``. At full
rank the factors still multiply to ``W`` exactly. The maths is
:func:`maestro_lod.functional.whitened_split` and :func:`~maestro_lod.functional.whitening_factor`;
this module collects ``C`` for every layer :func:`maestro_lod.factorize` replaces.

Collection runs the model once over the calibration batches, in eval mode and without gradients,
with forward hooks on the layers that sum ``x xᵀ`` in float64: nothing but one ``n × n`` matrix
per weight (``n`` = inputs per group) is kept, never the activations. What ``x`` is per layer:

* ``nn.Linear``, Hugging Face ``Conv1D`` and a factorised :class:`~maestro_lod.LowRankLinear`: the input, every leading dimension flattened;
* ``nn.Conv1d/2d/3d`` and a factorised :class:`~maestro_lod.LowRankConv`: the receptive-field patches the weight multiplies (the columns of
  ``unfold``, with the layer's stride, padding, padding mode and dilation), one matrix per group
  over that group's input channels × kernel positions;
* ``nn.MultiheadAttention``: ``q_proj`` sees the query, ``k_proj`` the key, ``v_proj`` the value,
  and ``out_proj`` the heads' concatenated output (obtained by running the attention once more
  with an identity output projection, with PyTorch's fused fast path turned off meanwhile).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, ConfigTypeError
from .functional import whitening_factor
from .layers import LowRankConv, LowRankLinear

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CHUNK_ELEMENTS = 1 << 24
"""Largest float64 block (elements) formed at once when summing ``x xᵀ`` (128 MiB)."""


class SecondMoment:
    """The running sum ``Σ x xᵀ`` (float64, ``groups × n × n``) of the rows seen at one weight's input.

    Rows whose contribution is NaN or infinite raise a ``ValueError`` naming ``name``.
    """

    def __init__(self, name: str, features: int, groups: int = 1):
        self.name = name
        self.features = features
        self.groups = groups
        self.matrix: torch.Tensor | None = None
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:
        """Add ``rows`` (N × groups·n, in group order) to the sum."""
        rows = rows.detach()
        if rows.shape[-1] != self.groups * self.features:
            raise ConfigError(f"calibration: the input of {self.name} has {rows.shape[-1]} features per position, "
                              f"the layer takes {self.groups * self.features}")
        if rows.device.type == "mps":  # no float64 there
            rows = rows.cpu()
        if self.matrix is None:
            self.matrix = torch.zeros(self.groups, self.features, self.features, dtype=torch.float64,
                                      device=rows.device)
        step = max(1, CHUNK_ELEMENTS // max(rows.shape[-1], 1))
        for start in range(0, rows.shape[0], step):
            block = rows[start:start + step].to(torch.float64)
            block = block.reshape(block.shape[0], self.groups, self.features).transpose(0, 1)
            update = block.mT @ block
            if not torch.isfinite(update).all():
                raise ConfigError(f"calibration: the input of {self.name} has NaN or infinite values")
            self.matrix += update
        self.rows += rows.shape[0]


def _conv_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The receptive fields ``conv`` multiplies its weight with, as rows (positions × C_in·k…),
    columns ordered like ``conv.weight[o].flatten()`` per group (channel-major, then kernel offsets)."""
    dims = len(conv.kernel_size)
    if x.dim() == dims + 1:
        x = x.unsqueeze(0)
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    k = math.prod(conv.kernel_size)
    channels = x.shape[1]
    # One one-hot kernel per offset and input channel: a depthwise convolution that copies each
    # patch entry to its own output channel (``unfold`` for any number of spatial dimensions).
    picks = torch.eye(k, dtype=torch.float64, device=x.device).reshape(k, 1, *conv.kernel_size)
    picks = picks.repeat(channels, *([1] * (dims + 1)))
    positions = max(1, math.prod(x.shape[2:]))
    step = max(1, CHUNK_ELEMENTS // max(positions * channels * k, 1))
    blocks = [x.new_zeros(0, channels * k, dtype=torch.float64)]
    for start in range(0, x.shape[0], step):
        patches = _CONV_FN[dims](x[start:start + step].to(torch.float64), picks, None, conv.stride, padding,
                                 conv.dilation, channels)
        blocks.append(patches.flatten(2).transpose(1, 2).reshape(-1, channels * k))
    return torch.cat(blocks)


def _first_argument(args: tuple, kwargs: dict, keyword: str) -> torch.Tensor:
    return args[0] if args else kwargs[keyword]


def _attention_arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("query", "key", "value")
    values = list(args[:3]) + [kwargs[name] for name in names[len(args[:3]):]]
    return values[0], values[1], values[2]


@contextmanager
def _identity_out_projection(mha: nn.MultiheadAttention):
    """``mha`` with ``out_proj`` temporarily the identity (no bias): its output is then the heads'
    concatenated output, the input of ``out_proj``."""
    proj = mha.out_proj
    weight, bias = proj.weight, proj.bias
    proj.weight = nn.Parameter(torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device),
                               requires_grad=False)
    if bias is not None:
        proj.bias = nn.Parameter(torch.zeros_like(bias), requires_grad=False)
    try:
        yield
    finally:
        proj.weight = weight
        if bias is not None:
            proj.bias = bias


def _register(name: str, module: nn.Module, moments: dict[str, SecondMoment]) -> list:
    """Hooks that feed ``module``'s inputs into ``moments`` (by component suffix); their handles."""
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        for suffix, n in (("q_proj", e), ("k_proj", module.kdim), ("v_proj", module.vdim), ("out_proj", e)):
            moments[suffix] = SecondMoment(f"{name}.{suffix}", n)
        busy = []

        def attention_hook(mha, args, kwargs, output):
            if busy:
                return
            query, key, value = _attention_arguments(args, kwargs)
            for suffix, x in (("q_proj", query), ("k_proj", key), ("v_proj", value)):
                moments[suffix].add(x.reshape(-1, x.shape[-1]))
            busy.append(True)
            try:
                with _identity_out_projection(mha):
                    context = nn.MultiheadAttention.forward(mha, *args, **kwargs)[0]
            finally:
                busy.clear()
            if context.is_nested:
                context = context.to_padded_tensor(0.0)
            moments["out_proj"].add(context.reshape(-1, context.shape[-1]))

        return [module.register_forward_hook(attention_hook, with_kwargs=True)]

    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, LowRankConv)):
        groups = module.groups
        moment = moments[""] = SecondMoment(name, module.in_channels // groups * math.prod(module.kernel_size), groups)

        def hook(conv, args, kwargs):
            moment.add(_conv_patches(conv, _first_argument(args, kwargs, "input")))
    elif isinstance(module, (nn.Linear, LowRankLinear)):
        moment = moments[""] = SecondMoment(name, module.in_features)

        def hook(linear, args, kwargs):
            x = _first_argument(args, kwargs, "input")
            moment.add(x.reshape(-1, x.shape[-1]))
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nx"):  # Hugging Face GPT-2
        moment = moments[""] = SecondMoment(name, module.nx)

        def hook(conv1d, args, kwargs):
            x = _first_argument(args, kwargs, "x")
            moment.add(x.reshape(-1, x.shape[-1]))
    else:
        raise ConfigTypeError(f"{name}: no input statistics for {type(module).__name__} "
                              f"(known: Linear, Conv1d/2d/3d, MultiheadAttention, transformers Conv1D and the "
                              f"factorised Linear and Conv layers)")
    return [module.register_forward_pre_hook(hook, with_kwargs=True)]


def model_inputs(batch: object) -> object:
    """What the model is called with for one calibration batch (see :func:`input_second_moments`)."""
    if isinstance(batch, (torch.Tensor, Mapping)):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ConfigError("calibration: a batch is an empty tuple; expected (inputs, targets) or a tensor")
        return batch[0]
    raise ConfigTypeError(f"calibration: a batch must be a tensor, a dict of keyword inputs or an "
                          f"(inputs, targets) tuple, got {type(batch).__name__}")


def _call(model: nn.Module, inputs: object) -> None:
    if isinstance(inputs, Mapping):
        model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        model(*inputs)
    else:
        model(inputs)


def check_calibration(calibration: object) -> None:
    """Refuse what cannot be a collection of calibration batches (before the model runs)."""
    if calibration is None:
        raise ConfigError("calibration is None")
    if isinstance(calibration, (torch.Tensor, str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise ConfigTypeError(f"calibration must be an iterable of batches (e.g. a list or a DataLoader), got "
                              f"{type(calibration).__name__}; wrap a single tensor batch in a list")


@torch.no_grad()
def input_second_moments(model: nn.Module, layers: Mapping[str, nn.Module],
                         calibration: Iterable) -> dict[str, dict[str, SecondMoment]]:
    """``Σ x xᵀ`` at the input of every weight of ``layers`` (by name, then component suffix:
    ``""``, or ``"q_proj"`` … for attention) over one pass of ``model`` on ``calibration``.

    ``calibration`` is an iterable (list, DataLoader, generator) of batches, each on the model's
    device, in the forms the rest of the package uses:

    * a tensor ``x``: the model is called as ``model(x)``;
    * a tuple or list, as a DataLoader or :func:`maestro_lod.deploy.search.calibration_batches`
      yields: its first element is the model input and the rest (targets) is ignored; an input that
      is itself a tuple or list is unpacked, ``model(*inputs)`` (so a two-input model takes
      ``((a, b), targets)`` batches);
    * a dict: keyword inputs, ``model(**batch)`` (Hugging Face batches).

    The model runs in eval mode without gradients; every module's mode, PyTorch's attention fast
    path setting, and the hooks are restored even when the model raises (e.g. on inputs of the
    wrong shape). An empty ``calibration``, NaN or infinite inputs at a layer raise ``ValueError``.
    """
    check_calibration(calibration)
    moments: dict[str, dict[str, SecondMoment]] = {name: {} for name in layers}
    modes = [(module, module.training) for module in model.modules()]
    fast_path = torch.backends.mha.get_fastpath_enabled()
    handles = []
    try:
        for name, module in layers.items():
            handles.extend(_register(name, module, moments[name]))
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        batches = 0
        for batch in calibration:
            _call(model, model_inputs(batch))
            batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
        torch.backends.mha.set_fastpath_enabled(fast_path)
    if batches == 0:
        raise ConfigError("calibration is empty: init='whitened' needs at least one batch")
    return moments


def whitening_factors(model: nn.Module, layers: Mapping[str, nn.Module], calibration: Iterable,
                      damping: float) -> dict[str, dict[str, torch.Tensor] | None]:
    """For every layer of ``layers`` (by name), the whitening factor ``L`` of each component's input
    (``n × n``, or ``groups × n × n`` for a grouped convolution), ready for
    :func:`~maestro_lod.functional.whitened_split`; None, with a warning, for a layer that the
    calibration pass never reached (it keeps plain SVD)."""
    factors: dict[str, dict[str, torch.Tensor] | None] = {}
    for name, components in input_second_moments(model, layers, calibration).items():
        unseen = [moment.name for moment in components.values() if moment.rows == 0]
        if unseen:
            warnings.warn(f"{', '.join(unseen)}: no input during calibration; initialised by plain SVD", stacklevel=3)
            factors[name] = None
            continue
        factors[name] = {}
        for suffix, moment in components.items():
            factor = whitening_factor(moment.matrix, damping)
            factors[name][suffix] = factor[0] if moment.groups == 1 else factor
    return factors
