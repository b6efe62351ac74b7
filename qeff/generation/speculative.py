"""Speculative decoding (greedy): a draft model proposes K tokens, the target checks them in one step.

Each round, for every unfinished row whose last token ``x`` sits at position ``p``:

1. the **draft** (any session over the base graph, same tokenizer) runs one token per step and
   proposes ``d1 … dK`` greedily. It first catches up on the tokens it has not yet run (the one
   the target added last round, or two when every proposal was accepted);
2. the **target** (a graph with ``num_logits_to_keep``, :mod:`qeff.serving.graph`) runs
   ``x, d1 … dK`` at positions ``p … p+K`` in one step and returns K+1 logits, whose argmaxes
   ``t0 … tK`` are the tokens the target itself would choose after each prefix;
3. the row keeps ``t0 … tn``, where ``n`` is the number of leading proposals with ``d_i = t_{i-1}``:
   every kept token is the target's own greedy choice after a prefix of target-verified tokens,
   so the output is exactly the target's greedy output. Cache entries written for rejected
   proposals sit beyond the row's position and are overwritten before any query can see them.

Near the end of the cache a row proposes fewer tokens (positions stay below ``ctx_len``), the
rest of its step being padding. ``mean_accepted_tokens`` is the mean of ``n + 1`` over rows and
rounds: K+1 when the draft always agrees (self-speculation), 1 when it never does.

The draft may also be a *drafter* with no model (``propose(tokens, k) → list``, e.g.
:class:`qeff.generation.ngram.NgramDrafter`: prompt-lookup decoding): it sees each row's tokens so
far and proposes up to K of them, possibly none (that row's step is then a plain one-token step).
Step 3 is the same, so the output is still exactly the target's greedy output.

Prefill chunks, retirement and timings are the engine's (:mod:`qeff.generation.engine`); this
module is the strategy: a draft round and a verify step per step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from qeff.errors import UsageError
from qeff.generation.engine import Clock, Engine, common_prefix, prefill
from qeff.generation.result import ServingResult

__all__ = ["generate_speculative", "check_same_tokenizer", "accepted_count", "can_verify"]


def accepted_count(proposal: Sequence[int], choices: Sequence[int]) -> int:
    """How many target tokens a row keeps: ``choices[0]`` always, then one more for each leading
    proposal equal to the target's choice before it (``proposal[i] == choices[i]``)."""
    kept = 1
    while kept <= len(proposal) and int(proposal[kept - 1]) == int(choices[kept - 1]):
        kept += 1
    return kept


def can_verify(session) -> bool:
    """Whether ``session.run(..., keep=N)`` returns the logits of N positions per row: a graph with
    ``num_logits_to_keep``, or a session that says so itself (the fused CPU graph's)."""
    return bool(getattr(getattr(session, "variant", None), "speculative", False) or getattr(session, "keeps_logits", False))


def _is_drafter(draft) -> bool:
    """A model-free drafter (``propose``), as opposed to a draft model's session (``run``)."""
    return hasattr(draft, "propose") and not hasattr(draft, "run")


def check_same_tokenizer(target_tokenizer, draft_tokenizer, *, target: str = "target", draft: str = "draft") -> None:
    """Raise :class:`UsageError` unless both tokenizers map the same strings to the same ids."""
    if target_tokenizer is None or draft_tokenizer is None:
        return
    a, b = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if a != b:
        differ = len(set(a.items()) ^ set(b.items()))
        raise UsageError(
            f"the draft model {draft} does not share the tokenizer of {target} ({len(b)} vs {len(a)} tokens, "
            f"{differ} entries differ): speculative decoding needs a draft with the target's vocabulary"
        )


class DraftAndVerify:
    """The strategy: each step, a draft (model or drafter) proposes up to K tokens per unfinished
    row and the target verifies them in one step, keeping its own choices up to the first miss."""

    def __init__(self, target, draft, k: int, *, return_logits: bool) -> None:
        self.target, self.draft, self.k, self.return_logits = target, draft, k, return_logits
        self.model_draft = not _is_drafter(draft)
        self.accepted: list[int] = []
        self.proposed = self.agreed = self.steps = 0
        self.draft_s = self.verify_s = 0.0

    def prefill(self, engine: Engine) -> None:
        """Prefill both models; the target's logits give each row its first token."""
        target, draft = self.target, self.draft

        def run(ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
            logits = target.run(ids, pos, keep=1)[:, -1, :]
            if self.model_draft:
                draft.run(ids, pos)
            return logits

        n = len(engine.prompt_ids)
        logits = prefill(run, engine.prompt_ids, engine.batch_size, engine.prompt_len)
        first = [int(logits[r].argmax()) for r in range(n)]
        self.kept_logits: list[list[np.ndarray]] = [
            [np.array(logits[r], dtype=np.float32)] if self.return_logits else [] for r in range(n)
        ]
        self.drafted: list[list[int]] = [list(p) for p in engine.prompt_ids]  # tokens the draft has run, by position
        engine.clock.first_tokens()
        for r in range(n):
            engine.ledger.emit(r, first[r])

    def step(self, engine: Engine) -> bool:
        ledger, batch, ctx_len, k = engine.ledger, engine.batch_size, engine.ctx_len, self.k
        target, draft, generated = self.target, self.draft, ledger.tokens
        active = ledger.active()
        if not active:
            return False
        # Each row: its last token at position p, and how many proposals fit below ctx_len.
        p = {r: ledger.next_position(r) for r in active}
        want = {r: min(k, ctx_len - 1 - p[r]) for r in active}
        known = {r: engine.prompt_ids[r] + generated[r] for r in active}
        proposals: dict[int, list[int]] = {r: [] for r in active}

        # 1. Draft: catch up on unseen tokens, then propose greedily, one token per step (a
        # model-free drafter proposes from the row's tokens at once).
        t_draft = time.perf_counter()
        if not self.model_draft:
            for r in active:
                proposals[r] = [int(t) for t in draft.propose(known[r], want[r])][: want[r]]
        while self.model_draft:
            ids = np.zeros((batch, 1), dtype=np.int64)
            pos = np.full((batch, 1), -1, dtype=np.int64)
            running = []
            for r in active:
                if len(proposals[r]) >= want[r]:
                    continue
                seq = known[r] + proposals[r]
                at = len(self.drafted[r])  # the next position the draft has not run
                ids[r, 0], pos[r, 0] = seq[at], at
                running.append(r)
            if not running:
                break
            logits = draft.run(ids, pos)
            for r in running:
                self.drafted[r].append(int(ids[r, 0]))
                if len(self.drafted[r]) == len(known[r]) + len(proposals[r]):  # caught up: the logits propose
                    proposals[r].append(int(logits[r].argmax()))
        if getattr(target, "chunk_fits_every_row", False):
            # The fused CPU graph runs the step's widest row for every row: each row's position plus
            # that width must stay inside the cache, so near its end all rows propose less.
            room = max(ctx_len - 1 - max(p.values()), 0)
            proposals = {r: proposal[:room] for r, proposal in proposals.items()}
        self.draft_s += time.perf_counter() - t_draft

        # 2. Target: x, d1 … d_want at positions p … p+want, the rest of the row padding.
        t_verify = time.perf_counter()
        ids = np.zeros((batch, k + 1), dtype=np.int64)
        pos = np.full((batch, k + 1), -1, dtype=np.int64)
        for r in active:
            row = [generated[r][-1]] + proposals[r]
            ids[r, : len(row)] = row
            pos[r, : len(row)] = np.arange(p[r], p[r] + len(row))
        logits = target.run(ids, pos, keep=k + 1)  # (B, K+1, V): column j scores position p+j
        self.verify_s += time.perf_counter() - t_verify
        self.steps += 1

        # 3. Keep the target's tokens up to and including the first disagreement.
        for r in active:
            choices = logits[r, : len(proposals[r]) + 1].argmax(-1)
            kept = accepted_count(proposals[r], choices)
            self.accepted.append(kept)
            self.proposed += len(proposals[r])
            self.agreed += kept - 1
            for j, token in enumerate(choices[:kept]):
                if self.return_logits:
                    self.kept_logits[r].append(np.array(logits[r, j], dtype=np.float32))
                if ledger.emit(r, token):
                    break
            # The draft's cache is valid as far as what it ran agrees with the kept tokens.
            if self.model_draft:
                del self.drafted[r][common_prefix(self.drafted[r], engine.prompt_ids[r] + generated[r]) :]
        return True


def generate_speculative(
    target,
    draft,
    prompts: Sequence[str] | None = None,
    *,
    num_speculative_tokens: int,
    tokenizer=None,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    prompt_len: int | None = None,
    generation_len: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    on_token=None,
    return_logits: bool = False,
) -> ServingResult:
    """Greedy generation for up to ``target.batch_size`` prompts, ``num_speculative_tokens`` (K)
    drafted per round. ``target`` must return K+1 logits per row (``run(..., keep=K+1)``);
    ``draft`` is any session with the target's batch size and at least its ctx_len, or a drafter
    without a model (``propose(tokens, k)``, :class:`qeff.generation.ngram.NgramDrafter`).
    ``return_logits``: keep the target logits each token was chosen from (``result.logits``)."""
    clock = Clock()
    k = num_speculative_tokens
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"--num_speculative_tokens must be at least 1 (got {k})")
    if not can_verify(target):
        raise UsageError("the target session's graph has no num_logits_to_keep input: export it with num_speculative_tokens")
    if not _is_drafter(draft) and (draft.batch_size != target.batch_size or draft.ctx_len < target.ctx_len):
        raise UsageError(
            f"the draft session (batch {draft.batch_size}, ctx_len {draft.ctx_len}) must match the target's batch size "
            f"({target.batch_size}) and hold at least its ctx_len ({target.ctx_len})"
        )
    engine = Engine.open(target, prompts, tokenizer=tokenizer, prompt_token_ids=prompt_token_ids, prompt_len=prompt_len,
                         generation_len=generation_len, eos_token_id=eos_token_id, who="generate_speculative",
                         clock=clock, on_token=on_token)
    loop = DraftAndVerify(target, draft, k, return_logits=return_logits)
    engine.run(loop)
    accepted = loop.accepted
    return ServingResult(
        **engine.fields(clock.phased(), "prompt"),
        steps=loop.steps,
        mean_accepted_tokens=float(np.mean(accepted)) if accepted else 0.0,
        acceptance_rate=loop.agreed / loop.proposed if loop.proposed else 0.0,
        num_speculative_tokens=k,
        draft_s=loop.draft_s,
        verify_s=loop.verify_s,
        verify_rows=len(accepted),
        proposed_tokens=loop.proposed,
        accepted_drafts=loop.agreed,
        logits=[np.stack(rows) for rows in loop.kept_logits] if return_logits else None,
    )
