"""The files of a run's output directory, written as training goes, and the claim on the directory.

``config.json`` at the start (the run's options, with the number of processes of this launch as
``world_size``); after every epoch the checkpoint and then ``metrics.jsonl`` (one JSON
object per epoch, rewritten from the checkpoint's history, so it is never ahead of it); the PNG
plots and finally ``summary.json``, whose presence marks a finished run. ``.maestro-lod-run`` marks
the directory as this package's (directories of older versions are recognised by their
``config.json``); ``.maestro-lod.lock``, locked by the process training (or compressing) there right
now, holds its id.

A run that replaces the files of an earlier one (``--force``, or ``--resume``, which makes the fronts
compressed from the older checkpoint stale) first moves them into ``.maestro-lod-replaced/``
(:func:`set_aside`) and deletes them (a resumed run keeps the fronts in ``compressed-epoch<N>/``)
only once its own first checkpoint is written (:func:`commit_set_aside`). Until then any failure, Ctrl-C or termination puts them back
(:func:`restore_set_aside`), and so does the next claim of the directory after a kill.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import RunDirectoryError
from ..deploy.compress import FRONT_FILE, PLOT_FILE, POINT_FILE
from ..deploy.family import FAMILY_FILE
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
SET_ASIDE_DIR = ".maestro-lod-replaced"
SET_ASIDE_LIST = "names.json"
SET_ASIDE_DONE = ".maestro-lod-replaced.done"
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

    _held_here: set[str] = set()
    """Lock files held by this process (a second claim from the same process is told apart)."""

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
                RunLock._held_here.add(self._key)
                try:
                    restore_set_aside(self.directory)  # a replacing run was killed before its first checkpoint
                except OSError as exc:
                    self.release()
                    raise RunDirectoryError(f"cannot put back the earlier run's files set aside in "
                                            f"{str(self.directory / SET_ASIDE_DIR)!r}: {_cause(exc)}") from None
                return self
            os.close(handle)
        raise RunDirectoryError(f"{str(self.directory)!r} is being claimed by other processes at the same time")

    @property
    def _key(self) -> str:
        return os.path.realpath(self.path)

    def held_by_this_process(self) -> bool:
        """Whether some RunLock of this process holds this directory now."""
        return self._key in RunLock._held_here

    def check_free(self) -> None:
        """Raise the RunDirectoryError of :meth:`acquire` when another process holds the directory
        (training there); take nothing. A directory this process holds, or one where no lock file can
        exist (read-only, nobody trains there), passes."""
        if self.held_by_this_process():
            return
        try:
            handle = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file: nobody holds it
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 32).decode("ascii", "replace").strip()
            raise self._in_use(holder) from None
        except OSError:
            pass
        finally:
            os.close(handle)

    def _in_use(self, holder: str) -> RunDirectoryError:
        who = f"process {holder}" if holder.isdigit() else "another process"
        return RunDirectoryError(f"{str(self.directory)!r} is in use by {who}, which is training or compressing "
                                 f"there; wait for it to end or choose another directory")

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
            raise self._in_use(holder) from None
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
        RunLock._held_here.discard(self._key)
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


def set_aside(directory: Path, names: list[str] | tuple[str, ...]) -> list[str]:
    """Move the files (or folders) ``names`` of ``directory`` that exist into :data:`SET_ASIDE_DIR`,
    one rename each, after recording which (so that :func:`restore_set_aside` can tell them from the
    files the new run writes). Returns the names moved. Call it holding the directory's lock."""
    present = [name for name in names if os.path.lexists(directory / name)]
    if not present:
        return []
    aside = directory / SET_ASIDE_DIR
    aside.mkdir(exist_ok=True)
    write_json_atomic(aside / SET_ASIDE_LIST, present)
    for name in present:
        os.replace(directory / name, aside / name)
    return present


def restore_set_aside(directory: Path) -> bool:
    """Put the files :func:`set_aside` moved back where they were, deleting the run files written
    since (the replacing run did not reach its first checkpoint). Safe to repeat after an
    interruption; returns whether there was anything to restore."""
    shutil.rmtree(directory / SET_ASIDE_DONE, ignore_errors=True)  # a commit killed half-way
    aside = directory / SET_ASIDE_DIR
    if not aside.is_dir():
        return False
    try:
        names = json.loads((aside / SET_ASIDE_LIST).read_text())
    except (OSError, ValueError):
        names = None
    if not isinstance(names, list):  # killed before the list was written: nothing was moved yet
        shutil.rmtree(aside)
        return False
    for name in RUN_FILES:  # the replacing run's own files go; names not set aside stay as they are
        if name not in names and os.path.lexists(directory / name):
            (directory / name).unlink()
    for name in names:
        if os.path.lexists(aside / name):
            target = directory / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(aside / name, target)
    clean_temporaries(directory)
    shutil.rmtree(aside)
    return True


def commit_set_aside(directory: Path, keep_as: str | None = None) -> Path | None:
    """The new run has a checkpoint of its own: delete the files set aside (one rename makes that
    final, then the renamed folder is deleted), or with ``keep_as`` keep them in that visible
    folder of ``directory`` (a name not taken: ``-2``, ``-3``, ... appended). Returns that folder."""
    aside = directory / SET_ASIDE_DIR
    if not aside.is_dir():
        return None
    if keep_as is not None:
        kept, number = directory / keep_as, 1
        while os.path.lexists(kept):
            number += 1
            kept = directory / f"{keep_as}-{number}"
        os.replace(aside, kept)
        (kept / SET_ASIDE_LIST).unlink(missing_ok=True)
        return kept
    done = directory / SET_ASIDE_DONE
    shutil.rmtree(done, ignore_errors=True)
    os.replace(aside, done)
    shutil.rmtree(done, ignore_errors=True)
    return None


def compress_outputs(directory: Path) -> list[str]:
    """Names of what ``maestro-lod compress`` wrote in ``directory``: the front, its plot, the family
    file and the target folders (those holding a ``point.json``)."""
    names = [name for name in (FRONT_FILE, PLOT_FILE, FAMILY_FILE) if os.path.lexists(directory / name)]
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError:
        return names
    return names + [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)
                    and not entry.name.startswith(".") and (Path(entry.path) / POINT_FILE).is_file()]


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
        self.replaced: list[str] = []
        """Files of an earlier run set aside until this run's first checkpoint (see :func:`set_aside`)."""
        self.keep_replaced_as: str | None = None
        """Folder the set-aside files are kept in at that checkpoint (None: they are deleted)."""
        self.kept: Path | None = None
        self.restored = False
        """Whether the set-aside files were put back (this run failed before its first checkpoint)."""

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
        if self.replaced:  # this run now has a checkpoint of its own: the earlier run's files go
            def commit() -> None:
                self.kept = commit_set_aside(self.directory, self.keep_replaced_as)
            _writing(self.directory / SET_ASIDE_DIR, commit)
            self.replaced = []

    def restore_replaced(self) -> bool:
        """Put back the earlier run's files set aside, if this run has not committed (see
        :func:`restore_set_aside`); returns whether it did."""
        if not self.replaced:
            return False
        self.replaced = []
        self.restored = restore_set_aside(self.directory)
        return self.restored

    def on_fit_end(self, trainer: Trainer, summary: Any) -> None:
        _writing(self.directory, lambda: write_plots(trainer.history, trainer.dense_params, trainer.dense_macs,
                                                     self.directory))
        path = self.directory / SUMMARY_FILE
        _writing(path, lambda: write_json_atomic(path, {**summary, **self.summary_extra}))
