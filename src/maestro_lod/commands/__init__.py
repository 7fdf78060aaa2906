"""Sub-commands of the ``maestro-lod`` command line, one module each, and what they share: one-line
warnings, termination signals handled like Ctrl-C, and the checks of directory arguments."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import UsageError

INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: handled like Ctrl-C (files put back, one line), exit 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(interruption: KeyboardInterrupt) -> int:
    """128 + the signal that interrupted: 130 for Ctrl-C, 143 for SIGTERM."""
    return interruption.exit_code if isinstance(interruption, Terminated) else INTERRUPTED


def caused_by_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` wraps a Ctrl-C (libraries such as ``torch.export`` re-raise it as a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def terminations_interrupt() -> Iterator[None]:
    """Within this block SIGTERM and SIGHUP raise :class:`Terminated` (a KeyboardInterrupt), so the
    cleanup that Ctrl-C gets runs for them too. Only in the main thread (elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Warnings raised inside (by this package or a library) are printed as one line each,
    ``maestro-lod: warning: ...``, without the source line Python shows."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) and \
                "maestro_lod" not in str(filename):
            return  # another library's notes to its own callers, not to this command's user
        text = " ".join(str(message).split())
        print(f"maestro-lod: warning: {text}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"maestro-lod: warning: {message}", file=sys.stderr, flush=True)


def check_directory_argument(flag: str, value: str | Path | None) -> Path | None:
    """A directory given on the command line: an empty string (which would mean the current
    directory) or a NUL character is refused."""
    if value is None:
        return None
    text = str(value)
    if not text.strip():
        raise UsageError(f"{flag} is empty; give a directory")
    if "\0" in text:
        raise UsageError(f"{flag} {text!r} holds a NUL character")
    return Path(text)
