"""The ``maestro-lod`` console script.

It lives outside the package so that it runs before the package (and torch, which takes a second
or two) is imported: Ctrl-C during that import ends with one line and exit code 130, as it does
anywhere later, instead of a traceback. The interrupt is only noted while the import runs and acted
on after it, because a KeyboardInterrupt raised inside the initialisation of torch's C++ extensions
aborts the process instead of unwinding.
"""

import signal
import sys


def main() -> int:
    """Import the command line and run it."""
    interrupts = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(signum))
    try:
        from maestro_lod.cli import main as run
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupts:
        print("maestro-lod: interrupted", file=sys.stderr)
        return 130
    return run()
