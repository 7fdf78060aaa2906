"""Atomic file writes: a reader never sees a half-written file, and a crash keeps the old one.

Each write goes to a temporary ``.<name>.<random>.tmp`` next to its target and is renamed over it;
:func:`remove_stale_temporaries` deletes the ones a killed process left behind.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import UsageError

TEMPORARY_SUFFIX = ".tmp"


def _umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, flush it to disk, then rename it over ``path``.

    The file gets the permissions an ordinary ``open`` would give it (0666 less the umask). An
    OSError (a full disk, a read-only directory) propagates with ``path`` untouched.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_text(data: Any, what: str, **options: Any) -> str:
    """Strict JSON of ``data``: a NaN or infinite number, which other JSON readers reject, raises a
    ValueError naming ``what`` (it is a bug of the writer, never written)."""
    try:
        return json.dumps(data, allow_nan=False, **options)
    except ValueError as exc:
        raise ValueError(f"refusing to write invalid JSON to {what}: {exc}") from None


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Pretty-printed strict JSON (keys in insertion order), written atomically."""
    write_text_atomic(path, json_text(data, repr(str(path)), indent=2) + "\n")


def write_png_atomic(figure: Any, path: str | Path, dpi: int = 100) -> None:
    """Render a matplotlib ``Figure`` (with a canvas attached) to PNG and write it atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_bytes_atomic(path, buffer.getvalue())


def remove_stale_temporaries(directory: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes of ``names`` left in ``directory``;
    returns them. Only call it while no other process writes there."""
    removed = []
    for name in names:
        for path in Path(directory).glob(f".{name}.*{TEMPORARY_SUFFIX}"):
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path)
    return removed


def check_output_directory(path: Path, what: str) -> None:
    """Refuse, before anything is computed, an output directory that cannot be written: an empty
    path, one that exists and is not a directory, one under a file, one without write permission
    (itself or, when it does not exist yet, the nearest existing parent). Creates nothing."""
    if not str(path).strip():
        raise UsageError(f"{what} is empty; give a directory")
    if "\0" in str(path):
        raise UsageError(f"{what} {str(path)!r} holds a NUL character")
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise UsageError(f"{what} {str(path)!r} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{what} {str(path)!r} is not writable")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is not writable")
