"""``--qeff-shard I/N``: this CI machine runs the I-th of N disjoint parts of the selected cards.

Cards are dealt round-robin over their sorted ids: shard ``I`` (1-based) takes the cards at
positions ``I-1, I-1+N, I-1+2N, …``. Every machine computes its part alone from the same card
set, the parts are disjoint and together hold every card, and their sizes differ by at most one.
Round-robin over sorted ids was chosen over a stable hash of each id: a hash keeps a card on the
same shard when other cards are added, but leaves shards unbalanced (sha256 of the 37 shipped
ids, modulo 4, gives shards of 6, 8, 11 and 12 cards; modulo 8, of 1 to 7), and CI time is set by
the largest shard. The price: adding a card moves the cards after it to other shards, which only
matters for caches kept per machine.

``python -m pytest_qeff.report merge DIR…`` joins the shards' results.json files again.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Shard", "parse"]

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def take(self, ordered: Sequence[T]) -> list[T]:
        """This shard's part of ``ordered`` (already sorted by id)."""
        return list(ordered[self.index - 1 :: self.count])


def parse(value: str) -> Shard:
    """The option's converter: ``"2/4"`` → ``Shard(2, 4)``; anything else is a usage error that
    pytest reports with the option's name."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not match:
        raise argparse.ArgumentTypeError(f"{value!r} is not I/N (e.g. 1/4: the first of four shards)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"{value!r}: I must be between 1 and N, and N at least 1")
    return Shard(index, count)
