"""Deployable files for the model at one point of the front, each checked against PyTorch.

* ``model.pt2``: a ``torch.export`` program of the deployed form (:func:`~.costs.deployable`: low-rank
  Linear/Conv as factor pairs or merged where that is no larger, factorised attention with its
  low-rank projections, layers that other code reads kept factorised), with a dynamic batch
  dimension. It loads with ``torch.export.load`` alone; this package is not needed to run it.
* ``model.onnx``: the same program through ``torch.onnx.export(dynamo=True)``, run once with ONNX
  Runtime (needs the ``deploy`` extra: ``pip install "maestro-lod[deploy]"``).
* ``model.safetensors``: the state dict of the plain torch.nn model of :func:`maestro_lod.export`
  (attention dense, since ``nn.MultiheadAttention`` reads packed weights), with the rank pattern and
  the layers stored as factor pairs in its metadata; :func:`load_plain` rebuilds it from the dense
  architecture.

What each form keeps: ``.pt2`` and ONNX keep the rank savings of every factorised layer (attention
projections and feed-forward layers included) except a layer whose dense weight the model's own
code multiplies by (merged: its forward never runs); ``model.safetensors`` keeps those of the
Linear/Conv layers that no code reads from outside (attention, the feed-forward layers of
``nn.TransformerEncoderLayer`` and read layers are dense in the plain form). The report of
:func:`build_artifacts` gives each written form's parameters and MACs per sample, measured on it.

Each artifact's outputs are compared with the PyTorch model on real inputs at two batch sizes;
the tolerances are in :data:`TOLERANCES` (float32: the artifacts reorder or fuse operations, so
bitwise equality is not expected, except for the plain model, which runs the same modules).
A mismatch raises :class:`ArtifactMismatch` and the artifact is not written.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from ..errors import CheckpointError, ConfigError, MaestroError, MissingFileError
from ..export import export
from ..files import write_bytes_atomic
from ..layers import LowRankConv, LowRankLinear, outermost_factorized, rank_pattern
from ..layers.handlers import _is_hf_conv1d
from ..engine.counting import count_macs, count_params
from ..engine.passes import forward
from ..engine.costs import deployable

FORMATS = ("pt2", "onnx", "safetensors")
FILES = {"pt2": "model.pt2", "onnx": "model.onnx", "safetensors": "model.safetensors"}
TOLERANCES = {"pt2": (1e-5, 1e-4), "onnx": (1e-4, 1e-3), "safetensors": (1e-5, 1e-4)}
"""Per format ``(atol, rtol)``: every output element must satisfy ``|a − b| ≤ atol + rtol·|b|``."""
PLAIN_METADATA_KEY = "maestro_lod_plain"
ONNX_MISSING = 'ONNX export needs the deploy extra: pip install "maestro-lod[deploy]" (onnx, onnxscript, onnxruntime)'


class ArtifactMismatch(MaestroError):
    """An exported artifact's outputs differ from the PyTorch model's beyond the stated tolerance."""


def onnx_available() -> bool:
    """Whether onnx, onnxscript and onnxruntime can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """``formats`` as a tuple if each is one of :data:`FORMATS` (and there is at least one)."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"unknown format(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(formats))


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, in order: the output itself, or the tensor leaves of a
    tuple, dict or Hugging Face ``ModelOutput`` (as ``torch.export`` and ONNX flatten them)."""
    return [leaf for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def compare(what: str, actual: Any, expected: Any, atol: float, rtol: float) -> float:
    """The largest ``|actual − expected|`` over every output tensor (one, or the leaves of a
    tuple, dict or ``ModelOutput``); raises :class:`ArtifactMismatch` beyond the tolerance."""
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        actual, expected = output_tensors(actual), output_tensors(expected)
        if len(actual) != len(expected) or not expected:
            raise ArtifactMismatch(f"{what}: {len(actual)} output tensor(s), PyTorch gives {len(expected)}")
        return max(compare(what, a, e, atol, rtol) for a, e in zip(actual, expected))
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise ArtifactMismatch(f"{what}: output shape {tuple(actual.shape)} differs from PyTorch's {tuple(expected.shape)}")
    difference = (actual - expected).abs()
    excess = difference - (atol + rtol * expected.abs())
    if not bool(torch.isfinite(actual).all()) or float(excess.max()) > 0:
        raise ArtifactMismatch(f"{what}: outputs differ from PyTorch's by up to {float(difference.max()):.3g} "
                               f"(tolerance {atol:g} + {rtol:g}·|value|)")
    return float(difference.max())


def export_program(module: nn.Module, example_inputs: Any) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` (eval mode) with the batch dimension of every input dynamic.
    PyTorch's fused attention path is off while tracing, so the program runs the module's own code."""
    inputs = _as_tuple(example_inputs)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = tuple({0: batch} for _ in inputs)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return torch.export.export(module.eval(), inputs, dynamic_shapes=dynamic, strict=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def onnx_bytes(program: torch.export.ExportedProgram) -> bytes:
    """ONNX model of an exported program (dynamic batch kept)."""
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    return onnx_program.model_proto.SerializeToString()


def run_onnx(model: bytes, inputs: Any) -> torch.Tensor | list[torch.Tensor]:
    """The output of ``model`` run by ONNX Runtime on the CPU: a tensor, or a list of them for a
    model with several outputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {name: tensor.detach().cpu().numpy() for name, tensor in zip(names, _as_tuple(inputs))}
    outputs = [torch.from_numpy(array) for array in session.run(None, feeds)]
    return outputs[0] if len(outputs) == 1 else outputs


def program_macs(module: nn.Module, inputs: Any) -> int:
    """Multiply–accumulates of one call of ``module`` (e.g. a loaded ``.pt2`` program, which has no
    eval mode to switch to) counted like :func:`~maestro_lod.engine.counting.count_macs`."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward(module, inputs)
    return counter.get_total_flops() // 2


def _batch(inputs: Any) -> int:
    return len(inputs[0] if isinstance(inputs, (tuple, list)) else inputs)


def _first(inputs: Any) -> Any:
    return tuple(x[:1] for x in inputs) if isinstance(inputs, (tuple, list)) else inputs[:1]


def plain_layout(model: nn.Module, plain: nn.Module) -> list[str]:
    """The factorised modules of ``model`` that ``plain`` (its export) holds as factor pairs."""
    return [name for name, _ in outermost_factorized(model) if isinstance(plain.get_submodule(name), nn.Sequential)]


def plain_bytes(model: nn.Module, plain: nn.Module) -> bytes:
    """safetensors of ``plain``'s state dict with the rank pattern and factor-pair layers of
    ``model`` in the metadata (tensors shared between entries are stored once per entry)."""
    tensors = {key: value.detach().cpu().clone().contiguous() for key, value in plain.state_dict().items()}
    ranks = rank_pattern(model)
    pairs = {name: ranks[name] for name in plain_layout(model, plain)}
    metadata = {PLAIN_METADATA_KEY: json.dumps({"format": 1, "ranks": ranks, "pairs": pairs})}
    return safetensors_bytes(tensors, metadata=metadata)


def read_tagged_safetensors(path: str | Path, key: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON document stored under metadata ``key`` of a safetensors file this package wrote, and
    its tensors; a missing file or one without that key is refused naming ``what`` was expected."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no {what} at {str(path)!r}")
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    if key not in metadata:
        raise CheckpointError(f"{str(path)!r} is not a {what} written by maestro-lod")
    return json.loads(metadata[key]), tensors


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def load_plain(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``model.safetensors`` written by :func:`write_artifacts` into ``model``, the dense
    architecture it was trained from (e.g. ``build_model(name, data)``), in place: each layer
    stored as a factor pair is replaced by an ``nn.Sequential`` of two plain layers of that rank
    (and a Hugging Face ``Conv1D``, which the export turns into ``nn.Linear``, by that ``nn.Linear``),
    then the state dict loads strictly. Only torch.nn modules result; nothing is unpickled."""
    info, state = read_tagged_safetensors(path, PLAIN_METADATA_KEY, "plain model")
    pairs = info["pairs"]
    linear_like = [name for name in info["ranks"] if name not in pairs and _is_hf_conv1d(_submodule(model, name))]
    for name in [*pairs, *linear_like]:
        dense = model.get_submodule(name)
        if _is_hf_conv1d(dense):  # exported as nn.Linear (its weight transposed)
            layer = LowRankLinear.from_weight(dense.weight.detach().t(), dense.bias, pairs.get(name, min(dense.weight.shape)),
                                              init="random")
        else:
            kind = LowRankLinear if isinstance(dense, nn.Linear) else LowRankConv
            layer = kind.from_dense(dense, pairs.get(name), init="random")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.to_standard(merge=name not in pairs))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{str(path)!r} does not fit this architecture: {str(exc).splitlines()[0]}") from None
    return model.eval()


@torch.no_grad()
def build_artifacts(model: nn.Module, formats: Sequence[str], check_inputs: Sequence[Any],
                    architecture: Callable[[], nn.Module] | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The bytes of each artifact of ``model`` (at its current ranks) and a report: per format
    the largest output difference on each of ``check_inputs`` (real input batches of different
    sizes), or why it was skipped, and under ``costs`` the parameters and MACs per sample (on the
    first sample of ``check_inputs[0]``) of the loaded ``.pt2`` program (ONNX holds the same
    program) and of the plain model. Layers whose attributes the model's own code reads on
    ``check_inputs[0]`` are exported merged in every artifact. ``architecture()`` builds the dense model that
    :func:`load_plain` loads the safetensors artifact into, to check it too."""
    formats = check_formats(formats)
    module = deployable(model, check_inputs[0])
    references = [forward(module, inputs) for inputs in check_inputs]
    files: dict[str, bytes] = {}
    report: dict[str, Any] = {"tolerances": {f: TOLERANCES[f] for f in formats}, "differences": {}, "skipped": {},
                              "costs": {}}
    sample = _first(check_inputs[0])

    def check(fmt: str, outputs: list[torch.Tensor]) -> None:
        atol, rtol = TOLERANCES[fmt]
        report["differences"][fmt] = [compare(f"{FILES[fmt]} on a batch of {_batch(inputs)}", out, ref, atol, rtol)
                                      for out, ref, inputs in zip(outputs, references, check_inputs)]

    program = None
    if "pt2" in formats or "onnx" in formats:
        program = export_program(module, check_inputs[0])
    if "pt2" in formats:
        files["pt2"] = program_bytes(program)
        loaded = torch.export.load(io.BytesIO(files["pt2"])).module()
        check("pt2", [forward(loaded, inputs) for inputs in check_inputs])
        report["costs"]["pt2"] = {"params": count_params(loaded), "macs": program_macs(loaded, sample)}
    if "onnx" in formats:
        if onnx_available():
            files["onnx"] = onnx_bytes(program)
            check("onnx", [run_onnx(files["onnx"], inputs) for inputs in check_inputs])
        else:
            report["skipped"]["onnx"] = ONNX_MISSING
    if "safetensors" in formats:
        plain = export(model, example_inputs=_as_tuple(check_inputs[0])).eval()
        files["safetensors"] = plain_bytes(model, plain)
        if architecture is not None:
            path_free = _load_plain_bytes(architecture(), files["safetensors"])
            check("safetensors", [forward(path_free, inputs) for inputs in check_inputs])
        else:
            check("safetensors", [forward(plain, inputs) for inputs in check_inputs])
        report["costs"]["safetensors"] = {"params": count_params(plain), "macs": count_macs(plain, sample)}
    return files, report


def _load_plain_bytes(model: nn.Module, data: bytes) -> nn.Module:
    """:func:`load_plain` from bytes (through a temporary file, as safetensors reads files)."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / FILES["safetensors"]
        path.write_bytes(data)
        return load_plain(model, path)


def write_files(directory: str | Path, files: dict[str, bytes]) -> list[str]:
    """Write each artifact atomically under ``directory`` (created); returns the file names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for fmt, data in files.items():
        write_bytes_atomic(directory / FILES[fmt], data)
    return [FILES[fmt] for fmt in files]
