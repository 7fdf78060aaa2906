"""The files of a run's output directory, written as training goes, and the claim on the directory.

``config.json`` at the start (the run's options, with the number of processes of this launch as
``world_size``); after every epoch the checkpoint and then ``metrics.jsonl`` (one JSON
object per epoch, rewritten from the checkpoint's history, so it is never ahead of it); the PNG
plots and finally ``summary.json``, whose presence marks a finished run. ``.maestro-lod-run`` marks
the directory as this package's (directories of older versions are recognised by their
``config.json``); ``.maestro-lod.lock``, locked by the process training there right now, holds its id.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import RunDirectoryError
from ..files import json_text, remove_stale_temporaries, write_json_atomic, write_text_atomic
from ..training.checkpoint import save_checkpoint
from ..training.train_config import check_nesting
from ..training.loop import Callback, Trainer
from .plots import PLOT_FILES, write_plots

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.safetensors"
SUMMARY_FILE = "summary.json"
MARKER_FILE = ".maestro-lod-run"
LOCK_FILE = ".maestro-lod.lock"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE, *PLOT_FILES)
OLD_CONFIG_KEYS = {"model", "data", "method", "epochs", "lr", "seed"}
"""Keys by which the config.json of a run written before the marker file existed is recognised."""


def _cause(exc: OSError) -> str:
    return exc.strerror or str(exc)


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; unreadable, non-UTF-8, invalid, deeply nested or non-object
    content raises a RunDirectoryError naming ``what`` and the cause."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise RunDirectoryError(f"cannot read {what} {str(path)!r}: {_cause(exc)}") from None
    except RecursionError:
        raise RunDirectoryError(f"{what} {str(path)!r} is nested too deeply to be a run's file") from None
    except ValueError as exc:  # UnicodeDecodeError and json.JSONDecodeError
        raise RunDirectoryError(f"{what} {str(path)!r} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RunDirectoryError(f"{what} {str(path)!r} holds a JSON {type(data).__name__}, not a table of options")
    check_nesting(data, f"{what} {str(path)!r}")
    return data


def _is_package_run(directory: Path) -> bool:
    """Whether ``directory`` holds a run of this package: its marker, or (runs of older versions)
    a config.json with the keys of a training config."""
    if (directory / MARKER_FILE).is_file():
        return True
    try:
        data = json.loads((directory / CONFIG_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and OLD_CONFIG_KEYS <= set(data)


def present_run_files(directory: Path) -> list[str]:
    """Names of :data:`RUN_FILES` that exist in ``directory`` (as files, links or anything else)."""
    return [name for name in RUN_FILES if os.path.lexists(directory / name)]


def run_status(directory: Path) -> str:
    """``"empty"`` (no run files), ``"foreign"`` (files with run-file names this package did not
    write), ``"started"`` (only a config: killed before the first epoch ended), ``"unfinished"``
    (a checkpoint, no summary) or ``"finished"`` (a summary)."""
    present = present_run_files(directory)
    if not present:
        return "empty"
    if not _is_package_run(directory):
        return "foreign"
    if SUMMARY_FILE in present:
        return "finished"
    return "unfinished" if CHECKPOINT_FILE in present else "started"


def foreign_message(flag: str, directory: Path) -> str:
    """What to tell a user whose directory holds files with run-file names that are not this package's."""
    names = ", ".join(present_run_files(directory))
    return (f"{flag} {str(directory)!r} holds {names} not written by maestro-lod; move them away or "
            f"choose another directory")


def clean_temporaries(directory: Path) -> None:
    """Delete the temporary files that interrupted writes of run files left (call it holding the lock)."""
    remove_stale_temporaries(directory, (*RUN_FILES, MARKER_FILE))


class RunLock:
    """An exclusive claim of this process on a run directory: an ``flock`` on ``.maestro-lod.lock``,
    which holds the process id for messages. The kernel drops the lock when its process ends, however
    it ends, so a killed run never blocks the next one (its lock file is simply taken over). Needs a
    file system with ``flock`` (every local one). Use as a context manager or call :meth:`acquire`
    / :meth:`release`.

    ``remove_if_empty``: on release, also remove the directory when nothing else is in it (it was
    created for a run that never started).
    """

    def __init__(self, directory: Path, remove_if_empty: bool = False):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.remove_if_empty = remove_if_empty
        self._handle: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._handle is not None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise a RunDirectoryError naming the process that holds it."""
        for _ in range(3):  # again when the holder removed the file between our open and our lock
            handle = self._open_locked()
            if self._is_current(handle):
                self._write_pid(handle)
                self._handle = handle
                return self
            os.close(handle)
        raise RunDirectoryError(f"{str(self.directory)!r} is being claimed by other processes at the same time")

    def _open_locked(self) -> int:
        try:
            handle = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise RunDirectoryError(f"cannot claim run directory {str(self.directory)!r}: {_cause(exc)}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 32).decode("ascii", "replace").strip()
            os.close(handle)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise RunDirectoryError(f"{str(self.directory)!r} is in use by {who}, which is training there; "
                                    f"wait for it to end or choose another directory") from None
        except OSError as exc:
            os.close(handle)
            raise RunDirectoryError(f"cannot lock run directory {str(self.directory)!r}: {_cause(exc)}") from None
        return handle

    def _is_current(self, handle: int) -> bool:
        """Whether the locked file is still the one at :attr:`path` (not removed by its last holder)."""
        try:
            on_disk, locked = os.stat(self.path), os.fstat(handle)
        except FileNotFoundError:
            return False
        return (on_disk.st_dev, on_disk.st_ino) == (locked.st_dev, locked.st_ino)

    def _write_pid(self, handle: int) -> None:
        try:
            os.ftruncate(handle, 0)
            os.write(handle, f"{os.getpid()}\n".encode())
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            os.close(handle)
            raise RunDirectoryError(f"cannot claim run directory {str(self.directory)!r}: {_cause(exc)}") from None

    def release(self) -> None:
        """Remove the lock file and drop the lock (and remove the directory, if asked and empty)."""
        if self._handle is None:
            return
        self.path.unlink(missing_ok=True)  # still locked: nobody can take the file we remove
        os.close(self._handle)
        self._handle = None
        if self.remove_if_empty:
            try:
                self.directory.rmdir()
            except OSError:
                pass  # not empty: a run started there

    def __enter__(self) -> "RunLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def _make_directory(path: Path, exist_ok: bool) -> bool:
    """Create ``path`` (and its parents); returns whether it was created. OSErrors become one-line
    RunDirectoryErrors naming the path and the cause."""
    try:
        path.mkdir(parents=True, exist_ok=False)
        return True
    except FileExistsError:
        if path.is_dir() and exist_ok:
            return False
        if path.is_symlink() and not path.exists():
            raise RunDirectoryError(f"{str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not "
                                    f"exist; remove the link or create its target") from None
        if not exist_ok and path.is_dir():
            raise
        raise RunDirectoryError(f"{str(path)!r} exists and is not a directory") from None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
            raise RunDirectoryError(f"cannot create run directory {str(path)!r}: {str(blocker)!r} is a file, "
                                    f"not a directory") from None
        raise RunDirectoryError(f"cannot create run directory {str(path)!r}: {_cause(exc)}") from None


def claim_directory(path: Path) -> RunLock:
    """Create ``path`` if needed and lock it for this process (see :class:`RunLock`)."""
    created = _make_directory(path, exist_ok=True)
    return RunLock(path, remove_if_empty=created).acquire()


def claim_new_directory(base: Path) -> RunLock:
    """Create and lock a directory that did not exist: ``base``, else ``base-2``, ``base-3``, ...
    (exclusive creation, so two runs started in the same second get different ones)."""
    path, suffix = base, 1
    while True:
        try:
            _make_directory(path, exist_ok=False)
            return RunLock(path, remove_if_empty=True).acquire()
        except FileExistsError:
            suffix += 1
            path = base.with_name(f"{base.name}-{suffix}")


def _writing(path: Path, write: Callable[[], None], kept: str = "") -> None:
    """Run ``write``; an OSError (full disk, read-only file system) becomes a RunDirectoryError naming
    ``path``, the cause and (``kept``) what is still intact."""
    try:
        write()
    except OSError as exc:
        raise RunDirectoryError(f"cannot write {str(path)!r}: {_cause(exc)}{kept}") from None


class RunDirectory(Callback):
    """Keeps ``directory`` up to date with the run; ``summary_extra`` is merged into summary.json.

    :attr:`saved_epoch` is the epoch of the checkpoint in the directory: the last one written, or
    the one a resumed run was loaded from (set it then); None while there is none.
    """

    main_only = True  # a distributed run writes and prints on rank 0 only

    def __init__(self, directory: str | Path, summary_extra: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self.summary_extra = dict(summary_extra or {})
        self.saved_epoch: int | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        _make_directory(self.directory, exist_ok=True)
        marker = self.directory / MARKER_FILE
        if not marker.is_file():
            _writing(marker, lambda: write_json_atomic(marker, {"maestro_lod": {"version": __version__}}))
        config = self.directory / CONFIG_FILE
        # the processes of this launch, whatever the config says (a resumed run records its new launch)
        options = {**trainer.config.to_dict(), "world_size": trainer.distributed.world_size}
        text = json_text(options, repr(str(config)), indent=2) + "\n"
        if not config.is_file() or config.read_bytes() != text.encode():
            _writing(config, lambda: write_text_atomic(config, text))
        if trainer.history:  # resumed: the checkpoint's history is the truth
            self._write_metrics(trainer)

    def _write_metrics(self, trainer: Trainer) -> None:
        path = self.directory / METRICS_FILE
        lines = "".join(json_text(r.to_dict(), repr(str(path))) + "\n" for r in trainer.history)
        _writing(path, lambda: write_text_atomic(path, lines))

    def on_epoch_end(self, trainer: Trainer, record: Any) -> None:
        path = self.directory / CHECKPOINT_FILE
        kept = "" if self.saved_epoch is None else f"; the checkpoint of epoch {self.saved_epoch} is intact"
        _writing(path, lambda: save_checkpoint(path, trainer.state_dict()), kept)
        self.saved_epoch = trainer.epoch
        self._write_metrics(trainer)

    def on_fit_end(self, trainer: Trainer, summary: Any) -> None:
        _writing(self.directory, lambda: write_plots(trainer.history, trainer.dense_params, trainer.dense_macs,
                                                     self.directory))
        path = self.directory / SUMMARY_FILE
        _writing(path, lambda: write_json_atomic(path, {**summary, **self.summary_extra}))
