"""The benchmark behind ``maestro-lod bench``: train a suite of (task × method × seed) cells and
compare them.

Every cell is an ordinary run directory of ``maestro-lod train`` under
``OUT/<task>/<method>/seed<k>`` (:mod:`~maestro_lod.bench.cells`), so a cell can be inspected,
plotted or resumed on its own. A finished cell (its ``summary.json`` written by the same options)
is never recomputed unless ``force``; an interrupted one continues from its checkpoint. After the
cells, ``OUT`` receives ``results.json`` (every cell and the aggregates), ``results.md`` (mean ±
std over seeds), ``accuracy-vs-macs.png`` and ``training-cost.png``.

Per cell (:mod:`~maestro_lod.bench.measure`): validation accuracy (perplexity for language
models), parameters and MACs of the exported model, its CPU latency (median of ``repeats``
forward passes of one example, one thread), training wall time, and training MACs (3 × forward
MACs per example and pass, from the ranks each step ran; see :mod:`maestro_lod.training.step_macs`).

Suites (:mod:`~maestro_lod.bench.suites`):

* ``quick`` (1 seed, a few minutes on two cores): LeNet-5 on mnist5k, the MLP on digits;
* ``cpu`` (3 seeds): the quick tasks, the four-convolution CNN ``cnn4`` on mnist5k and the
  character transformer on pydoc-text;
* ``paper`` (3 seeds, needs a GPU and the CIFAR-10 / translation data): ResNet-18 and VGG-19 on
  CIFAR-10 with the paper's recipe, the Transformer on the offline ``reverse`` task;
* ``fronts`` (:mod:`~maestro_lod.bench.fronts`, 3 seeds): MAESTRO's one-run front against
  dense + SVD, dense + whitened SVD, Pufferfish at three ranks and models trained separately at
  three of the front's points, on LeNet-5, cnn4, the MLP and the character LM
  (:func:`~maestro_lod.bench.fronts.run_fronts`).

Sensitivity sweeps (:mod:`~maestro_lod.bench.sweep`): a grid such as ``lambda_gl=1e-4,1e-3`` ×
``eps_ps=1e-4,1e-3`` trains every point of the cartesian product (``epochs`` may be swept too, and
size targets: ``target=macs=0.5,macs=0.3`` trains one targeted MAESTRO run per target). A grid
point is one more level of the cell directory, ``OUT/<task>/<method>/lambda_gl=0.0001,eps_ps=0.001/seed<k>``,
so each point is an ordinary resumable run. The MAESTRO options (``lambda_gl``, ``eps_ps``) vary
only in cells of a MAESTRO method whose variant does not fix them (``maestro-no-gl`` keeps λ = 0);
the other methods run once per value of the keys they use, as references. Without ``methods`` a
sweep trains ``dense`` once and ``maestro`` at every point. ``results.md`` then holds one row per
point and ``sweep.png`` draws accuracy and exported parameters / MACs against λ (or the first
swept key), one line per value of the other keys, the dense model as a horizontal line.

:func:`run_bench` runs it all; the modules' functions run its steps one by one.
"""

from .aggregate import aggregate, markdown
from .cells import Cell, cell_config, is_finished, plan_cells, train_cell
from .fronts import FrontsResult, run_fronts
from .measure import measure
from .plots import plot, plot_sweep
from .run import BenchResult, run_bench
from .suites import SUITES, VARIANTS, Suite, Task
from .sweep import SWEEP_KEYS, SWEEP_METHODS, applicable, grid_points, parse_sweep, point_label
from .toml_writer import config_toml

__all__ = ["run_bench", "BenchResult", "run_fronts", "FrontsResult", "SUITES", "VARIANTS", "Suite", "Task",
           "SWEEP_KEYS", "SWEEP_METHODS", "parse_sweep", "grid_points", "applicable", "point_label", "Cell", "cell_config", "plan_cells",
           "is_finished", "train_cell", "measure", "aggregate", "markdown", "plot", "plot_sweep", "config_toml"]
