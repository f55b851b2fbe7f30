"""``python -m gilfree``: see :mod:`gilfree.cli`."""

import sys

from gilfree.cli import main

if __name__ == "__main__":
    sys.exit(main())
