"""Module hooks and parametrizations across a replacement (dense → factorised → plain torch).

A replacement computes the same function of the same inputs, so hooks that see a module's inputs,
outputs or the gradients with respect to them stay exact on the new module: forward pre-hooks,
forward hooks and full backward (pre-)hooks are carried over, and their handles keep working (the
new module shares the hook tables of the old one). Everything that depends on the dense parameters
themselves cannot be carried: parametrizations (``torch.nn.utils.parametrize``, e.g.
``parametrizations.weight_norm``), the legacy ``weight_norm``/``spectral_norm`` hooks, state-dict
hooks, and legacy ``register_backward_hook`` hooks (they see the last autograd node, which differs).
:func:`hook_refusal` names those; such layers stay dense.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

_CARRIED = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _own_refusal(module: nn.Module) -> str | None:
    """Why ``module``'s own parametrizations or hooks cannot follow it onto a replacement."""
    if parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())
        return (f"parametrized ({names}): factorising would drop the parametrization "
                f"(remove it first with torch.nn.utils.parametrize.remove_parametrizations)")
    legacy = [h for h in module._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]
    if legacy:
        return (f"reparametrized by a {type(legacy[0]).__name__} hook (torch.nn.utils.weight_norm/spectral_norm): "
                f"factorising would drop it (remove it first)")
    if module._backward_hooks and module._is_full_backward_hook is False:
        return "has a register_backward_hook hook, which cannot be carried exactly (use register_full_backward_hook)"
    if any(getattr(module, name) for name in _STATE_DICT_HOOKS):
        return "has state_dict hooks, which expect its dense parameters"
    return None


def hook_refusal(module: nn.Module) -> str | None:
    """Why ``module`` cannot be replaced without losing a hook or a parametrization (None: it can).
    Hooks of its sub-modules (e.g. an attention's ``out_proj``) cannot be carried either."""
    reason = _own_refusal(module)
    if reason:
        return reason
    for name, sub in module.named_modules():
        if not name:
            continue
        if any(getattr(sub, table) for table in _HOOKS) or _own_refusal(sub):
            return f"sub-module {name} has hooks or a parametrization, which a replacement cannot keep"
    return None


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward and full backward hooks of ``old`` (shared tables: handles keep working)."""
    for name in _CARRIED:
        setattr(new, name, getattr(old, name))
