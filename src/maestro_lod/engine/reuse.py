"""Let the sampled pass reuse what the full pass already computed.

The sampled pass of a MAESTRO step differs from the full pass only from the first layer whose rank
was sampled below its current rank onward: every module that runs before it sees the same input with
the same weights and produces the same output. With the paper's single-layer sampler most draws land
in the later, wider layers, so most of the network's costliest work (the early convolutions and
pooling) would be repeated for nothing. :class:`PrefixReuse` records the outputs of the model's leaf
modules during the full pass and, during the sampled pass, makes the calls before the first sampled
layer return their recorded outputs instead of recomputing them. Gradients stay exact: the sampled
loss backpropagates through the recorded tensors into the full pass's graph of those modules.

It holds only when the model is deterministic (no dropout: the two passes would draw different
masks), does not modify module outputs in place, and uses each factorised layer through its forward
(not by reading its weight elsewhere). Randomness can hide anywhere in a forward (``F.dropout``
called in user code, ``nn.LSTM(dropout=…)``, stochastic depth), so the decision is made from two
checks that must both pass: :func:`prefix_reuse_supported` inspects the modules, and
:func:`runs_deterministically` runs the model twice on a real training batch and requires identical
outputs. A recorded output changed in place is detected and ends the reusable prefix there.
The recording hooks are attached only while a full pass records, so evaluation, BatchNorm
recalibration and MAC counting run the model untouched.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..layers import LowRankLayer

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def prefix_reuse_supported(model: nn.Module) -> str | None:
    """Why the full pass cannot be reused for ``model`` (None when it can): active dropout
    (dropout modules or attention dropout) or modules that work in place."""
    for name, module in model.named_modules():
        label = f"module {name or '<root>'} ({type(module).__name__})"
        if isinstance(module, _DROPOUT) and module.p > 0:
            return f"{label} uses dropout"
        if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
            return f"{label} uses attention dropout"
        if getattr(module, "inplace", False) is True:
            return f"{label} works in place"
    return None


@torch.no_grad()
def runs_deterministically(model: nn.Module, run: Callable[[], object]) -> bool:
    """Whether two training-mode calls of ``run()`` (a forward pass of ``model``) give bit-identical
    outputs. Leaves no trace: every random generator and every buffer (BatchNorm statistics) is
    restored afterwards, so the run's numbers are the same as without the check."""
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            first, second = tree_leaves(run()), tree_leaves(run())
    finally:
        model.train(was_training)
        for buffer, saved in buffers:
            buffer.copy_(saved)
    return len(first) == len(second) and all(
        not isinstance(a, torch.Tensor) or torch.equal(a, b) for a, b in zip(first, second))


class _Replay:
    """Stands in for a module's ``forward`` during the sampled pass: returns its recorded outputs in
    call order, then computes normally once they run out."""

    def __init__(self, forward, outputs: list[torch.Tensor]):
        self.forward = forward
        self.outputs = deque(outputs)

    def __call__(self, *args, **kwargs):
        if self.outputs:
            return self.outputs.popleft()
        return self.forward(*args, **kwargs)


class PrefixReuse:
    """Records leaf-module outputs of the full pass and replays the prefix in the sampled pass.

    Use ``with reuse.recording(): out_full = model(x)`` then
    ``with reuse.replaying(changed): out_s = model(x)`` where ``changed`` holds the factorised layers
    whose rank the draw lowered. :meth:`close` releases what is still recorded.
    """

    def __init__(self, model: nn.Module):
        self._calls: list[tuple[nn.Module, torch.Tensor, int]] = []
        self._modules = list({id(m): m for m in model.modules()
                              if isinstance(m, LowRankLayer) or not any(m.children())}.values())
        self.replayed = 0
        """Number of module calls replayed so far (for profiling and tests)."""

    def _record(self, module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            self._calls.append((module, output, output._version))

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the outputs of the modules called inside the block, in call order; the hooks
        that record exist only inside the block."""
        self._calls = []
        handles = [module.register_forward_hook(self._record) for module in self._modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def prefix(self, changed: set[LowRankLayer]) -> list[tuple[nn.Module, torch.Tensor]]:
        """The recorded calls the sampled pass can reuse: those before the first call of a changed
        layer, ending early at an output that was modified in place. Empty when a changed layer was
        never called through its forward (its position in the computation is unknown)."""
        called = {module for module, _, _ in self._calls}
        if any(layer not in called for layer in changed):
            return []
        prefix = []
        for module, output, version in self._calls:
            if module in changed or output._version != version:
                break
            prefix.append((module, output))
        return prefix

    @contextmanager
    def replaying(self, changed: set[LowRankLayer]) -> Iterator[int]:
        """Inside the block, the calls of the reusable prefix return their recorded outputs.
        Yields how many calls are replayed."""
        prefix = self.prefix(changed)
        outputs: dict[nn.Module, list[torch.Tensor]] = defaultdict(list)
        for module, output in prefix:
            outputs[module].append(output)
        own = {module: module.__dict__.get("forward") for module in outputs}
        try:
            for module, recorded in outputs.items():
                module.forward = _Replay(module.forward, recorded)
            yield len(prefix)
        finally:
            for module, previous in own.items():
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
            self.clear()
        self.replayed += len(prefix)

    def clear(self) -> None:
        """Forget the recorded outputs (they keep the full pass's activations alive)."""
        self._calls = []

    def close(self) -> None:
        """Release the recorded outputs (the hooks are already gone outside :meth:`recording`)."""
        self.clear()
