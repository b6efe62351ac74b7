"""Every error qeff raises on purpose.

    QEffError                       base; ``str(err)`` is one sentence a user can act on
    ├── UsageError                  bad input from the user (CLI exits with code 2, no traceback)
    │   ├── ModelNotFoundError      a model name/path that resolves to nothing
    │   └── BackendUnavailableError a backend whose runtime/SDK is not installed here
    ├── UnsupportedModelError       an architecture or module type the transform cannot handle
    ├── WeightsChangedError         a transform changed a parameter (name, shape or value)
    ├── ArtifactError               a cached artifact that is missing, corrupt or does not match
    ├── CompileError                a compiler run failed (carries the command, exit code, stderr)
    └── VerificationError           a comparison outside its tolerance (carries every number)
"""

from __future__ import annotations

__all__ = [
    "QEffError",
    "UsageError",
    "ModelNotFoundError",
    "BackendUnavailableError",
    "UnsupportedModelError",
    "WeightsChangedError",
    "ArtifactError",
    "CompileError",
    "VerificationError",
]


class QEffError(Exception):
    """Base of all qeff errors."""


class UsageError(QEffError):
    """The user asked for something that cannot work as asked."""


class ModelNotFoundError(UsageError):
    pass


class BackendUnavailableError(UsageError):
    pass


class UnsupportedModelError(QEffError):
    pass


class WeightsChangedError(QEffError):
    pass


class ArtifactError(QEffError):
    pass


class CompileError(QEffError):
    def __init__(self, message: str, *, command: list[str] | None = None, returncode: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.command = command or []
        self.returncode = returncode
        self.stderr = stderr


class VerificationError(QEffError):
    def __init__(self, message: str, report: object = None):
        super().__init__(message)
        self.report = report
