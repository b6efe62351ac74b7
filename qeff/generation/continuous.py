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
Prefill chunks, retirement and timings are the engine's (:mod:`qeff.generation.engine`); this
module is the strategy: admission into slots, and one decode step over every slot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from qeff.errors import UsageError
from qeff.generation.engine import Clock, Engine, PromptTokenCallback, common_prefix, prefill
from qeff.generation.result import ServingResult
from qeff.generation.sampling import RowSampler, SamplingParams

__all__ = ["generate_continuous", "common_prefix", "Slots"]


@dataclass
class _Slot:
    prompt: int | None = None  # index of the occupant, None = free
    resident: list[int] = field(default_factory=list)  # tokens whose K/V sit at positions 0, 1, …
    sampler: RowSampler | None = None


def _admission_order(n: int, arrival_steps: Sequence[int] | None) -> deque[int]:
    if arrival_steps is None:
        return deque(range(n))
    if len(arrival_steps) != n or any(int(a) < 0 for a in arrival_steps):
        raise UsageError(f"arrival_steps needs one non-negative step per prompt ({n}), got {list(arrival_steps)}")
    return deque(sorted(range(n), key=lambda i: (int(arrival_steps[i]), i)))


class Slots:
    """The strategy: prompts admitted into free cache slots as they arrive, one decode step over
    every slot at a time; a retired prompt frees its slot for the next."""

    def __init__(self, session, n: int, *, params: SamplingParams, prefix_caching: bool,
                 arrival_steps: Sequence[int] | None, return_logits: bool) -> None:
        self.session, self.params, self.prefix_caching, self.return_logits = session, params, prefix_caching, return_logits
        self.slots_n = session.full_batch_size
        self.queue = _admission_order(n, arrival_steps)
        self.arrival = [0] * n if arrival_steps is None else [int(a) for a in arrival_steps]
        self.slots = [_Slot() for _ in range(self.slots_n)]
        self.slot_of, self.hits = [-1] * n, [0] * n
        self.kept_logits: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.tick = self.steps = self.prefill_runs = self.occupied_sum = 0  # tick: decode steps, plus idle time jumped over
        self.all_slots = np.arange(self.slots_n, dtype=np.int64)

    def emit(self, engine: Engine, slot_id: int, logits: np.ndarray) -> None:
        """Choose and record a token from ``logits`` (vocab,); a prompt that retires frees its slot."""
        slot = self.slots[slot_id]
        i = slot.prompt
        token = slot.sampler(logits)
        if self.return_logits:
            self.kept_logits[i].append(np.array(logits, dtype=np.float32))
        if engine.ledger.emit(i, token):
            slot.prompt, slot.sampler = None, None

    def admit(self, engine: Engine, i: int, slot_id: int) -> None:
        slot, ids = self.slots[slot_id], engine.prompt_ids[i]
        reuse = min(common_prefix(slot.resident, ids), len(ids) - 1) if self.prefix_caching else 0
        slot.prompt = i
        slot.sampler = RowSampler(self.params, i, ids)
        slot.resident = list(ids)
        self.slot_of[i], self.hits[i] = slot_id, reuse
        index = np.array([[slot_id]], dtype=np.int64)

        def run(chunk: np.ndarray, pos: np.ndarray) -> np.ndarray:
            self.prefill_runs += 1
            return self.session.run(chunk, pos, batch_index=index)

        logits = prefill(run, [ids], 1, engine.prompt_len, starts=[reuse])
        engine.clock.first_token(i)
        self.emit(engine, slot_id, logits[0])

    def choose_slot(self, engine: Engine, i: int, free: list[int]) -> int:
        if not self.prefix_caching:
            return free[0]
        return max(free, key=lambda s: (common_prefix(self.slots[s].resident, engine.prompt_ids[i]), -s))

    def prefill(self, engine: Engine) -> None:
        """Nothing before the first step: prompts are admitted (and prefilled) as slots free up."""

    def step(self, engine: Engine) -> bool:
        queue, slots, ledger = self.queue, self.slots, engine.ledger
        while True:
            while queue and self.arrival[queue[0]] <= self.tick:
                free = [s for s in range(self.slots_n) if slots[s].prompt is None]
                if not free:
                    break
                i = queue.popleft()
                self.admit(engine, i, self.choose_slot(engine, i, free))
            busy = [s for s in range(self.slots_n) if slots[s].prompt is not None]
            if busy:
                break
            if not queue:
                return False
            self.tick = max(self.tick, self.arrival[queue[0]])  # idle until the next prompt arrives
        ids = np.zeros((self.slots_n, 1), dtype=np.int64)
        pos = np.full((self.slots_n, 1), -1, dtype=np.int64)
        for s in busy:
            i = slots[s].prompt
            ids[s, 0], pos[s, 0] = ledger.tokens[i][-1], ledger.next_position(i)
        logits = engine.clock.decode_step(lambda: self.session.run(ids, pos, batch_index=self.all_slots))
        self.tick += 1
        self.steps += 1
        self.occupied_sum += len(busy)
        for s in busy:
            slots[s].resident.append(int(ids[s, 0]))  # its K/V now sit at pos[s]
            self.emit(engine, s, logits[s])
        return True


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
    clock = Clock()
    if not getattr(session, "full_batch_size", None):
        raise UsageError("continuous batching needs a session over a graph with batch_index (export with full_batch_size)")
    engine = Engine.open(session, prompts, tokenizer=tokenizer, prompt_token_ids=prompt_token_ids, prompt_len=prompt_len,
                         generation_len=generation_len, eos_token_id=eos_token_id, who="generate_continuous",
                         any_number=True, batch_size=session.full_batch_size, clock=clock, on_token=on_token)
    n = len(engine.prompt_ids)
    loop = Slots(session, n, params=sampling or SamplingParams(), prefix_caching=prefix_caching,
                 arrival_steps=arrival_steps, return_logits=return_logits)
    engine.run(loop)
    fields = engine.fields(clock.interleaved(n), "prompt")  # ttft_s: the mean over prompts, queueing included
    return ServingResult(
        **fields,
        full_batch_size=loop.slots_n,
        steps=loop.steps,
        prefill_runs=loop.prefill_runs,
        ttft_per_prompt_s=[clock.first_token_s.get(i, 0.0) for i in range(n)],
        slots=loop.slot_of,
        prefix_hit_tokens=loop.hits,
        slot_occupancy=loop.occupied_sum / (loop.steps * loop.slots_n) if loop.steps else 0.0,
        logits=[np.stack(rows) for rows in loop.kept_logits] if return_logits else None,
    )
