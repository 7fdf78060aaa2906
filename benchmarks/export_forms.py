"""Which export form keeps which savings: dense vs plain ``torch.nn`` export vs the deployed form.

The character language model (``char-lm`` on ``pydoc-text``) is factorised and every low-rank layer
truncated to a quarter of its full rank; parameters and MACs per sample are counted for the dense
model, ``ml.export`` (the plain ``torch.nn`` tree of ``model.safetensors``: attention and the
encoder's feed-forward layers stay merged because PyTorch reads their weights) and
``deploy.deployable`` (the form of the ``.pt2`` / ONNX artifacts, which keeps low-rank attention).

    python benchmarks/export_forms.py
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

import maestro_lod as ml
from maestro_lod.data import load_data
from maestro_lod.deploy import deployable
from maestro_lod.files import write_json_atomic
from maestro_lod.models import build_model
from maestro_lod.tables import format_table

RANK_FRACTION = 0.25


def main() -> None:
    torch.manual_seed(0)
    data = load_data("pydoc-text")
    dense = build_model("char-lm", data).eval()
    inputs = data.val[0][0].unsqueeze(0)
    model = ml.factorize(build_model("char-lm", data)).eval()
    ml.truncate_(model, {name: max(1, int(RANK_FRACTION * layer.max_rank)) for name, layer in ml.low_rank_layers(model)})
    forms = {"dense": dense, "plain torch.nn export": ml.export(model), "deployed form (.pt2, ONNX)": deployable(model)}
    rows = [("form", "parameters", "MACs per sample")]
    results = {}
    for name, module in forms.items():
        results[name] = {"params": ml.count_params(module), "macs": ml.count_macs(module, inputs)}
        rows.append((name, f"{results[name]['params']:,}", f"{results[name]['macs']:,}"))
    print(f"char-lm on pydoc-text, every layer at {RANK_FRACTION:.0%} of its full rank; torch {torch.__version__}, "
          f"{platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print(format_table(rows))
    out = Path(__file__).with_name("results") / "export_forms.json"
    write_json_atomic(out, {"rank_fraction": RANK_FRACTION, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                            "forms": results})
    print(f"written: {out}")


if __name__ == "__main__":
    main()
