"""The compress pipeline on a run directory of ``maestro-lod train``: load the run, draw its
calibration, validation and check batches, and hand them to
:func:`maestro_lod.deploy.compress.compress_model`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..deploy.artifacts import FORMATS
from ..deploy.compress import CompressResult, ProgressFactory, check_inputs, check_outputs, compress_model, no_progress
from ..engine.search import CALIBRATION_SIZE, calibration_batches
from ..errors import UsageError
from ..layers import low_rank_layers
from ..models import build_model
from .loading import load_run


def compress_run(run_dir: str | Path, out: str | Path | None = None, *, targets: Sequence[tuple[str, float]] = (),
                 cost: str = "macs", step: float = 0.25, calibration_size: int = CALIBRATION_SIZE,
                 formats: Sequence[str] = FORMATS, latency_batch: int = 32, family: bool = True, force: bool = False,
                 say: Callable[..., None] = lambda *a, **k: None,
                 progress: ProgressFactory = no_progress, data_root: str | Path | None = None,
                 download: bool = False) -> CompressResult:
    """The front of the run in ``run_dir`` and deployable models for ``targets``, written under
    ``out`` (default: ``run_dir``), as ``maestro-lod compress`` does.

    The run's model is loaded on the CPU with its trained ranks; ``calibration_size`` samples of its
    training data (drawn with the run's seed) score the removals, its whole validation set scores
    the points. ``dense_accuracy`` in ``front.json`` is the run's dense reference. The other options
    are those of :func:`~maestro_lod.deploy.compress.compress_model`; existing outputs are refused
    (unless ``force``) before the run is loaded. The data is read from ``data_root`` (default: the
    run's) and downloaded only with ``download=True``, whatever the run's config.json says."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    check_outputs(out, targets, force, family)
    run = load_run(run_dir, data_root=data_root, download=download)
    config, data = run.config, run.data
    model = run.model.eval()
    if not any(True for _ in low_rank_layers(model)):
        raise UsageError(f"the model of {str(run_dir)!r} has no low-rank layers (a dense run): nothing to compress")
    calibration = calibration_batches(data.train, calibration_size, seed=config.seed)
    validation = calibration_batches(data.val, len(data.val), config.eval_batch_size, seed=0)
    dense_accuracy = (run.summary.get("dense_reference") or {}).get("accuracy")
    return compress_model(model, calibration, validation, out, checks=check_inputs(data.val), targets=targets,
                          cost=cost, step=step, formats=formats, latency_batch=latency_batch, family=family,
                          force=force, architecture=lambda: build_model(config.model, data, **config.model_options),
                          kind=data.kind, dense_accuracy=dense_accuracy,
                          metadata={"run": str(run_dir), "model": config.model, "data": config.data},
                          say=say, progress=progress)
