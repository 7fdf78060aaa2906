"""``maestro-lod bench``: train a suite of (task × method × seed) cells and compare them.

Every cell is an ordinary ``maestro-lod train`` run directory under ``OUT/<task>/<method>/seed<k>``,
so a cell can be inspected, plotted or resumed on its own. A finished cell (its ``summary.json``
written by the same options) is never recomputed unless ``--force``; an interrupted one continues
from its checkpoint. After the cells, ``OUT`` receives ``results.json`` (every cell and the
aggregates), ``results.md`` (mean ± std over seeds), ``accuracy-vs-macs.png`` and
``training-cost.png``.

Per cell: validation accuracy (perplexity for language models), parameters and MACs of the
exported model, its CPU latency (median of ``--repeats`` forward passes of one example, one
thread), training wall time, and training MACs (3 × forward MACs per example and pass, from the
ranks each step ran; see :mod:`maestro_lod.training.step_macs`).

Suites:

* ``quick`` (1 seed, a few minutes on two cores): LeNet-5 on mnist5k, the MLP on digits;
* ``cpu`` (3 seeds): the quick tasks, the four-convolution CNN ``cnn4`` on mnist5k and the
  character transformer on pydoc-text;
* ``paper`` (3 seeds, needs a GPU and the CIFAR-10 / translation data): ResNet-18 and VGG-19 on
  CIFAR-10 with the paper's recipe, the Transformer on the offline ``reverse`` task;
* ``fronts`` (3 seeds): MAESTRO's one-run front against dense + SVD, dense + whitened SVD,
  Pufferfish at three ranks and models trained separately at three of the front's points, by
  exported parameters and MACs (:mod:`maestro_lod.bench.fronts`); ``OUT`` receives ``fronts.json``,
  ``fronts.md`` and ``fronts.png``.

``--epochs N`` caps every task's epochs (a tiny budget for a smoke test); ``--methods``,
``--tasks`` and ``--seeds`` select cells.

Sensitivity sweeps: ``--sweep lambda_gl=1e-4,1e-3 --sweep eps_ps=1e-4,1e-3`` trains every point of
the cartesian product of the given values (``epochs=...`` may be swept too, and size targets:
``--sweep target=macs=0.5,macs=0.3`` trains one targeted MAESTRO run per target). A grid point is one
more level of the cell directory, ``OUT/<task>/<method>/lambda_gl=0.0001,eps_ps=0.001/seed<k>``, so
each point is an ordinary resumable run. The MAESTRO options (``lambda_gl``, ``eps_ps``) vary only
in cells of a MAESTRO method whose variant does not fix them (``maestro-no-gl`` keeps λ = 0); the
other methods run once per value of the keys they use, as references. Without ``--methods`` a
sweep trains ``dense`` once and ``maestro`` at every point. ``results.md`` then holds one row per
point and ``sweep.png`` draws accuracy and exported parameters / MACs against λ (or the first swept
key), one line per value of the other keys, the dense model as a horizontal line.

The benchmark itself is the library :mod:`maestro_lod.bench` (:func:`~maestro_lod.bench.run_bench`).
"""

from __future__ import annotations

import argparse

from ..bench import SUITES, SWEEP_KEYS, VARIANTS, parse_sweep, run_bench, run_fronts
from ..bench.fronts import DURATION, TASKS
from ..bench.sweep import split_names
from ..errors import UsageError


def run(args: argparse.Namespace) -> int:
    """Handler of ``maestro-lod bench``."""
    if args.suite == "fronts":
        if args.methods or args.sweep:
            raise UsageError("--suite fronts trains its own families: --methods and --sweep do not apply")
        fronts = run_fronts(args.out, tasks=args.tasks, seeds=args.seeds, epochs=args.epochs, force=args.force,
                            say=print)
        print(fronts.table)
        print("results: " + ", ".join(map(str, fronts.files)))
        return 0
    result = run_bench(args.suite, args.out, methods=args.methods, tasks=args.tasks, seeds=args.seeds,
                       epochs=args.epochs, repeats=args.repeats, grid=parse_sweep(args.sweep or []),
                       force=args.force, say=print)
    print(result.table)
    results, table = result.files
    print(f"results: {results}, {table}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command."""
    parser = subparsers.add_parser("bench", help="compare MAESTRO with ablations and baselines on a suite of tasks",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted([*SUITES, "fronts"]), default="quick",
                        help=f"quick, cpu, paper: methods x tasks x seeds; fronts: MAESTRO's one-run front against "
                             f"dense + SVD, Pufferfish and separately trained models on "
                             f"{', '.join(t.name for t in TASKS)}, 3 seeds "
                             f"({DURATION}; restrict with --tasks and --seeds)")
    parser.add_argument("--out", metavar="DIR", help="directory of the cells and results (default runs/bench-SUITE)")
    parser.add_argument("--methods", type=split_names, metavar="NAMES", help=f"subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--tasks", type=split_names, metavar="NAMES", help="subset of the suite's tasks")
    parser.add_argument("--seeds", type=int, metavar="N", help="how many seeds: runs seeds 0..N-1 (default: the suite's)")
    parser.add_argument("--epochs", type=int, metavar="N", help="cap every task's epochs (a tiny budget)")
    parser.add_argument("--repeats", type=int, default=50, help="timed forward passes per latency (default 50)")
    parser.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                        help=f"train every combination of these values (repeatable; KEY: {', '.join(SWEEP_KEYS)})")
    parser.add_argument("--force", action="store_true", help="recompute finished cells")
    parser.set_defaults(handler=run)
