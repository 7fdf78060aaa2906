"""``maestro_lod.deploy`` and ``maestro-lod compress``: the greedy front, its costs, BatchNorm
recalibration, selection by budget, the artifacts (checked in a fresh interpreter without this
package) and every bad-input path of the command. Runs use LeNet-5 on the 8×8 ``digits`` set."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import maestro_lod as ml
from maestro_lod import cli
from maestro_lod.deploy import (Front, calibration_batches, calibration_loss, deployable, evaluate_front,
                                greedy_front, materialize)
from maestro_lod.deploy.artifacts import build_artifacts, load_plain
from maestro_lod.errors import ConfigError
from maestro_lod.models import build_model
from maestro_lod.engine.evaluation import evaluate

from conftest import SmallConvNet

FAST = ["--data", "digits", "--model-option", "padding=2", "--batch-size", "128", "--quiet"]
COMPRESS = ["--calibration-size", "256", "--latency-batch", "4", "--quiet"]
LATENCY_KEYS = ("latency", "exported")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A one-epoch LeNet-5 run on digits, compressed once with a MACs target (the whole front)."""
    root = tmp_path_factory.mktemp("deploy")
    run = root / "run"
    assert cli.main(["train", *FAST, "--epochs", "1", "--out", str(run)]) == 0
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.6", "--formats", "pt2,onnx,safetensors",
                     "--full-front"]) == 0
    return run


def _lenet(data):
    return build_model("lenet5", data, padding=2)


def _points(front_file):
    return [{k: v for k, v in p.items() if k not in LATENCY_KEYS} for p in json.loads(front_file.read_text())["points"]]


def test_front_is_monotone_and_costs_exact(trained_run, digits):
    front = Front.load(trained_run / "front.json")
    macs = [p.macs for p in front.points]
    params = [p.params for p in front.points]
    assert len(front.points) > 5
    assert all(a > b for a, b in zip(macs, macs[1:])), macs  # every kept removal saves MACs
    assert all(a >= b for a, b in zip(params, params[1:]))
    assert all(min(p.ranks.values()) >= 0 for p in front.points)
    assert front.points[-1].ranks == {name: 1 for name in front.max_ranks}  # down to every min rank
    model = _trained_model(trained_run, digits)
    example = digits.val[0][0].unsqueeze(0)
    for point in front.points[::4]:
        deployed = deployable(materialize(model, point))
        assert point.macs == ml.count_macs(deployed, example) and point.params == ml.count_params(deployed)


def _trained_model(run, data):
    """The model the front of ``run`` was searched on: the trained one, its factors re-factorised
    by SVD (compress's default ``--order svd``)."""
    from maestro_lod.runs.loading import load_run
    return ml.canonicalize_(load_run(run).model.eval())


def test_exported_point_reproduces_recorded_accuracy(trained_run, digits):
    front = Front.load(trained_run / "front.json")
    exported = [p for p in front.points if p.exported]
    assert len(exported) == 1 and exported[0].exported["folder"] == "macs-0.6"
    point = exported[0]
    assert point.macs <= 0.6 * front.dense_macs
    plain = load_plain(_lenet(digits), trained_run / "macs-0.6" / "model.safetensors")
    assert all(type(m).__module__.startswith("torch.") for m in list(plain.modules())[1:])  # root: LeNet5 itself
    val = calibration_batches(digits.val, len(digits.val), 500)
    metrics = evaluate(plain, val, lambda b: (plain(b[0]), b[1]), "classification")
    assert metrics["accuracy"] == point.accuracy
    program = torch.export.load(str(trained_run / "macs-0.6" / "model.pt2")).module()
    with torch.no_grad():
        correct = sum(int((program(x).argmax(-1) == y).sum()) for x, y in val)
    assert correct / len(digits.val) == point.accuracy
    assert set(point.ranks) == set(front.max_ranks) and point.index > 0


FRESH = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "maestro_lod" or name.startswith("maestro_lod."):
            raise ImportError("maestro_lod is blocked in this interpreter")
sys.meta_path.insert(0, Block())
import torch
from safetensors.torch import load_file
data = load_file(sys.argv[1])
program = torch.export.load(sys.argv[2]).module()
for key in ("small", "large"):
    diff = (program(data[key]) - data[key + "_out"]).abs().max().item()
    assert diff <= 1e-5, (key, diff)
if len(sys.argv) > 3:
    import onnxruntime
    session = onnxruntime.InferenceSession(sys.argv[3], providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for key in ("small", "large"):
        out = torch.from_numpy(session.run(None, {name: data[key].numpy()})[0])
        assert (out - data[key + "_out"]).abs().max().item() <= 1e-4
try:
    import maestro_lod
except ImportError:
    print("ok")
"""


def test_artifacts_load_in_a_fresh_interpreter_without_this_package(trained_run, digits, tmp_path):
    front = Front.load(trained_run / "front.json")
    point = next(p for p in front.points if p.exported)
    model = deployable(materialize(_trained_model(trained_run, digits), point))
    small, large = (calibration_batches(digits.val, n, n, seed=5)[0][0] for n in (1, 7))
    with torch.no_grad():
        save_file({"small": small, "large": large, "small_out": model(small), "large_out": model(large)},
                  str(tmp_path / "io.safetensors"))
    folder = trained_run / "macs-0.6"
    args = [str(tmp_path / "io.safetensors"), str(folder / "model.pt2")]
    if (folder / "model.onnx").exists():
        args.append(str(folder / "model.onnx"))
    result = subprocess.run([sys.executable, "-c", FRESH, *args], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_onnx_written_and_checked_when_installed(trained_run):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    point = json.loads((trained_run / "macs-0.6" / "point.json").read_text())
    assert "model.onnx" in point["files"].values()
    assert (trained_run / "macs-0.6" / "model.onnx").stat().st_size > 0


def test_without_onnx_the_other_formats_are_still_written(monkeypatch, digits):
    import maestro_lod.deploy.artifacts as artifacts
    monkeypatch.setattr(artifacts, "onnx_available", lambda: False)
    model = ml.factorize(_lenet(digits)).eval()
    x = digits.val[0][0].unsqueeze(0).repeat(4, 1, 1, 1)
    files, report = build_artifacts(model, ["pt2", "onnx", "safetensors"], [x, x[:2]], lambda: _lenet(digits))
    assert set(files) == {"pt2", "safetensors"} and "deploy" in report["skipped"]["onnx"]


def test_artifact_mismatch_fails_loudly(monkeypatch, digits):
    import maestro_lod.deploy.artifacts as artifacts
    model = ml.factorize(_lenet(digits)).eval()
    x = digits.val[0][0].unsqueeze(0).repeat(4, 1, 1, 1)
    real = artifacts.load_plain

    def corrupted(dense, path):
        loaded = real(dense, path)
        with torch.no_grad():
            loaded.fc3.bias.add_(1e-2)
        return loaded

    monkeypatch.setattr(artifacts, "load_plain", corrupted)
    with pytest.raises(artifacts.ArtifactMismatch, match="model.safetensors"):
        build_artifacts(model, ["safetensors"], [x], lambda: _lenet(digits))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64, bias=False), nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def test_greedy_step_picks_the_known_best_removal():
    """Layer ``a`` has tiny trailing singular values, layer ``b`` large ones: removing a's slice
    costs almost no loss for the same MACs, so the first round must take it; a removal that
    loses more per MAC saved may not come first even when it saves more."""
    torch.manual_seed(0)
    model = TwoLayers()
    with torch.no_grad():
        left, right = torch.linalg.qr(torch.randn(64, 16))[0], torch.linalg.qr(torch.randn(16, 16))[0]
        spectrum = torch.cat([torch.linspace(4, 1, 12), torch.full((4,), 1e-4)])
        model.a.weight.copy_(left @ torch.diag(spectrum) @ right.T)
        model.b.weight.copy_(torch.linalg.qr(torch.randn(64, 16))[0].T * 3)
    model = ml.factorize(model, ml.FactorizeConfig(min_rank=1))
    x = torch.randn(512, 16)
    with torch.no_grad():
        y = model(x).argmax(-1)
    front = greedy_front(model, [(x, y)], cost="macs", step=0.25)
    assert front.points[1].ranks == {"a": 12, "b": 16}  # 16 → 12: the first slice that saves MACs
    assert front.points[0].ranks == {"a": 16, "b": 16} and model.a.rank == 16  # the model is untouched


def test_batchnorm_statistics_recomputed_for_the_points_that_change(digits):
    torch.manual_seed(0)
    model = ml.factorize(SmallConvNet()).eval()
    calibration = calibration_batches(digits.train, 256, 128)
    state = torch.get_rng_state()
    front = greedy_front(model, calibration, step=0.5)
    assert torch.equal(torch.get_rng_state(), state)  # a search mid-training leaves the run's draws alone
    trained = materialize(model, front.points[0], calibration)
    assert torch.equal(trained.bn1.running_mean, model.bn1.running_mean)  # the trained point keeps its statistics
    later = front.points[len(front.points) // 2]
    cut = materialize(model, later, calibration)
    assert not torch.equal(cut.bn2.running_mean, model.bn2.running_mean)
    again = materialize(model, later, calibration)
    assert torch.equal(cut.bn2.running_var, again.bn2.running_var)
    # the loss recorded for the point is that of the model with its own statistics
    assert later.calibration_loss == pytest.approx(calibration_loss(cut, calibration), rel=1e-6)
    with pytest.raises(ConfigError, match="BatchNorm"):  # without calibration data: refused, not stale
        materialize(model, later.ranks)


def test_selection_by_budget_and_json_round_trip(trained_run, tmp_path):
    front = Front.load(trained_run / "front.json")
    assert Front.from_dict(json.loads(json.dumps(front.to_dict()))).to_dict() == front.to_dict()
    chosen = front.select(macs=0.6)
    feasible = [p for p in front.points if p.macs <= 0.6 * front.dense_macs]
    assert chosen.accuracy == max(p.accuracy for p in feasible)
    cheapest = front.select(max_drop=0.05)
    assert front.trained.accuracy - cheapest.accuracy <= 0.05
    assert all(p.macs >= cheapest.macs for p in front.points if front.trained.accuracy - p.accuracy <= 0.05)
    with pytest.raises(ConfigError, match="closest is point"):
        front.select(params=1e-6)
    with pytest.raises(ConfigError, match="unknown target"):
        front.select(flops=0.5)
    front.plot(tmp_path / "front.png", dense_accuracy=0.9)
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"


def _snapshot(directory):
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in directory.rglob("*")}


@pytest.mark.parametrize("args, message", [
    (["--cost", "flops"], "invalid choice"),
    (["--target", "flops=0.5"], "unknown target"),
    (["--target", "macs=1.5"], "(0, 1]"),
    (["--target", "macs=0"], "(0, 1]"),
    (["--target", "params=0.0001"], "is unreachable"),  # refused before the search, from the smallest ranks' cost
    (["--formats", "tflite"], "unknown format"),
    (["--step", "2"], "--step"),
])
def test_compress_bad_input_one_line_no_change(trained_run, capsys, args, message):
    before = _snapshot(trained_run)
    code = cli.main(["compress", str(trained_run), *COMPRESS, "--force", *args])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maestro-lod: error: ") and message in lines[0], captured.err
    assert _snapshot(trained_run) == before


def test_compress_refuses_bad_run_directories(trained_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((trained_run / "config.json").read_text())
    assert cli.main(["compress", str(empty), *COMPRESS]) == 2
    assert "no checkpoint.safetensors" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((trained_run / "config.json").read_text())
    config["model"], config["model_options"] = "mlp", {}
    (other / "config.json").write_text(json.dumps(config))
    (other / "checkpoint.safetensors").write_bytes((trained_run / "checkpoint.safetensors").read_bytes())
    assert cli.main(["compress", str(other), *COMPRESS]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "checkpoint" in err
    assert sorted(p.name for p in other.iterdir()) == ["checkpoint.safetensors", "config.json"]
    before = _snapshot(trained_run)
    assert cli.main(["compress", str(trained_run), *COMPRESS]) == 2  # front.json exists, no --force
    assert "--force" in capsys.readouterr().err and _snapshot(trained_run) == before


def test_same_inputs_same_front(trained_run, tmp_path):
    out = tmp_path / "again"
    assert cli.main(["compress", str(trained_run), *COMPRESS, "--out", str(out), "--formats", "safetensors"]) == 0
    assert _points(out / "front.json") == _points(trained_run / "front.json")


def test_evaluate_front_fills_every_point(digits):
    model = ml.factorize(_lenet(digits)).eval()
    calibration = calibration_batches(digits.train, 128, 128)
    front = greedy_front(model, calibration, cost="params", step=1.0)
    evaluate_front(front, model, calibration_batches(digits.val, 200, 200))
    assert all(0 <= p.accuracy <= 1 and p.val_loss > 0 for p in front.points)
    params = [p.params for p in front.points]
    assert params == sorted(params, reverse=True)


def test_a_target_stops_the_search_on_the_path_of_the_full_front(trained_run, tmp_path):
    stopped, full = tmp_path / "stopped", tmp_path / "full"
    for out, extra in ((stopped, []), (full, ["--full-front"])):
        assert cli.main(["compress", str(trained_run), *COMPRESS, "--target", "macs=0.8", "--formats", "safetensors",
                         "--no-family", "--out", str(out), *extra]) == 0
    short, whole = Front.load(stopped / "front.json"), Front.load(full / "front.json")
    assert len(short.points) < len(whole.points)
    assert [p.ranks for p in short.points] == [p.ranks for p in whole.points[:len(short.points)]]
    assert short.points[-1].macs <= 0.8 * short.dense_macs < short.points[-2].macs  # it ends at the first point within
