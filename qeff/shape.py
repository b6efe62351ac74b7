"""The static shape of a compiled graph: rows, prefill chunk and cache slots, as one checked value.

``batch_size``, ``prompt_len`` and ``ctx_len`` travel together through the CLI, the pipeline and
the backends; as three loose integers each caller re-checked them (or did not). A :class:`Shape`
is checked once, when it is made, with the sentence the command line has always given: a value
that is not a positive integer, or a prefill chunk longer than the context, is a
:class:`~qeff.errors.UsageError` naming the flag. It sits on the lowest import floor (it needs
only :mod:`qeff.errors`), so any module may take one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qeff.errors import UsageError

__all__ = ["Shape", "check_positive"]


def check_positive(flag: str, value: int | None, *, optional: bool = False) -> None:
    """A size is a positive ``int`` (never a bool, a float or a string); ``optional``: None passes."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{flag} must be a positive integer (got {value})")


@dataclass(frozen=True)
class Shape:
    """Rows per batch, tokens per prefill chunk and cache slots per row (prompt + generated tokens)."""

    batch_size: int = 1
    prompt_len: int = 32
    ctx_len: int = 128

    def __post_init__(self) -> None:
        check_positive("--batch_size", self.batch_size)
        check_positive("--prompt_len", self.prompt_len)
        check_positive("--ctx_len", self.ctx_len)
        if self.prompt_len > self.ctx_len:
            raise UsageError(f"--prompt_len {self.prompt_len} is larger than --ctx_len {self.ctx_len}; "
                             "a prefill chunk must fit in the context")

    def as_dict(self) -> dict[str, int]:
        """The three sizes by name: a manifest's fields, or the keyword arguments of the functions
        that still take them loose."""
        return asdict(self)
