"""The generation engine: what every generation loop shares, written once.

A loop (a *strategy*: :mod:`~qeff.generation.static`, :mod:`~qeff.generation.continuous`,
:mod:`~qeff.generation.speculative`) decides only which rows run and how the next tokens are
chosen. The engine owns the rest:

- **intake** — prompts to token ids, the checks that they fit the session (:meth:`Engine.open`);
- **prefill** — each prompt, right-padded, in chunks of ``prompt_len`` tokens (padding carries
  ``position_id = -1``), from position 0 or from a reused prefix (:func:`prefill_chunks`,
  :func:`prefill`);
- **retirement** — one rule for every loop (:class:`Ledger`): a prompt stops at an EOS token
  (``eos``), at its generation length (``length``) or when its next token has no cache slot left
  (``ctx_len``), checked in that order after each token it produces. ``ignore_eos`` empties the EOS
  set; ``suppress_eos`` wraps the session in :class:`EosSuppressed`, so EOS is never chosen;
- **timings** — one clock (:class:`Clock`): the call's start, the first tokens, the decode steps,
  the end; the figures are derived from it in :mod:`qeff.generation.result`.

    Engine.open(session, prompts)          intake, limits, EOS set, clock started
      └─ Engine.run(strategy)
           strategy.prefill(engine)        prefill chunks → first tokens → Ledger.emit
           while strategy.step(engine):    one step of the loop's own kind → Ledger.emit (retires)
      └─ engine.fields(clock.…())          token ids, texts, stop reasons, timings → a result
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from qeff.errors import UsageError
from qeff.generation.result import result_fields
from qeff.inputs import batches

__all__ = ["Engine", "Strategy", "Ledger", "Clock", "prefill_chunks", "prefill", "eos_ids", "EosSuppressed", "EOS_MODES",
           "check_inputs", "common_prefix", "in_batches", "full_cache_messages"]

#: ``on_token(prompt_index, token)`` after each token a prompt produces.
PromptTokenCallback = Callable[[int, int], None]

#: What EOS does to a row: ``stop`` it (the default), ``continue`` past it (``ignore_eos``: the EOS
#: token is emitted and the row goes on, as vLLM's ``ignore_eos``), or ``suppress`` it (its logits
#: are -inf, so it is never chosen: HF ``min_new_tokens``, llama.cpp ``--ignore-eos``).
EOS_MODES = ("stop", "continue", "suppress")


def eos_ids(tokenizer=None, model=None) -> set[int]:
    """EOS token ids from the model's generation config and the tokenizer, whichever say."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


class EosSuppressed:
    """``session`` whose logits never choose ``token_ids``: each ``run``'s logits have those
    columns set to -inf, so greedy picks, sampling and the speculative loops' verification all
    skip them — without touching any loop. Every other attribute is the session's own.

    Token comparisons with engines that suppress EOS (HF ``generate(min_new_tokens=…)``,
    llama.cpp's ``--ignore-eos`` logit bias) hold for the whole run only in this mode: with
    ``ignore_eos`` the row emits EOS and goes on, and the text after it differs."""

    def __init__(self, session, token_ids) -> None:
        ids = sorted({int(t) for t in ([token_ids] if isinstance(token_ids, int) else token_ids)})
        if not ids:
            raise UsageError("suppressing EOS needs the EOS token id: the tokenizer names none; pass eos_token_id")
        self._session = session
        self._ids = np.array(ids, dtype=np.int64)

    @property
    def suppressed(self) -> list[int]:
        return self._ids.tolist()

    def __getattr__(self, name: str):
        return getattr(self._session, name)

    def run(self, *args, **kwargs) -> np.ndarray:
        logits = self._session.run(*args, **kwargs)
        if not logits.flags.writeable:  # a view of a runtime's buffer that numpy may not write
            logits = logits.copy()
        logits[..., self._ids] = -np.inf
        return logits


def stop_ids(eos_token_id: int | Sequence[int] | None, tokenizer=None) -> frozenset[int]:
    """The tokens that retire a row: ``eos_token_id`` as given, or the tokenizer's when None."""
    if eos_token_id is None:
        eos_token_id = eos_ids(tokenizer)
    return frozenset({int(eos_token_id)} if isinstance(eos_token_id, int) else map(int, eos_token_id))


def check_inputs(prompt_token_ids: list[list[int]], batch: int, prompt_len: int, ctx_len: int) -> None:
    """One sentence for each way the prompts cannot run on this session."""
    if not prompt_token_ids:
        raise UsageError("no prompts to generate from")
    if len(prompt_token_ids) > batch:
        raise UsageError(f"{len(prompt_token_ids)} prompts do not fit batch_size={batch}; split them into batches")
    if prompt_len > ctx_len:
        raise UsageError(f"prompt_len={prompt_len} is larger than ctx_len={ctx_len}")
    for i, ids in enumerate(prompt_token_ids):
        if not ids:
            raise UsageError(f"prompt {i} is empty (no tokens)")
        if len(ids) >= ctx_len:
            raise UsageError(
                f"prompt {i} has {len(ids)} tokens but ctx_len={ctx_len} leaves no room to generate; "
                f"use a larger ctx_len or a shorter prompt"
            )


def length_limits(generation_len: int | Sequence[int | None] | None, n: int, ctx_len: int) -> list[int]:
    """Each prompt's most new tokens: one limit for all, or one per prompt; None = until the cache
    is full (at most ``ctx_len``)."""
    values = [generation_len] * n if generation_len is None or isinstance(generation_len, int) else list(generation_len)
    if len(values) != n:
        raise UsageError(f"generation_len has {len(values)} entries for {n} prompts")
    values = [ctx_len if g is None else int(g) for g in values]
    if min(values) < 1:
        raise UsageError(f"generation_len must be at least 1 (got {min(values)})")
    return values


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefill_chunks(prompt_ids: Sequence[Sequence[int]], batch_size: int, prompt_len: int,
                   starts: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(input_ids, position_ids, ends)`` for each prefill chunk, each (batch_size, prompt_len).

    Rows are right-padded (pad id 0, position -1); rows past ``len(prompt_ids)`` are all padding.
    Row ``r`` starts at position ``starts[r]`` (default 0: a reused prefix is not run again).
    ``ends`` marks the rows whose last prompt token is in this chunk.
    """
    n = len(prompt_ids)
    lengths = np.array([len(p) for p in prompt_ids] + [0] * (batch_size - n), dtype=np.int64)
    begin = np.zeros(batch_size, dtype=np.int64)
    if starts is not None:
        begin[:n] = [int(s) for s in starts]
    n_chunks = int(-(-(lengths - begin).max() // prompt_len))
    for c in range(n_chunks):
        ids = np.zeros((batch_size, prompt_len), dtype=np.int64)
        pos = np.full((batch_size, prompt_len), -1, dtype=np.int64)
        for r, prompt in enumerate(prompt_ids):
            start = int(begin[r]) + c * prompt_len
            piece = prompt[start : start + prompt_len]
            ids[r, : len(piece)] = piece
            pos[r, : len(piece)] = np.arange(start, start + len(piece))
        first = begin + c * prompt_len
        ends = (lengths > first) & (lengths <= first + prompt_len)
        yield ids, pos, ends


def prefill(run: Callable[[np.ndarray, np.ndarray], np.ndarray], prompt_ids: Sequence[Sequence[int]], batch_size: int,
            prompt_len: int, starts: Sequence[int] | None = None) -> np.ndarray:
    """Run every prefill chunk through ``run(ids, positions) -> (B, vocab)``; return each row's
    logits at its last prompt token (B, vocab), copied (a runtime may reuse its output buffer).
    Rows that hold no prompt are zeros."""
    last = None
    for ids, pos, ends in prefill_chunks(prompt_ids, batch_size, prompt_len, starts):
        logits = run(ids, pos)
        if last is None:
            last = np.zeros((batch_size, *logits.shape[1:]), dtype=logits.dtype)
        last[ends] = logits[ends]
    return last


def full_cache_messages(who: str, reasons: Sequence[str], prompt_lens: Sequence[int], new_tokens: Sequence[int],
                        ctx_len: int) -> list[str]:
    """One line for each row (``who`` = "row" or "prompt") that stopped because its cache was full."""
    return [
        f"{who} {r}: stopped after {new_tokens[r]} new tokens because its cache is full "
        f"({prompt_lens[r]} prompt + {new_tokens[r]} generated tokens reach ctx_len={ctx_len}); "
        f"compile with a larger ctx_len to generate more"
        for r, reason in enumerate(reasons)
        if reason == "ctx_len"
    ]


class Ledger:
    """Every prompt's generated tokens and, once it stops, why: the one retirement rule."""

    def __init__(self, prompt_ids: list[list[int]], limits: list[int], eos: frozenset[int], ctx_len: int,
                 on_token: PromptTokenCallback | None = None) -> None:
        self.prompt_ids, self.limits, self.eos, self.ctx_len = prompt_ids, limits, eos, ctx_len
        self.on_token = on_token
        self.tokens: list[list[int]] = [[] for _ in prompt_ids]
        self.reasons = [""] * len(prompt_ids)

    def next_position(self, i: int) -> int:
        """Where prompt ``i``'s last generated token sits when it is fed."""
        return len(self.prompt_ids[i]) + len(self.tokens[i]) - 1

    def done(self, i: int) -> bool:
        return bool(self.reasons[i])

    def active(self) -> list[int]:
        return [i for i, reason in enumerate(self.reasons) if not reason]

    def emit(self, i: int, token: int) -> bool:
        """Record prompt ``i``'s next token (and tell ``on_token``); True when it retires the prompt."""
        token = int(token)
        self.tokens[i].append(token)
        if self.on_token is not None:
            self.on_token(i, token)
        if token in self.eos:
            self.reasons[i] = "eos"
        elif len(self.tokens[i]) >= self.limits[i]:
            self.reasons[i] = "length"
        elif self.next_position(i) >= self.ctx_len:
            self.reasons[i] = "ctx_len"
        return bool(self.reasons[i])

    def messages(self, who: str) -> list[str]:
        return full_cache_messages(who, self.reasons, [len(p) for p in self.prompt_ids], [len(t) for t in self.tokens],
                                   self.ctx_len)


class Clock:
    """One run's timings. ``ttft_s`` is the time to the first generated token — the whole batch's
    (a static batch: prefill and first pick) or the mean over prompts (continuous batching, queueing
    included); ``decode_s`` the time after it (static) or inside decode steps (continuous)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.decode_s = 0.0
        self.first_token_s: dict[int, float] = {}

    def since_start(self) -> float:
        return time.perf_counter() - self.t0

    def first_tokens(self) -> None:
        """Every row's first token is chosen (a static batch's prefill is over)."""
        self.t_first = time.perf_counter()

    def first_token(self, i: int) -> None:
        """Prompt ``i``'s prefill is over (continuous batching: each prompt on its own)."""
        self.first_token_s[i] = self.since_start()

    def decode_step(self, run: Callable[[], np.ndarray]) -> np.ndarray:
        """``run()`` timed as a decode step."""
        t = time.perf_counter()
        out = run()
        self.decode_s += time.perf_counter() - t
        return out

    def phased(self) -> dict[str, float]:
        """Timings of a loop that prefills every row, then decodes: prefill = time to first token."""
        t_end = time.perf_counter()
        first = self.t_first - self.t0
        return dict(ttft_s=first, prefill_s=first, decode_s=t_end - self.t_first, e2e_s=t_end - self.t0)

    def interleaved(self, n: int) -> dict[str, float]:
        """Timings of a loop whose prefills run between decode steps (continuous batching)."""
        e2e = time.perf_counter() - self.t0
        ttft = [self.first_token_s.get(i, 0.0) for i in range(n)]
        return dict(ttft_s=float(np.mean(ttft)) if ttft else 0.0, prefill_s=e2e - self.decode_s, decode_s=self.decode_s,
                    e2e_s=e2e)


class Strategy(Protocol):
    """A generation loop on the engine: how prompts are prefilled and how each step chooses tokens."""

    def prefill(self, engine: Engine) -> None:
        """Run what is prefilled before the first step, and emit those prompts' first tokens."""

    def step(self, engine: Engine) -> bool:
        """One step; emits the tokens it chose. False when nothing is left to run."""


class Engine:
    """One generation call: its prompts, limits, EOS set, :class:`Ledger` and :class:`Clock`."""

    def __init__(self, *, prompts, prompt_ids: list[list[int]], tokenizer, batch_size: int, prompt_len: int,
                 ctx_len: int, limits: list[int], eos: frozenset[int], clock: Clock,
                 on_token: PromptTokenCallback | None = None) -> None:
        self.prompts, self.prompt_ids, self.tokenizer = prompts, prompt_ids, tokenizer
        self.batch_size, self.prompt_len, self.ctx_len = batch_size, prompt_len, ctx_len
        self.clock = clock
        self.ledger = Ledger(prompt_ids, limits, eos, ctx_len, on_token)

    @classmethod
    def open(cls, session, prompts: Sequence[str] | None, *, tokenizer, prompt_token_ids, prompt_len: int | None,
             generation_len, eos_token_id, who: str, any_number: bool = False, batch_size: int | None = None,
             clock: Clock | None = None, on_token: PromptTokenCallback | None = None) -> Engine:
        """Intake: token ids from ``prompts`` (or ``prompt_token_ids``), checked against the session
        (at most ``batch_size`` prompts, the session's by default, unless ``any_number``: continuous
        batching queues them), each prompt's limit and the EOS set. ``who`` names the calling
        function in the error for missing prompts."""
        clock = clock or Clock()
        if prompt_token_ids is None:
            if prompts is None or tokenizer is None:
                raise UsageError(f"{who}() needs prompts and a tokenizer, or prompt_token_ids")
            prompt_token_ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        ids = [list(map(int, p)) for p in prompt_token_ids]
        ctx_len = session.ctx_len
        batch = session.batch_size if batch_size is None else batch_size
        prompt_len = session.prompt_len or prompt_len
        if not prompt_len:
            raise UsageError("prompt_len is required for this backend")
        check_inputs(ids, len(ids) if any_number else batch, prompt_len, ctx_len)
        limits = length_limits(generation_len, len(ids), ctx_len)
        return cls(prompts=prompts, prompt_ids=ids, tokenizer=tokenizer, batch_size=batch, prompt_len=prompt_len,
                   ctx_len=ctx_len, limits=limits, eos=stop_ids(eos_token_id, tokenizer), clock=clock, on_token=on_token)

    def run(self, strategy: Strategy) -> None:
        strategy.prefill(self)
        while strategy.step(self):
            pass

    def fields(self, timings: dict[str, float], who: str) -> dict:
        """The fields of a :class:`~qeff.generation.result.GenerationResult` for this run; ``who``
        ("row" or "prompt") names the rows in the messages about a full cache."""
        ledger = self.ledger
        return result_fields(self.prompts, self.prompt_ids, ledger.tokens, ledger.reasons, tokenizer=self.tokenizer,
                             batch_size=self.batch_size, prompt_len=self.prompt_len, ctx_len=self.ctx_len,
                             messages=ledger.messages(who), **timings)


def in_batches(prompts: list[str], batch_size: int) -> Iterator[tuple[list[str], int, int]]:
    """``(rows, real, offset)`` per batch of :func:`qeff.inputs.batches`: the batch's prompts
    (filler rows repeat real ones), how many are real, and the index of its first prompt."""
    offset = 0
    for rows, real in batches(list(prompts), batch_size):
        yield rows, real, offset
        offset += real
