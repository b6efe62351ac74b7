"""Moved to :mod:`qeff.generation.sampling` (below the generation engine); this name stays for
existing imports."""

from qeff.generation.sampling import *  # noqa: F401,F403
from qeff.generation.sampling import __all__  # noqa: F401
