"""Moved to :mod:`qeff.generation.continuous` (a strategy on the generation engine); this name
stays for existing imports. Patch the loop's functions there, not here."""

from qeff.generation.continuous import *  # noqa: F401,F403
from qeff.generation.continuous import __all__  # noqa: F401
