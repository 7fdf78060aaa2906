"""How long ``maestro-lod compress`` takes, end to end, as a user runs it.

Trains a run (default: the character LM, ``--preset char-lm-pydoc --epochs 1``), then times, as
separate processes with ``OMP_NUM_THREADS=1`` (``--threads``; 0 leaves torch's default, every core):

* ``first``: ``maestro-lod compress RUN --target params=0.5 --force`` (load, latency table, lazy
  search stopped at the target, evaluation of every point, the default formats, family file);
* ``second``: then ``--target params=0.6`` into the same place (the cached front and latency
  table reused: load and export only).

Each ``--repeats`` times; prints the medians and writes JSON (every time, the machine, torch
version and date) to ``benchmarks/results/compress_time.json``.

    python benchmarks/compress_time.py                    # char LM, 3 repeats: about 5 minutes
    python benchmarks/compress_time.py --train "--preset lenet5-mnist5k" --name lenet5
    python benchmarks/compress_time.py --threads 0 --name charlm-all-cores  # as a user runs it (an idle machine)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from maestro_lod.files import write_json_atomic


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default="--preset char-lm-pydoc --epochs 1", help="maestro-lod train options")
    parser.add_argument("--name", default="charlm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the timed commands (0: torch's default, all cores; what a user gets)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compress_time.json")
    args = parser.parse_args()
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cli = [sys.executable, "-m", "maestro_lod"]
    work = Path(tempfile.mkdtemp(prefix="compress-time-"))
    run = work / "run"
    train_s = timed([*cli, "train", *shlex.split(args.train), "--quiet", "--out", str(run)], env)
    first, second = [], []
    for _ in range(args.repeats):
        shutil.rmtree(run / "params-0.6", ignore_errors=True)  # the second target's folder of the last repeat
        first.append(timed([*cli, "compress", str(run), "--target", "params=0.5", "--force", "--quiet"], env))
        second.append(timed([*cli, "compress", str(run), "--target", "params=0.6", "--quiet"], env))
    front = json.loads((run / "front.json").read_text())
    result = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "threads": args.threads or torch.get_num_threads()},
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "train": args.train,
              "train_s": train_s, "first_s": first, "second_s": second, "points": len(front["points"])}
    print(f"{args.name}: trained in {train_s:.1f} s; compress --target params=0.5: median "
          f"{statistics.median(first):.1f} s ({', '.join(f'{t:.1f}' for t in first)}); a second target: median "
          f"{statistics.median(second):.1f} s ({', '.join(f'{t:.1f}' for t in second)}); {len(front['points'])} points")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[args.name] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, results)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
