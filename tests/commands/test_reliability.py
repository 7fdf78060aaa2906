"""Hostile input to ``maestro-lod train``: every bad flag, config file, run directory or checkpoint ends
in one line on stderr with exit code 2 — never a traceback — and leaves every file that was there
byte for byte as it was."""

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from maestro_lod import cli, files
from maestro_lod.training import load_checkpoint, save_checkpoint
from maestro_lod.runs.directory import RunDirectory

TINY = ["--model", "mlp", "--data", "digits", "--batch-size", "256", "--bn-recal-batches", "0", "--quiet"]
DEEP = 5000
"""A nesting depth far beyond any real config, deep enough to exhaust Python's recursion limit."""


def train(*args: str) -> int:
    return cli.main(["train", *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished one-epoch run and a run interrupted after epoch 1 of 2, made once for the module."""
    root = tmp_path_factory.mktemp("runs")
    assert train(*TINY, "--epochs", "1", "--out", str(root / "finished")) == 0
    original = RunDirectory.on_epoch_end

    def interrupt(self, trainer, record):
        original(self, trainer, record)
        raise KeyboardInterrupt

    RunDirectory.on_epoch_end = interrupt
    try:
        train(*TINY, "--epochs", "2", "--out", str(root / "unfinished"))
    except KeyboardInterrupt:
        pass
    finally:
        RunDirectory.on_epoch_end = original
    assert (root / "unfinished" / "checkpoint.safetensors").is_file()
    return {"finished": root / "finished", "unfinished": root / "unfinished"}


# ---------------------------------------------------------------------------------------- set-ups
# Each takes (tmp, runs, monkeypatch) and prepares the directory a case runs in.
def nothing(tmp, runs, monkeypatch):
    """An empty directory."""


def finished(tmp, runs, monkeypatch):
    shutil.copytree(runs["finished"], tmp / "run")


def unfinished(tmp, runs, monkeypatch):
    shutil.copytree(runs["unfinished"], tmp / "run")


def foreign(tmp, runs, monkeypatch):
    (tmp / "run").mkdir()
    (tmp / "run" / "config.json").write_text('{"my": "own settings"}\n')
    (tmp / "run" / "metrics.jsonl").write_text("my own measurements\n")


def config_file(text: str):
    def setup(tmp, runs, monkeypatch):
        (tmp / "c.toml").write_bytes(text.encode() if isinstance(text, str) else text)
    return setup


def edited_config(change):
    """An unfinished run whose config.json was edited by hand."""
    def setup(tmp, runs, monkeypatch):
        unfinished(tmp, runs, monkeypatch)
        path = tmp / "run" / "config.json"
        text = change(path.read_text())
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def set_key(key, value):
    def change(text):
        data = json.loads(text)
        data[key] = value
        return json.dumps(data)
    return change


def bad_checkpoint(mutate):
    """An unfinished run whose checkpoint is a valid file with ``mutate(state)`` applied inside."""
    def setup(tmp, runs, monkeypatch):
        unfinished(tmp, runs, monkeypatch)
        path = tmp / "run" / "checkpoint.safetensors"
        state = load_checkpoint(path)
        state = mutate(state) or state
        save_checkpoint(path, state)
    return setup


def raw_checkpoint(data: bytes):
    def setup(tmp, runs, monkeypatch):
        unfinished(tmp, runs, monkeypatch)
        (tmp / "run" / "checkpoint.safetensors").write_bytes(data)
    return setup


def bigger_factor(state):
    up = state["model"]["1.up"]
    state["model"]["1.up"] = torch.zeros(up.shape[0], 200)
    state["model"]["1.down"] = torch.zeros(200, state["model"]["1.down"].shape[1])


def ranks_disagree(state):
    down = state["model"]["1.down"]
    state["model"]["1.down"] = down[: down.shape[0] - 3]


def other_model(state):
    state["model"] = {"conv1.weight": torch.zeros(6, 1, 5, 5), "fc.bias": torch.zeros(10)}


def missing_tensor(state):
    del state["model"]["3.up"]


def optimizer_shape(state):
    first = next(iter(state["optimizer"]["state"]))
    state["optimizer"]["state"][first]["momentum_buffer"] = torch.zeros(3, 3)


def rng_shape(state):
    state["rng"]["torch"] = torch.zeros(7, dtype=torch.uint8)


def missing_key(key):
    def mutate(state):
        del state[key]
    return mutate


def set_field(key, value):
    def mutate(state):
        state[key] = value
    return mutate


def deep_checkpoint(tmp, runs, monkeypatch):
    unfinished(tmp, runs, monkeypatch)
    metadata = {"maestro_lod": "[" * DEEP + "]" * DEEP}
    from safetensors.torch import save
    (tmp / "run" / "checkpoint.safetensors").write_bytes(save({"x": torch.zeros(1)}, metadata=metadata))


HELD: list[int] = []
"""File descriptors of locks a case holds while the command runs (closed after it)."""


def live_lock(tmp, runs, monkeypatch):
    """An unfinished run that another process is training right now: its lock is held (an flock on
    its own open file conflicts with the command's even within this process)."""
    unfinished(tmp, runs, monkeypatch)
    handle = os.open(tmp / "run" / ".maestro-lod.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(handle, b"4242\n")
    HELD.append(handle)


def symlink(tmp, runs, monkeypatch):
    (tmp / "link").symlink_to(tmp / "nowhere" / "at-all")


def regular_file(tmp, runs, monkeypatch):
    (tmp / "file").write_text("a file, not a directory\n")


def fail_writes(code: int, name: str = ""):
    """Every atomic write (of files whose name contains ``name``) fails with ``OSError(code)``: a full disk, a read-only file system."""
    def setup(tmp, runs, monkeypatch):
        unfinished(tmp, runs, monkeypatch)
        original = files.os.fdopen

        def fdopen(handle, *args, **kwargs):
            target = os.readlink(f"/proc/self/fd/{handle}")
            file = original(handle, *args, **kwargs)
            if name in os.path.basename(target):
                def write(data):
                    raise OSError(code, os.strerror(code))
                file.write = write
            return file

        monkeypatch.setattr(files.os, "fdopen", fdopen)
    return setup


def fail_mkdir(code: int):
    def setup(tmp, runs, monkeypatch):
        def mkdir(*args, **kwargs):
            raise OSError(code, os.strerror(code), str(args[0]) if args else "")
        monkeypatch.setattr(os, "mkdir", mkdir)
    return setup


NEST = "[" * DEEP + "]" * DEEP
R = "{tmp}/run"
CASES = [
    # --- run directories: never lose a run, never touch a user's file
    ("finished-run", finished, [*TINY, "--epochs", "1", "--out", R], "finished run"),
    ("unfinished-run", unfinished, [*TINY, "--epochs", "1", "--out", R], "--resume"),
    pytest.param("force-bad-device", finished, [*TINY, "--epochs", "1", "--out", R, "--force", "--device", "cuda"],
                 "cuda", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    ("force-bad-model-option", finished, [*TINY, "--out", R, "--force", "--model-option", "hidden_sizes=[0]"],
     "hidden_sizes"),
    ("force-model-data-mismatch", finished, ["--model", "char-lm", "--data", "digits", "--out", R, "--force"],
     "char-lm"),
    ("force-huge-model", finished, [*TINY, "--out", R, "--force", "--model-option", "hidden_sizes=[100000000]"],
     "parameters"),
    ("force-foreign-files", foreign, [*TINY, "--epochs", "1", "--out", R, "--force"], "not written by maestro-lod"),
    ("out-foreign-files", foreign, [*TINY, "--epochs", "1", "--out", R], "not written by maestro-lod"),
    ("resume-foreign-files", foreign, ["--resume", R], "not written by maestro-lod"),
    ("run-in-use", live_lock, [*TINY, "--epochs", "1", "--out", R, "--force"], "in use by process 4242"),
    ("resume-in-use", live_lock, ["--resume", R], "in use by process 4242"),
    ("resume-finished", finished, ["--resume", R], "already finished"),
    ("resume-nothing", nothing, ["--resume", R], None),
    ("resume-threads", unfinished, ["--resume", R, "--threads", "2"], "threads"),
    ("resume-num-workers", unfinished, ["--resume", R, "--num-workers", "1"], "num_workers"),
    # --- file system
    ("out-below-file", regular_file, [*TINY, "--epochs", "1", "--out", "{tmp}/file/run"], "file"),
    ("out-is-file", regular_file, [*TINY, "--epochs", "1", "--out", "{tmp}/file"], "not a directory"),
    ("out-name-too-long", nothing, [*TINY, "--epochs", "1", "--out", "{tmp}/" + "x" * 300], "too long"),
    ("out-dangling-symlink", symlink, [*TINY, "--epochs", "1", "--out", "{tmp}/link"], "link"),
    ("out-not-writable", fail_mkdir(errno.EACCES), [*TINY, "--epochs", "1", "--out", R], "ermission denied"),
    ("out-read-only-fs", fail_mkdir(errno.EROFS), [*TINY, "--epochs", "1", "--out", R], "ead-only"),
    ("disk-full-checkpoint", fail_writes(errno.ENOSPC, "checkpoint"), ["--resume", R, "--quiet"], "No space left"),
    ("disk-full-everything", fail_writes(errno.ENOSPC), ["--resume", R, "--quiet"], "No space left"),
    ("config-is-directory", nothing, ["--config", "{tmp}"], "config"),
    # --- types in config files
    ("toml-download-int", config_file("download = 1\n"), ["--config", "{tmp}/c.toml"], "download"),
    ("toml-epochs-string", config_file('epochs = "3"\n'), ["--config", "{tmp}/c.toml"], "epochs"),
    ("toml-lr-string", config_file('lr = "0.1"\n'), ["--config", "{tmp}/c.toml"], "lr"),
    ("toml-betas-string", config_file('betas = "0.9"\n'), ["--config", "{tmp}/c.toml"], "betas"),
    ("toml-milestones-mixed", config_file('milestones = [0.5, "x"]\n'), ["--config", "{tmp}/c.toml"], "milestones"),
    ("toml-threads-bool", config_file("threads = true\n"), ["--config", "{tmp}/c.toml"], "threads"),
    ("toml-data-root-int", config_file("data_root = 5\n"), ["--config", "{tmp}/c.toml"], "data_root"),
    ("toml-model-data-table", config_file("[model]\nname = 'mlp'\n"), ["--config", "{tmp}/c.toml"], "model"),
    ("toml-factorize-scalar", config_file("factorize = 3\n"), ["--config", "{tmp}/c.toml"], "factorize"),
    ("toml-model-options-scalar", config_file("model_options = 3\n"), ["--config", "{tmp}/c.toml"],
     "model_options"),
    ("toml-factorize-rank-string", config_file('[factorize]\nrank = "x"\n'), ["--config", "{tmp}/c.toml"], "rank"),
    ("toml-factorize-targets-int", config_file("[factorize]\ntarget_modules = 5\n"), ["--config", "{tmp}/c.toml"],
     "target_modules"),
    ("toml-factorize-unknown", config_file("[factorize]\nranks = 5\n"), ["--config", "{tmp}/c.toml"], "ranks"),
    ("toml-rank-pattern-string", config_file('[factorize.rank_pattern]\nfc1 = "x"\n'),
     ["--config", "{tmp}/c.toml"], "fc1"),
    ("toml-model-option-type", config_file('[model_options]\nhidden_sizes = "wide"\n'),
     ["--config", "{tmp}/c.toml", "--model", "mlp", "--data", "digits"], "hidden_sizes"),
    ("toml-not-utf8", config_file(b"lr = \xff\xfe\n"), ["--config", "{tmp}/c.toml"], "c.toml"),
    ("toml-deeply-nested", config_file(f"x = {NEST}\n"), ["--config", "{tmp}/c.toml"], "nest"),
    ("json-epochs-string", edited_config(set_key("epochs", "2")), ["--resume", R], "epochs"),
    ("json-download-int", edited_config(set_key("download", 1)), ["--resume", R], "download"),
    ("json-factorize-list", edited_config(set_key("factorize", [1])), ["--resume", R], "factorize"),
    ("json-not-a-table", edited_config(lambda text: "[1, 2]"), ["--resume", R], "config.json"),
    ("json-not-utf8", edited_config(lambda text: b"{\"epochs\": \xff}"), ["--resume", R], "config.json"),
    ("json-deeply-nested", edited_config(lambda text: NEST), ["--resume", R], "nest"),
    # --- numbers that tensors must hold, and seeds
    ("lr-overflows-float32", nothing, [*TINY, "--epochs", "1", "--out", R, "--lr", "1e300"], "lr"),
    ("lr-inf", nothing, [*TINY, "--epochs", "1", "--out", R, "--lr", "inf"], "lr"),
    ("weight-decay-huge", nothing, [*TINY, "--epochs", "1", "--out", R, "--weight-decay", "1e300"], "weight_decay"),
    ("gamma-huge", nothing, [*TINY, "--epochs", "1", "--out", R, "--gamma", "1e300"], "gamma"),
    ("grad-clip-huge", nothing, [*TINY, "--epochs", "1", "--out", R, "--grad-clip", "1e300"], "grad_clip"),
    ("lambda-gl-huge", nothing, [*TINY, "--epochs", "1", "--out", R, "--lambda-gl", "1e300"], "lambda_gl"),
    ("eps-ps-huge", nothing, [*TINY, "--epochs", "1", "--out", R, "--eps-ps", "1e300"], "eps_ps"),
    ("seed-near-2-63", nothing, [*TINY, "--epochs", "1", "--out", R, "--seed", str(2**63 - 100)], "seed"),
    ("seed-beyond-2-64", nothing, [*TINY, "--epochs", "1", "--out", R, "--seed", str(2**64 + 1)], "seed"),
    ("epochs-astronomical", nothing, [*TINY, "--epochs", "1" + "0" * 400, "--out", R], "epochs"),
    ("warmup-steps-astronomical", nothing, [*TINY, "--epochs", "1", "--warmup-steps", "1" + "0" * 400], "warmup"),
    ("threads-astronomical", nothing, [*TINY, "--epochs", "1", "--threads", "1" + "0" * 30], "threads"),
    ("workers-astronomical", nothing, [*TINY, "--epochs", "1", "--num-workers", "100000"], "num_workers"),
    ("bn-batches-astronomical", nothing, [*TINY, "--epochs", "1", "--bn-recal-batches", "1" + "0" * 30],
     "bn_recal_batches"),
    ("batch-size-astronomical", nothing, [*TINY, "--epochs", "1", "--batch-size", "1" + "0" * 30], "batch_size"),
    ("model-option-deeply-nested", nothing, [*TINY, "--model-option", f"hidden_sizes={NEST}"], "nest"),
    ("model-option-huge-layer", nothing, [*TINY, "--epochs", "1", "--out", R,
                                          "--model-option", "hidden_sizes=[100000000]"], "parameters"),
    ("lenet-huge-padding", nothing, ["--model", "lenet5", "--data", "digits", "--out", R,
                                     "--model-option", "padding=1000000"], "parameters"),
    # --- checkpoints that are valid files but do not fit the run
    ("ckpt-factor-too-big", bad_checkpoint(bigger_factor), ["--resume", R], "does not fit"),
    ("ckpt-ranks-disagree", bad_checkpoint(ranks_disagree), ["--resume", R], "does not fit"),
    ("ckpt-other-model", bad_checkpoint(other_model), ["--resume", R], "does not fit"),
    ("ckpt-missing-tensor", bad_checkpoint(missing_tensor), ["--resume", R], "does not fit"),
    ("ckpt-optimizer-shape", bad_checkpoint(optimizer_shape), ["--resume", R], "does not fit"),
    ("ckpt-rng-shape", bad_checkpoint(rng_shape), ["--resume", R], "does not fit"),
    ("ckpt-missing-rng", bad_checkpoint(missing_key("rng")), ["--resume", R], "does not fit"),
    ("ckpt-missing-history", bad_checkpoint(missing_key("history")), ["--resume", R], "does not fit"),
    ("ckpt-epoch-too-big", bad_checkpoint(set_field("epoch", 5)), ["--resume", R], "does not fit"),
    ("ckpt-epoch-negative", bad_checkpoint(set_field("epoch", -1)), ["--resume", R], "does not fit"),
    ("ckpt-epoch-string", bad_checkpoint(set_field("epoch", "1")), ["--resume", R], "does not fit"),
    ("ckpt-history-length", bad_checkpoint(set_field("history", [])), ["--resume", R], "does not fit"),
    ("ckpt-not-a-table", bad_checkpoint(lambda state: {"weights": [1, 2]}), ["--resume", R], "does not fit"),
    ("ckpt-deeply-nested", deep_checkpoint, ["--resume", R], "checkpoint"),
    ("ckpt-garbage", raw_checkpoint(b"\x00" * 64), ["--resume", R], "checkpoint"),
    ("ckpt-bad-json", raw_checkpoint(b""), ["--resume", R], "checkpoint"),
]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.is_symlink()}


def _as_param(case):
    """A sweep case as a pytest parameter named by its first entry (keeping a case's marks)."""
    if hasattr(case, "marks"):
        name, *values = case.values
        return pytest.param(*values, id=name, marks=case.marks)
    return pytest.param(*case[1:], id=case[0])


@pytest.mark.parametrize("setup, args, message", [_as_param(case) for case in CASES])
def test_bad_input_is_one_line_and_touches_nothing(setup, args, message, runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path, runs, monkeypatch)
    before = snapshot(tmp_path)
    try:
        code = train(*[arg.replace("{tmp}", str(tmp_path)) for arg in args])
    finally:
        monkeypatch.undo()
        while HELD:
            os.close(HELD.pop())
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("maestro-lod: error: "), captured.err
    if message:
        assert message in lines[0]
    after = snapshot(tmp_path)
    changed = sorted(name for name, data in before.items() if after.get(name) != data)
    assert not changed, f"changed or removed: {changed}"


# ------------------------------------------------------------------------- behaviours behind the sweep
def test_a_stale_lock_of_a_killed_process_does_not_block_resume(runs, tmp_path, capsys):
    unfinished(tmp_path, runs, None)
    (tmp_path / "run" / ".maestro-lod.lock").write_text("4242\n")  # left by a killed run: no longer locked
    assert train("--resume", str(tmp_path / "run"), "--quiet") == 0
    assert (tmp_path / "run" / "summary.json").is_file() and not (tmp_path / "run" / ".maestro-lod.lock").exists()


def test_default_run_names_are_unique_within_one_second(tmp_path):
    from maestro_lod.errors import RunDirectoryError
    from maestro_lod.runs.directory import RunLock, claim_new_directory

    first, second = claim_new_directory(tmp_path / "mlp-digits-x"), claim_new_directory(tmp_path / "mlp-digits-x")
    assert first.directory != second.directory and second.directory.name == "mlp-digits-x-2"
    assert first.held and second.held
    with pytest.raises(RunDirectoryError, match="in use by process"):
        RunLock(first.directory).acquire()
    first.release()
    second.release()
    assert not first.directory.exists()  # nothing was written there: removed again


def test_ctrl_c_says_where_the_checkpoint_is(runs, tmp_path, monkeypatch, capsys):
    unfinished(tmp_path, runs, monkeypatch)
    out = tmp_path / "run"

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr("maestro_lod.training.loop.Trainer.fit", interrupted)
    assert train("--resume", str(out), "--quiet") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint of epoch 1" in err[0] and f"--resume {out}" in err[0]
    assert not (out / ".maestro-lod.lock").exists()


def test_a_run_killed_in_its_first_epoch_starts_over_on_resume(runs, tmp_path, capsys):
    unfinished(tmp_path, runs, None)
    out = tmp_path / "run"
    for name in ("checkpoint.safetensors", "metrics.jsonl"):
        (out / name).unlink()
    (out / "notes.txt").write_text("mine")
    assert train("--resume", str(out), "--quiet") == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 and (out / "summary.json").is_file()
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_trusts_the_checkpoint_and_removes_stale_temporaries(runs, tmp_path, capsys):
    unfinished(tmp_path, runs, None)
    out = tmp_path / "run"
    with (out / "metrics.jsonl").open("a") as file:  # a crash after the metrics, before the checkpoint
        file.write('{"epoch": 2, "val_loss": 1.0}\n')
    stale = out / ".checkpoint.safetensors.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    mine = out / ".mine.tmp"
    mine.write_text("not this package's")
    assert train("--resume", str(out), "--quiet") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and "train_loss" in records[1]
    assert not stale.exists() and mine.exists()


def test_metrics_are_written_after_the_checkpoint(tmp_path, monkeypatch, capsys):
    """A failing checkpoint write leaves metrics.jsonl at the last checkpoint's epoch, never ahead of it."""
    def full_disk(path, state):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("maestro_lod.runs.directory.save_checkpoint", full_disk)
    out = tmp_path / "run"
    assert train(*TINY, "--epochs", "1", "--out", str(out)) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists() and (out / "config.json").is_file()


def test_derived_seeds_fit_every_generator():
    from maestro_lod.training.rng import derive_seed

    assert derive_seed(5, 1, 7919) == 5 + 7919 and derive_seed(3, 1_000_003, 2) == 3 * 1_000_003 + 2
    for seed in (2**32 - 1, 2**63 - 1, 2**64 + 5):
        for scale, offset in ((1, 7919), (1_000_003, 30)):
            value = derive_seed(seed, scale, offset)
            assert 0 <= value < 2**63
            torch.Generator().manual_seed(value)
    with pytest.raises(TypeError):
        derive_seed(1.5)


def test_json_files_never_hold_nan(tmp_path):
    with pytest.raises(ValueError, match="invalid JSON"):
        files.write_json_atomic(tmp_path / "summary.json", {"final_loss": float("nan")})
    assert not (tmp_path / "summary.json").exists() and not list(tmp_path.iterdir())


def test_a_run_being_trained_by_another_process_is_refused_until_that_process_dies(runs, tmp_path, capsys):
    import signal
    import subprocess
    import sys

    unfinished(tmp_path, runs, None)
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from maestro_lod.runs.directory import RunLock\n"
                               f"RunLock({str(out)!r}).acquire(); print('claimed', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        code = train("--resume", str(out), "--quiet")
        line = capsys.readouterr().err.strip()
        assert code == 2 and f"in use by process {holder.pid}" in line
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: the kernel drops its lock, its lock file stays
        holder.wait()
        holder.stdout.close()
    assert (out / ".maestro-lod.lock").exists()
    assert train("--resume", str(out), "--quiet") == 0


def test_demo_figure_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    from maestro_lod.commands import demo

    def read_only(results, out):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(demo, "run_experiment", lambda problem, settings: None)
    monkeypatch.setattr(demo, "report", lambda result: "")
    monkeypatch.setattr(demo, "save_figure", read_only)
    assert cli.main(["demo", "pca", "--out", str(tmp_path / "f.png")]) == 2
    assert "Read-only file system" in capsys.readouterr().err
