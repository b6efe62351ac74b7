"""The static-batch loop (greedy, or sampled) and the front door :func:`generate`, for every backend.

Up to ``session.batch_size`` prompts run together: prefill feeds every row's prompt in chunks of
``prompt_len`` tokens (:func:`~qeff.generation.engine.prefill`), then each decode step feeds one
token per row until each row retires (:class:`~qeff.generation.engine.Ledger`). A row that has
retired, and a row that holds no prompt, is padding (``position -1``). The figures are those of
:mod:`qeff.generation.result`; ``generate(prompt_lookup=N)`` hands the prompts to the speculative
loop with the n-gram drafter instead.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import numpy as np

from qeff.errors import UsageError
from qeff.generation.engine import Clock, Engine, EosSuppressed, eos_ids, in_batches, prefill
from qeff.generation.ngram import DEFAULT_NGRAM_MAX, NgramDrafter
from qeff.generation.result import GenerationResult, RunSummary, batch_figures
from qeff.generation.sampling import batch_picker
from qeff.generation.speculative import generate_speculative
from qeff.runtime.base import Session

__all__ = ["generate", "run_prompts", "TextStreamer", "StaticBatch"]

log = logging.getLogger(__name__)

#: Called after each step with the new token of every row and which rows produced one.
TokenCallback = Callable[[np.ndarray, np.ndarray], None]

#: ``pick(logits (B, V), rows (B,) bool) -> (B,) tokens``; only the marked rows matter.
Picker = Callable[[np.ndarray, np.ndarray], np.ndarray]


class TextStreamer:
    """Prints the text of one row as it is generated (decoding the whole row each time, so that
    tokens which only form a character together print correctly)."""

    def __init__(self, tokenizer, row: int = 0, out: TextIO | None = None):
        self.tokenizer, self.row, self.out = tokenizer, row, out or sys.stdout
        self._ids: list[int] = []
        self._printed = ""

    def __call__(self, tokens: np.ndarray, produced: np.ndarray) -> None:
        if self.row >= len(tokens) or not produced[self.row]:
            return
        self._ids.append(int(tokens[self.row]))
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        self.out.write(text[len(self._printed) :])
        self.out.flush()
        self._printed = text

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


class StaticBatch:
    """The strategy: every row prefilled together, then one token per unfinished row per step."""

    def __init__(self, session: Session, pick: Picker, on_token: TokenCallback | None) -> None:
        self.session, self.pick, self.on_token = session, pick, on_token

    def _emit(self, engine: Engine, tokens: np.ndarray, rows: list[int]) -> None:
        produced = np.zeros(engine.batch_size, dtype=bool)
        produced[rows] = True
        if self.on_token is not None:
            self.on_token(tokens, produced)
        for r in rows:
            engine.ledger.emit(r, tokens[r])

    def prefill(self, engine: Engine) -> None:
        # Each row's first token comes from the chunk holding its last prompt token.
        logits = prefill(self.session.run, engine.prompt_ids, engine.batch_size, engine.prompt_len)
        rows = list(range(len(engine.prompt_ids)))
        mask = np.zeros(engine.batch_size, dtype=bool)
        mask[rows] = True
        first = self.pick(logits, mask)
        engine.clock.first_tokens()
        self._emit(engine, first, rows)

    def step(self, engine: Engine) -> bool:
        ledger, batch = engine.ledger, engine.batch_size
        rows = ledger.active()
        if not rows:
            return False
        # An unfinished row feeds its last token at its next position; a retired row (or one
        # without a prompt) is padding at position -1, which writes nothing.
        ids = np.zeros((batch, 1), dtype=np.int64)
        pos = np.full((batch, 1), -1, dtype=np.int64)
        for r, tokens in enumerate(ledger.tokens):
            ids[r, 0] = tokens[-1]
        for r in rows:
            pos[r, 0] = ledger.next_position(r)
        active = pos[:, 0] >= 0
        logits = self.session.run(ids, pos)
        self._emit(engine, self.pick(logits, active), rows)
        return True


def _generate_prompt_lookup(session, prompts, *, tokenizer, prompt_token_ids, prompt_len, generation_len, eos_token_id,
                            ignore_eos: bool, on_token, sampling, k, ngram_max):
    """:func:`generate` with ``prompt_lookup``: the speculative loop with the n-gram drafter."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"prompt_lookup must be at least 1 draft token per step (got {k!r})")
    if ngram_max is not None and (isinstance(ngram_max, bool) or not isinstance(ngram_max, int) or ngram_max < 1):
        raise UsageError(f"ngram_max must be at least 1 (got {ngram_max!r})")
    if sampling is not None and not getattr(sampling, "plain_greedy", True):
        raise UsageError("prompt-lookup decoding is greedy only: drop the sampling settings, or prompt_lookup")
    step = None
    if on_token is not None:
        batch = session.batch_size

        def step(r: int, token: int) -> None:  # the speculative loop's (row, token) as a TokenCallback
            tokens, mask = np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=bool)
            tokens[r], mask[r] = token, True
            on_token(tokens, mask)

    return generate_speculative(session, NgramDrafter(ngram_max or DEFAULT_NGRAM_MAX), prompts, tokenizer=tokenizer,
                                prompt_token_ids=prompt_token_ids, prompt_len=prompt_len, generation_len=generation_len,
                                eos_token_id=[] if ignore_eos else eos_token_id, on_token=step, num_speculative_tokens=k)


def generate(
    session: Session,
    prompts: Sequence[str] | None = None,
    *,
    tokenizer=None,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    prompt_len: int | None = None,
    generation_len: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    ignore_eos: bool = False,
    on_token: TokenCallback | None = None,
    sampling=None,
    sample_keys: Sequence[int] | None = None,
    prompt_lookup: int | None = None,
    ngram_max: int | None = None,
    suppress_eos: bool = False,
) -> GenerationResult:
    """Generation for up to ``session.batch_size`` prompts (text, or token ids): greedy, or as
    ``sampling`` (a :class:`qeff.generation.sampling.SamplingParams`) says. ``sample_keys``: each
    prompt's index in the whole input (default 0, 1, …), which picks its random stream.

    ``prompt_lookup=N``: prompt-lookup decoding (greedy only): each step drafts up to N tokens, the
    continuation of the latest earlier occurrence of the text's last ``ngram_max`` (default 3) …
    1 tokens, and the session verifies them in one step (:mod:`qeff.generation.ngram`); the tokens are
    those of plain greedy decoding, and the result (a :class:`qeff.generation.result.ServingResult`)
    reports ``mean_accepted_tokens`` per step. The session must return several positions' logits
    (``run(..., keep=N + 1)``): the fused CPU graph, or a graph exported with num_speculative_tokens.

    ``ignore_eos``: EOS does not stop a row, so every row runs to ``generation_len`` (or a full
    cache) — fixed-length runs for benchmarks, as vLLM's ``ignore_eos``: the row emits EOS and goes on.
    ``suppress_eos``: EOS is never chosen (its logits are -inf, :class:`EosSuppressed`), so every row
    also runs to ``generation_len`` — HF ``min_new_tokens`` and llama.cpp's ``--ignore-eos``; token
    comparisons with those hold only in this mode."""
    if suppress_eos:
        if ignore_eos:
            raise UsageError("ignore_eos and suppress_eos exclude each other: choose whether EOS is emitted or never chosen")
        ids = eos_token_id if eos_token_id is not None else eos_ids(tokenizer)
        session, eos_token_id, ignore_eos = EosSuppressed(session, ids), [], True
    if prompt_lookup is not None:
        return _generate_prompt_lookup(session, prompts, tokenizer=tokenizer, prompt_token_ids=prompt_token_ids,
                                       prompt_len=prompt_len, generation_len=generation_len, eos_token_id=eos_token_id,
                                       ignore_eos=ignore_eos, on_token=on_token, sampling=sampling, k=prompt_lookup,
                                       ngram_max=ngram_max)
    clock = Clock()
    engine = Engine.open(session, prompts, tokenizer=tokenizer, prompt_token_ids=prompt_token_ids, prompt_len=prompt_len,
                         generation_len=generation_len, eos_token_id=[] if ignore_eos else eos_token_id, who="generate",
                         clock=clock)
    # The length limit never exceeds the cache: a row of a 1-token prompt that fills the cache
    # stops for its length, as it always has here (issue 19 capped the limit at ctx_len).
    engine.ledger.limits = [min(g, engine.ctx_len) for g in engine.ledger.limits]
    pick = batch_picker(sampling, sample_keys, engine.prompt_ids, engine.batch_size)
    engine.run(StaticBatch(session, pick, on_token))
    result = GenerationResult(**engine.fields(clock.phased(), "row"))
    for msg in result.messages:
        log.warning(msg)
    return result


def run_prompts(
    session: Session,
    prompts: Sequence[str],
    *,
    tokenizer,
    generation_len: int | None = None,
    ignore_eos: bool = False,
    stream: TextIO | None = None,
    sampling=None,
    suppress_eos: bool = False,
) -> RunSummary:
    """Generate for every prompt, in batches of ``session.batch_size``; ``stream`` (a text file)
    receives the first prompt's tokens as they come; ``ignore_eos``, ``suppress_eos`` as :func:`generate`'s. With
    ``sampling`` each prompt draws from the random stream of its index in ``prompts`` (filler rows
    repeat their prompt's)."""
    results, texts, token_ids, messages = [], [], [], []
    for index, (rows, real, offset) in enumerate(in_batches(list(prompts), session.batch_size)):
        streamer = TextStreamer(tokenizer, out=stream) if stream is not None and index == 0 else None
        if streamer:
            stream.write(f"\n{rows[0]}")
        keys = [offset + i % real for i in range(len(rows))]
        r = generate(session, rows, tokenizer=tokenizer, generation_len=generation_len, ignore_eos=ignore_eos,
                     on_token=streamer, sampling=sampling, sample_keys=keys, suppress_eos=suppress_eos)
        if streamer:
            streamer.end()
        results.append(r)
        texts += r.texts[:real]
        token_ids += r.token_ids[:real]
        messages += r.messages[:real]
    return RunSummary(
        prompts=list(prompts), text=texts, token_ids=token_ids, messages=messages, **batch_figures(results),
        batch_size=session.batch_size, sampling=sampling.to_dict() if sampling is not None else None,
    )
