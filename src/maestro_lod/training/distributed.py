"""Data-parallel training over several processes (``torchrun``), without DistributedDataParallel.

Launched under ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` in the environment), the
:class:`~maestro_lod.training.Trainer` joins a process group (gloo on CPU, NCCL on CUDA) and every
process trains a replica of the model on its share of each global batch: a :class:`DataParallel`.
Outside ``torchrun`` the single process, ``Distributed()``, does nothing at all. The trainer calls
the same methods of either (the device, the loaders, broadcasts, reductions, the check after
shrinking) and never asks which it has.

Why no ``DistributedDataParallel``: a MAESTRO step runs the model twice (the full pass, then a
sampled sub-model with lower active ranks) before one backward, and progressive shrinking replaces
the shapes of the parameters between epochs. DDP's reducer expects one forward per backward over a
fixed set of parameter shapes (it would have to be rebuilt after every shrink, and its hooks fire
while the sampled pass's graph is still being built). Averaging the gradients by hand after the
backward (:meth:`DataParallel.reduce_step`: the gradients, flattened into one buffer with the
step's numbers, one ``all_reduce``) gives exactly the gradient of the global batch, before unscaling,
the group lasso, clipping and the optimiser step; shrinking then needs nothing (no wrapper to
rebuild), and the optimiser state stays identical on every process, so a checkpoint is not
specific to a rank (rank 0 writes it; any number of processes can load it).

What keeps the replicas identical: parameters and buffers are broadcast from rank 0 at the start
(and after factorising); every process draws the same sub-models (the sampler's generator is
seeded from ``config.seed`` on every rank); averaged gradients make the same update everywhere, so
shrinking decides the same everywhere (checked after every epoch: :meth:`DataParallel.after_shrink`);
BatchNorm recalibration runs on the same unsharded batches on every rank; evaluation is sharded
and its sums are reduced. BatchNorm in training mode normalises with the statistics of the
process's own share of the batch (as DDP without SyncBatchNorm does); running statistics are
broadcast from rank 0 at the end of the steps of each epoch.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError, ConfigTypeError, MaestroError
from ..layers import rank_pattern

TIMEOUT_ENV = "MAESTRO_LOD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
"""Seconds a collective waits for a missing peer before the run ends with a :class:`DistributedError`."""


class DistributedError(MaestroError, RuntimeError):
    """A process of a distributed run failed or stopped answering (or the replicas diverged)."""


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process of a multi-process launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    """This process's rank from the environment (0 outside ``torchrun``), without joining a group."""
    return int(os.environ.get("RANK", "0"))


def choose_backend(device_type: str, cuda_available: bool) -> str:
    """The process-group backend for a run on ``device_type``: ``"nccl"`` when the run uses CUDA and
    CUDA is present (NCCL only moves GPU tensors), ``"gloo"`` otherwise (CPU tensors)."""
    return "nccl" if device_type == "cuda" and cuda_available else "gloo"


def timeout_from_env() -> float:
    """``MAESTRO_LOD_DIST_TIMEOUT`` (seconds) or :data:`DEFAULT_TIMEOUT_S`."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r} must be a positive, finite number of seconds")
    return value


def check_timeout(timeout_s: Any) -> float:
    """``timeout_s`` as a float of seconds: a positive, finite number (bool, NaN, infinity, 0 and
    negatives are refused with a one-line ConfigError / ConfigTypeError)."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise ConfigTypeError(f"timeout_s={timeout_s!r} must be a number of seconds")
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ConfigError(f"timeout_s={timeout_s!r} must be a positive, finite number of seconds")
    return float(timeout_s)


class Distributed:
    """The processes of a run, as the :class:`~maestro_lod.training.Trainer` sees them: ``world_size``,
    ``rank``, ``local_rank``, :attr:`is_main`, and what the loop asks of them (the device, the
    loaders, broadcasts, the gradient and metric reductions, the check after shrinking).

    ``Distributed()`` is the single process: every method is a real no-op (the model, the loaders
    and every number stay exactly what a plain PyTorch loop has). :class:`DataParallel` is the
    ``torchrun`` form; :meth:`from_env` returns the one the environment describes.
    :attr:`comm_time` accumulates the seconds spent in gradient all-reduces (for benchmarks; 0 here)."""

    world_size = 1
    rank = 0
    local_rank = 0

    def __init__(self) -> None:
        self.timeout_s = DEFAULT_TIMEOUT_S
        self.comm_time = 0.0

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str = "cpu", timeout_s: float | None = None) -> "Distributed":
        """Join (or reuse) the default process group when launched by ``torchrun``: a
        :class:`DataParallel`; the single process otherwise (also in a group of one process).
        Backend: :func:`choose_backend`. ``timeout_s`` (default: :func:`timeout_from_env`) must be a
        positive, finite number of seconds, checked with or without ``torchrun``."""
        if timeout_s is not None:
            timeout_s = check_timeout(timeout_s)
        if not launched_by_torchrun() and not (dist.is_available() and dist.is_initialized()):
            return Distributed()
        timeout_s = timeout_from_env() if timeout_s is None else timeout_s
        if not dist.is_available():
            raise DistributedError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = choose_backend(device_type, torch.cuda.is_available())
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            except Exception as exc:  # rendezvous failures come as several exception types
                raise DistributedError(f"cannot join the process group ({backend}): {_one_line(exc)}") from None
        if dist.get_world_size() == 1:
            return Distributed()
        return DataParallel(dist.get_world_size(), dist.get_rank(), local_rank, timeout_s)

    # ------------------------------------------------------------------- what the trainer asks
    def process_device(self, device: torch.device) -> torch.device:
        """The device this process trains on, given the run's ``device``."""
        return device

    def train_loader(self, data: Dataset, batch_size: int, generator: torch.Generator, *, num_workers: int = 0,
                     pin_memory: bool = False) -> DataLoader:
        """Shuffled training batches of ``batch_size`` drawn from ``generator`` (checkpointed with the run)."""
        return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator,
                          num_workers=num_workers, pin_memory=pin_memory)

    def eval_shard(self, data: Dataset) -> Dataset:
        """The evaluation items this process scores (all of them)."""
        return data

    def global_items(self, loader: DataLoader, step: int, items: int) -> int:
        """The items of global batch ``step`` (0-based) of ``loader``, of which this process has ``items``."""
        return items

    def reduce_step(self, parameters: Iterable[nn.Parameter], numbers: torch.Tensor, loader: DataLoader, step: int,
                    means: int) -> torch.Tensor:
        """After the backward of step ``step`` (0-based) of ``loader``: the gradients of the global
        batch, and the step's ``numbers`` over it (the first ``means`` are means, the rest sums).
        One process: both are already that; ``numbers`` is returned as it is."""
        return numbers

    def reduce_sum(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tensor`` summed over the processes (collectives on ``device``), on ``tensor``'s device.
        One process: ``tensor`` itself."""
        return tensor

    def after_shrink(self, model: nn.Module, epoch: int) -> None:
        """After the method's end-of-epoch work changed (or kept) the shapes of ``model``. Nothing
        holds the parameters, so nothing is rebuilt; one process has nothing to check either."""

    # ---------------------------------------------------------------------------- collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place; returns it."""
        return tensor

    def average_gradients(self, parameters: Sequence[nn.Parameter], weight: float = 1.0,
                          numbers: torch.Tensor | None = None) -> torch.Tensor | None:
        """Replace every ``.grad`` by the weighted sum over the processes (``weight``: this process's
        share of the global batch, 1/world_size for equal shares), and sum ``numbers`` alongside
        them; one ``all_reduce`` of one flattened buffer. Returns the summed ``numbers``."""
        return numbers

    def broadcast_module(self, module: nn.Module) -> None:
        """Give every process rank 0's parameters and buffers."""

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm running statistics)."""

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every process, by rank (picklable values)."""
        return [value]

    def check_same(self, value: Any, what: str) -> None:
        """Raise a :class:`DistributedError` unless every process holds the same ``value``."""
        values = self.gather(value)
        if any(v != values[0] for v in values[1:]):
            raise DistributedError(f"the processes disagree on {what}: "
                                   + "; ".join(f"rank {r}: {v}" for r, v in enumerate(values)))

    def close(self) -> None:
        """Leave the process group (when one was joined)."""


class DataParallel(Distributed):
    """``world_size`` processes of a ``torchrun`` launch on the default process group (joined by
    :meth:`Distributed.from_env`); this one is ``rank``, on GPU ``local_rank`` of its node. Each
    trains a replica on its share of every global batch (:class:`GlobalBatchSampler`), evaluates
    its :class:`Shard` of the validation data, and the gradients and sums are all-reduced."""

    def __init__(self, world_size: int, rank: int, local_rank: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__()
        self.world_size, self.rank, self.local_rank = world_size, rank, local_rank
        self.timeout_s = check_timeout(timeout_s)

    def process_device(self, device: torch.device) -> torch.device:
        """The GPU ``local_rank`` for a CUDA run; ``device`` otherwise."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def train_loader(self, data: Dataset, batch_size: int, generator: torch.Generator, *, num_workers: int = 0,
                     pin_memory: bool = False) -> DataLoader:
        """This process's share of each global batch of ``batch_size × world_size``
        (:class:`GlobalBatchSampler`, drawing from ``generator`` as a single process does)."""
        batches = GlobalBatchSampler(len(data), batch_size, self.world_size, self.rank, generator)
        return DataLoader(data, batch_sampler=batches, generator=generator, num_workers=num_workers,
                          pin_memory=pin_memory)

    def eval_shard(self, data: Dataset) -> Dataset:
        """Items ``rank, rank + world_size, ...`` (:class:`Shard`): every item is scored once."""
        return Shard(data, self.world_size, self.rank)

    def global_items(self, loader: DataLoader, step: int, items: int) -> int:
        return round(items / loader.batch_sampler.share(step))

    def reduce_step(self, parameters: Iterable[nn.Parameter], numbers: torch.Tensor, loader: DataLoader, step: int,
                    means: int) -> torch.Tensor:
        """Average the gradients over the processes, weighted by their shares of the global batch
        (before unscaling, the penalty, clipping and the update), and reduce the step's numbers
        alike (means weighted by the share, sums summed), in the same ``all_reduce``."""
        share = loader.batch_sampler.share(step)
        weights = torch.tensor([share] * means + [1.0] * (len(numbers) - means), device=numbers.device)
        return self.average_gradients(list(parameters), share, numbers * weights)

    def reduce_sum(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.all_reduce_sum(tensor.to(device)).to(tensor.device)

    def after_shrink(self, model: nn.Module, epoch: int) -> None:
        """Identical parameters must shrink identically: a :class:`DistributedError` unless every
        process holds the same ranks."""
        self.check_same(rank_pattern(model), f"the ranks after epoch {epoch}")

    # ---------------------------------------------------------------------------- collectives
    def _collective(self, what: str, run):
        try:
            return run()
        except DistributedError:
            raise
        except Exception as exc:  # DistBackendError, RuntimeError from gloo/NCCL on a dead or late peer
            raise DistributedError(f"rank {self.rank}: {what} failed (a peer process died or did not answer "
                                   f"within {self.timeout_s:g}s): {_one_line(exc)}") from None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self._collective("all_reduce", lambda: dist.all_reduce(tensor))
        return tensor

    def average_gradients(self, parameters: Sequence[nn.Parameter], weight: float = 1.0,
                          numbers: torch.Tensor | None = None) -> torch.Tensor | None:
        started = time.perf_counter()
        grads = [p.grad for p in parameters if p.grad is not None]
        tensors = [g.mul_(weight) for g in grads]
        if numbers is not None:
            tensors.append(numbers.to(grads[0] if grads else numbers))
        flat = _flatten_dense_tensors(tensors)
        self._collective("gradient all_reduce", lambda: dist.all_reduce(flat))
        for tensor, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            tensor.copy_(reduced)
        self.comm_time += time.perf_counter() - started
        return None if numbers is None else tensors[-1].to(numbers)

    def broadcast_module(self, module: nn.Module) -> None:
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                self._collective("broadcast", lambda: dist.broadcast(tensor, 0))

    def broadcast_buffers(self, module: nn.Module) -> None:
        for tensor in module.buffers():
            self._collective("broadcast", lambda: dist.broadcast(tensor, 0))

    def gather(self, value: Any) -> list[Any]:
        values: list[Any] = [None] * self.world_size
        self._collective("all_gather_object", lambda: dist.all_gather_object(values, value))
        return values

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


class GlobalBatchSampler(Sampler[list[int]]):
    """The batches of one process: every epoch, one permutation of the dataset drawn from
    ``generator`` (as a shuffling DataLoader draws it), cut into global batches of
    ``batch_size × world_size`` items; process ``rank`` takes the ``rank``-th share of each (the last,
    shorter global batch is split as evenly as possible). So the union of the processes' batches at
    each step is the batch a single process with ``batch_size × world_size`` would see, in the same
    order, and the generator (checkpointed with the run) makes the order resume exactly.
    :meth:`share` is this process's fraction of each global batch (for weighting gradients)."""

    def __init__(self, size: int, batch_size: int, world_size: int, rank: int, generator: torch.Generator):
        if size < world_size:
            raise DistributedError(f"{size} training items cannot be shared by {world_size} processes")
        self.size, self.batch_size, self.world_size, self.rank = size, batch_size, world_size, rank
        self.generator = generator
        self.global_batch = batch_size * world_size

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.global_batch)
        return full + (rest >= self.world_size)  # a last batch too small to give every process an item is dropped

    def _bounds(self, count: int) -> tuple[int, int]:
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def share(self, step: int) -> float:
        """This process's fraction of the items of global batch ``step`` (0-based)."""
        count = min(self.global_batch, self.size - step * self.global_batch)
        start, stop = self._bounds(count)
        return (stop - start) / count

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=self.generator).tolist()
        for step in range(len(self)):
            batch = order[step * self.global_batch:(step + 1) * self.global_batch]
            start, stop = self._bounds(len(batch))
            yield batch[start:stop]
        # a shuffling DataLoader's RandomSampler draws a second (empty-sliced) permutation at the
        # end of each epoch; drawing it too keeps the generator in step with a single-process run
        torch.randperm(self.size, generator=self.generator)


class Shard(torch.utils.data.Dataset):
    """Items ``rank, rank + world_size, ...`` of ``dataset`` (evaluation: every item counted once)."""

    def __init__(self, dataset, world_size: int, rank: int):
        self.dataset, self.indices = dataset, range(rank, len(dataset), world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]
