"""``python -m qeff.cloud.execute …`` = ``qeff execute …`` (the seed product's entry point)."""

from __future__ import annotations

import sys

from qeff.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["execute", *sys.argv[1:]]))
