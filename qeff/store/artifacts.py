"""The artifact cache: every stage's output is a directory with a ``manifest.json``.

    $QEFF_HOME (default ./qeff_models)/
      <model>/<export hash>/            onnx/model.onnx, manifest.json
        <backend compile dir>/          e.g. ort_1BS_32PL_128CL, qpc_16cores_1BS_32PL_128CL_1devices_mxfp6

A stage is reused only when its manifest equals, key for key, the manifest the run would write
now (model identity and weight digest, config, transforms, library versions, options) AND every
file still matches the size and digest the manifest records for it (:mod:`qeff.store.integrity`; the
``quick`` check by default, ``full`` under :func:`verify_cache` / ``--verify-cache``). A file that
fails is reported in one line on stderr and the artifact is rebuilt (``Built.repaired`` says why).

Builds happen in a temporary sibling directory ``.tmp-<name>-<8 hex>``: files get the usual
permissions, are recorded (digests) and fsync'd, the manifest is written last (with a digest of
itself), and the directory is renamed into place — so a killed run never leaves a directory a
later run trusts. A lock (``<name>.lock``, :mod:`qeff.store.locks`) makes two processes building the
same artifact build it once; its holder also removes temporaries that killed builds of the same
artifact left behind (no other builder of that name can be running while it holds the lock).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from qeff.store import atomic, integrity
from qeff.errors import ArtifactError, UsageError
from qeff.store.layout import MANIFEST, qeff_home
from qeff.store.locks import PathLock, remove_if_free

__all__ = [
    "qeff_home",
    "manifest_hash",
    "read_manifest",
    "Built",
    "build_artifact",
    "discard",
    "check_artifact",
    "check_holder",
    "is_qeff_manifest",
    "verify_cache",
    "verify_mode",
    "MANIFEST",
    "VERIFY_MODES",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "LOCK_SUFFIX",
    "FAILED_LOG_SUFFIX",
    "owner_of_temporary",
]

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LOCK_SUFFIX = ".lock"
#: A failed compile's log is kept beside its target as ``<name>.failed.log`` (the build's own
#: temporary directory is removed).
FAILED_LOG_SUFFIX = ".failed.log"
#: quick: sizes + stat + sampled digests (full digest of a file whose stat changed); full: every digest.
VERIFY_MODES = ("quick", "full")

_MODE: ContextVar[str | None] = ContextVar("qeff_verify_cache", default=None)
#: (directory, manifest digest, mode) verified (or built) by this process, so opening a session
#: right after a reuse does not read every file a second time (as long as no file's stat changed).
_VERIFIED: set[tuple[str, str, str]] = set()  # (directory, manifest digest, mode)


def verify_mode() -> str:
    """The integrity check applied on reuse: :func:`verify_cache`'s, else ``$QEFF_VERIFY_CACHE``, else quick."""
    mode = _MODE.get() or os.environ.get("QEFF_VERIFY_CACHE") or "quick"
    if mode not in VERIFY_MODES:
        raise UsageError(f"QEFF_VERIFY_CACHE={mode!r}: choose one of {', '.join(VERIFY_MODES)}")
    return mode


@contextmanager
def verify_cache(mode: str = "full") -> Iterator[None]:
    """``with verify_cache("full"):`` — every reuse inside recomputes every file's digest."""
    if mode not in VERIFY_MODES:
        raise UsageError(f"unknown cache verification {mode!r}; choose one of {', '.join(VERIFY_MODES)}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def manifest_hash(manifest: dict, length: int = 12) -> str:
    return hashlib.sha256(_canonical(manifest).encode()).hexdigest()[:length]


def _self_digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.blake2b(_canonical(body).encode(), digest_size=16).hexdigest()


def _load_manifest(directory: Path) -> tuple[dict | None, str | None]:
    """(the manifest or None if absent, what is wrong with it or None)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None, None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"its manifest is corrupt ({exc})"
    if not isinstance(record, dict):
        return None, "its manifest is corrupt (not a JSON object)"
    if "digest" in record and record["digest"] != _self_digest(record):
        return None, "its manifest's content does not match its digest (edited or corrupted)"
    return record, None


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory`` or None if absent; raise ArtifactError if it is unreadable
    or its own digest does not match its content."""
    record, problem = _load_manifest(directory)
    if problem is not None:
        raise ArtifactError(f"the cached artifact {directory} is damaged: {problem}; delete that directory to rebuild it")
    return record


@dataclass(frozen=True)
class Built:
    path: Path
    manifest: dict
    reused: bool
    seconds: float  # time this call spent building (0 when reused)
    build_seconds: float  # how long the original build took (what reuse saved)
    #: why a cached copy with a matching manifest was rebuilt (it failed its integrity check), else None
    repaired: str | None = None
    #: seconds this call spent checking the cached files (0 when built)
    check_seconds: float = 0.0


def _problems(directory: Path, record: dict, required: tuple[str, ...], mode: str) -> tuple[list[str], dict]:
    """What is wrong with the files of a cached artifact whose manifest matches (empty: nothing)."""
    files = record.get("files")
    if not isinstance(files, dict):
        return ["its manifest records no file digests (built by an older qeff)"], {}
    missing = [r for r in required if r not in files]
    if missing:
        return [f"its manifest records no {missing[0]}"], {}
    problems, refreshed = integrity.check_tree(directory, files, full=mode == "full")
    return [str(p) for p in problems], refreshed


def _inspect(directory: Path, manifest: dict, required: tuple[str, ...], mode: str) -> tuple[str, dict | None, str]:
    """("match", record, "") | ("absent", None, "") | ("different", None, "") | ("corrupt", None, why)."""
    record, problem = _load_manifest(directory)
    if problem is not None:
        return "corrupt", None, problem
    if record is None:
        return ("corrupt", None, "its manifest.json is missing") if directory.is_dir() else ("absent", None, "")
    if _canonical(record.get("inputs")) != _canonical(manifest):
        return "different", None, ""
    problems, refreshed = _problems(directory, record, required, mode)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return "corrupt", None, problems[0] + more
    if refreshed:
        _refresh_stats(directory, record, refreshed)
    _VERIFIED.add((str(directory), record.get("digest", ""), mode))
    return "match", record, ""


def _refresh_stats(directory: Path, record: dict, refreshed: dict[str, list[int]]) -> None:
    """Store new stat keys of files whose full digests matched (a copied cache), so the next
    reuse is quick again. Best effort: a read-only cache simply stays on the slower path."""
    lock = PathLock(str(directory) + LOCK_SUFFIX)
    try:
        if not lock.acquire(blocking=False):
            return
    except OSError:
        return
    try:
        current = read_manifest(directory)
        if current is None or current.get("digest") != record.get("digest"):
            return  # rebuilt meanwhile: those stats belong to other files
        updated = json.loads(json.dumps(current))
        for rel, key in refreshed.items():
            updated["files"][rel]["stat"] = key
        updated["digest"] = _self_digest(updated)
        atomic.write_text(directory / MANIFEST, json.dumps(updated, indent=2, sort_keys=True, default=str))
        record.clear()
        record.update(updated)
    except (OSError, ArtifactError):
        pass
    finally:
        _release(lock)


def check_artifact(directory: str | os.PathLike, *, mode: str | None = None) -> dict:
    """The manifest of a compiled artifact after checking its files; ArtifactError naming the
    first bad file otherwise. Free when this process already verified or built it."""
    directory = Path(directory)
    mode = mode or verify_mode()
    record = read_manifest(directory)
    if record is None:
        raise ArtifactError(f"{directory} is not a qeff artifact (no manifest.json)")
    if not isinstance(record.get("files"), dict):
        return record  # an artifact from before integrity records: nothing to check it against
    key = (str(directory), record.get("digest", ""))
    if ((*key, mode) in _VERIFIED or (*key, "full") in _VERIFIED) and _stats_unchanged(directory, record["files"]):
        return record
    problems, refreshed = _problems(directory, record, (), mode)
    if problems:
        raise ArtifactError(f"the artifact {directory} failed its integrity check: {problems[0]}; rebuild it")
    if refreshed:
        _refresh_stats(directory, record, refreshed)
    _VERIFIED.add((*key, mode))
    return record


#: The keys every manifest :func:`build_artifact` writes has.
_MANIFEST_KEYS = frozenset({"inputs", "outputs", "build_seconds", "created"})


def is_qeff_manifest(record: object) -> bool:
    """Whether a parsed ``manifest.json`` has the keys of the ones qeff writes."""
    return isinstance(record, dict) and _MANIFEST_KEYS <= set(record)


def check_holder(path: str | os.PathLike, *, levels: int = 3) -> dict | None:
    """The one integrity path for every file a command reads from the cache: the artifact holding
    ``path`` (``path`` itself or the nearest of its ``levels`` parents with a manifest qeff wrote)
    is checked by :func:`check_artifact` and its manifest returned; None when no artifact holds
    ``path`` (a QPC or tokenizer of the user's own, outside any cache: nothing to check it against).

    Issue 19: `qeff execute` read the export's tokenizer (and a QPC given as its ``qpcs/``
    directory) without a check, so an edited ``tokenizer.json`` gave wrong text with exit 0."""
    path = Path(path)
    for directory in [path, *path.parents[:levels]]:
        if not (directory / MANIFEST).is_file():
            continue
        record = read_manifest(directory)  # ArtifactError when it is corrupt or edited
        if directory == path or is_qeff_manifest(record):  # a parent's: only a manifest qeff wrote
            return check_artifact(directory)
    return None


def _stats_unchanged(directory: Path, files: dict) -> bool:
    """Every file still has the stat key recorded (nothing wrote to it since it was verified)."""
    try:
        return all(integrity.stat_key(os.stat(directory / rel)) == rec.get("stat") for rel, rec in files.items())
    except OSError:
        return False


def owner_of_temporary(name: str) -> str | None:
    """The artifact name a ``.tmp-<name>-<8 hex>`` or ``.trash-<name>-<8 hex>`` directory belongs to."""
    for prefix in (TMP_PREFIX, TRASH_PREFIX):
        if name.startswith(prefix):
            owner, _, tag = name[len(prefix):].rpartition("-")
            if owner and len(tag) == 8 and all(c in "0123456789abcdef" for c in tag):
                return owner
    return None


def _remove_stale(directory: Path) -> None:
    """Temporaries of ``directory``'s earlier builds; the caller holds its lock, so no build of
    that name is running: whatever is left was left by a killed one."""
    for entry in directory.parent.iterdir():
        if entry.is_dir() and owner_of_temporary(entry.name) == directory.name:
            shutil.rmtree(entry, ignore_errors=True)


def _tidy(directory: Path) -> None:
    """On reuse: remove temporaries a killed build of this artifact left, if no build of it is
    running (its lock is free). Best effort and cheap: one lock attempt and one directory listing."""
    if not any(owner_of_temporary(e.name) == directory.name for e in directory.parent.iterdir()):
        return
    lock = PathLock(str(directory) + LOCK_SUFFIX)
    try:
        if lock.acquire(blocking=False):
            try:
                _remove_stale(directory)
            finally:
                _release(lock)
    except OSError:
        pass  # a read-only cache: nothing to tidy


def _release(lock: PathLock) -> None:
    """Release an artifact's lock and remove its file unless someone else holds it now, so that
    finished work leaves no lock file for `qeff doctor` to list as a leftover. Safe while another
    process waits on it: acquiring re-checks that the path still names the file it locked."""
    lock.release()
    try:
        remove_if_free(lock.path)
    except OSError:
        pass  # a read-only cache keeps its (empty) lock files


def _cache_unwritable(directory: Path, exc: OSError) -> UsageError:
    reason = {errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.ENOTDIR: "a path component is a file, not a directory",
              errno.EEXIST: "a file of that name is in the way"}.get(exc.errno or 0, exc.strerror or str(exc))
    if exc.errno == errno.ENAMETOOLONG:  # another --home cannot shorten a name inside the cache
        return UsageError(f"cannot write the artifact cache at {directory}: a name in that path is longer than its file "
                          f"system allows ({len(directory.name.encode())} bytes)")
    return UsageError(f"cannot write the artifact cache at {directory}: {reason}; choose a writable directory with --home or QEFF_HOME")


def _normalize_permissions(tmp: Path) -> None:
    """What plain ``open()``/``mkdir()`` would have given: libraries that write through
    temporary files leave 0600 files (issue 14: ``model.onnx.data``), unreadable to a team
    sharing the cache."""
    for path in [tmp, *tmp.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(atomic.default_mode(executable=True))
        else:
            path.chmod(atomic.default_mode(executable=bool(path.stat().st_mode & 0o111)))


_NEARLY_FULL = 4 * 2**20


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return _NEARLY_FULL


def _bytes_under(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def _builders_lock(directory: Path, waiting_to: str = "") -> PathLock:
    """The lock every builder of ``directory`` takes, held (waiting, and saying so, while another
    process builds it); a cache that cannot hold a lock file is one sentence."""
    lock = PathLock(str(directory) + LOCK_SUFFIX)
    try:
        lock.acquire(on_wait=lambda who: _say(f"waiting for {who}, which is building {directory}{waiting_to}"))
    except OSError as exc:
        raise _cache_unwritable(directory.parent, exc) from exc
    return lock


def _say(message: str) -> None:
    print(f"[qeff] {message}", file=sys.stderr, flush=True)


def build_artifact(
    directory: str | os.PathLike,
    manifest: dict,
    builder: Callable[[Path], dict | None],
    *,
    required: tuple[str, ...] = (),
    force: bool = False,
    size_hint: Callable[[], int | None] | int | None = None,
) -> Built:
    """Reuse ``directory`` if its manifest's inputs equal ``manifest`` and its files pass their
    integrity check; else run ``builder(tmp_dir)`` and atomically move the result into place.

    ``builder`` may return extra facts (sizes, timings) stored under ``"outputs"``. ``force``
    rebuilds even when the manifest matches. ``size_hint`` (bytes, or a function giving them
    when asked) is how much the build writes, for the message if the disk fills up.
    """
    directory = Path(directory)
    mode = verify_mode()
    if os.path.lexists(directory) and not directory.is_dir():
        # Issue 19: a plain file here failed every run with "Not a directory". qeff did not make
        # it, so it is not removed unasked; `qeff doctor` reports it and `clean --damaged` removes it.
        raise ArtifactError(f"{directory} is a file where qeff keeps an artifact directory; move it away, or remove it "
                            f"with `qeff clean --damaged`")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cache_unwritable(directory.parent, exc) from exc
    start_check = time.perf_counter()
    if not force:
        state, record, why = _inspect(directory, manifest, required, mode)
        if state == "match":
            _tidy(directory)
            return _reused(directory, record, time.perf_counter() - start_check)
    lock = _builders_lock(directory)
    try:
        repaired = None
        if not force:
            state, record, why = _inspect(directory, manifest, required, mode)  # built by another process meanwhile?
            if state == "match":
                return _reused(directory, record, time.perf_counter() - start_check)
            if state == "corrupt":
                repaired = why
                _say(f"the cached artifact {directory} failed its integrity check ({why}); rebuilding it")
        _remove_stale(directory)
        return _build(directory, manifest, builder, repaired, size_hint)
    finally:
        _release(lock)


def _build(directory: Path, manifest: dict, builder, repaired: str | None, size_hint) -> Built:
    tmp = directory.parent / f"{TMP_PREFIX}{directory.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise _cache_unwritable(directory.parent, exc) from exc
    start = time.perf_counter()
    try:
        outputs = builder(tmp) or {}
        seconds = time.perf_counter() - start
        _normalize_permissions(tmp)
        files = integrity.record_tree(tmp, exclude=(MANIFEST,), sync=True)
        record = {"inputs": manifest, "outputs": outputs, "build_seconds": round(seconds, 3), "created": time.time(),
                  "files": files, "integrity": {"algorithm": integrity.ALGORITHM, "sample_block": integrity.SAMPLE_BLOCK,
                                                "sample_count": integrity.SAMPLE_COUNT}}
        record["digest"] = _self_digest(record)
        atomic.write_text(tmp / MANIFEST, json.dumps(record, indent=2, sort_keys=True, default=str))
        atomic.fsync_dir(tmp)
        _install(tmp, directory)
    except BaseException as exc:
        written = _bytes_under(tmp)
        # Native writers (ONNX Runtime) report a full disk as "Failed to write …" without errno:
        # a failed build with almost no space left on its disk is taken as the disk filling up.
        full = atomic.is_disk_full(exc) or (isinstance(exc, Exception) and _free_bytes(tmp) < _NEARLY_FULL)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            try:
                needed = size_hint() if callable(size_hint) else size_hint
            except Exception:  # the hint is only for the message
                needed = None
            raise atomic.disk_full_error(directory.parent, what=f"building {directory.name}", needed=needed,
                                         written=written) from exc
        raise
    _VERIFIED.add((str(directory), record["digest"], "full"))
    return Built(directory, record, reused=False, seconds=seconds, build_seconds=seconds, repaired=repaired)


def discard(built: Built) -> bool:
    """Remove the artifact ``built`` (one qeff built that must never be served: a fused graph that
    failed its check) under the lock its builders take, so that it never pulls a directory from
    under a process rebuilding or repairing it. Kept when its manifest is no longer ``built``'s (it
    was rebuilt meanwhile: that build is judged by its own check). True when removed."""
    directory = Path(built.path)
    lock = _builders_lock(directory, ", to remove the copy that failed")
    try:
        record, _ = _load_manifest(directory)
        if record is None or record.get("digest") != built.manifest.get("digest"):
            return False
        shutil.rmtree(directory, ignore_errors=True)
        _VERIFIED.difference_update({entry for entry in _VERIFIED if entry[0] == str(directory)})
        return not directory.exists()
    finally:
        _release(lock)


def _foreign(entry: Path) -> bool:
    """Entries inside an artifact directory that belong to other artifacts nested in it (an
    export holds its compile and verify directories, their locks and their builds' temporaries)."""
    if entry.name.endswith(LOCK_SUFFIX) or entry.name.endswith(FAILED_LOG_SUFFIX) or owner_of_temporary(entry.name):
        return True
    return entry.is_dir() and (entry / MANIFEST).exists()


def _recorded_names(directory: Path) -> set[str]:
    """The top-level names of the files ``directory``'s manifest records (empty when it is
    missing or unreadable: then nothing there is provably the artifact's)."""
    record, _ = _load_manifest(directory)
    files = record.get("files") if isinstance(record, dict) else None
    return {rel.split("/", 1)[0] for rel in files} if isinstance(files, dict) else set()


def _install(tmp: Path, directory: Path) -> None:
    """Put the finished build ``tmp`` at ``directory`` (the caller holds its lock).

    Without nested artifacts the old directory is swapped out whole (one rename each way).
    With them (an export rebuilt over its compile directories), only the artifact's own entries
    are replaced: moving the directory would move other processes' builds and locks out from
    under them. The old manifest goes first, so from then on no reader trusts the directory until
    the new manifest lands, last."""
    if not directory.exists():
        tmp.rename(directory)
        atomic.fsync_dir(directory.parent)
        return
    new = {e.name for e in tmp.iterdir()} - {MANIFEST}
    # Only what the old manifest recorded, or what the new build replaces by name, is the
    # artifact's to remove; anything else in the directory (a user's notes, another tool's
    # files) stays where it is (issue 19: qeff deletes only what it provably made).
    owned = _recorded_names(directory) | new | {MANIFEST}
    foreign = [e for e in directory.iterdir() if _foreign(e) or e.name not in owned]
    trash = directory.parent / f"{TRASH_PREFIX}{directory.name}-{uuid.uuid4().hex[:8]}"
    if not foreign:
        directory.rename(trash)
        tmp.rename(directory)
        atomic.fsync_dir(directory.parent)
        shutil.rmtree(trash, ignore_errors=True)
        return
    (directory / MANIFEST).unlink(missing_ok=True)
    atomic.fsync_dir(directory)
    trash.mkdir()
    for old in list(directory.iterdir()):
        if _foreign(old) or old.name not in owned or old.name == MANIFEST:
            continue
        if old.name not in new or old.is_dir() or (tmp / old.name).is_dir():
            old.rename(trash / old.name)  # no longer part of the artifact, or a directory os.replace cannot overwrite
    for name in sorted(new):
        os.replace(tmp / name, directory / name)  # over the old file: a reader's open handle keeps the old one
    os.replace(tmp / MANIFEST, directory / MANIFEST)
    atomic.fsync_dir(directory)
    tmp.rmdir()
    shutil.rmtree(trash, ignore_errors=True)


def _reused(directory: Path, record: dict, check_seconds: float) -> Built:
    return Built(directory, record, reused=True, seconds=0.0, build_seconds=float(record.get("build_seconds", 0.0)),
                 check_seconds=check_seconds)
