"""The package's error types: problems a user can fix, told apart from bugs.

Everything that goes wrong because of what a user asked for (an option out of range, a file that
does not fit, a run directory in the way) raises a :class:`MaestroError`. The command line reports
those as one line with exit code 2; any other exception is a bug and keeps its traceback.

The subclasses also derive from the built-in type that callers have always been able to catch
(``ConfigError`` is a ``ValueError``, ``ConfigTypeError`` a ``TypeError``), so code written
against plain ``ValueError``/``TypeError`` keeps working.
"""

from __future__ import annotations


class MaestroError(Exception):
    """Base of every user-facing error of maestro-lod."""


class ConfigError(MaestroError, ValueError):
    """A value given by the user (an option, an argument, a config or checkpoint entry) is not acceptable."""


class ConfigTypeError(ConfigError, TypeError):
    """A value given by the user has the wrong type."""


class UsageError(ConfigError):
    """A command-line request that cannot be carried out as asked (the message says what to do)."""


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be read, or that does not fit the run it is loaded into."""


class RunDirectoryError(MaestroError):
    """A run directory that cannot be created, claimed or written (names the path and the cause)."""


class TrainingDiverged(MaestroError, ValueError):
    """The loss became NaN or infinite; training stopped before the bad update was applied."""

    def __init__(self, epoch: int, step: int | None, value: float, what: str = "loss"):
        where = f"epoch {epoch}" + ("" if step is None else f", step {step}")
        super().__init__(f"{what} is {value} at {where}; training stopped")
        self.epoch, self.step, self.value = epoch, step, value


class MissingFileError(ConfigError, FileNotFoundError):
    """A file or directory the user pointed at (data, a config, a checkpoint) does not exist."""
