"""Which shipped artifact keeps which rank savings, measured on the artifacts themselves.

Two models, factorised and every low-rank layer truncated to a quarter of its full rank (no
training: what is counted is structure, not accuracy):

* the character language model (``char-lm`` on ``pydoc-text``): ``nn.TransformerEncoderLayer``
  blocks, whose fused inference path reads the feed-forward layers' ``.weight``;
* a ViT (torchvision's ``VisionTransformer``, 32×32 images, patch 4, 4 blocks of width 64, MLP 256;
  needs the ``vision`` extra, skipped without torchvision): ``nn.MultiheadAttention`` and an MLP.

For each, the artifacts of ``deploy.artifacts.build_artifacts`` are built (checked against
PyTorch) and counted: parameters of the loaded ``.pt2`` program, of the ONNX initializers (the ONNX
exporter folds constants such as a causal mask into initializers and stores equal tensors once,
so its count differs a little from the program's), of the plain ``torch.nn`` model that
``model.safetensors`` loads into; MACs per sample of the ``.pt2`` program and the plain model.
Next to them the dense model and the factorised model itself (every saving). Prints machine, torch version and date and writes ``benchmarks/results/export_forms.json``.

    python benchmarks/export_forms.py
"""

from __future__ import annotations

import math
import os
import platform
import time
import warnings
from pathlib import Path

import torch

import maestro_lod as ml
from maestro_lod.data import load_data
from maestro_lod.deploy.artifacts import build_artifacts, onnx_available
from maestro_lod.export import MergedForReaders
from maestro_lod.files import write_json_atomic
from maestro_lod.models import build_model
from maestro_lod.tables import format_table

RANK_FRACTION = 0.25
VIT = dict(image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=256, num_classes=10)


def _truncated(model: torch.nn.Module) -> torch.nn.Module:
    model = ml.factorize(model).eval()
    ml.truncate_(model, {name: max(1, int(RANK_FRACTION * layer.max_rank)) for name, layer in ml.low_rank_layers(model)})
    return model


def _onnx_params(data: bytes) -> int:
    """Elements of every initializer of an ONNX model (its stored weights)."""
    import onnx

    return sum(math.prod(tensor.dims) for tensor in onnx.load_model_from_string(data).graph.initializer)


def measure(name: str, dense: torch.nn.Module, model: torch.nn.Module, checks: list[torch.Tensor]) -> dict:
    """Parameters and MACs per sample of the dense model, the factorised model and each artifact."""
    sample = checks[0][:1]
    formats = ["pt2", "safetensors"] + (["onnx"] if onnx_available() else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MergedForReaders)  # the plain form names its merged layers; counted below
        files, report = build_artifacts(model, formats, checks)
    forms = {"dense model": {"params": ml.count_params(dense), "macs": ml.count_macs(dense, sample)},
             "factorised model (every saving)": {"params": ml.count_params(model), "macs": ml.count_macs(model, sample)},
             "model.pt2": report["costs"]["pt2"],
             "model.safetensors (plain torch.nn)": report["costs"]["safetensors"]}
    if "onnx" in files:
        forms["model.onnx (initializers)"] = {"params": _onnx_params(files["onnx"]), "macs": None}
    return {"model": name, "forms": forms, "max_differences": report["differences"]}


def _char_lm() -> dict:
    torch.manual_seed(0)
    data = load_data("pydoc-text")
    dense = build_model("char-lm", data).eval()
    torch.manual_seed(0)
    model = _truncated(build_model("char-lm", data))
    checks = [torch.stack([data.val[i][0] for i in range(16)]), torch.stack([data.val[i][0] for i in range(3)])]
    return measure("char-lm on pydoc-text (64-character samples)", dense, model, checks)


def _vit() -> dict | None:
    try:
        from torchvision.models import VisionTransformer
    except ImportError:
        print("torchvision is not installed (pip install 'maestro-lod[vision]'): the ViT is skipped")
        return None
    torch.manual_seed(0)
    dense = VisionTransformer(**VIT).eval()
    torch.manual_seed(0)
    model = _truncated(VisionTransformer(**VIT))
    images = torch.randn(16, 3, 32, 32)
    return measure("ViT (torchvision VisionTransformer, 32x32 images, 4 blocks of width 64)", dense, model,
                   [images, images[:3]])


def _table(result: dict) -> str:
    dense = result["forms"]["dense model"]
    rows = [("form", "parameters", "vs dense", "MACs per sample", "vs dense")]
    for form, cost in result["forms"].items():
        macs = cost["macs"]
        rows.append((form, f"{cost['params']:,}", f"{cost['params'] / dense['params']:.2f}x",
                     "-" if macs is None else f"{macs:,}", "-" if macs is None else f"{macs / dense['macs']:.2f}x"))
    return format_table(rows)


def main() -> None:
    torch.set_num_threads(1)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"machine: {machine['platform']} ({machine['processor']}, {machine['cpus']} CPUs, {machine['threads']} "
          f"thread); torch {torch.__version__}; {date}")
    print(f"every factorised layer at {RANK_FRACTION:.0%} of its full rank\n")
    results = [r for r in (_char_lm(), _vit()) if r is not None]
    for result in results:
        print(result["model"])
        print(_table(result))
        print()
    out = Path(__file__).with_name("results") / "export_forms.json"
    write_json_atomic(out, {"machine": machine, "torch": torch.__version__, "date": date,
                            "rank_fraction": RANK_FRACTION, "models": results})
    print(f"written: {out}")


if __name__ == "__main__":
    main()
