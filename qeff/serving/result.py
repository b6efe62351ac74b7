"""What a serving loop returns: :class:`~qeff.generation.GenerationResult` plus its own figures."""

from __future__ import annotations

from dataclasses import dataclass, field

from qeff.generation import GenerationResult

__all__ = ["ServingResult"]


@dataclass
class ServingResult(GenerationResult):
    #: Slots of continuous batching (None for a static batch).
    full_batch_size: int | None = None
    #: Decode steps (continuous batching) or target verify steps (speculative decoding) run.
    steps: int = 0
    #: Prefill runs (one per admitted prompt and chunk).
    prefill_runs: int = 0
    #: Per prompt: seconds from the call to its first token (queueing included).
    ttft_per_prompt_s: list[float] = field(default_factory=list)
    #: Per prompt: the slot it ran in (continuous batching).
    slots: list[int] = field(default_factory=list)
    #: Per prompt: prompt tokens whose cache was reused from the slot's previous occupant.
    prefix_hit_tokens: list[int] = field(default_factory=list)
    #: Mean fraction of slots holding a prompt per decode step (continuous batching).
    slot_occupancy: float = 0.0
    #: Speculative decoding: tokens kept per verify step and row (accepted drafts + the target's own).
    mean_accepted_tokens: float | None = None
    #: Speculative decoding: accepted / proposed draft tokens.
    acceptance_rate: float | None = None
    num_speculative_tokens: int | None = None
    #: Speculative decoding: (row, verify step) pairs, draft tokens proposed and accepted.
    verify_rows: int = 0
    proposed_tokens: int = 0
    accepted_drafts: int = 0
    #: With ``return_logits=True``: per prompt, the (steps, vocab) logits each token was chosen from.
    logits: list | None = None
    #: Speculative decoding: seconds spent in draft steps and in target verify steps.
    draft_s: float = 0.0
    verify_s: float = 0.0

    def summary(self) -> str:
        text = super().summary()
        if self.full_batch_size:
            text += f"; {self.full_batch_size} slots, occupancy {self.slot_occupancy:.0%}, {self.steps} decode steps"
            hits = sum(self.prefix_hit_tokens)
            if hits:
                text += f", {hits} prompt tokens reused from cache"
        if self.mean_accepted_tokens is not None:
            text += f"; {self.mean_accepted_tokens:.2f} tokens per verify step (K={self.num_speculative_tokens})"
        return text
