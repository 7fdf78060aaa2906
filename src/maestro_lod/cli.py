"""The ``maestro-lod`` command line. Each sub-command lives in its own module under ``commands``
and registers itself through a ``register(subparsers)`` function listed in ``COMMANDS``."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import bench, caused_by_interrupt, compress, demo, train
from .errors import MaestroError, UsageError

# One ``register(subparsers)`` per sub-command module in ``maestro_lod.commands``.
COMMANDS: list = [train.register, demo.register, bench.register, compress.register]


class _Parser(argparse.ArgumentParser):
    """Reports argument errors as a :class:`UsageError` (one line) instead of a usage dump; its
    sub-command parsers inherit this class."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maestro-lod", description="Train low-rank ordered models (MAESTRO) "
                                     "and turn one trained model into a family of smaller ones.")
    parser.add_argument("--version", action="version", version=f"maestro-lod {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        return int(args.handler(args) or 0)
    except MaestroError as exc:
        print(f"maestro-lod: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:  # Ctrl-C (130), or SIGTERM where a command turns it into one
        print("maestro-lod: interrupted", file=sys.stderr)
        return getattr(interruption, "exit_code", 130)
    except RuntimeError as exc:  # some libraries (torch.export) re-raise a Ctrl-C as a RuntimeError
        if not caused_by_interrupt(exc):
            raise
        print("maestro-lod: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
