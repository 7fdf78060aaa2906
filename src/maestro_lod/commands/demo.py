"""``maestro-lod demo svd|pca``: the theory made visible in under a minute on CPU.

``svd`` trains one factorised layer on ``y = A x`` (x uniform in the unit ball) for two spectra,
geometric and flat-tailed; ``pca`` trains a linear autoencoder on centred Gaussian data. Each
prints, per rank b, the principal angles to the true leading subspaces, the error against the
Eckart–Young optimum and the learned importance next to the singular value, for LoD and for the
contrast trained without ordered dropout, then saves the same as a PNG.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..errors import UsageError
from ..tables import format_table
from ..theory import PCA_SETTINGS, SVD_KINDS, SVD_SETTINGS, ExperimentResult, pca_problem, run_experiment, svd_problem
from ..theory.measures import RankRow
from ..theory.plots import save_figure

DEMOS = ("svd", "pca")
DEMO_ROOT = Path("runs")
"""Where the figure goes by default (the directory ``maestro-lod train`` writes its runs into)."""
COLUMNS = (
    ("b", "the truncation to the leading b ranks of the trained layer"),
    ("gap", "whether σ_b > σ_b+1: only then is the best rank-b subspace unique, so only those b are judged"),
    ("left° / right°", "largest principal angle between the learned and the true leading b-dimensional left / "
                       "right (input-weighted) singular subspaces; 0° = recovered"),
    ("u_b∠p_b°", "angle between the learned b-th left direction and the true b-th singular vector"),
    ("error/optimum", "risk of the rank-b truncation over the Eckart–Young optimum (1 = optimal)"),
    ("σ_b/σ_1", "the true b-th singular value, relative to the first"),
    ("importance/σ_1", "the learned importance of rank b, ‖u_b v_bᵀ S‖ (equal to σ_b/σ_1 when LoD recovers the SVD)"),
)
"""The columns of the per-rank tables, explained once before them."""


def columns_legend() -> str:
    """The explanation of the table columns, one line per column."""
    width = max(len(name) for name, _ in COLUMNS)
    return "\n".join(["columns of the tables below:"] + [f"  {name:<{width}}  {text}" for name, text in COLUMNS])


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="show that LoD recovers the SVD of a linear map and PCA",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=DEMOS, help="svd: linear map on the unit ball; pca: linear autoencoder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problem, initialisation and data (default 0)")
    parser.add_argument("--out", default=None, metavar="FILE.png",
                        help=f"PNG to write (default: {DEMO_ROOT}/demo-<which>-seed<seed>.png, {DEMO_ROOT}/ created "
                             f"if needed)")
    parser.add_argument("--force", action="store_true", help="replace --out if it already exists")
    parser.set_defaults(handler=run_demo)


def run_demo(args) -> int:
    default = args.out is None
    if not default and not str(args.out).strip():
        raise UsageError("--out is empty; give a .png file")
    out = DEMO_ROOT / f"demo-{args.which}-seed{args.seed}.png" if default else Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {str(out)!r} must end in .png")
    if out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a directory; give a .png file")
    if default and not out.parent.exists():
        try:
            out.parent.mkdir(parents=True)
        except OSError as exc:
            raise UsageError(f"cannot create {str(out.parent)!r} for the figure: {exc.strerror or exc}; "
                             f"pass --out") from None
    if not out.parent.is_dir():
        raise UsageError(f"--out {str(out)!r}: directory {str(out.parent)!r} does not exist")
    if out.exists() and not args.force:
        raise UsageError(f"--out {str(out)!r} already exists; pass --force to replace it")
    start = time.perf_counter()
    if args.which == "svd":
        settings = dataclasses.replace(SVD_SETTINGS, seed=args.seed)
        results = [run_experiment(svd_problem(kind, args.seed), settings) for kind in SVD_KINDS]
    else:
        settings = dataclasses.replace(PCA_SETTINGS, seed=args.seed)
        results = [run_experiment(pca_problem(args.seed), settings)]
    print(columns_legend())
    print()
    for result in results:
        print(report(result))
        print()
    try:
        save_figure(results, out)
    except OSError as exc:
        raise UsageError(f"cannot write --out {str(out)!r}: {exc.strerror or exc}") from None
    print(f"figure: {out}   ({time.perf_counter() - start:.1f} s)")
    return 0


def report(result: ExperimentResult) -> str:
    """The per-rank tables of LoD and the contrast, and the verdict on ordering and optimality."""
    problem, settings = result.problem, result.settings
    header = (f"== {problem.name}: n = {problem.in_features}, layer rank r = {settings.rank}, "
              f"{settings.steps} Adam steps of {settings.batch} fresh samples, seed {settings.seed}")
    parts = [header]
    for title, rows in (("LoD: rank b drawn uniformly from 1..r every step", result.lod),
                        ("contrast: same layer, init and data, always at full rank", result.contrast)):
        parts += ["", title, _table(rows, result), _verdict(rows, result)]
    return "\n".join(parts)


def _table(rows: list[RankRow], result: ExperimentResult) -> str:
    top = result.problem.values[0].item()
    gaps = set(result.gap_ranks)
    lines = [("b", "gap", "left°", "right°", "u_b∠p_b°", "error/optimum", "σ_b/σ_1", "importance/σ_1")]
    for row in rows:
        lines.append((row.rank, "yes" if row.rank in gaps else "no", f"{row.left_angle:.2f}", f"{row.right_angle:.2f}",
                      f"{row.direction_angle:.2f}",
                      f"{row.ratio:.4f}", f"{row.singular_value / top:.4f}", f"{row.importance / top:.4f}"))
    return format_table(lines)


def _verdict(rows: list[RankRow], result: ExperimentResult) -> str:
    checked = [row for row in rows if row.rank in set(result.gap_ranks)]
    worst_angle = max(checked, key=lambda row: max(row.left_angle, row.right_angle))
    worst_ratio = max(checked, key=lambda row: row.ratio)
    violations = result.violations(rows)
    order = "ordered like the singular values" if not violations else \
        f"NOT ordered (violations at b = {', '.join(map(str, violations))})"
    return (f"over the b with a gap: worst angle {max(worst_angle.left_angle, worst_angle.right_angle):.2f}° "
            f"(b = {worst_angle.rank}), worst error ratio {worst_ratio.ratio:.4f} (b = {worst_ratio.rank}); "
            f"importances {order}")
