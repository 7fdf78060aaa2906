"""The ``maestro-lod`` console script.

It lives outside the package so that it runs before the package (and torch, which takes a second
or two) is imported: Ctrl-C during that import ends with one line and exit code 130, as it does
anywhere later, instead of a traceback.
"""

import sys


def main() -> int:
    """Import the command line and run it."""
    try:
        from maestro_lod.cli import main as run
    except KeyboardInterrupt:
        print("maestro-lod: interrupted", file=sys.stderr)
        return 130
    return run()
