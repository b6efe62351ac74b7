"""The precision stage (``--qeff-precision fp32,fp16,mxfp6,…``): one test per tier per card.

The first tier's test of a card runs the whole ladder (:func:`qeff.precision.ladder.run_ladder`:
HF fp32 on the untouched model is traced once, each tier's emulated graph is built, compiled for
ONNX Runtime and run), the others read their rung from the worker's cache. Each test records its
tier (:class:`~pytest_qeff.records.PrecisionRecord`) and fails when the tier is outside the card's
budget (``[precision] budgets``; qeff's measured defaults otherwise).

The corpus: the tiny tier has random weights and no tokenizer, so it runs seeded random tokens of
the tiny vocabulary; the full tier runs the qeff corpus (``qeff/data/corpus.txt``) through the
model's tokenizer. The card's ``[precision]`` table sets how many windows of how many tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pytest_qeff.cards import Card
from pytest_qeff.collect import Target
from pytest_qeff.records import PrecisionRecord, StageRecord

__all__ = ["precision", "corpus_for"]


def corpus_for(ws, card: Card, tokens: int) -> tuple[list[int], str]:
    """(token ids, what they are) for the ladder of ``card`` in the workspace's tier."""
    if ws.tier == "tiny":
        vocab = card.tiny_config().vocab_size
        rng = random.Random(f"{card.id}/{card.tiny.seed}/corpus")  # a str seed is stable across runs
        return [rng.randrange(vocab) for _ in range(tokens)], "random tokens"
    from qeff.data import corpus_token_ids

    return corpus_token_ids(ws.pipeline(card).tokenizer), "qeff corpus"


def _run(ws, target: Target, tiers: tuple[str, ...]):
    from qeff.precision.ladder import Budget, run_ladder

    card, case = target.card, target.case
    pipe = ws.pipeline(card)
    pipe.export()
    prompts = ws.prompts(card, case)
    steps = card.prompts.generation_len
    size = getattr(card.precision, ws.tier)
    rows = max(size.rows, len(prompts))
    window = max(size.window, max(len(p) for p in prompts) + steps)  # the prompts' greedy steps must fit too
    corpus, what = corpus_for(ws, card, rows * window)
    budgets = {name: Budget(**b.model_dump()) for name, b in card.precision.budgets.items()}
    ladder = run_ladder(pipe.model, pipe.onnx_path, ",".join(tiers), corpus_ids=corpus, prompt_token_ids=prompts,
                        rows=rows, window=window, steps=steps, prompt_len=case.prompt_len, budgets=budgets, progress=False)
    return ladder, what


def precision(ws, target: Target, tier: str, tiers: tuple[str, ...], ladders: dict, record: Callable[[StageRecord], None]) -> None:
    card, case = target.card, target.case
    found = ladders.get(card.id)
    if found is None:
        try:
            found = _run(ws, target, tiers)
        except pytest.skip.Exception:
            raise
        except Exception as exc:  # remembered: every tier of the card reports it, none retries
            found = exc
        ladders[card.id] = found
    if isinstance(found, BaseException):
        from qeff.errors import QEffError

        if isinstance(found, QEffError):
            pytest.fail(f"{card.id}: precision ladder: {found}", pytrace=False)
        raise found
    ladder, what = found
    result = ladder[tier]
    record(PrecisionRecord(
        prompts=ws.prompts(card, case), prompt_texts=ws.prompt_texts(card, case), batch_size=case.batch_size,
        prompt_len=case.prompt_len, ctx_len=case.ctx_len, device_group=list(ws.device_group),
        tier_name=tier, result=result, corpus=what, corpus_tokens=ladder.corpus_tokens, rows=ladder.rows,
        window=ladder.window, steps=ladder.steps, tiers=[t.tier for t in ladder.tiers],
    ))
    if result.failures:
        pytest.fail(f"{target.id} precision {tier} vs HF fp32: " + "; ".join(result.failures), pytrace=False)
