"""The accuracy–cost front of one trained model: its points, selection by budget, JSON, a plot.

Every point is a rank pattern reached by the greedy search (:func:`~maestro_lod.deploy.greedy_front`),
point 0 being the trained model itself. Costs are those of the deployed form, the model the
``.pt2`` and ONNX artifacts hold (:func:`~maestro_lod.deploy.deployable`; the plain
``model.safetensors`` form can cost more): ``macs`` per sample and ``params`` exactly, ``latency``
(seconds per batch) estimated from the latency table. Budgets
are fractions of the dense (unfactorised) model's cost; an accuracy drop is measured against the
trained model (point 0), in absolute accuracy (``max_drop=0.01`` is one percentage point).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingFileError
from ..files import write_json_atomic, write_png_atomic
from .costs import COSTS, LatencyTable
from .targets import COMPRESS, check_target, dense_cost

FORMAT = 1
BUDGETS = COSTS
TARGET_KEYS = COMPRESS.keys


@dataclass
class FrontPoint:
    """One rank pattern of the front and what it costs and scores.

    ``latency`` is the table estimate (None without a table); ``accuracy``, ``perplexity`` and
    ``val_loss`` are filled by :func:`~maestro_lod.deploy.evaluate_front`; ``exported`` describes
    the artifacts written for it (folder, measured latency, files).
    """

    index: int
    ranks: dict[str, int]
    macs: int
    params: int
    calibration_loss: float
    latency: float | None = None
    accuracy: float | None = None
    perplexity: float | None = None
    val_loss: float | None = None
    exported: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FrontPoint":
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})

    def label(self) -> str:
        """``"/"``-joined ranks in layer order, e.g. ``6/16/34/20/10``."""
        return "/".join(str(r) for r in self.ranks.values())


@dataclass
class Front:
    """Points of one greedy pass, the dense model's costs, and how they were obtained."""

    cost: str
    step: float
    calibration_size: int
    dense_macs: int
    dense_params: int
    points: list[FrontPoint]
    max_ranks: dict[str, int]
    latency_table: LatencyTable | None = None
    kind: str = "classification"
    metadata: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------- selection
    @property
    def trained(self) -> FrontPoint:
        """Point 0: the model as trained."""
        return self.points[0]

    @property
    def dense_latency(self) -> float | None:
        return None if self.latency_table is None else self.latency_table.dense

    def fraction(self, point: FrontPoint, budget: str) -> float:
        """``point``'s cost as a fraction of the dense model's (``budget``: macs, params, latency)."""
        if budget == "latency":
            if point.latency is None or not self.dense_latency:
                raise ConfigError("a latency budget needs a front measured with a latency table")
            return point.latency / self.dense_latency
        return getattr(point, budget) / dense_cost(self, budget)

    def drop(self, point: FrontPoint) -> float:
        """Accuracy lost against the trained model (needs evaluated points)."""
        if point.accuracy is None or self.trained.accuracy is None:
            raise ConfigError("max_drop needs validation accuracies: evaluate the front first (evaluate_front)")
        return self.trained.accuracy - point.accuracy

    def point_at(self, point: int | FrontPoint, what: str = "this front") -> FrontPoint:
        """The point at index ``point`` (or the one with a given point's index, whose ranks must
        match); anything else is a one-line ConfigError naming ``what``."""
        index = point.index if isinstance(point, FrontPoint) else point
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.points):
            raise ConfigError(f"point {point!r} is not an index of {what} (0..{len(self.points) - 1})")
        chosen = self.points[index]
        if isinstance(point, FrontPoint) and point.ranks != chosen.ranks:
            raise ConfigError(f"point {index} of {what} has ranks {chosen.label()}, not {point.label()}")
        return chosen

    def select(self, **targets: float) -> FrontPoint:
        """The point meeting every target: budgets ``macs``/``params``/``latency`` (fraction of the
        dense model's cost, in (0, 1]) and ``max_drop`` (accuracy drop from the trained model).

        With a budget, the most accurate feasible point (the lowest validation loss for a front
        evaluated without accuracies, the lowest calibration loss for one not evaluated); with only ``max_drop``, the cheapest feasible one in the front's cost. A
        budget no point meets raises a ConfigError naming the closest point.
        """
        if not targets:
            raise ConfigError(f"select needs at least one target: {', '.join(TARGET_KEYS)}")
        for key, value in targets.items():
            check_target(key, value)
        feasible = [p for p in self.points if all(self._meets(p, k, v) for k, v in targets.items())]
        if not feasible:
            closest = min(self.points, key=lambda p: sum(max(0.0, self._excess(p, k, v)) for k, v in targets.items()))
            wanted = ", ".join(f"{k}={v}" for k, v in targets.items())
            achieved = ", ".join(f"{k} {self._measure(closest, k):.4g}" for k in targets)
            raise ConfigError(f"no point of the front meets {wanted}; the closest is point {closest.index} "
                              f"(ranks {closest.label()}: {achieved})")
        if any(k in BUDGETS for k in targets):
            if all(p.accuracy is not None for p in feasible):
                return max(feasible, key=lambda p: (p.accuracy, -p.calibration_loss, -p.index))
            if all(p.val_loss is not None for p in feasible):
                return min(feasible, key=lambda p: (p.val_loss, p.calibration_loss, p.index))
            return min(feasible, key=lambda p: (p.calibration_loss, p.index))
        return min(feasible, key=lambda p: (self._cost_value(p), p.index))

    def _cost_value(self, point: FrontPoint) -> float:
        return self.fraction(point, self.cost)

    def _measure(self, point: FrontPoint, key: str) -> float:
        return self.drop(point) if key == "max_drop" else self.fraction(point, key)

    def _excess(self, point: FrontPoint, key: str, value: float) -> float:
        return self._measure(point, key) - value

    def _meets(self, point: FrontPoint, key: str, value: float) -> bool:
        return self._excess(point, key, value) <= 1e-12

    # -------------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "cost": self.cost, "step": self.step, "calibration_size": self.calibration_size,
                "kind": self.kind, "dense": {"macs": self.dense_macs, "params": self.dense_params,
                                             "latency": self.dense_latency},
                "max_ranks": self.max_ranks, "metadata": self.metadata,
                "latency_table": None if self.latency_table is None else self.latency_table.to_dict(),
                "points": [p.to_dict() for p in self.points]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Front":
        if data.get("format") != FORMAT:
            raise ConfigError(f"front format {data.get('format')!r} is not {FORMAT}")
        table = data.get("latency_table")
        return cls(data["cost"], float(data["step"]), int(data["calibration_size"]), int(data["dense"]["macs"]),
                   int(data["dense"]["params"]), [FrontPoint.from_dict(p) for p in data["points"]],
                   dict(data["max_ranks"]), None if table is None else LatencyTable.from_dict(table),
                   data.get("kind", "classification"), dict(data.get("metadata", {})))

    def save(self, path: str | Path) -> None:
        """Write the front as JSON (atomically)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Front":
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"no front at {str(path)!r}")
        return cls.from_dict(json.loads(path.read_text()))

    # --------------------------------------------------------------------------------- plot
    def plot(self, path: str | Path, dense_accuracy: float | None = None) -> None:
        """PNG of accuracy (calibration loss before evaluation) against MACs and against latency,
        marking the dense model, the trained model (point 0) and the exported points."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        evaluated = all(p.accuracy is not None for p in self.points)
        score = (lambda p: 100 * p.accuracy) if evaluated else (lambda p: p.calibration_loss)
        label = "validation accuracy (%)" if evaluated else "calibration loss"
        if not evaluated and all(p.val_loss is not None for p in self.points):
            score, label = (lambda p: p.val_loss), "validation loss"
        axes_specs = [("MACs (fraction of dense)", lambda p: p.macs / self.dense_macs, 1.0)]
        if self.latency_table is not None:
            axes_specs.append((f"latency, batch {self.latency_table.batch_size} (ms)",
                               lambda p: 1000 * p.latency, 1000 * self.latency_table.dense))
        figure = Figure(figsize=(6 * len(axes_specs), 4.5))
        FigureCanvasAgg(figure)
        for i, (xlabel, x, dense_x) in enumerate(axes_specs):
            axes = figure.add_subplot(1, len(axes_specs), i + 1)
            axes.plot([x(p) for p in self.points], [score(p) for p in self.points], ".-", color="tab:blue",
                      markersize=4, label="greedy front")
            axes.plot([x(self.trained)], [score(self.trained)], "*", color="tab:green", markersize=14,
                      label="trained model")
            exported = [p for p in self.points if p.exported]
            if exported:
                axes.plot([x(p) for p in exported], [score(p) for p in exported], "o", color="tab:red",
                          markersize=9, fillstyle="none", label="exported")
                if i == 1:
                    measured = [p for p in exported if p.exported.get("latency") is not None]
                    axes.plot([1000 * p.exported["latency"] for p in measured], [score(p) for p in measured], "x",
                              color="tab:red", label="exported, measured")
            if dense_accuracy is not None and evaluated:
                axes.plot([dense_x], [100 * dense_accuracy], "s", color="black", label="dense model")
            else:
                axes.axvline(dense_x, color="black", linestyle=":", label="dense model cost")
            axes.set_xlabel(xlabel)
            axes.set_ylabel(label)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8)
        figure.suptitle(self._plot_title())
        caption = self._latency_caption()
        figure.tight_layout(rect=(0, 0.07 if caption else 0, 1, 1))
        if caption:
            figure.text(0.5, 0.015, caption, ha="center", va="bottom", fontsize=8, color="dimgray", wrap=True)
        write_png_atomic(figure, path, dpi=110)

    def _plot_title(self) -> str:
        """``greedy front of runs/x (mlp on digits): 38 points, cost: macs``; the run's name when known."""
        meta = self.metadata or {}
        what = f" ({meta['model']} on {meta['data']})" if meta.get("model") and meta.get("data") else ""
        run = f" of {meta['run']}{what}" if meta.get("run") else what
        return f"greedy front{run}: {len(self.points)} points, cost: {self.cost}"

    def _latency_caption(self) -> str:
        """What each latency of the right panel measures (empty without a latency table)."""
        if self.latency_table is None:
            return ""
        table = self.latency_table
        text = (f"latency of the front (dots, star, circles): the search's table estimate, the trained model timed whole "
                f"plus each layer's change timed alone at its new rank (batch {table.batch_size}, median of {table.repeats})")
        if any(p.exported and p.exported.get("latency") is not None for p in self.points):
            text += ("; crosses: the exported model timed whole at the same batch, so the gap to its circle is what "
                     "the estimate misses (operations between the layers, caches)")
        return text
