"""A targeted run with another holding weight: the measurement behind ``budget.HOLD_LAMBDA``.

``python benchmarks/budget_hold.py --target params=0.5 --hold 1e-3 --seed 0 --out FILE.json`` trains
the default recipe (LeNet-5 / mnist5k, the ``lenet5-mnist5k`` preset) with ``--target`` exactly as
``maestro-lod train --target ... --reference none`` does, except that once the target is met λ_gl
becomes ``--hold`` instead of :data:`maestro_lod.training.budget.HOLD_LAMBDA`. It writes one JSON
object (the summary and every epoch's accuracy, ranks, λ and exported cost) to ``--out``, which
must not exist yet, and prints the final numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from maestro_lod.runs.loading import build_trainer, load_task
from maestro_lod.errors import UsageError
from maestro_lod.files import write_json_atomic
from maestro_lod.training import MaestroConfig, TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="COST=FRACTION, as maestro-lod train --target")
    parser.add_argument("--hold", type=float, required=True, help="λ_gl once the target is met")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file to write (must not exist)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"{out} exists; choose another --out")
    if not args.hold >= 0:
        raise UsageError(f"--hold {args.hold} must be >= 0")
    config = TrainConfig(method_options=MaestroConfig(target=args.target), seed=args.seed, reference="none")
    trainer = build_trainer(config, load_task(config), [])  # the model and trainer exactly as maestro-lod train builds them
    trainer.method.scheduler.hold = args.hold
    result = trainer.fit()
    epochs = [{"epoch": r.epoch, "val_accuracy": r.val_accuracy, "ranks": r.ranks,
               **{k: r.extra[k] for k in ("lambda_gl", "exported_cost", "target_met", "gap_closed") if k in r.extra}}
              for r in result.history]
    write_json_atomic(out, {"target": args.target, "hold": args.hold, "seed": args.seed, "torch": torch.__version__,
                            "machine": f"{platform.machine()} {platform.processor()}".strip(),
                            "date": time.strftime("%Y-%m-%d"), "summary": result.summary.to_dict(),
                            "epochs": epochs})
    summary = result.summary
    print(json.dumps({"final_accuracy": summary.final_accuracy, "achieved_cost": summary.extra["achieved_cost"],
                      "final_ranks": summary.final_ranks}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
