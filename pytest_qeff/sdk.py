"""Is the Cloud AI 100 SDK here? ``find_sdk()`` says, and says where it looked.

The ``qaic`` stages need two things: a compiler (``qaic-exec`` or ``qaic-compile``, on ``PATH`` or in
``/opt/qti-aic/exec/``) and the ``qaicrt`` Python module that runs a compiled QPC; and qeff must
have a ``qaic`` backend. When any is missing the stages skip with :attr:`Sdk.reason`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Sdk", "find_sdk", "SDK_EXEC_DIR", "COMPILERS"]

SDK_EXEC_DIR = Path("/opt/qti-aic/exec")
COMPILERS = ("qaic-exec", "qaic-compile")


@dataclass(frozen=True)
class Sdk:
    compiler: str | None  # path of qaic-exec / qaic-compile
    runtime: str | None  # where the qaicrt module was found
    backend: bool  # qeff.compile knows the "qaic" backend
    exec_dir: Path = SDK_EXEC_DIR

    @property
    def available(self) -> bool:
        return bool(self.compiler and self.runtime and self.backend)

    @property
    def reason(self) -> str:
        """Why the qaic stages cannot run here ('' when they can)."""
        missing = []
        if not self.compiler:
            missing.append(f"no {' or '.join(COMPILERS)} on PATH or in {self.exec_dir}/")
        if not self.runtime:
            missing.append("the qaicrt Python module is not importable")
        if missing:
            return "Cloud AI 100 SDK not found: " + "; ".join(missing) + " (install the Cloud AI 100 Platform and Apps SDK)"
        if not self.backend:
            return f"Cloud AI 100 SDK found ({self.compiler}), but this qeff has no 'qaic' backend yet"
        return ""


def find_sdk(exec_dir: Path = SDK_EXEC_DIR) -> Sdk:
    compiler = None
    for name in COMPILERS:
        compiler = shutil.which(name) or next(
            (str(p) for p in [exec_dir / name] if p.is_file() and os.access(p, os.X_OK)), None
        )
        if compiler:
            break
    spec = importlib.util.find_spec("qaicrt")
    runtime = (spec.origin or "qaicrt") if spec is not None else None
    from qeff.compilers import BACKENDS

    return Sdk(compiler=compiler, runtime=runtime, backend="qaic" in BACKENDS, exec_dir=exec_dir)
