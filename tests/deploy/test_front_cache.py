"""A second ``maestro-lod compress`` into the same place adds its targets to the cached front:
no latency table, search or evaluation when ``front.json`` was computed from the same checkpoint
and options and answers the new targets; a front of other inputs is refused, naming what
differs; ``--force`` recomputes. Runs: a one-epoch LeNet-5 on the 8×8 ``digits`` set."""

import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from maestro_lod import cli
from maestro_lod.deploy import Front
from maestro_lod.deploy import compress as deploy_compress

FAST = ["--data", "digits", "--model-option", "padding=2", "--batch-size", "128", "--quiet"]
COMPRESS = ["--calibration-size", "256", "--latency-batch", "4", "--formats", "safetensors", "--quiet"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A one-epoch LeNet-5 run on digits, compressed once for macs=0.8 (a front stopped there)."""
    run = tmp_path_factory.mktemp("cache") / "run"
    assert cli.main(["train", *FAST, "--epochs", "1", "--out", str(run)]) == 0
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.8"]) == 0
    return run


@pytest.fixture
def run(compressed, tmp_path):
    shutil.copytree(compressed, tmp_path / "run")
    return tmp_path / "run"


def _forbid(monkeypatch, *names):
    def fail(*args, **kwargs):
        raise AssertionError("the cached front should have been reused")
    for name in names:
        monkeypatch.setattr(deploy_compress, name, fail)


def _count(monkeypatch, name):
    calls = []
    original = getattr(deploy_compress, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)
    monkeypatch.setattr(deploy_compress, name, counted)
    return calls


def _marks(front_file):
    """folder → ranks of the point front.json marks as exported there."""
    marks = {}
    for point in json.loads(front_file.read_text())["points"]:
        exported = point["exported"] or {}
        for folder in exported.get("folders", [exported.get("folder")] if exported else []):
            marks[folder] = point["ranks"]
    return marks


def _files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _touch_checkpoint(run):
    path = run / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    tensors = load_file(path)
    name = next(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, path, metadata=metadata)


def test_a_new_target_is_added_to_the_cached_front_without_a_search(run, tmp_path, monkeypatch, capsys):
    earlier = _files(run / "macs-0.8")
    before = Front.load(run / "front.json")
    assert before.metadata["stops"] == {"macs": 0.8} and len(before.metadata["inputs"]["checkpoint_sha256"]) == 64
    _forbid(monkeypatch, "greedy_front", "measure_latency", "evaluate_front")
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.9"]) == 0
    assert "reusing the front" in capsys.readouterr().out
    assert _files(run / "macs-0.8") == earlier  # the earlier target's folder stays as it was
    front = Front.load(run / "front.json")
    assert front.metadata["targets"] == [["macs", 0.8], ["macs", 0.9]]
    assert [p.ranks for p in front.points] == [p.ranks for p in before.points]
    marks = _marks(run / "front.json")
    assert set(marks) == {"macs-0.8", "macs-0.9"}
    record = json.loads((run / "macs-0.9" / "point.json").read_text())
    assert record["point"]["exported"]["folder"] == "macs-0.9" and record["point"]["ranks"] == marks["macs-0.9"]
    monkeypatch.undo()
    # what one compress given both targets chooses
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.8", "--target", "macs=0.9",
                     "--out", str(tmp_path / "both")]) == 0
    assert _marks(tmp_path / "both" / "front.json") == marks
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.9"]) == 2  # its folder exists
    assert "macs-0.9 already exist" in capsys.readouterr().err


def test_a_target_beyond_the_stopped_front_searches_again_with_the_cached_latency_table(run, monkeypatch, capsys):
    before = Front.load(run / "front.json")
    assert not any(before._meets(p, "macs", 0.5) for p in before.points)
    _forbid(monkeypatch, "measure_latency")
    searches = _count(monkeypatch, "greedy_front")
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.5"]) == 0
    out = capsys.readouterr().out
    assert searches == ["greedy_front"] and "stops before macs=0.5: searching again" in out
    assert "latency table: reused" in out
    front = Front.load(run / "front.json")
    assert [p.ranks for p in front.points[:len(before.points)]] == [p.ranks for p in before.points]
    assert front.latency_table == before.latency_table and front.metadata["stops"] == {"macs": 0.5}
    marks = _marks(run / "front.json")
    assert set(marks) == {"macs-0.8", "macs-0.5"}
    assert marks["macs-0.8"] == _marks_of(before)["macs-0.8"]  # the earlier target keeps its point


def _marks_of(front):
    return {p.exported["folder"]: p.ranks for p in front.points if p.exported}


def test_remeasure_latency_measures_the_table_again(run, monkeypatch):
    measures = _count(monkeypatch, "measure_latency")
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.9", "--remeasure-latency"]) == 0
    assert measures == ["measure_latency"]
    assert set(_marks(run / "front.json")) == {"macs-0.8", "macs-0.9"}


def test_a_changed_checkpoint_is_refused_naming_it_and_force_recomputes(run, monkeypatch, capsys):
    _touch_checkpoint(run)
    before = _files(run)
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.9"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "computed from another checkpoint (sha256 " in lines[0] and "--force" in lines[0]
    assert _files(run) == before
    searches, measures = _count(monkeypatch, "greedy_front"), _count(monkeypatch, "measure_latency")
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.9", "--force"]) == 0
    assert searches == ["greedy_front"] and measures == ["measure_latency"]  # another checkpoint: measured anew
    assert "macs-0.8 (exported with the earlier front) stay" in capsys.readouterr().out
    front = Front.load(run / "front.json")
    assert front.metadata["inputs"]["checkpoint_sha256"] == deploy_compress.file_sha256(run / "checkpoint.safetensors")
    assert front.metadata["targets"] == [["macs", 0.9]] and set(_marks(run / "front.json")) == {"macs-0.9"}


@pytest.mark.parametrize("args, named", [
    (["--step", "0.5"], "step (0.25, now 0.5)"),
    (["--calibration-size", "128"], "calibration size (256, now 128)"),
    (["--search", "exhaustive"], "search (lazy, now exhaustive)"),
    (["--order", "trained"], "order (svd, now trained)"),
    (["--cost", "params"], "cost (macs, now params)"),
])
def test_other_options_are_refused_naming_them(run, capsys, args, named):
    before = _files(run)
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.9", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "--force" in lines[0], lines
    assert _files(run) == before


def test_a_front_without_recorded_inputs_is_refused(run, capsys):
    data = json.loads((run / "front.json").read_text())
    del data["metadata"]["inputs"]
    (run / "front.json").write_text(json.dumps(data))
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.9"]) == 2
    assert "does not record what it was computed from" in capsys.readouterr().err


def test_a_removed_earlier_folder_is_no_longer_marked(run, monkeypatch, capsys):
    shutil.rmtree(run / "macs-0.8")
    _forbid(monkeypatch, "greedy_front", "measure_latency")
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.9"]) == 0
    assert "macs-0.8 (exported before) no longer exist" in capsys.readouterr().out
    assert set(_marks(run / "front.json")) == {"macs-0.9"}
    assert Front.load(run / "front.json").metadata["targets"] == [["macs", 0.9]]


def test_a_model_of_ones_own_adds_targets_too(tmp_path, monkeypatch, capsys):
    import torch
    from torch import nn

    (tmp_path / "cachemodels.py").write_text("from torch import nn\n\ndef build():\n    return nn.Sequential("
                                             "nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n")
    torch.manual_seed(0)
    save_file(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).state_dict(),
              str(tmp_path / "weights.safetensors"))
    own = ["--model-factory", f"{tmp_path / 'cachemodels.py'}:build",
           "--weights", str(tmp_path / "weights.safetensors"), "--data", "digits", "--out", str(tmp_path / "out"), *COMPRESS]
    assert cli.main(["compress", *own, "--target", "params=0.5"]) == 0
    _forbid(monkeypatch, "greedy_front", "measure_latency")
    assert cli.main(["compress", *own, "--target", "params=0.6"]) == 0
    assert set(_marks(tmp_path / "out" / "front.json")) == {"params-0.5", "params-0.6"}
    assert cli.main(["compress", *own, "--target", "params=0.7", "--seed", "1"]) == 2
    assert "seed (0, now 1)" in capsys.readouterr().err


def test_force_with_the_same_inputs_searches_again_with_the_cached_latency_table(run, monkeypatch, capsys):
    _forbid(monkeypatch, "measure_latency")
    searches = _count(monkeypatch, "greedy_front")
    assert cli.main(["compress", str(run), *COMPRESS, "--target", "macs=0.8", "--force"]) == 0
    assert searches == ["greedy_front"] and "latency table: reused" in capsys.readouterr().out
    assert set(_marks(run / "front.json")) == {"macs-0.8"}
