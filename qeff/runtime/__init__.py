"""Sessions: one per backend, one interface (:class:`qeff.runtime.base.Session`)."""

from __future__ import annotations

from qeff.runtime.base import Session

__all__ = ["Session"]
