"""Moved to :mod:`qeff.generation.ngram`; this name stays for existing imports."""

from qeff.generation.ngram import *  # noqa: F401,F403
from qeff.generation.ngram import __all__  # noqa: F401
