"""The artifact cache: every stage's output is a directory with a ``manifest.json``.

    $QEFF_HOME (default ./qeff_models)/
      <model>/<export hash>/            onnx/model.onnx, manifest.json
        <backend compile dir>/          e.g. ort_1BS_32PL_128CL, qpc_16cores_1BS_32PL_128CL_1devices_mxfp6

A stage is reused only when its manifest equals, key for key, the manifest the run would write
now (model identity and weight digest, config, transforms, library versions, options). Builds
happen in a temporary sibling directory and are renamed into place only after the manifest is
written, so a killed run never leaves a directory a later run trusts; a file lock makes two
processes building the same artifact build it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from qeff.errors import ArtifactError
from qeff.layout import MANIFEST, qeff_home

__all__ = ["qeff_home", "manifest_hash", "read_manifest", "Built", "build_artifact", "MANIFEST"]

def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def manifest_hash(manifest: dict, length: int = 12) -> str:
    return hashlib.sha256(_canonical(manifest).encode()).hexdigest()[:length]


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory`` or None if absent; raise ArtifactError if it is unreadable."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(
            f"the cached artifact {directory} has a corrupt manifest ({exc}); delete that directory to rebuild it"
        ) from exc


@dataclass(frozen=True)
class Built:
    path: Path
    manifest: dict
    reused: bool
    seconds: float  # time this call spent building (0 when reused)
    build_seconds: float  # how long the original build took (what reuse saved)


def _matches(directory: Path, manifest: dict, required: tuple[str, ...]) -> bool:
    try:
        found = read_manifest(directory)
    except ArtifactError:
        return False
    if found is None or _canonical(found.get("inputs")) != _canonical(manifest):
        return False
    return all((directory / r).exists() for r in required)


def build_artifact(
    directory: str | os.PathLike,
    manifest: dict,
    builder: Callable[[Path], dict | None],
    *,
    required: tuple[str, ...] = (),
    force: bool = False,
) -> Built:
    """Reuse ``directory`` if its manifest's inputs equal ``manifest`` (and ``required`` files
    exist); else run ``builder(tmp_dir)`` and atomically move the result into place.

    ``builder`` may return extra facts (sizes, timings) stored under ``"outputs"``. ``force``
    rebuilds even when the manifest matches.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    if not force and _matches(directory, manifest, required):
        return _reused(directory)
    with FileLock(str(directory) + ".lock"):
        if not force and _matches(directory, manifest, required):  # another process built it while we waited
            return _reused(directory)
        tmp = directory.parent / f".tmp-{directory.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        start = time.perf_counter()
        try:
            outputs = builder(tmp) or {}
            seconds = time.perf_counter() - start
            record = {"inputs": manifest, "outputs": outputs, "build_seconds": round(seconds, 3), "created": time.time()}
            (tmp / MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
            if directory.exists():
                trash = directory.parent / f".trash-{directory.name}-{uuid.uuid4().hex[:8]}"
                directory.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Built(directory, record, reused=False, seconds=seconds, build_seconds=seconds)


def _reused(directory: Path) -> Built:
    record = read_manifest(directory) or {}
    return Built(directory, record, reused=True, seconds=0.0, build_seconds=float(record.get("build_seconds", 0.0)))
