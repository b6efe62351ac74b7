"""``qeff doctor``: verify every cached artifact; show stale temporaries and locks."""

from __future__ import annotations

from qeff.cli import arguments as a
from qeff.cli.checks import home_of
from qeff.cli.options import Invocation
from qeff.cli.output import warn_untested_libraries

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="verify every cached artifact; show stale temporaries and locks")
    a.home_arg(p)
    p.add_argument("--full", action="store_true", help="recompute every file's full digest (default: the quick check)")
    p.set_defaults(func=run)


def run(inv: Invocation) -> int:
    from qeff.store.doctor import format_scan, scan

    warn_untested_libraries()
    found = scan(home_of(inv), full=inv.store.full)
    print("\n".join(format_scan(found)))
    return 0 if found.healthy else 1
