"""``qeff clean``: remove what killed runs left behind (never a build in progress) — in the cache, and
the scratch folders of gone runs in the system's temporary directory; ``--superseded``: also what
another qeff or library version built (this one never reuses it)."""

from __future__ import annotations

from qeff.cli import arguments as a
from qeff.cli.checks import home_of
from qeff.cli.options import Invocation

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("clean", help="remove stale temporaries and locks of killed runs (never a build in progress)")
    a.home_arg(p)
    p.add_argument("--damaged", action="store_true", help="also remove artifacts that fail their integrity check")
    p.add_argument("--logs", action="store_true", help="also remove the kept logs of failed compiles")
    p.add_argument("--superseded", action="store_true",
                   help="also remove artifacts built by another qeff or library version (never reused by this one)")
    p.set_defaults(func=run)


def run(inv: Invocation) -> int:
    from qeff.store.atomic import human_bytes
    from qeff.store.doctor import ArtifactStatus, clean

    home, store = home_of(inv), inv.store
    done = clean(home, damaged=store.damaged, logs=store.logs, superseded=store.superseded)

    def what(item) -> str:
        if not isinstance(item, ArtifactStatus):
            return item.kind
        return "damaged artifact" if item.problem else f"superseded artifact ({item.superseded})"

    for item in done.removed:
        print(f"removed {what(item)}: {item.path}")
    for item, why in done.kept:
        print(f"kept {what(item)}: {item.path} ({why})")
    print(f"freed {human_bytes(done.freed)} under {home}")
    # The scratch folders stages spill to outside the cache (qeff.store.scratch): those of runs
    # that are gone, whichever cache they used.
    from qeff.store.scratch import reclaim_scratch

    scratch = reclaim_scratch()
    for path, _ in scratch.removed:
        print(f"removed scratch folder of a run that is gone: {path}")
    for path, why in scratch.kept:
        print(f"kept scratch folder: {path} ({why})")
    if scratch.removed:
        print(f"freed {human_bytes(scratch.freed)} of scratch folders in {scratch.removed[0][0].parent}")
    return 0
