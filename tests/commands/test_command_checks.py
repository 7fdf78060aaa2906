"""Every command checks what it reads and what it is asked before it computes or writes anything:
bad input ends in one line and exit code 2, Ctrl-C in one line and 130, and nothing the user had
changes."""

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from maestro_lod import cli
from maestro_lod.deploy import compress as deploy_compress
from maestro_lod.runs import loading
from maestro_lod.runs.directory import LOCK_FILE

TINY = ["--model", "mlp", "--data", "digits", "--batch-size", "256", "--bn-recal-batches", "0", "--quiet"]
FAST_COMPRESS = ["--formats", "safetensors", "--no-family", "--calibration-size", "64", "--latency-batch", "4",
                 "--step", "0.5", "--quiet"]


def one_line(capsys, code: int, expected_code: int = 2) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if not line.startswith("maestro-lod: warning:")]
    assert code == expected_code and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
            and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def run(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def _edit_checkpoint(run: Path, value: float) -> None:
    path = run / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    tensors = load_file(path)
    name = next(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[name].view(-1)[0] = value
    save_file(tensors, path, metadata=metadata)


def _json_edit(name: str, change):
    def edit(run: Path) -> None:
        data = json.loads((run / name).read_text())
        change(data)
        (run / name).write_text(json.dumps(data))
    return edit


# ------------------------------------------------------------------------------------------ compress
COMPRESS_CASES = [
    ("nan-checkpoint", lambda run: _edit_checkpoint(run, float("nan")), [], "NaN or infinite"),
    ("flipped-bit", lambda run: _edit_checkpoint(run, 3e38), [], "a corrupted checkpoint"),
    ("config-not-utf8", lambda run: (run / "config.json").write_bytes(b"\xff\xfe{"), [], "not valid UTF-8 JSON"),
    ("config-deep", lambda run: (run / "config.json").write_text("[" * 100_000 + "]" * 100_000), [],
     "nested too deeply"),
    ("summary-malformed", lambda run: (run / "summary.json").write_text("{bad"), [], "not valid UTF-8 JSON"),
    ("summary-list", lambda run: (run / "summary.json").write_text("[1, 2]"), [], "holds a JSON list"),
    ("reference-list", _json_edit("summary.json", lambda d: d.update(dense_reference=[1])), [],
     "dense_reference is a JSON list"),
    ("reference-accuracy", _json_edit("summary.json", lambda d: d.update(dense_reference={"accuracy": "high"})), [],
     "not a fraction"),
    ("config-bad-value", _json_edit("config.json", lambda d: d.update(epochs="many")), [], "run config"),
    ("out-a-file", lambda run: (run.parent / "afile").write_text("mine"), ["--out", "{tmp}/afile"],
     "exists and is not a directory"),
    ("out-under-a-file", lambda run: (run.parent / "afile").write_text("mine"), ["--out", "{tmp}/afile/x"],
     "is a file, not a directory"),
    ("out-empty", lambda run: None, ["--out", ""], "--out is empty"),
    ("out-dangling-link", lambda run: os.symlink(run.parent / "nowhere", run.parent / "link"),
     ["--out", "{tmp}/link"], "exists and is not a directory"),
    ("latency-batch-huge", lambda run: None, ["--latency-batch", "99999999999999"], "--latency-batch"),
    ("target-folder-is-a-file", lambda run: (run / "macs-0.5").write_text("mine"), ["--force"], "are not folders"),
]


@pytest.mark.parametrize("edit, extra, message", [c[1:] for c in COMPRESS_CASES], ids=[c[0] for c in COMPRESS_CASES])
def test_compress_refuses_bad_runs_and_outputs_before_writing(edit, extra, message, run, tmp_path, capsys):
    edit(run)
    before = snapshot(tmp_path)
    extra = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    line = one_line(capsys, cli.main(["compress", str(run), "--target", "macs=0.5", *FAST_COMPRESS, *extra]))
    assert message in line, line
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.rglob("*.tmp"))


def test_compress_says_when_the_run_is_unfinished_and_writes_each_target_once_and_whole(run, capsys, monkeypatch):
    (run / "summary.json").unlink()
    (run / ".macs-0.5.stale.tmp").mkdir()  # left by a killed compress
    writes = []
    original = deploy_compress.write_files

    def counted(directory, files):
        writes.append(Path(directory).name)
        assert Path(directory).name.startswith(".macs-0.5.")  # filled under a temporary name
        return original(directory, files)

    monkeypatch.setattr(deploy_compress, "write_files", counted)
    code = cli.main(["compress", str(run), "--target", "macs=0.5", "--target", "macs=0.50", *FAST_COMPRESS])
    out = capsys.readouterr().out
    assert code == 0 and "has no summary.json: its training has not finished" in out
    assert len(writes) == 1 and (run / "macs-0.5" / "point.json").is_file()
    assert not list(run.glob(".*.tmp")) and not (run / LOCK_FILE).exists()


def test_a_failing_export_leaves_no_folder_and_no_temporary(run, capsys, monkeypatch):
    def broken(directory, files):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(deploy_compress, "write_files", broken)
    line = one_line(capsys, cli.main(["compress", str(run), "--target", "macs=0.5", *FAST_COMPRESS]))
    assert "No space left on device" in line
    assert not (run / "macs-0.5").exists() and not list(run.glob(".*.tmp")) and not (run / "front.json").exists()


def test_ctrl_c_in_compress_is_one_line_and_130(run, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(deploy_compress, "measure_latency", interrupt)
    line = one_line(capsys, cli.main(["compress", str(run), "--target", "macs=0.5", *FAST_COMPRESS]), 130)
    assert "interrupted" in line and not (run / LOCK_FILE).exists()


def test_a_ctrl_c_wrapped_in_a_runtime_error_is_still_an_interruption(run, capsys, monkeypatch):
    def wrapped(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("while exporting with ExportDynamoConfig") from exc

    monkeypatch.setattr(deploy_compress, "measure_latency", wrapped)
    assert "interrupted" in one_line(capsys, cli.main(["compress", str(run), *FAST_COMPRESS]), 130)


def test_ctrl_c_is_held_until_the_latency_table_ends():
    import signal

    # Python's own handler, also where this process was started with SIGINT ignored (a background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with deploy_compress.deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)  # held, not raised inside the block
                finished = True
        assert finished and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------------- trust
def test_reading_a_run_never_downloads_nor_follows_its_data_root_unless_asked(tmp_path, monkeypatch):
    run = tmp_path / "theirs"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(run), "--data-root", "/somewhere/else",
                     "--download"]) == 0
    calls = []
    real = loading.load_data

    def spy(name, **options):
        calls.append(options)
        return real(name, **options)

    monkeypatch.setattr(loading, "load_data", spy)
    loading.load_run(run)
    assert calls[-1]["download"] is False and calls[-1]["root"] == "/somewhere/else"
    loading.load_run(run, data_root="/mine", download=True)
    assert calls[-1]["download"] is True and calls[-1]["root"] == "/mine"


def test_resume_does_not_download_unless_the_command_line_says_so(tmp_path, monkeypatch):
    from maestro_lod.runs.directory import RunDirectory

    original = RunDirectory.on_epoch_end

    def stop(self, trainer, record):
        original(self, trainer, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDirectory, "on_epoch_end", stop)
    out, planted = tmp_path / "run", tmp_path / "planted"
    assert cli.main(["train", *TINY, "--epochs", "2", "--out", str(out), "--data-root", str(planted),
                     "--download"]) == 130
    monkeypatch.setattr(RunDirectory, "on_epoch_end", original)
    calls = []
    real = loading.load_data
    monkeypatch.setattr(loading, "load_data", lambda name, **o: calls.append(o) or real(name, **o))
    assert cli.main(["train", "--resume", str(out), "--quiet"]) == 0
    assert calls and all(call["download"] is False for call in calls)
    assert json.loads((out / "config.json").read_text())["download"] is True  # the record is the run's


# ------------------------------------------------------------------------------------------- bench
BENCH_CASES = [
    (["--tasks", ""], "--tasks is empty"),
    (["--tasks", ","], "--tasks is empty"),
    (["--methods", ","], "--methods is empty"),
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", "99999999999999999999"], "--seeds"),
    (["--repeats", "0"], "--repeats"),
    (["--epochs", "0"], "--epochs"),
    (["--methods", "dense,dense"], "lists dense more than once"),
    (["--tasks", "mlp-digits,mlp-digits"], "lists mlp-digits more than once"),
    (["--out", "{tmp}/results.json"], "exists and is not a directory"),
    (["--out", ""], "--out is empty"),
]


@pytest.mark.parametrize("args, message", BENCH_CASES, ids=[" ".join(a) or "empty" for a, _ in BENCH_CASES])
def test_bench_refuses_bad_arguments_before_touching_anything(args, message, tmp_path, capsys, monkeypatch):
    from maestro_lod.bench import run as bench_run

    monkeypatch.setattr(bench_run, "train_cell", lambda *a, **k: pytest.fail("a cell was trained"))
    (tmp_path / "results.json").write_text('{"mine": 1}')
    (tmp_path / "results.md").write_text("my table")
    before = snapshot(tmp_path)
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    out = [] if any(a.startswith("--out") for a in args) else ["--out", str(tmp_path)]
    line = one_line(capsys, cli.main(["bench", "--suite", "quick", *out, *args]))
    assert message in line, line
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------- train
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_dist_timeout_must_be_a_positive_finite_number(value, tmp_path, capsys):
    line = one_line(capsys, cli.main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "r"),
                                      f"--dist-timeout={value}"]))
    assert "--dist-timeout" in line and not (tmp_path / "r").exists()


def test_the_library_refuses_bad_timeouts_with_or_without_torchrun():
    from maestro_lod.errors import ConfigError
    from maestro_lod.training.distributed import DataParallel, Distributed

    for bad in (-1, 0, float("nan"), float("inf")):
        with pytest.raises(ConfigError):
            Distributed.from_env("cpu", bad)
        with pytest.raises(ValueError):
            DataParallel(2, 0, timeout_s=bad)
    with pytest.raises(TypeError):
        Distributed.from_env("cpu", "300")


@pytest.mark.parametrize("flag", ["--out", "--resume"])
def test_an_empty_directory_argument_is_refused(flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*TINY, "--epochs", "1", flag, ""] if flag == "--out" else [flag, ""]
    assert "is empty" in one_line(capsys, cli.main(["train", *args]))
    assert not list(tmp_path.iterdir())


def test_options_that_do_nothing_warn_in_one_line_each(tmp_path, capsys):
    code = cli.main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "r"), "--method", "dense",
                     "--warmup-epochs", "1", "--min-rank", "4", "--data-root", str(tmp_path), "--schedule", "constant",
                     "--gamma", "0.5",
                     "--betas", "0.9,0.99"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("maestro-lod: warning:")]
    assert code == 0
    joined = "\n".join(warnings)
    for flag in ("--warmup-epochs", "--min-rank", "--data-root", "--gamma", "--betas"):
        assert f"{flag} does nothing" in joined, joined
    assert len(warnings) == 5


def test_the_librarys_own_warnings_are_one_line_on_the_command_line(tmp_path, capsys):
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "r"), "--min-rank", "999"]) == 0
    err = capsys.readouterr().err
    assert "maestro-lod: warning: min_rank=999 exceeds the full rank of every factorised layer" in err
    assert len(err.strip().splitlines()) == 1


def test_the_stored_dense_figure_is_labelled_as_one(monkeypatch):
    from maestro_lod.runs.report import result_table

    summary = {"method": "maestro", "final_accuracy": 0.9, "dense_params": 10, "params": 5, "dense_macs": 10,
               "macs": 5, "exported_params": 5, "exported_macs": 5, "train_time": 1.0, "initial_ranks": {}}
    stored = {"accuracy": 0.965, "source": "stored figure: measured by benchmarks/x.py", "origin": "benchmarks/x.py"}
    table = result_table(summary, stored)
    assert "stored dense reference (benchmarks/x.py)" in table.splitlines()[0]
    assert "not a run made now" in table
    assert "dense run (this command)" in result_table(summary, {"accuracy": 0.9, "source": "dense run with the "
                                                                  "same recipe and seed (this command)"})


# -------------------------------------------------------------------------------------- plots, demo
def test_plots_skip_ranks_for_dense_runs_and_mark_single_epochs(tmp_path):
    from maestro_lod.runs.plots import write_plots

    record = {"epoch": 1, "train_loss": 1.0, "train_loss_full": 1.0, "val_loss": 1.0, "train_accuracy": 0.5,
              "val_accuracy": 0.5, "params": 10, "macs": 10, "total_rank": 0, "ranks": {}}
    assert [p.name for p in write_plots([record], 10, 10, tmp_path)] == ["curves.png", "cost.png"]
    many = {f"layer{i}": 8 for i in range(13)}
    paths = write_plots([{**record, "ranks": many, "total_rank": 104}], 10, 10, tmp_path)
    assert [p.name for p in paths] == ["ranks.png", "curves.png", "cost.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_progress_bars_are_off_when_stderr_is_not_a_terminal(capsys):
    from maestro_lod.runs.progress import Progress, is_terminal

    assert not is_terminal(open(os.devnull, "w"))
    progress = Progress(bars=True)

    class Trainer:
        train_loader = [0] * 3
        config = type("C", (), {"epochs": 1})

    progress.on_epoch_start(Trainer(), 1)
    assert progress._bar is None


def test_demo_writes_under_runs_by_default(tmp_path, monkeypatch, capsys):
    from maestro_lod.commands import demo

    written = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "run_experiment", lambda problem, settings: None)
    monkeypatch.setattr(demo, "report", lambda result: "")
    monkeypatch.setattr(demo, "save_figure", lambda results, out: written.append(out))
    assert cli.main(["demo", "pca"]) == 0
    assert written == [Path("runs/demo-pca-seed0.png")] and (tmp_path / "runs").is_dir()
    out = capsys.readouterr().out
    assert "u_b∠p_b°" in out and "gap" in out.split("columns")[1]
    assert "is empty" in one_line(capsys, cli.main(["demo", "pca", "--out", ""]))
