"""``python -m emitguard``: the ``emitguard`` command line (:func:`emitguard.cli.main`)."""

from __future__ import annotations

import sys

from emitguard.cli import main

if __name__ == "__main__":
    sys.exit(main())
