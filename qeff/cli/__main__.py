"""``python -m qeff.cli …`` = ``qeff …``."""

from __future__ import annotations

from qeff.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
