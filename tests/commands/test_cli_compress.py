"""``maestro-lod compress`` on any run (dense runs factorised first, trained factors ordered by
``--order``) and on a model of one's own (``--model-factory`` / ``--torchvision`` with
``--weights`` and ``--data``): the artifacts, the ``point.json`` that says how to feed them (a
``.pt2`` is run from it alone), and the one-line refusals of bad input with nothing written."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from maestro_lod import cli
from maestro_lod.data import load_data
from maestro_lod.deploy import Front
from maestro_lod.deploy.artifacts import load_plain, onnx_available
from maestro_lod.models import build_model

DIGITS = ["--data", "digits", "--model-option", "padding=2", "--batch-size", "128", "--quiet"]
FAST = ["--calibration-size", "128", "--latency-batch", "2", "--quiet"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dense") / "run"
    assert cli.main(["train", "--method", "dense", *DIGITS, "--epochs", "2", "--out", str(run)]) == 0
    return run


def _raw_digits_val():
    """The raw 8x8 digits (values 0-16) of the validation split, as the dataset draws it."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from maestro_lod.data.embedded import SPLIT_SEED

    bunch = load_digits()
    _, x_val, _, y_val = train_test_split(bunch.data, bunch.target, test_size=0.2, stratify=bunch.target,
                                          random_state=SPLIT_SEED)
    return x_val, y_val


def _input_from_record(record, raw):
    """Model inputs built from ``point.json`` alone: shape, dtype and normalisation."""
    spec, norm = record["inputs"][0], record["normalization"]
    x = torch.as_tensor(np.asarray(raw), dtype=getattr(torch, spec["dtype"])).reshape(-1, *spec["shape"][1:])
    mean = torch.tensor(norm["mean"]).reshape(1, -1, *[1] * (x.dim() - 2))
    std = torch.tensor(norm["std"]).reshape(1, -1, *[1] * (x.dim() - 2))
    return (x * norm["scale"] - mean) / std


@pytest.mark.parametrize("init", ["svd", "whitened"])
def test_a_dense_run_compresses_and_its_pt2_runs_from_the_point_record(dense_run, tmp_path, init):
    out = tmp_path / init
    assert cli.main(["compress", str(dense_run), *FAST, "--init", init, "--target", "params=0.5", "--out", str(out)]) == 0
    front = Front.load(out / "front.json")
    assert front.metadata["factorized"] and front.metadata["init"] == init and front.metadata["method"] == "dense"
    summary = json.loads((dense_run / "summary.json").read_text())
    assert front.metadata["dense_accuracy"] == summary["final_accuracy"]
    assert front.points[0].accuracy == pytest.approx(summary["final_accuracy"], abs=2e-3)  # full rank: the model
    folder = out / "params-0.5"
    written = {p.name for p in folder.iterdir()}
    assert {"model.pt2", "model.safetensors", "point.json"} <= written
    assert ("model.onnx" in written) == onnx_available()  # the deploy extra writes it
    record = json.loads((folder / "point.json").read_text())
    assert record["labels"] == [str(d) for d in range(10)] and record["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert record["outputs"] == [{"shape": ["batch", 10], "dtype": "float32"}]
    raw, labels = _raw_digits_val()
    inputs = _input_from_record(record, raw)
    torch.testing.assert_close(inputs, load_data("digits").val.tensors[0])  # the record reproduces the data
    program = torch.export.load(folder / "model.pt2").module()
    with torch.no_grad():
        predicted = [record["labels"][i] for i in program(inputs).argmax(1).tolist()]
    accuracy = float(np.mean([p == str(y) for p, y in zip(predicted, labels)]))
    assert accuracy == record["point"]["accuracy"]
    plain = load_plain(build_model("lenet5", load_data("digits"), padding=2), folder / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(plain(inputs), program(inputs), atol=1e-4, rtol=1e-3)


def test_the_char_lm_record_holds_its_vocabulary(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    assert cli.main(["train", "--model", "char-lm", "--data", "pydoc-text", "--model-option", "d_model=16",
                     "--model-option", "num_layers=1", "--model-option", "num_heads=2", "--seq-len", "16",
                     "--epochs", "1", "--method", "dense", "--batch-size", "256", "--quiet", "--out", str(run)]) == 0
    assert cli.main(["compress", str(run), "--calibration-size", "64", "--step", "1.0", "--latency-batch", "2",
                     "--quiet", "--target", "params=0.5", "--out", str(out), "--no-family"]) == 0
    record = json.loads((out / "params-0.5" / "point.json").read_text())
    assert record["inputs"] == [{"shape": ["batch", 16], "dtype": "int64"}]
    tokens = record["vocabulary"]["tokens"]
    ids = torch.tensor([[tokens.index(c) for c in "def compress(mo"[:16].ljust(16)]])
    program = torch.export.load(out / "params-0.5" / "model.pt2").module()
    data = load_data("pydoc-text", seq_len=16)
    plain = load_plain(build_model("char-lm", data, d_model=16, num_layers=1, num_heads=2), out / "params-0.5" / "model.safetensors")
    with torch.no_grad():
        logits = program(ids)
        assert logits.shape == (1, 16, len(tokens))
        torch.testing.assert_close(plain(ids), logits, atol=1e-4, rtol=1e-3)


def test_order_keeps_the_trained_point_and_is_recorded(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", *DIGITS, "--epochs", "1", "--out", str(run)]) == 0
    fronts = {}
    for order in ("trained", "svd", "whitened"):
        out = tmp_path / order
        assert cli.main(["compress", str(run), *FAST, "--order", order, "--formats", "pt2", "--no-family",
                         "--out", str(out)]) == 0
        fronts[order] = Front.load(out / "front.json")
        assert fronts[order].metadata["order"] == order and not fronts[order].metadata["factorized"]
    assert len({f.points[0].accuracy for f in fronts.values()}) == 1  # the same function at the trained ranks
    assert len({json.dumps(f.points[0].ranks) for f in fronts.values()}) == 1


FACTORY = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))

def wide():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 10))

def broken():
    raise RuntimeError("no such layer")

def not_a_model():
    return 3
"""


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    """A factory file and the weights of its model, trained briefly on digits."""
    root = tmp_path_factory.mktemp("own")
    (root / "mymodels.py").write_text(FACTORY)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    x, y = load_data("digits").train.tensors
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    save_file(model.state_dict(), str(root / "weights.safetensors"))
    return root


def test_a_model_factory_file_compresses(own_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["--weights", str(own_model / "weights.safetensors"), "--data", "digits", *FAST, "--target", "params=0.5"]
    assert cli.main(["compress", "--model-factory", f"{own_model / 'mymodels.py'}:build", *args, "--out", str(out)]) == 0
    front = Front.load(out / "front.json")
    assert front.metadata["model_factory"].endswith("mymodels.py:build") and front.metadata["init"] == "whitened"
    assert front.points[0].accuracy == pytest.approx(front.metadata["dense_accuracy"], abs=2e-3)
    assert front.points[0].accuracy > 0.9
    record = json.loads((out / "params-0.5" / "point.json").read_text())
    assert record["data"] == "digits" and record["normalization"]["scale"] == 1 / 16 and len(record["labels"]) == 10
    monkeypatch.chdir(own_model)  # module:function, importable from the current directory
    assert cli.main(["compress", "--model-factory", "mymodels:build", *args, "--init", "svd", "--formats", "pt2",
                     "--out", str(tmp_path / "module")]) == 0


def _snapshot(directory):
    return sorted(str(p) for p in directory.rglob("*"))


@pytest.mark.parametrize("args, message", [
    (["--model-factory", "nosuchmodule:build"], "no module named 'nosuchmodule'"),
    (["--model-factory", "mymodels:nothing"], "has no function 'nothing'"),
    (["--model-factory", "mymodels"], "must be module:function"),
    (["--model-factory", "mymodels:broken"], "RuntimeError: no such layer"),
    (["--model-factory", "mymodels:not_a_model"], "returned int, not a torch.nn.Module"),
    (["--model-factory", "mymodels:wide"], "shape mismatch: 1.bias (48,) in the file, (40,) in the model"),
    (["--model-factory", "mymodels:build", "--data", "mnist5k"], "fails on inputs of shape (128, 1, 28, 28)"),
    (["--model-factory", "mymodels:build", "--weights", "missing.safetensors"], "does not exist"),
    (["--model-factory", "mymodels:build", "--weights", "mymodels.py"], "is not a safetensors file"),
    (["--model-factory", "mymodels:build", "--weights", "extra.safetensors"], "unexpected keys extra"),
    (["--model-factory", "mymodels:build", "--weights", "partial.safetensors"], "missing keys 1.bias, 1.weight"),
    (["--model-factory", "mymodels:build", "--data", "nosuchdata"], "nosuchdata"),
    (["--torchvision", "nosucharch"], "is not a torchvision classifier"),
    (["--model-factory", "mymodels:build", "--torchvision", "resnet18"], "not both"),
    (["RUNDIR", "--model-factory", "mymodels:build"], "not both"),
    (["RUNDIR", "--seed", "3", "--no-out"], "--seed apply to --model-factory/--torchvision"),
    ([], "give a RUN_DIR"),
    (["--model-factory", "mymodels:build", "--no-out"], "needs --out"),
])
def test_bad_own_model_input_one_line_nothing_written(own_model, tmp_path, monkeypatch, capsys, args, message):
    if args[:1] == ["--torchvision"]:
        pytest.importorskip("torchvision")
    monkeypatch.chdir(own_model)
    state = dict(torch.nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).state_dict())
    save_file({**state, "extra": torch.zeros(1)}, "extra.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("1.")}, "partial.safetensors")
    args = [str(tmp_path) if a == "RUNDIR" else a for a in args]
    defaults = {"--weights": "weights.safetensors", "--data": "digits"}
    full = list(args) + [x for key, value in defaults.items() if key not in args for x in (key, value)]
    out = tmp_path / "out"
    full = [a for a in full if a != "--no-out"] + ([] if "--no-out" in args else ["--out", str(out)])
    before = _snapshot(own_model)
    code = cli.main(["compress", *full, *FAST])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    assert not out.exists() and _snapshot(own_model) == before


def test_torchvision_classifier_on_an_image_folder(tmp_path):
    torchvision = pytest.importorskip("torchvision", reason="torchvision is an optional extra")
    from PIL import Image

    generator = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for label in ("cat", "dog"):
            (tmp_path / "images" / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = generator.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "images" / split / label / f"{i}.png")
    torch.manual_seed(0)
    save_file(torchvision.models.resnet18(num_classes=2).state_dict(), str(tmp_path / "r18.safetensors"))
    out = tmp_path / "out"
    assert cli.main(["compress", "--torchvision", "resnet18", "--weights", str(tmp_path / "r18.safetensors"),
                     "--data", "image-folder", "--data-root", str(tmp_path / "images"), "--calibration-size", "8",
                     "--step", "1.0", "--latency-batch", "2", "--quiet", "--formats", "pt2", "--no-family",
                     "--target", "params=0.5", "--out", str(out)]) == 0
    record = json.loads((out / "params-0.5" / "point.json").read_text())
    assert record["labels"] == ["cat", "dog"] and record["normalization"]["resize"] == [16, 16]
    assert record["inputs"] == [{"shape": ["batch", 3, 16, 16], "dtype": "float32"}]
    assert Front.load(out / "front.json").metadata["torchvision"] == "resnet18"


def _val_figures(model, task):
    """Accuracy and mean cross-entropy of ``model`` on the digits validation split."""
    inputs, labels = task.val.tensors
    with torch.no_grad():
        logits = model(inputs)
    return float((logits.argmax(1) == labels).float().mean()), float(F.cross_entropy(logits, labels))


def test_heal_fine_tunes_each_exported_point_and_exports_the_healed_model(dense_run, tmp_path, capsys):
    out = tmp_path / "healed"
    assert cli.main(["compress", str(dense_run), *FAST, "--heal", "1", "--target", "params=0.5",
                     "--formats", "safetensors", "--no-family", "--out", str(out)]) == 0
    assert "params-0.5: --heal 1 epoch(s)" in capsys.readouterr().out
    front = Front.load(out / "front.json")
    record = json.loads((out / "params-0.5" / "point.json").read_text())
    healing = record["healing"]["point"]
    assert healing["epochs"] == 1 and healing["seconds"] > 0 and "front" not in record["healing"]
    point = front.select(params=0.5)
    assert healing["before"]["accuracy"] == point.accuracy and healing["before"]["loss"] == pytest.approx(point.val_loss)
    assert healing["after"]["loss"] != healing["before"]["loss"]  # it trained
    task = load_data("digits")
    exported = load_plain(build_model("lenet5", task, padding=2), out / "params-0.5" / "model.safetensors")
    accuracy, loss = _val_figures(exported.eval(), task)  # the artifact is the healed model
    assert accuracy == pytest.approx(healing["after"]["accuracy"], abs=1e-6)
    assert loss == pytest.approx(healing["after"]["loss"], rel=1e-4)


def test_heal_maestro_searches_the_front_of_the_healed_model(dense_run, tmp_path):
    out = tmp_path / "healed-front"
    assert cli.main(["compress", str(dense_run), *FAST, "--heal-maestro", "1", "--target", "params=0.5",
                     "--formats", "safetensors", "--no-family", "--out", str(out)]) == 0
    front = Front.load(out / "front.json")
    assert front.metadata["heal_maestro"] == 1 and front.metadata["inputs"]["heal_maestro"] == 1
    summary = json.loads((dense_run / "summary.json").read_text())
    assert front.points[0].val_loss != pytest.approx(summary["final_loss"], rel=1e-6)  # full rank, but trained on
    healing = json.loads((out / "params-0.5" / "point.json").read_text())["healing"]["front"]
    point = front.select(params=0.5)
    assert healing["epochs"] == 1 and healing["after"]["loss"] == pytest.approx(point.val_loss)
    assert healing["before"]["loss"] != pytest.approx(healing["after"]["loss"], rel=1e-6)
    # the same ranks cut from the unhealed model give the "before" figures
    plain = tmp_path / "plain"
    assert cli.main(["compress", str(dense_run), *FAST, "--target", "params=0.5", "--formats", "safetensors",
                     "--no-family", "--out", str(plain)]) == 0
    unhealed = Front.load(plain / "front.json")
    same = next((p for p in unhealed.points if p.ranks == point.ranks), None)
    if same is not None:
        assert healing["before"]["loss"] == pytest.approx(same.val_loss, rel=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--heal", "0"], "--heal 0 must be a whole number of epochs from 1"),
    (["--heal-maestro", "-2"], "--heal-maestro -2 must be a whole number of epochs from 1"),
    (["--heal", "1", "--model-factory", "m:f", "--weights", "w.safetensors", "--data", "digits", "--no-run"],
     "--heal and --heal-maestro train with a run's recipe"),
])
def test_bad_healing_options_one_line(dense_run, tmp_path, capsys, args, message):
    run = [] if "--no-run" in args else [str(dense_run)]
    code = cli.main(["compress", *run, *[a for a in args if a != "--no-run"], *FAST, "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    assert not (tmp_path / "o").exists()
