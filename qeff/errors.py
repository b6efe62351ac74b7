"""Every error qeff raises on purpose.

    QEffError                       base; ``str(err)`` is one sentence a user can act on
    ├── UsageError                  bad input from the user (CLI exits with code 2, no traceback)
    │   ├── ModelNotFoundError      a model name/path that resolves to nothing
    │   ├── BackendUnavailableError a backend whose runtime/SDK is not installed here
    │   ├── CorruptWeightsError     a weights file whose header is unreadable or promises more than the file holds
    │   └── UnsupportedArchitectureError  refused from the config alone, before loading (also an UnsupportedModelError)
    ├── UnsupportedModelError       an architecture or module type the transform cannot handle
    ├── WeightsChangedError         a transform changed a parameter (name, shape or value)
    ├── NotStreamableError          a model the streamed export cannot write from its files (the in-memory one can)
    ├── ArtifactError               a cached artifact that is missing, corrupt or does not match
    ├── DiskFullError               a write that ran out of disk space (names the directory and the need)
    ├── CompileError                a compiler run failed (carries the command, exit code, stderr)
    └── VerificationError           a comparison outside its tolerance (carries every number)
"""

from __future__ import annotations

__all__ = [
    "QEffError",
    "UsageError",
    "ModelNotFoundError",
    "BackendUnavailableError",
    "CorruptWeightsError",
    "UnsupportedArchitectureError",
    "UnsupportedModelError",
    "WeightsChangedError",
    "NotStreamableError",
    "ArtifactError",
    "DiskFullError",
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


class CorruptWeightsError(UsageError):
    """A weights file whose header is unreadable, inconsistent, or places data past the file's end."""


class UnsupportedArchitectureError(UsageError, UnsupportedModelError):
    """A model refused from its config alone (:mod:`qeff.intake.support`), before any weight is read: the
    user asked for something qeff cannot run, so the command line treats it as a usage error."""

    def __init__(self, message: str, *, model_type: str | None = None, nearest: str | None = None):
        super().__init__(message)
        self.model_type = model_type
        self.nearest = nearest


class WeightsChangedError(QEffError):
    pass


class NotStreamableError(QEffError):
    """The streamed export (:mod:`qeff.weights`) cannot build this model from its weight files: a
    parameter name the checkpoint does not hold as is, or a weight the exporter folds into a new
    value. The pipeline exports such a model in memory instead."""


class ArtifactError(QEffError):
    pass


class DiskFullError(QEffError):
    """A stage failed because the disk (or the user's quota) is full."""


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
