"""The ``flagcx-bench`` command: parse the nccl-tests flags, then launch the ranks."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from .launch import launch
from .options import parse


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 wrong results or a failed rank, 2 usage error)."""
    opts = parse(sys.argv[1:] if argv is None else argv)
    return launch(opts)


if __name__ == "__main__":
    sys.exit(main())
