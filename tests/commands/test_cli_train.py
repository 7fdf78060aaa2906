"""``maestro-lod train``: the files a run writes, the config layering, resume, and every error path
(one line on stderr, exit code 2, no traceback). Runs use LeNet-5 on the 8×8 ``digits`` set for speed."""

import json

import pytest
import torch
from safetensors import safe_open

from maestro_lod import cli
from maestro_lod.models import MODELS
from maestro_lod.models.vision import LeNet5
from maestro_lod.training import load_checkpoint
from maestro_lod.runs.directory import RunDirectory

FAST = ["--data", "digits", "--model-option", "padding=2", "--batch-size", "128", "--quiet"]
TIME_KEYS = ("train_time", "epoch_time")


def train(*args: str) -> int:
    return cli.main(["train", *args])


def one_line_error(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maestro-lod: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_run_writes_every_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*FAST, "--epochs", "2", "--lambda-gl", "5e-3", "--eps-ps", "0.1", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "rank before" in printed and "validation accuracy" in printed and "total" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == "digits" and config["model_options"] == {"padding": 2} and config["lambda_gl"] == 5e-3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train_loss", "val_accuracy", "ranks", "params", "macs", "epoch_time"} <= set(records[0])
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["final_ranks"] == records[-1]["ranks"] and summary["dense_params"] > 0
    # export merges the layers whose factor pair is dearer than the dense weight: never dearer than either
    assert summary["exported_params"] <= min(summary["params"], summary["dense_params"])
    assert summary["exported_macs"] <= summary["macs"]
    assert "exported MACs per sample" in printed
    assert summary["initial_ranks"] == {"conv1": 6, "conv2": 16, "fc1": 64, "fc2": 84, "fc3": 10}
    for name in ("ranks.png", "curves.png", "cost.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as file:
        assert "model.fc1.up" in file.keys()
    state = load_checkpoint(out / "checkpoint.safetensors")
    assert state["epoch"] == 2 and state["rank_pattern"] == records[-1]["ranks"]


def test_config_file_then_flags_override(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('epochs = 3\nlr = 0.03\nmethod = "dense"\n[model_options]\npadding = 2\n')
    out = tmp_path / "run"
    assert train("--config", str(config), "--data", "digits", "--epochs", "1", "--quiet", "--out", str(out)) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 0.03 and saved["method"] == "dense"
    assert "dense model" in capsys.readouterr().out


def test_preset_is_overridden_by_flags(tmp_path):
    out = tmp_path / "run"
    assert train("--preset", "lenet5-mnist5k", *FAST, "--epochs", "1", "--method", "dense", "--out", str(out)) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 0.01 and saved["data"] == "digits"


def test_finished_run_is_refused_unless_forced(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*FAST, "--epochs", "1", "--method", "dense", "--out", str(out)) == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert "holds a finished run" in one_line_error(capsys, train(*FAST, "--epochs", "1", "--out", str(out)))
    assert train(*FAST, "--epochs", "1", "--out", str(out), "--force") == 0
    assert json.loads((out / "summary.json").read_text())["method"] == "maestro"
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_continues_exactly(tmp_path, monkeypatch, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = [*FAST, "--epochs", "3", "--lambda-gl", "5e-3", "--eps-ps", "0.1"]
    assert train(*args, "--out", str(full)) == 0

    original = RunDirectory.on_epoch_end

    def interrupt_after_two(self, trainer, record):
        original(self, trainer, record)
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDirectory, "on_epoch_end", interrupt_after_two)
    assert train(*args, "--out", str(cut)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert "unfinished run" in one_line_error(capsys, train(*args, "--out", str(cut)))
    assert train("--resume", str(cut), "--quiet") == 0

    expected, actual = load_checkpoint(full / "checkpoint.safetensors"), load_checkpoint(cut / "checkpoint.safetensors")
    assert expected["model"].keys() == actual["model"].keys()
    assert all(torch.equal(expected["model"][k], actual["model"][k]) for k in expected["model"])
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS}  # noqa: E731
                          for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert strip(cut) == strip(full) and len(strip(full)) == 3
    assert "already finished" in one_line_error(capsys, train("--resume", str(cut)))


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    class NanLater(LeNet5):
        """LeNet-5 whose logits turn NaN from the 60th training forward pass: with 12 steps of two passes
        per epoch, that is the sampled pass of epoch 3, step 6."""

        calls = 0

        def forward(self, x):
            out = super().forward(x)
            if self.training:
                NanLater.calls += 1
                if NanLater.calls >= 60:
                    return out * float("nan")
            return out

    monkeypatch.setitem(MODELS, "nan-later", lambda data: NanLater(1, 8, 8, 10, padding=2))
    out = tmp_path / "run"
    code = train("--model", "nan-later", "--data", "digits", "--batch-size", "128", "--quiet", "--epochs", "3",
                 "--reuse-prefix", "off",
                 "--bn-recal-batches", "0", "--out", str(out))
    line = one_line_error(capsys, code)
    assert "loss is nan at epoch 3, step 6" in line and "last good checkpoint (epoch 2)" in line
    assert load_checkpoint(out / "checkpoint.safetensors")["epoch"] == 2
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "alexnet"], "unknown model 'alexnet'; available: "),
    (["--data", "imagenet"], "unknown dataset 'imagenet'; available: "),
    (["--preset", "gpt5"], "unknown preset 'gpt5'"),
    (["--lr", "-1"], "lr=-1.0 must be a number > 0"),
    (["--model-option", "depth=3"], "has no option(s) depth"),
    (["--method", "dense", "--amp"], "amp=true needs a CUDA device"),
    (["--config", "/nonexistent/run.toml"], "cannot read config file '/nonexistent/run.toml'"),
    (["--sampled-batch", "0"], "sampled_batch=0.0 must be a number in (0, 1]"),
    (["--sampled-batch", "0.5", "--reuse-prefix", "on"], "sampled_batch=0.5 cannot reuse the full pass's prefix"),
    (["--sampled-weight", "0"], "sampled_weight=0.0 must be a number > 0"),
    (["--sampled-weight", "0.5", "--no-full-pass"], "sampled_weight=0.5 weighs the sampled pass against the full"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    line = one_line_error(capsys, train(*FAST, "--epochs", "1", "--out", str(tmp_path / "run"), *args))
    assert message in line


def test_bad_config_files(tmp_path, capsys):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("epochs = 1\nlearning_rate = 0.1\n")
    assert "unknown option(s) learning_rate" in one_line_error(capsys, train("--config", str(unknown)))
    broken = tmp_path / "broken.toml"
    broken.write_text("[factorize\n")
    assert "is not valid TOML" in one_line_error(capsys, train("--config", str(broken)))


def test_resume_errors(tmp_path, capsys):
    assert "no config.json" in one_line_error(capsys, train("--resume", str(tmp_path / "nothing")))
    assert "drop lr" in one_line_error(capsys, train("--resume", str(tmp_path), "--lr", "0.1"))


def test_unknown_flag_or_bad_value_is_one_line_exit_2(capsys):
    assert "unrecognized arguments: --learning-rate" in one_line_error(capsys, train("--learning-rate", "0.1"))
    assert "invalid int value: 'abc'" in one_line_error(capsys, train("--epochs", "abc"))
    assert "invalid choice: 'nope'" in one_line_error(capsys, cli.main(["nope"]))


def test_dense_reference_run_fills_the_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*FAST, "--epochs", "1", "--reference", "run", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "dense run with the same recipe and seed" in printed
    reference = json.loads((out / "summary.json").read_text())["dense_reference"]
    assert 0.0 <= reference["accuracy"] <= 1.0 and reference["train_time"] > 0


def test_default_run_uses_the_stored_dense_reference(monkeypatch, capsys):
    """The no-argument command is the 30-epoch benchmark recipe (too slow for a unit test): check that it
    resolves to LeNet-5 / mnist5k with MAESTRO and that the stored dense figure applies to it."""
    from maestro_lod.commands import train as command
    from maestro_lod.runs import report

    args = cli.build_parser().parse_args(["train"])
    config = command.build_config(args)
    assert (config.model, config.data, config.method, config.epochs) == ("lenet5", "mnist5k", "maestro", 30)
    reference = report.dense_reference(config, None, quiet=True)
    assert 0.9 < reference["accuracy"] < 1.0 and reference["source"].startswith("stored figure")


def test_keep_ends_trains_the_stem_and_the_classifier_dense(tmp_path):
    out = tmp_path / "run"
    assert train(*FAST, "--epochs", "1", "--keep-ends", "--out", str(out)) == 0
    assert json.loads((out / "config.json").read_text())["factorize"]["keep_ends"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert summary["initial_ranks"] == {"conv2": 16, "fc1": 64, "fc2": 84}
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as file:
        assert {"model.conv1.weight", "model.fc3.weight", "model.fc1.up"} <= set(file.keys())
