"""The run directory: its claim (an flock holding the holder's id), its status, its files."""

import json
import os
import subprocess
import sys
import types

import pytest

from maestro_lod.errors import RunDirectoryError
from maestro_lod.files import write_bytes_atomic, write_json_atomic
from maestro_lod.runs import directory as rundir
from maestro_lod.runs.directory import (CHECKPOINT_FILE, CONFIG_FILE, LOCK_FILE, MARKER_FILE, METRICS_FILE,
                                        SUMMARY_FILE, RunDirectory, RunLock, claim_directory,
                                        claim_new_directory, clean_temporaries, foreign_message,
                                        present_run_files, read_json_file, run_status)

HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\n".encode())
print("locked", flush=True)
sys.stdin.read()
"""


def _lock_text(directory):
    return (directory / LOCK_FILE).read_text()


# ----------------------------------------------------------------------------------------- the lock
def test_lock_holds_the_pid_and_refuses_a_second_claim_naming_the_holder(tmp_path):
    lock = RunLock(tmp_path).acquire()
    assert lock.held
    assert _lock_text(tmp_path) == f"{os.getpid()}\n"
    with pytest.raises(RunDirectoryError) as caught:
        RunLock(tmp_path).acquire()  # flock conflicts between two open files, even in one process
    message = str(caught.value)
    assert f"process {os.getpid()}" in message and str(tmp_path) in message
    assert _lock_text(tmp_path) == f"{os.getpid()}\n"  # the refused claim did not overwrite the id
    lock.release()
    assert not lock.held
    assert not (tmp_path / LOCK_FILE).exists()
    again = RunLock(tmp_path).acquire()  # released: the next claim succeeds
    assert again.held
    again.release()
    lock.release()  # releasing twice is harmless


def test_lock_held_by_another_process_names_it_and_is_taken_over_once_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / LOCK_FILE)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=f"in use by process {holder.pid}\\b"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the dead process left its lock file (with its id) behind; the kernel dropped its lock
    assert _lock_text(tmp_path) == f"{holder.pid}\n"
    with RunLock(tmp_path) as lock:
        assert lock.held
        assert _lock_text(tmp_path) == f"{os.getpid()}\n"
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_file_without_a_lock_is_taken_over_and_its_content_replaced(tmp_path):
    (tmp_path / LOCK_FILE).write_text("123456789 and a much longer leftover line\n")
    with RunLock(tmp_path):
        assert _lock_text(tmp_path) == f"{os.getpid()}\n"  # truncated, not overwritten in place


def test_a_holder_whose_id_is_unreadable_is_called_another_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.replace('f"{os.getpid()}\\n"', '"garbage"'),
                               str(tmp_path / LOCK_FILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match="in use by another process"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_remove_if_empty_removes_only_an_empty_directory(tmp_path):
    empty, used = tmp_path / "empty", tmp_path / "used"
    lock = claim_directory(empty)
    assert lock.remove_if_empty and empty.is_dir()
    lock.release()
    assert not empty.exists()
    lock = claim_directory(used)
    (used / CONFIG_FILE).write_text("{}")
    lock.release()
    assert used.is_dir() and (used / CONFIG_FILE).is_file() and not (used / LOCK_FILE).exists()
    existing = claim_directory(used)  # it existed: never removed
    assert not existing.remove_if_empty
    existing.release()


def test_claim_new_directory_numbers_taken_names(tmp_path):
    base = tmp_path / "run"
    first = claim_new_directory(base)
    second = claim_new_directory(base)
    third = claim_new_directory(base)
    assert [lock.directory.name for lock in (first, second, third)] == ["run", "run-2", "run-3"]
    for lock in (first, second, third):
        lock.release()
    assert not any(tmp_path.iterdir())  # all were empty and created for the claim


def test_claiming_a_path_that_is_a_file_or_under_a_file_names_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunDirectoryError, match="exists and is not a directory"):
        claim_directory(blocker)
    with pytest.raises(RunDirectoryError, match=f"{str(blocker)!r} is a file"):
        claim_directory(blocker / "sub" / "run")
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(RunDirectoryError, match="symbolic link"):
        claim_directory(dangling)


# ------------------------------------------------------------------------------- status and files
def test_run_status_goes_through_its_stages(tmp_path):
    assert run_status(tmp_path) == "empty" and present_run_files(tmp_path) == []
    (tmp_path / MARKER_FILE).write_text("{}")
    (tmp_path / CONFIG_FILE).write_text("{}")
    assert run_status(tmp_path) == "started"
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"")
    (tmp_path / METRICS_FILE).write_text("")
    assert run_status(tmp_path) == "unfinished"
    (tmp_path / SUMMARY_FILE).write_text("{}")
    assert run_status(tmp_path) == "finished"
    assert present_run_files(tmp_path) == [CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE]


def test_foreign_and_old_runs_are_told_apart_by_marker_or_config_keys(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model": "x", "lr": 1}))
    assert run_status(tmp_path) == "foreign"
    message = foreign_message("--out", tmp_path)
    assert message.startswith(f"--out {str(tmp_path)!r} holds config.json not written by maestro-lod")
    # a config.json of an older version of this package (no marker, but every key of a training config)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(dict.fromkeys(rundir.OLD_CONFIG_KEYS, 1)))
    assert run_status(tmp_path) == "started"
    (tmp_path / CONFIG_FILE).write_text("[1, 2]")  # not a table
    assert run_status(tmp_path) == "foreign"


def test_present_run_files_counts_links_and_directories_too(tmp_path):
    (tmp_path / SUMMARY_FILE).symlink_to(tmp_path / "missing-target")
    (tmp_path / METRICS_FILE).mkdir()
    (tmp_path / "notes.txt").write_text("not a run file")
    assert present_run_files(tmp_path) == [METRICS_FILE, SUMMARY_FILE]
    assert run_status(tmp_path) == "foreign"
    assert "metrics.jsonl, summary.json" in foreign_message("--resume", tmp_path)


def test_clean_temporaries_removes_only_temporaries_of_run_files(tmp_path):
    stale = [tmp_path / f".{CONFIG_FILE}.a1b2.tmp", tmp_path / f".{CHECKPOINT_FILE}.zz.tmp",
             tmp_path / f".{MARKER_FILE}.q.tmp"]
    kept = [tmp_path / ".notes.txt.a1.tmp", tmp_path / CONFIG_FILE, tmp_path / f".{CONFIG_FILE}.a1b2.tmp.bak",
            tmp_path / f"{CONFIG_FILE}.x.tmp"]
    for path in stale + kept:
        path.write_text("x")
    directory_like = tmp_path / f".{SUMMARY_FILE}.d.tmp"
    directory_like.mkdir()  # not a file: left alone
    clean_temporaries(tmp_path)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept) and directory_like.is_dir()


def test_atomic_write_replaces_whole_files_and_a_failed_write_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / SUMMARY_FILE
    write_json_atomic(path, {"a": 1, "b": [1.5, "x"]})
    assert path.read_text() == '{\n  "a": 1,\n  "b": [\n    1.5,\n    "x"\n  ]\n}\n'
    umask = os.umask(0o027)
    try:
        write_json_atomic(path, {"a": 2})
    finally:
        os.umask(umask)
    assert json.loads(path.read_text()) == {"a": 2}
    assert path.stat().st_mode & 0o777 == 0o640  # what an ordinary open under that umask gives

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_bytes_atomic(path, b"new content")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == [SUMMARY_FILE]  # no temporary left behind
    with pytest.raises(ValueError, match="refusing to write invalid JSON"):
        write_json_atomic(path, {"loss": float("nan")})
    assert json.loads(path.read_text()) == {"a": 2}


def test_read_json_file_errors_name_the_file_and_the_problem(tmp_path):
    path = tmp_path / CONFIG_FILE
    path.write_text('{"lr": 0.5}')
    assert read_json_file(path, "config") == {"lr": 0.5}
    for content, problem in ((b"{not json", "is not valid UTF-8 JSON"), (b"\xff\xfe{}", "is not valid UTF-8 JSON"),
                             (b"[1, 2]", "holds a JSON list, not a table of options")):
        path.write_bytes(content)
        with pytest.raises(RunDirectoryError) as caught:
            read_json_file(path, "config")
        assert str(caught.value).startswith(f"config {str(path)!r}") and problem in str(caught.value)
    with pytest.raises(RunDirectoryError, match="cannot read config"):
        read_json_file(tmp_path / "absent.json", "config")


def test_run_directory_writes_marker_and_config_once_with_the_launch_world_size(tmp_path):
    out = tmp_path / "run"
    options = {"model": "lenet5", "lr": 0.01, "world_size": 1}
    trainer = types.SimpleNamespace(config=types.SimpleNamespace(to_dict=lambda: dict(options)),
                                    distributed=types.SimpleNamespace(world_size=3), history=[])
    files = RunDirectory(out)
    files.on_fit_start(trainer)
    config = out / CONFIG_FILE
    assert json.loads(config.read_text()) == {"model": "lenet5", "lr": 0.01, "world_size": 3}
    assert json.loads((out / MARKER_FILE).read_text())["maestro_lod"]["version"]
    assert run_status(out) == "started"
    inode = config.stat().st_ino
    files.on_fit_start(trainer)  # same content: not rewritten
    assert config.stat().st_ino == inode
    trainer.distributed.world_size = 1  # a resumed launch with one process records it
    files.on_fit_start(trainer)
    assert config.stat().st_ino != inode and json.loads(config.read_text())["world_size"] == 1
