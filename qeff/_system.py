"""Facts about the machine and the installation: physical cores, peak memory, library versions,
and the constants every manifest records. Imports nothing heavy: the cached path of the command
line reads manifests through this module without importing torch or transformers."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

from qeff.code_digest import scoped_source

__all__ = ["physical_cores", "peak_rss_mb", "source_digest", "library_versions", "OPSET", "TRANSFORMS"]

#: The ONNX opset of the exported (portable) graph.
OPSET = 17
#: The retained-state transforms every exported graph went through (stamped into manifests).
TRANSFORMS = ("RetainedStateCache", "PositionIdsMask", "LastTokenLogits", "EagerAttention")


def library_versions(scope: str | None = None) -> dict[str, str]:
    """Versions of everything that shapes an artifact, qeff's own code included: code changed
    under the same version number must not reuse an artifact the old code built. Read from the
    installed distributions' metadata (the same strings as ``module.__version__``), so that
    comparing manifests imports none of them.

    ``scope``: the kind of artifact (:data:`qeff.code_digest.SCOPES`: ``"export"``, ``"verify"``),
    whose ``qeff_source`` is then ``"<scope>:<digest>"`` of only the qeff code that can shape it
    (issue 18: editing a CLI message no longer re-exports a 7B checkpoint). None: a digest of all
    of qeff's ``*.py`` files, for the kinds whose builders are not bounded (compiled graphs, QPCs,
    precision tiers; :mod:`qeff.code_digest` says why)."""
    from importlib.metadata import PackageNotFoundError, version

    from qeff._version import __version__

    out = {"qeff": __version__, "qeff_source": source_digest() if scope is None else scoped_source(scope)}
    for dist in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


_SOURCE_DIGEST: str | None = None


def source_digest(root: str | os.PathLike | None = None) -> str:
    """A digest of all of qeff's own ``*.py`` files (computed once per process), or of those of
    the copy of the package at ``root``."""
    global _SOURCE_DIGEST
    if root is not None:
        return _digest_tree(Path(root))
    if _SOURCE_DIGEST is None:
        _SOURCE_DIGEST = _digest_tree(Path(__file__).parent)
    return _SOURCE_DIGEST


def _digest_tree(root: Path) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once).

    Threads default to this: on CPUs with SMT, a second thread per core only adds contention for
    the matmul units that decode is bound by.
    """
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in allowed:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return len(allowed)
        cores.add((package, core))
    return max(1, len(cores))


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB (across the per-stage resets of :mod:`qeff.meter`)."""
    from qeff.meter import process_peak

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    return max(peak, process_peak() / 2**20)
