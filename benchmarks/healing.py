"""What healing buys a dense model compressed without retraining, and what it costs.

For each task a dense run is trained with its preset (``maestro-lod train --method dense``), then
compressed to ``params`` = 0.2, 0.3 and 0.5 of the dense model by the same lazy greedy search, five
ways (``maestro_lod.runs.compress.compress_run``):

* ``svd``: factorised at full rank by plain SVD, no healing;
* ``whitened``: by whitened SVD on the calibration inputs, no healing;
* ``whitened + heal N``: each exported point fine-tuned at its ranks for N epochs (one training per
  budget: three here);
* ``whitened + heal-maestro N``: N epochs of MAESTRO (ordered dropout with self-distillation) on
  the factorised model before the search: one training for the whole front;
* ``whitened + both``: the two together.

Prints, per task and row, the validation accuracy (perplexity for the character LM) of each
budget's exported model and the seconds of healing and of the whole compress, and writes JSON
with the machine, torch version and date to ``benchmarks/results/healing.json``.

    python benchmarks/healing.py                       # LeNet-5 and the char LM, about 15 minutes
    python benchmarks/healing.py --tasks lenet5 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from maestro_lod.files import write_json_atomic
from maestro_lod.runs.compress import compress_run
from maestro_lod.tables import format_table

TASKS = {"lenet5": ["--preset", "lenet5-mnist5k"], "charlm": ["--preset", "char-lm-pydoc", "--epochs", "2"]}
BUDGETS = (0.2, 0.3, 0.5)


def rows(epochs: int) -> dict[str, dict]:
    return {"svd": {"init": "svd"}, "whitened": {"init": "whitened"},
            f"whitened + heal {epochs}": {"init": "whitened", "heal": epochs},
            f"whitened + heal-maestro {epochs}": {"init": "whitened", "heal_maestro": epochs},
            f"whitened + both {epochs}": {"init": "whitened", "heal": epochs, "heal_maestro": epochs}}


def figure(scores: dict) -> float:
    return scores["perplexity"] if "perplexity" in scores else scores["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="lenet5,charlm")
    parser.add_argument("--epochs", type=int, default=1, help="healing epochs")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "healing.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="healing-"))
    results = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": 1},
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "heal_epochs": args.epochs,
               "tasks": {}}
    for task in args.tasks.split(","):
        run = work / task / "dense"
        if not (run / "summary.json").is_file():
            subprocess.run([sys.executable, "-m", "maestro_lod", "train", *TASKS[task], "--method", "dense", "--quiet",
                            "--out", str(run)], check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((run / "summary.json").read_text())
        entry = results["tasks"][task] = {"dense": {"accuracy": summary.get("final_accuracy"),
                                                    "loss": summary.get("final_loss")}, "rows": {}}
        for name, options in rows(args.epochs).items():
            started = time.perf_counter()
            result = compress_run(run, work / task / name.replace(" ", "-"), targets=[("params", b) for b in BUDGETS],
                                  formats=("safetensors",), family=False, force=True, **options)
            seconds = time.perf_counter() - started
            budgets = {}
            for folder, point in result.chosen:
                healing = result.healing.get(folder, {})
                final = healing.get("point", healing.get("front", {})).get("after")
                budgets[folder] = {"ranks": point.label(), "params": point.params / result.front.dense_params,
                                   "value": figure(final) if final else (point.perplexity or point.accuracy),
                                   "healing": healing}
            heal_seconds = sum(h.get("point", {}).get("seconds", 0) for h in result.healing.values())
            heal_seconds += next((h["front"]["seconds"] for h in result.healing.values() if "front" in h), 0)
            entry["rows"][name] = {"seconds": seconds, "healing_seconds": heal_seconds, "budgets": budgets}
            print(f"{task}: {name}: {seconds:.1f} s", flush=True)
        language = result.front.kind != "classification"
        table = [("row", *(f"params {b:g}" for b in BUDGETS), "healing (s)", "compress (s)")]
        for name, row in entry["rows"].items():
            cells = [f"{v['value']:.3f}" if language else f"{100 * v['value']:.2f}%" for v in row["budgets"].values()]
            table.append((name, *cells, f"{row['healing_seconds']:.1f}", f"{row['seconds']:.1f}"))
        print(f"\n{task} (dense: {entry['dense']}), {'perplexity' if language else 'accuracy'} of each budget's model:")
        print(format_table(table))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
