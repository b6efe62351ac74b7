"""Content digests of a model's source files (a checkpoint directory or a ``.gguf``), for the
export manifest's model identity.

The identity used to be each file's size and mtime (issue 19): weights replaced in place by
others of the same size, with the mtime set back (``os.utime``, ``cp -p``, ``rsync -t``), left
the identity unchanged, so the old export was reused and the old model's tokens served with exit
0, even under ``--verify-cache``. Now the identity holds a blake2b digest of every file's
content. Hashing a 7B checkpoint takes ~12 s (~1.2 GB/s on one core), so each file's digest is
kept in the cache, keyed by ``(inode, size, mtime_ns, ctime_ns)``: any write through the file
system changes ``ctime``, which no user call can set back, so an unchanged key means unchanged
content, and a cached run reads no weights. ``--verify-cache`` (``full``) hashes every file again.

    $QEFF_HOME/.sources/<blake2b of the source path>.json
        {"path": "/models/llama", "files": {"model.safetensors": {"stat": [ino, size, mtime_ns, ctime_ns], "blake2b": "…"}}}

A record is a cache of facts any run can recompute: written atomically, last writer wins, and a
record that cannot be read or written is simply recomputed (a read-only cache still works).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qeff.store import atomic, integrity
from qeff.store.home import mark

__all__ = ["SOURCES_DIR", "content_digest"]

#: Where the per-source records live, inside the cache root.
SOURCES_DIR = ".sources"


def _key(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _record_path(home: Path, source: Path) -> Path:
    name = hashlib.blake2b(str(source).encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()
    return home / SOURCES_DIR / f"{name}.json"


def _load(path: Path, source: Path) -> dict[str, dict]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("path") != str(source) or not isinstance(record.get("files"), dict):
        return {}
    return record["files"]


def content_digest(source: str | os.PathLike, *, home: str | os.PathLike | None = None, rehash: bool = False) -> str:
    """A digest of the content of ``source`` (a file, or every file under a directory, with their
    relative paths). ``home``: the cache keeping each file's digest by stat key (None: hash every
    file now); ``rehash``: hash every file even when its stat key is cached."""
    source = Path(source)
    base = source.parent if source.is_file() else source
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    record_path = _record_path(Path(home), source) if home is not None else None
    cached = _load(record_path, source) if record_path is not None and not rehash else {}
    entries: dict[str, dict] = {}
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        rel = f.relative_to(base).as_posix()
        before = os.stat(f)
        known = cached.get(rel)
        if isinstance(known, dict) and known.get("stat") == _key(before) and isinstance(known.get("blake2b"), str):
            digest = known["blake2b"]
        else:
            digest = integrity.full_digest(f)
            if _key(os.stat(f)) != _key(before):
                record_path = None  # written to while read: use this digest, but never cache it
        entries[rel] = {"stat": _key(before), "blake2b": digest}
        h.update(f"{rel}\0{before.st_size}\0{digest}\n".encode("utf-8", "surrogateescape"))
    if record_path is not None and entries != cached:
        try:
            mark(home)  # the first thing a run writes into a new cache: mark it as qeff's
            record_path.parent.mkdir(exist_ok=True)
            atomic.write_text(record_path, json.dumps({"path": str(source), "files": entries}, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # a read-only cache: recomputed next time
    return h.hexdigest()
