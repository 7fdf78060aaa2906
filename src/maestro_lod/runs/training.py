"""Training into a run directory: what ``maestro-lod train`` (and every ``bench`` cell) does once
its directory is claimed (:mod:`maestro_lod.runs.loading`).

:func:`train_claimed` loads the data, measures the dense reference, builds the trainer (restored
from the checkpoint when continuing), sets the earlier run's files aside only then, and trains with a
:class:`~maestro_lod.runs.directory.RunDirectory` keeping the directory up to date; the files set
aside are deleted at the new run's first checkpoint, and put back if it fails or is interrupted
before.
:func:`train_directory` claims a directory and does the same in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrainingDiverged, UsageError
from ..training.distributed import Distributed
from ..training.train_config import TrainConfig
from .directory import RunDirectory
from .loading import Claim, build_trainer, claim_output, claim_resume, load_task
from .progress import Progress
from .report import dense_reference


@dataclass
class TrainedRun:
    """A finished run: its directory, its summary (as in ``summary.json``) and the dense reference
    it is compared with (None when there is none)."""

    directory: Path
    summary: dict[str, Any]
    reference: dict[str, Any] | None


def record_launch(claim: Claim, distributed: Distributed, resumed: bool, say: Callable[..., None]) -> None:
    """Put this launch's number of processes into the run's config. A resumed run may continue on
    another number (said, since the global batch changes with it); a new run whose options ask for
    another number than torchrun started is refused, as ``world_size`` only records the launch."""
    config, processes = claim.config, distributed.world_size
    if config.world_size == processes:
        return
    if resumed:
        say(f"continuing a run of {config.world_size} process(es) on {processes}: the global batch is now "
            f"{config.batch_size * processes} (it was {config.batch_size * config.world_size})", flush=True)
    elif config.world_size != 1:
        raise UsageError(f"world_size={config.world_size} in the options, but {processes} process(es) were "
                         f"started; world_size records the launch, so leave it out or start "
                         f"{config.world_size} processes with torchrun")
    claim.config = config.replace(world_size=processes)


def train_claimed(claim: Claim, files: RunDirectory, distributed: Distributed, *, resumed: bool, quiet: bool,
                  say: Callable[..., None] = print) -> TrainedRun:
    """Train the run of ``claim`` (its directory held by this process) into ``files``: load the data,
    the dense reference, the trainer (continuing from ``claim.checkpoint`` when there is one), then
    set the earlier run's files aside and train. ``quiet``: one line per epoch, no progress bars;
    ``say`` prints the other lines. A diverged loss raises a one-line :class:`UsageError` saying which
    checkpoint is kept; on any failure or interruption before the first checkpoint the files set
    aside are put back (:meth:`RunDirectory.restore_replaced`)."""
    record_launch(claim, distributed, resumed, say)
    config, out = claim.config, claim.directory
    data = load_task(config, claim.access)
    reference = dense_reference(config, data, quiet)
    files.summary_extra["dense_reference"] = reference
    trainer = build_trainer(config, data, [files, Progress(bars=not quiet)], distributed, checkpoint=claim.checkpoint)
    if claim.checkpoint is not None:
        files.saved_epoch = trainer.epoch
    try:
        if distributed.is_main:
            claim.prepare_files(files)
        say(f"training {config.model} on {config.data} ({config.method}, {config.epochs} epochs) into {out}",
            flush=True)
        result = trainer.fit()
    except TrainingDiverged as exc:
        if files.restore_replaced():
            kept = f"no epoch finished; the run that was in {out} is restored"
        elif files.saved_epoch:
            kept = f"the last good checkpoint (epoch {files.saved_epoch}) is kept in {out}"
        else:
            kept = f"no epoch finished, so {out} holds no checkpoint"
        raise UsageError(f"{exc}; {kept}") from None
    except BaseException:
        files.restore_replaced()
        raise
    if files.kept is not None:
        say(f"the fronts compressed from the earlier checkpoint are kept in {files.kept}", flush=True)
    return TrainedRun(out, result.summary, reference)


def train_directory(directory: Path, config: TrainConfig | None, *, force: bool = False, quiet: bool = True,
                    say: Callable[..., None] = print) -> TrainedRun:
    """Train ``config`` into ``directory`` in this process, as ``maestro-lod train --out DIRECTORY``
    does (``force``: replace a run there, as ``--force``); ``config=None`` continues the interrupted
    run there with its saved config, as ``--resume DIRECTORY`` does (reading its data where it was,
    never downloading)."""
    resume = config is None
    claim = claim_resume(directory, {}) if resume else claim_output(config, directory, force)
    with claim.lock:
        return train_claimed(claim, RunDirectory(claim.directory), Distributed(), resumed=resume, quiet=quiet, say=say)
