"""Seconds the greedy cut of a targeted run takes, by calibration size: the measurement behind
``budget.CUT_CALIBRATION``.

``python benchmarks/cut_time.py RUN_DIR`` loads the final checkpoint of a ``maestro-lod train``
run directory and times :func:`maestro_lod.deploy.greedy_front` from its ranks with the cut's step
(``budget.CUT_STEP``) on 512 and 2,048 training samples, on one thread. It prints one line per
size: samples, points of the front, seconds, and the first points' exported parameters as a share
of the dense model's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from maestro_lod.runs.loading import load_run
from maestro_lod.deploy import calibration_batches, greedy_front
from maestro_lod.errors import MaestroError
from maestro_lod.training.budget import CUT_STEP


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished maestro-lod train run directory of a factorised model")
    args = parser.parse_args(argv)
    run = load_run(Path(args.run_dir), device=None)
    config, trainer = run.config, run.trainer
    torch.set_num_threads(1)
    for size in (512, 2048):
        batches = calibration_batches(trainer.train_data, size, seed=config.seed)
        started = time.perf_counter()
        front = greedy_front(trainer.model, batches, "params", CUT_STEP)
        seconds = time.perf_counter() - started
        shares = [round(p.params / trainer.dense_params, 3) for p in front.points[:6]]
        print(f"{size} samples: {len(front.points)} points in {seconds:.1f} s; params/dense {shares}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MaestroError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
