"""``qeff doctor`` and ``qeff clean``: the whole cache checked, and what killed runs left removed.

``scan(home)`` walks ``$QEFF_HOME`` and reports:

- every artifact (a directory with ``manifest.json``) with the result of its integrity check
  (:func:`qeff.store.artifacts.check_artifact`; ``full=True`` recomputes every digest);
- leftovers: build directories (``.tmp-<name>-<hex>``) and swapped-out copies
  (``.trash-<name>-<hex>``) with their sizes, lock files (``<name>.lock``), temporary files of
  atomic writes (``.<file>.<pid>.<hex>.tmp``) — each marked *in use* when a live process owns it
  (the artifact's lock is held, or the writing pid is alive on this host) — and kept logs of
  failed compiles.

``clean(home)`` removes the leftovers nobody is using, each while holding the lock of the
artifact it belongs to, so it can never remove a build in progress; ``damaged=True`` also removes
artifacts that fail their integrity check (the next run rebuilds them). Logs of failed compiles
are kept unless ``logs=True``.

An artifact is *superseded* when the versions its manifest records (qeff, qeff's source digest,
torch, transformers, onnx, onnxruntime) differ from this installation's: no run of this qeff can
ever reuse it, since reuse needs the manifest to match key for key. Each upgrade (or, for qeff's
developers, each edit) leaves the previous exports behind, 0.6 GB and more per model.
``clean(home, superseded=True)`` removes them, each only when no lock inside it is held.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from qeff.store import atomic
from qeff.store.artifacts import (
    FAILED_LOG_SUFFIX,
    LOCK_SUFFIX,
    MANIFEST,
    check_artifact,
    owner_of_temporary,
    read_manifest,
)
from qeff.code_digest import scope_for, scoped_source
from qeff.errors import ArtifactError
from qeff.store.home import is_qeff_manifest, require_cache
from qeff.store.layout import is_artifact_name
from qeff.store.locks import PathLock, holder, holder_pid, is_held, pid_alive, remove_if_free

__all__ = ["is_qeff_artifact", "ArtifactStatus", "Leftover", "Scan", "scan", "clean", "format_scan", "Cleaned", "reclaim",
           "superseded_because",
           "superseded_hint"]


@dataclass
class ArtifactStatus:
    path: Path
    kind: str
    bytes: int
    created: float
    problem: str | None  # None: every file matches its manifest
    #: why no run of this installation can reuse it (see the module docstring), else None
    superseded: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass
class Leftover:
    path: Path
    kind: str  # build | trash | lock | temporary file | failed log
    bytes: int
    in_use: str | None  # who uses it now, or None when it is stale


@dataclass
class Scan:
    home: Path
    artifacts: list[ArtifactStatus] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)

    @property
    def damaged(self) -> list[ArtifactStatus]:
        return [a for a in self.artifacts if not a.ok]

    @property
    def stale(self) -> list[Leftover]:
        return [x for x in self.leftovers if x.in_use is None and x.kind != "failed log"]

    @property
    def healthy(self) -> bool:
        return not self.damaged and not self.stale

    @property
    def superseded(self) -> list[ArtifactStatus]:
        """The outermost superseded artifacts (one nested in another goes with it), each with the
        bytes of its whole tree."""
        marked = [a for a in self.artifacts if a.superseded]
        roots = [a for a in marked if not any(o.path in a.path.parents for o in marked)]
        return [replace(a, bytes=atomic.tree_bytes(a.path)) for a in roots]


def _lock_user(lock: Path) -> str | None:
    if is_held(lock):
        return holder(lock) or "a running process"
    return None


#: What :mod:`qeff.store.locks` writes into a lock file: nothing (released) or ``pid host start-time``.
_LOCK_TEXT = re.compile(rb"(\d+ \S+ \d+\n)?")


def _is_qeff_lock(entry: Path) -> bool:
    """A lock file qeff made: an artifact's name plus ``.lock`` (issue 19: ``Cargo.lock``,
    ``yarn.lock`` and ``poetry.lock`` were removed by their suffix alone), holding what
    :mod:`qeff.store.locks` writes and nothing else."""
    if not is_artifact_name(entry.name[: -len(LOCK_SUFFIX)]) or entry.is_symlink() or not entry.is_file():
        return False
    try:
        with open(entry, "rb") as f:
            text = f.read(256)
    except OSError:
        return False
    return _LOCK_TEXT.fullmatch(text) is not None


def _leftover(entry: Path) -> Leftover | None:
    """What a killed run of qeff left at ``entry``, or None: only names qeff gives (an artifact's
    name with qeff's prefix or suffix), so a user's look-alike (``.tmp-build/``) is never one."""
    name = entry.name
    owner = owner_of_temporary(name)
    if owner is not None and is_artifact_name(owner) and entry.is_dir() and not entry.is_symlink():
        kind = "build" if name.startswith(".tmp-") else "trash"
        return Leftover(entry, kind, atomic.tree_bytes(entry), _lock_user(entry.parent / (owner + LOCK_SUFFIX)))
    if name.endswith(LOCK_SUFFIX) and _is_qeff_lock(entry):
        return Leftover(entry, "lock", entry.stat().st_size, _lock_user(entry))
    if atomic.TEMPORARY.match(name) and entry.is_file() and not entry.is_symlink():
        pid = int(name.rsplit(".", 3)[1])
        return Leftover(entry, "temporary file", entry.stat().st_size, f"pid {pid}" if pid_alive(pid) else None)
    if name.endswith(FAILED_LOG_SUFFIX) and is_artifact_name(name[: -len(FAILED_LOG_SUFFIX)]) and entry.is_file():
        return Leftover(entry, "failed log", entry.stat().st_size, None)
    return None


def superseded_because(record: dict, current: dict[str, str] | None = None) -> str | None:
    """Why an artifact whose manifest is ``record`` can never be reused by this installation (its
    recorded versions differ from ``current``, default :func:`qeff._system.library_versions`), or
    None when they match or the manifest records none. An export's or a verification's
    ``qeff_source`` is compared with the digest of that kind's code now (``"export:<hex>"``,
    :mod:`qeff.code_digest`), so one that recorded the whole-source digest (an older qeff) is
    superseded whatever that digest."""
    inputs = record.get("inputs") if isinstance(record, dict) else None
    versions = inputs.get("versions") if isinstance(inputs, dict) else None
    if not isinstance(versions, dict):
        return None
    if current is None:
        from qeff._system import library_versions

        current = library_versions()
    scope = scope_for(inputs)
    if scope is not None:
        current = {**current, "qeff_source": scoped_source(scope)}
    changes = []
    for key in sorted(set(versions) | set(current)):
        then, now = versions.get(key), current.get(key)
        if then == now:
            continue
        if key == "qeff_source":
            changes.append("another revision of qeff's source")
        else:
            changes.append(f"{key} {then or '(absent)'} (now {now or 'absent'})")
    return ("built with " + ", ".join(changes)) if changes else None


def superseded_hint(model_dir: str | os.PathLike) -> str | None:
    """One line for after an export: the superseded exports beside it (a model's directory in
    the cache) and the bytes they hold, or None when there are none. Reads manifests only."""
    from qeff._system import library_versions

    model_dir = Path(model_dir)
    current = library_versions()
    old = []
    for manifest in sorted(model_dir.glob(f"*/{MANIFEST}")):
        try:
            record = read_manifest(manifest.parent) or {}
        except ArtifactError:
            continue
        if superseded_because(record, current):
            old.append(manifest.parent)
    if not old:
        return None
    size = atomic.human_bytes(sum(atomic.tree_bytes(d) for d in old))
    return (f"{len(old)} export(s) of {model_dir.name} built by another qeff or library version hold {size} "
            f"and will never be reused; `qeff clean --superseded` removes them")


def _status(directory: Path, full: bool, current: dict[str, str] | None = None) -> ArtifactStatus:
    try:
        record = read_manifest(directory) or {}
    except ArtifactError as exc:
        return ArtifactStatus(directory, "?", _own_bytes(directory), 0.0, str(exc))
    inputs = record.get("inputs", {}) if isinstance(record.get("inputs"), dict) else {}
    kind = inputs.get("backend") or inputs.get("stage", "?")
    problem = None
    if not isinstance(record.get("files"), dict):
        problem = "its manifest records no file digests (built by an older qeff): it cannot be verified"
    else:
        try:
            check_artifact(directory, mode="full" if full else "quick")
        except ArtifactError as exc:
            problem = str(exc)
    return ArtifactStatus(directory, kind, _own_bytes(directory), float(record.get("created", 0.0)), problem,
                          superseded_because(record, current))


def is_qeff_artifact(directory: Path) -> bool:
    """A directory holding a manifest qeff wrote, or one named as qeff names artifacts (then a
    manifest that does not parse is damage to report). Another tool's ``manifest.json`` in a
    directory of the user's is neither, and nothing in it is touched."""
    if is_artifact_name(directory.name):
        return True
    try:
        return is_qeff_manifest(json.loads((directory / MANIFEST).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


def _in_the_way(path: Path) -> ArtifactStatus:
    """A file (or link) where qeff keeps an artifact directory (issue 19: an export replaced by a
    plain file failed every run with "Not a directory" while doctor saw nothing)."""
    try:
        size = path.lstat().st_size
    except OSError:
        size = 0
    return ArtifactStatus(path, "?", size, 0.0, f"{path} is a file where qeff keeps an artifact directory; "
                                                f"`qeff clean --damaged` removes it")


def _own_bytes(directory: Path) -> int:
    """Bytes of the artifact's own files (not the artifacts nested in it)."""
    total = 0
    for p in directory.iterdir():
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir() and not (p / MANIFEST).exists() and owner_of_temporary(p.name) is None:
            total += atomic.tree_bytes(p)
    return total


def scan(home: str | os.PathLike, *, full: bool = False, check: bool = True, command: str = "doctor") -> Scan:
    """Check every artifact under ``home`` and list the leftovers (see the module docstring);
    ``check=False`` lists only the leftovers. UsageError when ``home`` is not a qeff cache
    (:func:`qeff.store.home.require_cache`; ``command`` names the command in that sentence)."""
    from qeff._system import library_versions

    home = Path(home)
    require_cache(home, command)
    result = Scan(home)
    if not home.is_dir():
        return result
    current = library_versions() if check else None
    for root, dirs, files in os.walk(home):
        here = Path(root)
        for name in sorted(files):
            found = _leftover(here / name)
            if found is not None:
                result.leftovers.append(found)
            elif check and is_artifact_name(name):
                result.artifacts.append(_in_the_way(here / name))
        keep = []
        for name in sorted(dirs):
            found = _leftover(here / name)
            if found is not None:
                result.leftovers.append(found)  # a build or trash directory: not walked into
            else:
                keep.append(name)
        dirs[:] = keep
        if check and MANIFEST in files and here != home and is_qeff_artifact(here):
            result.artifacts.append(_status(here, full, current))
    return result


@dataclass
class Cleaned:
    removed: list[Leftover | ArtifactStatus] = field(default_factory=list)
    kept: list[tuple[Leftover | ArtifactStatus, str]] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(x.bytes for x in self.removed)


def _remove_unless_in_use(path: Path) -> str | None:
    """Remove the artifact ``path`` holding its lock and every lock inside it (builds nested in
    it); None when removed, else who is using it."""
    held: list[PathLock] = []
    if path.is_symlink() or not path.is_dir():  # a file in the way (see _in_the_way): nothing nested, no lock inside
        lock = PathLock(Path(str(path) + LOCK_SUFFIX))
        if not lock.acquire(blocking=False):
            return holder(lock.path) or "a running process"
        try:
            path.unlink(missing_ok=True)
        finally:
            lock.release()
        return None
    try:
        # Only qeff's locks: taking one rewrites its text, and a user's Cargo.lock in there is not one.
        nested = sorted(p for p in path.rglob("*" + LOCK_SUFFIX) if _is_qeff_lock(p))
        for lock_path in [Path(str(path) + LOCK_SUFFIX), *nested]:
            lock = PathLock(lock_path)
            if not lock.acquire(blocking=False):
                return holder(lock_path) or "a running process"
            held.append(lock)
        shutil.rmtree(path, ignore_errors=True)
        return None
    finally:
        for lock in held:
            lock.release()


def clean(home: str | os.PathLike, *, damaged: bool = False, logs: bool = False, superseded: bool = False) -> Cleaned:
    """Remove stale leftovers (and, with ``damaged``, artifacts that fail their check; with
    ``superseded``, artifacts no run of this installation can reuse)."""
    found = scan(home, command="clean")
    out = Cleaned()
    # Build directories first (each under its artifact's lock), lock files last.
    order = {"build": 0, "trash": 0, "temporary file": 1, "failed log": 2, "lock": 3}
    for item in sorted(found.leftovers, key=lambda x: order[x.kind]):
        if item.kind == "failed log" and not logs:
            continue
        if item.kind == "lock":
            if remove_if_free(item.path):
                out.removed.append(item)
            else:
                out.kept.append((item, f"held by {holder(item.path) or 'a running process'}"))
            continue
        if item.kind in ("build", "trash"):
            lock = PathLock(item.path.parent / (owner_of_temporary(item.path.name) + LOCK_SUFFIX))
            if not lock.acquire(blocking=False):
                out.kept.append((item, f"a build in progress ({holder(lock.path) or 'lock held'})"))
                continue
            try:
                shutil.rmtree(item.path, ignore_errors=True)
            finally:
                lock.release()
            out.removed.append(item)
            continue
        if item.in_use is not None:
            out.kept.append((item, f"being written by {item.in_use}"))
            continue
        item.path.unlink(missing_ok=True)
        out.removed.append(item)
    # Damaged artifacts first: a superseded one may hold one (it then goes with it).
    for art in (found.damaged if damaged else []) + (found.superseded if superseded else []):
        if not art.path.exists():
            continue
        user = _remove_unless_in_use(art.path)
        if user is None:
            out.removed.append(art)
        else:
            out.kept.append((art, f"in use by {user}"))
    # Locks whose build directories were just removed are free now.
    for item in scan(home, check=False, command="clean").leftovers:
        if item.kind == "lock" and remove_if_free(item.path):
            out.removed.append(item)
    return out


def _owner_alive(lock_path: Path) -> str | None:
    """Who may still own the build that ``lock_path`` guards: None only when that is provably no
    one — the lock is free (the kernel drops a dead holder's flock) and the pid the last holder
    stamped in it is gone from this host. A holder on another host cannot be checked from here."""
    stamp = holder_pid(lock_path)  # read first: testing the lock re-stamps it, and releasing clears it
    if is_held(lock_path):
        return holder(lock_path) or "a running process"
    if stamp is None:
        return None
    pid, host = stamp
    if host != socket.gethostname():
        return f"pid {pid} on {host} (another host: `qeff clean` there removes it)"
    return f"pid {pid}" if pid_alive(pid) and pid != os.getpid() else None


def reclaim(root: str | os.PathLike) -> Cleaned:
    """Remove the build and trash directories under ``root`` that killed runs left (issue 18: a
    3B export killed by the kernel left 12 GB in ``.tmp-export-…``). Run at the start of each
    command on its model's directory, so a run the preflight then refuses still frees them. Only
    qeff's own temporaries (``.tmp-<artifact>-<8 hex>``, ``.trash-…``) whose artifact's lock is free
    and whose last holder's pid is dead; each removed while holding that lock."""
    out = Cleaned()
    root = Path(root)
    if not root.is_dir():
        return out
    found = []
    for here, dirs, _ in os.walk(root):
        ours = [d for d in dirs if is_artifact_name(owner_of_temporary(d) or "") and not (Path(here) / d).is_symlink()]
        found += [Path(here) / d for d in sorted(ours)]
        dirs[:] = [d for d in dirs if d not in ours]  # not walked into
    for path in found:
        # Not through scan(): testing a lock (is_held) re-stamps it, erasing the dead holder's pid.
        item = Leftover(path, "build" if path.name.startswith(".tmp-") else "trash", atomic.tree_bytes(path), None)
        lock_path = path.parent / (owner_of_temporary(path.name) + LOCK_SUFFIX)
        user = _owner_alive(lock_path)
        if user is not None:
            out.kept.append((item, f"its builder may be running ({user})"))
            continue
        lock = PathLock(lock_path)
        try:
            if not lock.acquire(blocking=False):
                out.kept.append((item, "a build in progress"))
                continue
        except OSError:
            continue  # a read-only cache: `qeff clean` by its owner
        try:
            shutil.rmtree(item.path, ignore_errors=True)
        finally:
            lock.release()
            remove_if_free(lock_path)
        out.removed.append(item)
    return out


def format_scan(found: Scan) -> list[str]:
    """The lines ``qeff doctor`` prints."""
    home = found.home
    lines = []
    if not found.artifacts and not found.leftovers:
        return [f"no artifacts under {home}"]
    if found.artifacts:
        width = max(len(str(a.path.relative_to(home))) for a in found.artifacts)
        lines.append(f"{'artifact':<{width}}  {'kind':<8} {'size':>10}  check   (under {home})")
        for a in found.artifacts:
            rel = str(a.path.relative_to(home))
            state = ("ok" if a.ok else "DAMAGED") + (", superseded" if a.superseded else "")
            lines.append(f"{rel:<{width}}  {a.kind:<8} {atomic.human_bytes(a.bytes):>10}  {state}")
            if a.problem:
                lines.append(f"  {a.problem}")
    if found.leftovers:
        lines.append("")
        lines.append("leftovers:")
        for x in found.leftovers:
            state = f"in use ({x.in_use})" if x.in_use else ("kept (qeff clean --logs removes it)" if x.kind == "failed log" else "stale")
            lines.append(f"  {x.kind:<14} {atomic.human_bytes(x.bytes):>10}  {state:<8}  {x.path.relative_to(home)}")
    stale_bytes = sum(x.bytes for x in found.stale)
    lines.append("")
    if found.healthy:
        lines.append(f"cache healthy: {len(found.artifacts)} artifact(s) verified, nothing stale")
    else:
        lines.append(
            f"{len(found.damaged)} damaged artifact(s), {len(found.stale)} stale leftover(s) ({atomic.human_bytes(stale_bytes)}); "
            f"`qeff clean` removes the leftovers{', `qeff clean --damaged` the damaged artifacts' if found.damaged else ''} "
            f"(a damaged artifact is also rebuilt by the next run that needs it)"
        )
    old = found.superseded
    if old:
        lines.append(f"{len(old)} superseded artifact(s) ({atomic.human_bytes(sum(a.bytes for a in old))}) were built by another "
                     f"qeff or library version and will never be reused: `qeff clean --superseded` removes them")
    return lines
