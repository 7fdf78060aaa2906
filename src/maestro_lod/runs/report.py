"""The closing report of a training run: the dense accuracy to compare with (a stored figure or a
dense run of the same recipe) and the table of the result against the dense model."""

from __future__ import annotations

from typing import Any

from ..data import TaskData
from ..errors import TrainingDiverged, UsageError
from ..tables import format_table
from ..training.train_config import TrainConfig
from ..training.methods import METHODS, DenseMethod
from .loading import build_trainer
from .progress import Progress
from .reference import stored_reference


def dense_reference(config: TrainConfig, data: TaskData | None, quiet: bool) -> dict[str, Any] | None:
    """The dense model's figures shown next to the result (None for ``reference = "none"`` and dense
    runs): the stored figure of this recipe, or (``reference = "run"``) a dense run trained now."""
    if config.reference == "none" or METHODS[config.method] is DenseMethod:  # a dense run is its own reference
        return None
    if config.reference == "stored":
        stored = stored_reference(config)
        if stored is None:
            return {"source": "none stored for this recipe (use --reference run to measure one)"}
        return {"accuracy": stored.accuracy, "source": f"stored figure: {stored.source}", "origin": stored.origin}
    print("dense reference: training the dense model with the same recipe first", flush=True)
    dense = config.replace(method="dense", reference="none")
    try:
        summary = build_trainer(dense, data, [Progress(bars=not quiet, prefix="[dense] ")]).fit().summary
    except TrainingDiverged as exc:
        raise UsageError(f"dense reference run: {exc}") from None
    reference = {"accuracy": summary["final_accuracy"], "train_time": summary["train_time"],
                 "source": "dense run with the same recipe and seed (this command)"}
    if summary.get("final_perplexity") is not None:
        reference["perplexity"] = summary["final_perplexity"]
    return reference


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _cost(value: int, dense: int) -> str:
    return f"{value:,} ({value / max(dense, 1):.2f}x)"


def reference_label(reference: dict[str, Any]) -> str:
    """The heading of the dense column: says whether its accuracy is a stored figure (and from
    where) or a dense run made by this command, so a stored number never reads as a new run."""
    source = str(reference.get("source", ""))
    if "accuracy" not in reference:
        return "dense model"
    if source.startswith("stored figure"):
        origin = reference.get("origin")
        return f"stored dense reference ({origin})" if origin else "stored dense reference"
    return "dense run (this command)" if "this command" in source else "dense reference"


def result_table(summary: Any, reference: dict[str, Any] | None) -> str:
    """The closing report: dense reference vs result, ranks per layer before → after. The dense
    column's parameters and MACs are the model's dense form; its accuracy and time are the
    reference's (named in the heading and in the last line)."""
    reference = reference or {}
    method = METHODS.lookup(summary["method"]).label
    rows = [("", reference_label(reference), method),
            ("validation accuracy", _percent(reference.get("accuracy")), _percent(summary["final_accuracy"]))]
    if summary.get("final_perplexity") is not None:
        ppl = reference.get("perplexity")
        rows.append(("validation perplexity", "-" if ppl is None else f"{ppl:.3f}", f"{summary['final_perplexity']:.3f}"))
    rows += [("parameters", f"{summary['dense_params']:,}", _cost(summary["params"], summary["dense_params"])),
             ("MACs per sample", f"{summary['dense_macs']:,}", _cost(summary["macs"], summary["dense_macs"])),
             ("exported parameters", "", _cost(summary["exported_params"], summary["dense_params"])),
             ("exported MACs per sample", "", _cost(summary["exported_macs"], summary["dense_macs"])),
             ("training time", f"{reference['train_time']:.1f} s" if "train_time" in reference else "-",
              f"{summary['train_time']:.1f} s")]
    text = format_table(rows)
    if summary["initial_ranks"]:
        ranks = [("layer", "rank before", "rank after")]
        ranks += [(name, str(before), str(summary["final_ranks"].get(name, "-")))
                  for name, before in summary["initial_ranks"].items()]
        ranks.append(("total", str(summary["initial_total_rank"]), str(summary["final_total_rank"])))
        text += "\n\n" + format_table(ranks)
    source = str(reference.get("source") or "")
    if source.startswith("stored figure: ") and "accuracy" in reference:
        text += (f"\n\nstored dense reference (a figure measured earlier, not a run made now; parameters and MACs "
                 f"are this model's dense form): {source[len('stored figure: '):]}")
    elif source:
        text += f"\n\ndense reference: {source}"
    return text
