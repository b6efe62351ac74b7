"""Continuous batching: a fixed set of cache slots, each prompt admitted into a free one.

The session runs a :mod:`continuous-batching graph <qeff.serving.graph>` with ``full_batch_size``
slots. The loop keeps a queue of prompts (in arrival order) and repeats:

1. **admit** — while a prompt has arrived and a slot is free, prefill the prompt into that slot
   (``batch_size = 1``, ``batch_index = [[slot]]``, chunks of ``prompt_len`` from position 0)
   and take its first token. The other slots keep their caches and positions untouched;
2. **decode** — one step over every slot (``batch_size = full_batch_size``, ``batch_index = 0 …
   F-1``): an occupied slot feeds its last token at its next position, a free one is all padding
   (``position -1``: it writes nothing and its logits are dropped);
3. **retire** — a prompt that met EOS, its generation length or the end of its cache frees its
   slot, which step 1 refills before the next decode step.

Why a slot never reads its previous occupant: a new prompt writes positions ``0 … n-1`` of the
slot before any query of it runs at position ``n-1`` or later, and the mask lets a query at
position ``p`` see slots ``<= p`` only. Nothing is cleared; stale entries are simply never visible.

**Prefix caching** (``prefix_caching=True``): a free slot still holds its last occupant's tokens
(prompt + fed generated tokens, at positions ``0 …``). A new prompt that starts with ``m`` of
those tokens is admitted into the slot with the longest such match and prefilled from position
``m``: the entries at ``0 … m-1`` are exactly what its own prefill would have written there (the
same tokens at the same positions, attending to the same prefix). At least the last prompt token
is always run, for its logits.

Each prompt's tokens are those of its batch-1 run (``tests/test_serving_continuous.py`` proves it
for random arrival orders and lengths); sampling streams are keyed by the prompt's input index.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from qeff.errors import UsageError
from qeff.generation import _check_inputs, eos_ids, full_cache_messages, result_fields
from qeff.serving.result import ServingResult
from qeff.serving.sampling import RowSampler, SamplingParams

__all__ = ["generate_continuous", "common_prefix"]

#: ``on_token(prompt_index, token)`` after each token a prompt produces.
PromptTokenCallback = Callable[[int, int], None]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Slot:
    prompt: int | None = None  # index of the occupant, None = free
    resident: list[int] = field(default_factory=list)  # tokens whose K/V sit at positions 0, 1, …
    length: int = 0  # the occupant's prompt length
    generated: list[int] = field(default_factory=list)
    sampler: RowSampler | None = None

    @property
    def next_position(self) -> int:
        """Where the last generated token goes when it is fed."""
        return self.length + len(self.generated) - 1


def _admission_order(n: int, arrival_steps: Sequence[int] | None) -> deque[int]:
    if arrival_steps is None:
        return deque(range(n))
    if len(arrival_steps) != n or any(int(a) < 0 for a in arrival_steps):
        raise UsageError(f"arrival_steps needs one non-negative step per prompt ({n}), got {list(arrival_steps)}")
    return deque(sorted(range(n), key=lambda i: (int(arrival_steps[i]), i)))


def generate_continuous(
    session,
    prompts: Sequence[str] | None = None,
    *,
    tokenizer=None,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    prompt_len: int | None = None,
    generation_len: int | Sequence[int] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    sampling: SamplingParams | None = None,
    prefix_caching: bool = False,
    arrival_steps: Sequence[int] | None = None,
    on_token: PromptTokenCallback | None = None,
    return_logits: bool = False,
) -> ServingResult:
    """Generate for any number of prompts through ``session.full_batch_size`` slots.

    ``generation_len``: one limit, or one per prompt (default: until EOS or the cache is full).
    ``arrival_steps``: the decode step at which each prompt arrives (default: all at once, in
    input order). Results are in input order. ``return_logits``: keep the logits each token was
    chosen from (``result.logits[i]``, (tokens, vocab)), for comparison with a reference.
    """
    t0 = time.perf_counter()
    if not getattr(session, "full_batch_size", None):
        raise UsageError("continuous batching needs a session over a graph with batch_index (export with full_batch_size)")
    if prompt_token_ids is None:
        if prompts is None or tokenizer is None:
            raise UsageError("generate_continuous() needs prompts and a tokenizer, or prompt_token_ids")
        prompt_token_ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    prompts_ids = [list(map(int, p)) for p in prompt_token_ids]
    n = len(prompts_ids)
    slots_n, ctx_len = session.full_batch_size, session.ctx_len
    prompt_len = session.prompt_len or prompt_len
    if not prompt_len:
        raise UsageError("prompt_len is required for this backend")
    _check_inputs(prompts_ids, n, prompt_len, ctx_len)
    limits = [generation_len] * n if generation_len is None or isinstance(generation_len, int) else list(generation_len)
    if len(limits) != n:
        raise UsageError(f"generation_len has {len(limits)} entries for {n} prompts")
    limits = [ctx_len if g is None else int(g) for g in limits]
    if min(limits) < 1:
        raise UsageError(f"generation_len must be at least 1 (got {min(limits)})")
    if eos_token_id is None:
        eos_token_id = eos_ids(tokenizer)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(map(int, eos_token_id))
    params = sampling or SamplingParams()

    queue = _admission_order(n, arrival_steps)
    arrival = [0] * n if arrival_steps is None else [int(a) for a in arrival_steps]
    slots = [_Slot() for _ in range(slots_n)]
    tokens: list[list[int]] = [[] for _ in range(n)]
    reasons = [""] * n
    slot_of, hits, ttft = [-1] * n, [0] * n, [0.0] * n
    kept_logits: list[list[np.ndarray]] = [[] for _ in range(n)]
    clock = steps = prefill_runs = occupied_sum = 0  # clock: decode steps, plus idle time jumped over
    all_slots = np.arange(slots_n, dtype=np.int64)

    def emit(slot_id: int, logits: np.ndarray) -> bool:
        """Choose and record a token from ``logits`` (vocab,); True when the prompt is done (its
        slot is then free)."""
        slot = slots[slot_id]
        i = slot.prompt
        token = slot.sampler(logits)
        if return_logits:
            kept_logits[i].append(np.array(logits, dtype=np.float32))
        slot.generated.append(token)
        if on_token is not None:
            on_token(i, token)
        reason = ""
        if token in eos:
            reason = "eos"
        elif len(slot.generated) >= limits[i]:
            reason = "length"
        elif slot.next_position >= ctx_len:
            reason = "ctx_len"
        if not reason:
            return False
        reasons[i], tokens[i] = reason, list(slot.generated)
        slot.prompt, slot.sampler = None, None
        return True

    def admit(i: int, slot_id: int) -> None:
        nonlocal prefill_runs
        slot, ids = slots[slot_id], prompts_ids[i]
        reuse = min(common_prefix(slot.resident, ids), len(ids) - 1) if prefix_caching else 0
        slot.prompt, slot.length, slot.generated = i, len(ids), []
        slot.sampler = RowSampler(params, i, ids)
        slot.resident = list(ids)
        slot_of[i], hits[i] = slot_id, reuse
        index = np.array([[slot_id]], dtype=np.int64)
        logits = None
        for start in range(reuse, len(ids), prompt_len):
            piece = ids[start : start + prompt_len]
            chunk = np.zeros((1, prompt_len), dtype=np.int64)
            pos = np.full((1, prompt_len), -1, dtype=np.int64)
            chunk[0, : len(piece)] = piece
            pos[0, : len(piece)] = np.arange(start, start + len(piece))
            logits = session.run(chunk, pos, batch_index=index)
            prefill_runs += 1
        ttft[i] = time.perf_counter() - t0
        emit(slot_id, logits[0])

    def choose_slot(i: int, free: list[int]) -> int:
        if not prefix_caching:
            return free[0]
        return max(free, key=lambda s: (common_prefix(slots[s].resident, prompts_ids[i]), -s))

    decode_s = 0.0
    while True:
        while queue and arrival[queue[0]] <= clock:
            free = [s for s in range(slots_n) if slots[s].prompt is None]
            if not free:
                break
            i = queue.popleft()
            admit(i, choose_slot(i, free))
        busy = [s for s in range(slots_n) if slots[s].prompt is not None]
        if not busy:
            if not queue:
                break
            clock = max(clock, arrival[queue[0]])  # idle until the next prompt arrives
            continue
        ids = np.zeros((slots_n, 1), dtype=np.int64)
        pos = np.full((slots_n, 1), -1, dtype=np.int64)
        for s in busy:
            ids[s, 0], pos[s, 0] = slots[s].generated[-1], slots[s].next_position
        t_step = time.perf_counter()
        logits = session.run(ids, pos, batch_index=all_slots)
        decode_s += time.perf_counter() - t_step
        clock += 1
        steps += 1
        occupied_sum += len(busy)
        for s in busy:
            slots[s].resident.append(int(ids[s, 0]))  # its K/V now sit at pos[s]
            emit(s, logits[s])
    t_end = time.perf_counter()

    messages = full_cache_messages("prompt", reasons, [len(p) for p in prompts_ids], [len(t) for t in tokens], ctx_len)
    e2e = t_end - t0
    return ServingResult(
        **result_fields(prompts, prompts_ids, tokens, reasons, tokenizer=tokenizer, batch_size=slots_n,
                        prompt_len=prompt_len, ctx_len=ctx_len,
                        ttft_s=float(np.mean(ttft)) if ttft else 0.0,  # the mean over prompts, queueing included
                        prefill_s=e2e - decode_s, decode_s=decode_s, e2e_s=e2e, messages=messages),
        full_batch_size=slots_n,
        steps=steps,
        prefill_runs=prefill_runs,
        ttft_per_prompt_s=ttft,
        slots=slot_of,
        prefix_hit_tokens=hits,
        slot_occupancy=occupied_sum / (steps * slots_n) if steps else 0.0,
        logits=[np.stack(rows) for rows in kept_logits] if return_logits else None,
    )
