"""``python -m flagcx.bench``: the same as the ``flagcx-bench`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
