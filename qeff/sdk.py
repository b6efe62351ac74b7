"""Is the Cloud AI 100 SDK here? The one place that says, and says where it looked.

The ``qaic`` backend needs two things from the SDK:

- a compiler, ``qaic-compile`` (newer Apps SDKs) or ``qaic-exec`` (older), on ``PATH`` or in
  :data:`EXEC_DIR` — one the user put on ``PATH`` wins, and ``qaic-compile`` is preferred;
- the runtime, the ``qaicrt`` extension module (importable, or in :data:`LIB_DIR`, where the
  Platform SDK installs it) plus the IO descriptor's protobuf module ``QAicApi_pb2`` (importable,
  or in :data:`PYTHON_DIR`).

:func:`status` answers without importing or running anything; the compiler
(:mod:`qeff.compilers.qaic`), the session (:mod:`qeff.runtime.qaic`), the CLI's ``--backend auto``
and the plugin's qaic stages all ask it, so they agree on what "the SDK is installed" means.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from qeff.errors import BackendUnavailableError

__all__ = [
    "SdkStatus",
    "status",
    "find_compiler",
    "require_compiler",
    "import_runtime",
    "SDK_ROOT",
    "EXEC_DIR",
    "LIB_DIR",
    "PYTHON_DIR",
    "COMPILERS",
]

SDK_ROOT = Path("/opt/qti-aic")
#: Where the Apps SDK installs its compilers.
EXEC_DIR = SDK_ROOT / "exec"
#: Where the Platform SDK installs the ``qaicrt`` extension module.
LIB_DIR = SDK_ROOT / "dev" / "lib" / (platform.machine() or "x86_64")
#: Where the SDK installs ``QAicApi_pb2`` (the IO descriptor's protobuf classes).
PYTHON_DIR = SDK_ROOT / "dev" / "python"
#: Compiler executables, preferred first.
COMPILERS = ("qaic-compile", "qaic-exec")


@dataclass(frozen=True)
class SdkStatus:
    compiler: Path | None  # the compiler found, or None
    runtime: str | None  # where ``qaicrt`` was found (module origin or SDK directory), or None
    exec_dir: Path
    lib_dir: Path

    @property
    def available(self) -> bool:
        return self.compiler is not None and self.runtime is not None

    @property
    def reason(self) -> str:
        """Why the qaic backend cannot run here ('' when it can), naming every place looked in."""
        missing = []
        if self.compiler is None:
            missing.append(f"no {' or '.join(COMPILERS)} on PATH or in {self.exec_dir}/")
        if self.runtime is None:
            missing.append(f"the qaicrt Python module is not importable nor in {self.lib_dir}/")
        if not missing:
            return ""
        return "Cloud AI 100 SDK not found: " + "; ".join(missing) + " (install the Cloud AI 100 Platform and Apps SDK)"


def find_compiler(*, search_path: str | None = None, exec_dir: str | os.PathLike | None = None) -> Path | None:
    """The compiler on ``search_path`` (default ``$PATH``), else in ``exec_dir`` (default
    :data:`EXEC_DIR`); None when there is none."""
    search_path = os.environ.get("PATH", "") if search_path is None else search_path
    exec_dir = Path(EXEC_DIR if exec_dir is None else exec_dir)
    for name in COMPILERS:
        found = shutil.which(name, path=search_path)
        if found:
            return Path(found)
    for name in COMPILERS:
        candidate = exec_dir / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_compiler(*, search_path: str | None = None, exec_dir: str | os.PathLike | None = None) -> Path:
    """:func:`find_compiler`, or :class:`BackendUnavailableError` naming every place it looked."""
    found = find_compiler(search_path=search_path, exec_dir=exec_dir)
    if found is None:
        where = EXEC_DIR if exec_dir is None else exec_dir
        raise BackendUnavailableError(
            f"no Cloud AI 100 compiler found: looked for {' and '.join(COMPILERS)} on PATH and in {where}; "
            f"install the Cloud AI Apps SDK, or pass the compiler's path"
        )
    return found


def _runtime_location() -> str | None:
    try:
        spec = importlib.util.find_spec("qaicrt")
    except (ImportError, ValueError):  # a None entry in sys.modules (tests), or a broken package
        spec = None
    if spec is not None:
        return spec.origin or "qaicrt"
    if LIB_DIR.is_dir() and any(LIB_DIR.glob("qaicrt*")):
        return str(LIB_DIR)
    return None


def status(*, search_path: str | None = None, exec_dir: str | os.PathLike | None = None) -> SdkStatus:
    """What of the SDK is installed here (nothing is imported or run)."""
    return SdkStatus(
        compiler=find_compiler(search_path=search_path, exec_dir=exec_dir),
        runtime=_runtime_location(),
        exec_dir=Path(EXEC_DIR if exec_dir is None else exec_dir),
        lib_dir=LIB_DIR,
    )


def _import(name: str, sdk_dir: Path):
    try:
        return importlib.import_module(name)
    except ImportError as first:
        error: ImportError = first
    if sdk_dir.is_dir() and str(sdk_dir) not in sys.path:
        sys.path.append(str(sdk_dir))
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            sys.path.remove(str(sdk_dir))
            error = exc
    raise BackendUnavailableError(
        f"the Cloud AI 100 runtime is not installed here: Python module {name} was not found on sys.path "
        f"nor in {sdk_dir}/ ({error}); install the Cloud AI Platform and Apps SDKs to run QPCs"
    ) from error


def import_runtime():
    """``(qaicrt, QAicApi_pb2)``: the runtime module and the IO descriptor's protobuf module,
    imported from ``sys.path`` or the SDK's directories. Raises :class:`BackendUnavailableError`
    naming where they were expected."""
    return _import("qaicrt", LIB_DIR), _import("QAicApi_pb2", PYTHON_DIR)
