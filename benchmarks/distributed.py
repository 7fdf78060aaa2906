"""Data-parallel training speed on this machine: samples per second for 1 and 2 processes (CPU, gloo).

Each configuration is one ``torchrun --standalone --nproc_per_node N -m maestro_lod train`` run of
MAESTRO LeNet-5 on mnist5k with the same per-process batch, so N processes see N× the samples per
step. Reported per configuration: samples per second over the optimisation steps (the epochs'
``train_time``), wall time of the whole run, and the share of rank 0's step time spent in
collectives (gradient and metric all-reduces). Repeats alternate the configurations so load from
other processes on a shared machine hits both alike; medians are reported.

    python benchmarks/distributed.py                       # 2 epochs, 3 repeats, table + JSON
    python benchmarks/distributed.py --epochs 1 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from maestro_lod.files import write_json_atomic
from maestro_lod.tables import format_table

TRAIN_ITEMS = 4000  # the mnist5k training split


def run(processes: int, epochs: int, batch: int, out: Path) -> dict:
    """One torchrun run; its summary figures and wall time."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    command = [torchrun, "--standalone", "--nproc_per_node", str(processes), "-m", "maestro_lod", "train",
               "--epochs", str(epochs), "--batch-size", str(batch), "--threads", "1", "--quiet",
               "--reference", "none", "--out", str(out)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    steps_time = sum(json.loads(line)["train_time"] for line in (out / "metrics.jsonl").read_text().splitlines())
    return {"processes": processes, "wall_s": wall, "steps_s": steps_time,
            "samples_per_s": epochs * TRAIN_ITEMS / steps_time,
            "communication_share": summary["communication_time"] / steps_time,
            "final_accuracy": summary["final_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "distributed.json")
    args = parser.parse_args()
    results: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for processes in ((1, 2) if repeat % 2 == 0 else (2, 1)):
                out = Path(scratch) / f"n{processes}-r{repeat}"
                results[processes].append(run(processes, args.epochs, args.batch_size, out))
                print(f"repeat {repeat} processes {processes}: {results[processes][-1]['samples_per_s']:.0f} samples/s",
                      flush=True)
    median = {n: {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "processes"}
              for n, runs in results.items()}
    rows = [("processes", "samples/s (median)", "speed-up", "communication share", "wall s", "final accuracy")]
    for n in (1, 2):
        m = median[n]
        rows.append((n, f"{m['samples_per_s']:.0f}", f"{m['samples_per_s'] / median[1]['samples_per_s']:.2f}x",
                     f"{100 * m['communication_share']:.1f}%", f"{m['wall_s']:.1f}", f"{100 * m['final_accuracy']:.1f}%"))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"\nMAESTRO LeNet-5 on mnist5k, {args.epochs} epochs, batch {args.batch_size} per process; {machine}; "
          f"{time.strftime('%Y-%m-%d')}")
    print(format_table(rows))
    write_json_atomic(args.out, {"machine": machine, "date": time.strftime("%Y-%m-%d"), "epochs": args.epochs,
                                 "batch_per_process": args.batch_size, "runs": results, "median": median})
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
