"""The package's first import: torch, which takes seconds, so that a Ctrl-C during it is handled here.

``python -m flagcx.launch`` imports this package before its own code runs; a Ctrl-C in
those seconds (no rank has started yet) prints one ``flagcx.launch:`` line and exits
130, as a Ctrl-C once ranks run does, instead of a KeyboardInterrupt traceback through
torch's import. Any other process gets the KeyboardInterrupt unchanged.
"""

from __future__ import annotations

import sys


def _launcher_starting() -> bool:
    """Whether this process is ``python -m flagcx.launch`` (its package is still being imported)."""
    argv = getattr(sys, "orig_argv", [])
    return "-m" in argv and argv[argv.index("-m") + 1 :][:1] == ["flagcx.launch"]


try:
    import torch  # noqa: F401
except KeyboardInterrupt:
    if not _launcher_starting():
        raise
    sys.stderr.write("flagcx.launch: stopped by SIGINT before any rank started\n")
    raise SystemExit(130) from None
