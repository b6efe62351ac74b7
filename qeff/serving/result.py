"""Moved to :mod:`qeff.generation.result`; this name stays for existing imports."""

from qeff.generation.result import ServingResult

__all__ = ["ServingResult"]
