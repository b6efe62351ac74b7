"""``qeff list``: the cached artifacts under $QEFF_HOME, current or superseded, and the leftovers of killed runs.

(The module is not named ``list``: a submodule becomes an attribute of :mod:`qeff.cli`, where it
would hide the builtin.)"""

from __future__ import annotations

import time
from pathlib import Path

from qeff.cli import arguments as a
from qeff.cli.checks import home_of
from qeff.cli.options import Invocation
from qeff.errors import ArtifactError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="list cached artifacts")
    a.home_arg(p)
    p.set_defaults(func=run)


def run(inv: Invocation) -> int:
    from qeff.store.artifacts import read_manifest

    home = home_of(inv)
    if not home.is_dir():
        print(f"no artifacts: {home} does not exist")
        return 0
    from qeff._system import library_versions
    from qeff.store.artifacts import owner_of_temporary
    from qeff.store.atomic import human_bytes
    from qeff.store.doctor import is_qeff_artifact, scan, superseded_because
    from qeff.store.home import require_cache

    require_cache(home, "list")

    current = library_versions()
    rows = []
    superseded: list[tuple[str, int]] = []
    for manifest in sorted(home.rglob("manifest.json")):
        directory = manifest.parent
        rel = str(directory.relative_to(home))
        if any(owner_of_temporary(part) for part in directory.relative_to(home).parts):
            continue  # a build in progress (or one a killed run left): not an artifact
        if directory == home or not is_qeff_artifact(directory):
            continue  # another tool's manifest.json among the user's files
        try:
            record = read_manifest(directory) or {}
        except ArtifactError:
            rows.append((rel, "corrupt", "-", "-", ""))
            continue
        size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.get("created", 0)))
        kind = record.get("inputs", {}).get("backend") or record.get("inputs", {}).get("stage", "?")
        # What is nested in a superseded artifact goes with it (a verify record has no versions).
        old = superseded_because(record, current) is not None or any(Path(d) in Path(rel).parents for d, _ in superseded)
        if old:
            superseded.append((rel, size))
        rows.append((rel, kind, f"{size / 2**20:.1f} MiB", created, "superseded" if old else ""))
    stale = scan(home, check=False, command="list").stale
    if stale:
        print(f"{len(stale)} stale leftover(s) of killed runs ({human_bytes(sum(x.bytes for x in stale))}): "
              f"`qeff doctor` lists them, `qeff clean` removes them")
    if not rows:
        print(f"no artifacts under {home}")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{'artifact':<{width}}  {'kind':<8} {'size':>10}  {'created':<16}  state   (under {home})")
    for path, kind, size, created, state in rows:
        print(f"{path:<{width}}  {kind:<8} {size:>10}  {created:<16}  {state or 'current'}")
    if superseded:
        print(f"{len(superseded)} superseded artifact(s) ({human_bytes(sum(b for _, b in superseded))}) were built by another "
              f"qeff or library version and will never be reused: `qeff clean --superseded` removes them")
    return 0
