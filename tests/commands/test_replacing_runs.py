"""A run that replaces another (``--force``) or continues it (``--resume``) never loses what was there:
the earlier run's files are set aside and deleted only once the new run has a checkpoint of its own;
a failure, Ctrl-C, SIGTERM or SIGKILL before that gives them back, byte for byte."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import maestro_lod
from maestro_lod import cli
from maestro_lod.runs.directory import (CHECKPOINT_FILE, CONFIG_FILE, SET_ASIDE_DIR, SUMMARY_FILE, RunDirectory,
                                        RunLock, restore_set_aside, set_aside)

TINY = ["--model", "mlp", "--data", "digits", "--batch-size", "256", "--bn-recal-batches", "0", "--quiet"]
SOURCE = str(Path(maestro_lod.__file__).resolve().parents[1])

# Trains into argv[1] with --force (argv[2:] more flags), stopping inside the first epoch's end,
# before the checkpoint is written: prints "in epoch" and waits to be killed.
STALLED = r"""
import sys, time
from maestro_lod import cli
from maestro_lod.runs.directory import RunDirectory

def stall(self, trainer, record):
    print("in epoch", flush=True)
    time.sleep(120)

RunDirectory.on_epoch_end = stall
sys.exit(cli.main(["train", *sys.argv[3:], "--epochs", "2", "--out", sys.argv[1], *sys.argv[2].split()]))
"""


def train(*args: str) -> int:
    return cli.main(["train", *args])


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every visible file under ``directory`` (relative path → bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    assert train(*TINY, "--epochs", "1", "--out", str(root / "run")) == 0
    return root / "run"


@pytest.fixture
def run(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def stalled(run: Path, flags: str = "--force") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SOURCE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", STALLED, str(run), flags, *TINY], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:  # the training line, then the stall
        if line.strip() == "in epoch":
            return process
    process.wait()
    raise AssertionError(process.stderr.read())


def test_a_forced_run_that_diverges_leaves_the_finished_run_intact(run, capsys):
    before = snapshot(run)
    assert train(*TINY, "--epochs", "2", "--out", str(run), "--force", "--lr", "1e6") == 2
    line = capsys.readouterr().err.strip()
    assert "loss is nan" in line and "restored" in line and "\n" not in line
    assert snapshot(run) == before
    assert not (run / SET_ASIDE_DIR).exists()


def test_ctrl_c_in_the_first_epoch_of_a_forced_run_restores_the_earlier_run(run, monkeypatch, capsys):
    before = snapshot(run)

    def interrupt(self, trainer, record):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDirectory, "on_epoch_end", interrupt)
    assert train(*TINY, "--epochs", "2", "--out", str(run), "--force") == 130
    assert "the run that was in" in capsys.readouterr().err
    assert snapshot(run) == before


def test_a_forced_run_killed_in_its_first_epoch_is_undone_by_the_next_claim(run, capsys):
    before = snapshot(run)
    process = stalled(run)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close(), process.stderr.close()
    assert (run / SET_ASIDE_DIR).is_dir() and not (run / SUMMARY_FILE).exists()  # as the kill left it
    # the next command on the directory (here a new run without --force) puts the finished run back first
    assert train(*TINY, "--epochs", "1", "--out", str(run)) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert snapshot(run) == before
    assert not (run / SET_ASIDE_DIR).exists()


def test_sigterm_in_the_first_epoch_of_a_forced_run_restores_the_earlier_run(run):
    before = snapshot(run)
    process = stalled(run)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    err = process.stderr.read()
    process.stdout.close(), process.stderr.close()
    assert "the run that was in" in err and "Traceback" not in err
    assert snapshot(run) == before


def test_a_forced_run_replaces_the_earlier_one_once_it_has_a_checkpoint(run):
    old_checkpoint = (run / CHECKPOINT_FILE).read_bytes()
    assert train(*TINY, "--epochs", "1", "--out", str(run), "--force", "--method", "dense", "--seed", "3") == 0
    assert (run / CHECKPOINT_FILE).read_bytes() != old_checkpoint
    assert json.loads((run / CONFIG_FILE).read_text())["method"] == "dense"
    assert not (run / SET_ASIDE_DIR).exists()
    assert not (run / "ranks.png").exists()  # the earlier run's plot went with it (a dense run has none)


def test_resume_keeps_the_fronts_of_the_older_checkpoint_under_a_name_saying_so(finished, tmp_path, monkeypatch):
    original = RunDirectory.on_epoch_end

    def stop_after_one(self, trainer, record):
        original(self, trainer, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDirectory, "on_epoch_end", stop_after_one)
    out = tmp_path / "run"
    assert train(*TINY, "--epochs", "2", "--out", str(out)) == 130
    monkeypatch.setattr(RunDirectory, "on_epoch_end", original)
    (out / "front.json").write_text("{}\n")
    (out / "macs-0.5").mkdir()
    (out / "macs-0.5" / "point.json").write_text("{}\n")
    (out / "notes").mkdir()  # not compress's: stays where it is
    assert train("--resume", str(out), "--quiet") == 0
    kept = out / "compressed-epoch1"
    assert (kept / "front.json").read_text() == "{}\n" and (kept / "macs-0.5" / "point.json").is_file()
    assert not (out / "front.json").exists() and not (out / "macs-0.5").exists() and (out / "notes").is_dir()


def test_set_aside_and_restore_can_be_repeated_after_an_interruption(tmp_path):
    (tmp_path / CONFIG_FILE).write_text("old config")
    (tmp_path / SUMMARY_FILE).write_text("old summary")
    assert set_aside(tmp_path, [CONFIG_FILE, SUMMARY_FILE, CHECKPOINT_FILE]) == [CONFIG_FILE, SUMMARY_FILE]
    (tmp_path / CONFIG_FILE).write_text("new config")
    (tmp_path / CHECKPOINT_FILE).write_text("new checkpoint")
    os.replace(tmp_path / SET_ASIDE_DIR / CONFIG_FILE, tmp_path / CONFIG_FILE)  # a restore killed half-way
    (tmp_path / CONFIG_FILE).write_text("old config")
    assert restore_set_aside(tmp_path)
    assert (tmp_path / CONFIG_FILE).read_text() == "old config"
    assert (tmp_path / SUMMARY_FILE).read_text() == "old summary"
    assert not (tmp_path / CHECKPOINT_FILE).exists() and not (tmp_path / SET_ASIDE_DIR).exists()
    assert not restore_set_aside(tmp_path)


def test_compress_refuses_a_run_being_trained_naming_the_process(run, capsys):
    process = stalled(run, "--force")
    try:
        assert cli.main(["compress", str(run), "--target", "macs=0.5"]) == 2
        line = capsys.readouterr().err.strip()
        assert f"in use by process {process.pid}" in line and "\n" not in line
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close(), process.stderr.close()
    assert not (run / "front.json").exists()


def test_a_run_being_trained_is_refused_by_load_run(run):
    from maestro_lod.errors import RunDirectoryError
    from maestro_lod.runs.loading import load_run

    process = stalled(run, "--force")
    try:
        with pytest.raises(RunDirectoryError, match=f"in use by process {process.pid}"):
            load_run(run)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close(), process.stderr.close()
    with RunLock(run):  # this process holds it: reading passes, and the killed run was undone
        assert load_run(run).summary
