"""Which directories are qeff caches: the marker qeff writes, and how older caches are recognised.

``qeff clean --home DIR`` used to treat any directory as a cache and delete every ``*.lock`` and
``.tmp-*`` under it by name (issue 19: a source tree lost its ``Cargo.lock`` and ``yarn.lock``).
Now a cache is a directory that holds :data:`qeff.store.layout.CACHE_MARKER`, which qeff writes when it
first builds an artifact there; `qeff doctor`, `qeff clean` and `qeff list` refuse any other
directory in one sentence (:func:`require_cache`).

Caches made before the marker existed are recognised by their layout: a ``manifest.json`` qeff
wrote (its keys, and its digest of itself, which no other tool's manifest matches) at most three
levels down, where qeff puts artifacts (``<model>/export-<hash>/``, and what is nested in it).
Such a cache gets its marker then (best effort: a read-only one is still recognised each time).
A directory that is neither stays refused; ``touch DIR/.qeff-cache`` marks it by hand.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from qeff.store import atomic
from qeff.store.artifacts import _self_digest, is_qeff_manifest
from qeff.errors import UsageError
from qeff.store.layout import CACHE_MARKER, MANIFEST

__all__ = ["mark", "is_marked", "is_cache", "require_cache", "is_qeff_manifest", "find_home"]

#: How deep below the cache root qeff puts artifacts: <model>/export-<hash>/<compile or verify>.
_LAYOUT_DEPTH = 3


def is_marked(home: str | os.PathLike) -> bool:
    return (Path(home) / CACHE_MARKER).is_file()


def mark(home: str | os.PathLike) -> None:
    """Write the marker in ``home`` unless it is there (created with its parents). Best effort:
    an unwritable home fails later, where the build says so in its own words."""
    home = Path(home)
    if is_marked(home):
        return
    try:
        home.mkdir(parents=True, exist_ok=True)
        from qeff._version import __version__

        atomic.write_text(home / CACHE_MARKER, json.dumps({"qeff_cache": 1, "created_by": f"qeff {__version__}",
                                                           "created": time.time()}) + "\n")
    except OSError:
        pass


def find_home(path: str | os.PathLike, levels: int = 4) -> Path | None:
    """The marked cache ``path`` lies in (itself or one of its ``levels`` parents), or None."""
    path = Path(path)
    return next((p for p in [path, *path.parents[:levels]] if is_marked(p)), None)


def _written_by_qeff(path: Path) -> bool:
    """A manifest qeff wrote: its keys, and (since manifests carry one) its digest of itself."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return is_qeff_manifest(record) and record.get("digest") == _self_digest(record)


def _laid_out_by_qeff(home: Path) -> bool:
    for depth in range(1, _LAYOUT_DEPTH + 1):
        for manifest in home.glob("/".join(["*"] * depth + [MANIFEST])):
            if _written_by_qeff(manifest):
                return True
    return False


def is_cache(home: str | os.PathLike) -> bool:
    """Whether ``home`` is a qeff cache: marked, or laid out by an older qeff (then marked now)."""
    home = Path(home)
    if is_marked(home):
        return True
    if home.is_dir() and _laid_out_by_qeff(home):
        mark(home)
        return True
    return False


def require_cache(home: str | os.PathLike, command: str) -> None:
    """Refuse (UsageError) a directory that exists and is not a qeff cache."""
    home = Path(home)
    if not home.exists() or is_cache(home):
        return
    if not home.is_dir():
        raise UsageError(f"{home} is a file, not a qeff cache: `qeff {command}` needs the cache directory (--home or QEFF_HOME)")
    raise UsageError(
        f"{home} is not a qeff cache: it holds no {CACHE_MARKER} marker and no manifest qeff wrote, so `qeff {command}` will not "
        f"look inside it (it only removes what qeff made); if an old qeff made it, mark it with `touch {home / CACHE_MARKER}`"
    )
