"""pytest-xdist: one card's stages run on one worker, where its artifacts are reused.

The suite marks each test ``xdist_group(<card>)``, the documented way. But ``--dist loadgroup``
finds groups by suffixing node ids on the workers (xdist 3.8 assigns ``Node._nodeid``), which
pytest 9.2 no longer reads, so the groups are silently ignored. The plugin therefore schedules by
card itself under ``--dist load`` (``-n`` alone) and ``--dist loadgroup``: xdist's
``LoadScopeScheduling`` with the card as the scope. Other ``--dist`` modes are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

__all__ = ["card_of", "make_scheduler", "DIST_MODES"]

DIST_MODES = ("load", "loadgroup")


def card_of(nodeid: str, card_ids: Sequence[str]) -> str | None:
    """``…::test_compile[llama-2-7b-chat-bs1-pl32-cl128-ort]`` → ``llama-2-7b-chat``."""
    start, end = nodeid.find("["), nodeid.rfind("]")
    if start < 0 or end < start:
        return None
    params = nodeid[start + 1 : end]
    return next((c for c in sorted(card_ids, key=len, reverse=True) if params.startswith(c + "-")), None)


def make_scheduler(config: pytest.Config, log, card_ids: Sequence[str]):
    from xdist.scheduler import LoadScopeScheduling

    class CardScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return card_of(nodeid, card_ids) or super()._split_scope(nodeid)

    return CardScheduling(config, log)
