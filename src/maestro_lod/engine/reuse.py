"""Let the sampled pass reuse what the full pass already computed.

The sampled pass of a MAESTRO step differs from the full pass only from the first layer whose rank
was sampled below its current rank onward: every module that runs before it sees the same input with
the same weights and produces the same output. With the paper's single-layer sampler most draws land
in the later, wider layers, so most of the network's costliest work (the early convolutions and
pooling) would be repeated for nothing. :class:`PrefixReuse` records the outputs of the model's
modules during the full pass and, during the sampled pass, makes the outermost calls that finished
before the first sampled layer started return their recorded outputs instead of recomputing them. Gradients stay exact: the sampled
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

from collections import defaultdict
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


class _Call:
    """One recorded module call: its module, the call it ran inside (an index into the recording,
    None at the top), when it started and ended (ticks shared by all calls), and its output with
    the output's version counter at the end of the call (None when the output is not a tensor)."""

    __slots__ = ("module", "parent", "start", "end", "output", "version")

    def __init__(self, module: nn.Module, parent: int | None, start: int):
        self.module, self.parent, self.start = module, parent, start
        self.end: int | None = None
        self.output: torch.Tensor | None = None
        self.version: int | None = None


class _Replay:
    """Stands in for a module's ``forward`` during the sampled pass: the module's ``n``-th call
    returns ``outputs[n]`` where one was recorded for it, and computes normally otherwise."""

    def __init__(self, forward, outputs: list[torch.Tensor | None]):
        self.forward = forward
        self.outputs = outputs
        self.calls = 0

    def __call__(self, *args, **kwargs):
        index, self.calls = self.calls, self.calls + 1
        if index < len(self.outputs) and self.outputs[index] is not None:
            return self.outputs[index]
        return self.forward(*args, **kwargs)


class PrefixReuse:
    """Records module outputs of the full pass and replays the prefix in the sampled pass.

    Use ``with reuse.recording(): out_full = model(x)`` then
    ``with reuse.replaying(changed): out_s = model(x)`` where ``changed`` holds the factorised layers
    whose rank the draw lowered. :meth:`close` releases what is still recorded.

    Every module is recorded, not only the leaves, and the replay uses the largest modules that
    finished before the first changed layer started: a whole Transformer block or residual stage
    then returns its output at once, and the work its forward does outside any submodule
    (attention products, activations, residual additions) is not repeated either.
    """

    def __init__(self, model: nn.Module):
        self._calls: list[_Call] = []
        self._open: list[int] = []
        self._ticks = 0
        self._modules = list({id(m): m for m in model.modules()}.values())
        self._inside: dict[nn.Module, frozenset[nn.Module]] = {}
        self.replayed = 0
        """Number of module calls replayed so far (for profiling and tests)."""

    def _tick(self) -> int:
        self._ticks += 1
        return self._ticks

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self._calls.append(_Call(module, self._open[-1] if self._open else None, self._tick()))
        self._open.append(len(self._calls) - 1)

    def _leave(self, module: nn.Module, args: tuple, output: object) -> None:
        call = self._calls[self._open.pop()]
        call.end = self._tick()
        if isinstance(output, torch.Tensor):
            call.output, call.version = output, output._version

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the calls of the modules inside the block and their outputs, in call order; the
        hooks that record exist only inside the block."""
        self._calls, self._open = [], []
        handles = []
        for module in self._modules:
            handles.append(module.register_forward_pre_hook(self._enter))
            handles.append(module.register_forward_hook(self._leave))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._open = []

    def _contains(self, module: nn.Module, changed: set[LowRankLayer]) -> bool:
        if module not in self._inside:
            self._inside[module] = frozenset(module.modules())
        return not changed.isdisjoint(self._inside[module])

    def _replay_plan(self, changed: set[LowRankLayer]) -> tuple[list[_Call], dict[nn.Module, list]]:
        """The recorded calls the sampled pass replays, and per module that still runs the outputs of
        its calls in order (None: computed). A call is replayed when it ended before the first call
        of a changed layer started and before the first output changed in place, returned a tensor,
        and holds no changed layer, and no call around it is replayed. Nothing is replayed when a
        changed layer was never called through its forward (its position is unknown)."""
        called = {call.module for call in self._calls if call.module in changed}
        if len(changed) > len(called):
            return [], {}
        limit = min((call.start for call in self._calls if call.module in changed), default=self._ticks + 1)
        for call in sorted((c for c in self._calls if c.end is not None), key=lambda c: c.end):
            if call.end >= limit:
                break
            if call.output is not None and call.output._version != call.version:
                limit = call.end
                break
        chosen: list[_Call] = []
        outputs: dict[nn.Module, list] = defaultdict(list)
        covered = [False] * len(self._calls)  # inside a replayed call: not run at all
        for index, call in enumerate(self._calls):
            if call.parent is not None and covered[call.parent]:
                covered[index] = True
                continue
            replay = (call.end is not None and call.end < limit and call.output is not None
                      and not self._contains(call.module, changed))
            covered[index] = replay
            outputs[call.module].append(call.output if replay else None)
            if replay:
                chosen.append(call)
        return chosen, {module: calls for module, calls in outputs.items() if any(o is not None for o in calls)}

    def prefix(self, changed: set[LowRankLayer]) -> list[tuple[nn.Module, torch.Tensor]]:
        """The recorded calls the sampled pass reuses, outermost first in call order: those that
        end before the first call of a changed layer. Empty when a changed layer was never called
        through its forward."""
        return [(call.module, call.output) for call in self._replay_plan(changed)[0]]

    @contextmanager
    def replaying(self, changed: set[LowRankLayer], keep: bool = False) -> Iterator[int]:
        """Inside the block, the calls of the reusable prefix return their recorded outputs.
        Yields how many calls are replayed. The recording is released afterwards, or kept with
        ``keep`` (to replay it again for another set of changed layers)."""
        chosen, outputs = self._replay_plan(changed)
        own = {module: module.__dict__.get("forward") for module in outputs}
        try:
            for module, recorded in outputs.items():
                module.forward = _Replay(module.forward, recorded)
            yield len(chosen)
        finally:
            for module, previous in own.items():
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
            if not keep:
                self.clear()
        self.replayed += len(chosen)

    def clear(self) -> None:
        """Forget the recorded outputs (they keep the full pass's activations alive)."""
        self._calls = []

    def close(self) -> None:
        """Release the recorded outputs (the hooks are already gone outside :meth:`recording`)."""
        self.clear()
