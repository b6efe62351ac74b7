"""The serving options of a run (the ``qeff`` command line declares their flags in
:mod:`qeff.cli.arguments` and resolves them here into one :class:`ServingOptions`).

    --full_batch_size N           continuous batching over N cache slots (compile; not with --batch_size)
    --num_speculative_tokens K    the target verifies K drafted tokens per step (compile)
    --draft_model_name M          the draft model of speculative decoding (infer; default K = 3)
    --prompt_lookup N             prompt-lookup decoding: N tokens drafted per step from the text itself (infer, execute)
    --prompt_lookup_ngram M       the longest n-gram looked up (default 3)
    --comp_ctx_lengths L          compute context length: attention reads the first C slots, C from the ladder L (compile)
    --prefix_caching              reuse a free slot's cached prompt prefix (with --full_batch_size)
    --temperature T --top_k K --top_p P --repetition_penalty R --seed S   sampling (greedy when T = 0)

:func:`serving_options` validates them all before any slow work: a bad value is one sentence and
exit 2. It takes typed values, never the command line's ``Namespace``.
"""

from __future__ import annotations

from dataclasses import dataclass

from qeff.errors import UsageError
from qeff.serving.variant import BASE, GraphVariant
from qeff.serving.ngram import DEFAULT_NGRAM_MAX
from qeff.serving.sampling import SamplingParams

__all__ = ["ServingOptions", "serving_options", "DEFAULT_SPECULATIVE_TOKENS"]

#: K when a draft model is named without --num_speculative_tokens.
DEFAULT_SPECULATIVE_TOKENS = 3


@dataclass(frozen=True)
class ServingOptions:
    full_batch_size: int | None = None
    num_speculative_tokens: int | None = None
    draft_model_name: str | None = None
    prefix_caching: bool = False
    sampling: SamplingParams = SamplingParams()
    #: Prompt-lookup decoding: draft tokens per step (None: off) and the longest n-gram looked up.
    #: It keeps the base graph (the fused CPU graph verifies several positions itself).
    prompt_lookup: int | None = None
    prompt_lookup_ngram: int = DEFAULT_NGRAM_MAX
    #: ``--comp_ctx_lengths`` as given: None = the default ladder where the graph is portable,
    #: an off word = no ladder, else the lengths (checked against --ctx_len).
    comp_ctx_lengths: str | None = None

    @property
    def ladder_asked(self) -> bool:
        """The user listed lengths (not the default, not off)."""
        from qeff.serving.ctx_ladder import OFF_WORDS

        return self.comp_ctx_lengths is not None and self.comp_ctx_lengths.strip().lower() not in OFF_WORDS

    @property
    def ladder_off(self) -> bool:
        from qeff.serving.ctx_ladder import OFF_WORDS

        return self.comp_ctx_lengths is not None and self.comp_ctx_lengths.strip().lower() in OFF_WORDS

    @property
    def variant(self) -> GraphVariant:
        if self.full_batch_size is None and self.num_speculative_tokens is None:
            return BASE
        return GraphVariant(continuous_batching=self.full_batch_size is not None, speculative=self.num_speculative_tokens is not None)


def serving_options(*, full_batch_size: int | None = None, num_speculative_tokens: int | None = None,
                    draft_model_name: str | None = None, prefix_caching: bool = False, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0, prompt_lookup: int | None = None, prompt_lookup_ngram: int | None = DEFAULT_NGRAM_MAX,
                    comp_ctx_lengths: str | None = None, ctx_len: int | None = None, batch_size: int | None = None,
                    takes_draft: bool = False, takes_slots: bool = False) -> ServingOptions:
    """The serving options of one run, every combination checked before any slow work (one
    sentence and exit 2 each). ``batch_size``: the rows the user asked for (None: not asked);
    ``takes_draft`` / ``takes_slots``: whether the command has a draft model (``infer``) or compiles
    slots (``--full_batch_size``), which decides whether K alone or --prefix_caching alone is a
    mistake here or is judged later against the artifact."""
    fbs, k, draft = full_batch_size, num_speculative_tokens, draft_model_name
    if fbs is not None and fbs < 1:
        raise UsageError(f"--full_batch_size must be at least 1 (got {fbs})")
    if fbs is not None and batch_size is not None:
        raise UsageError(
            "--full_batch_size and --batch_size exclude each other: with continuous batching prefill runs one "
            "prompt at a time and decode runs --full_batch_size slots"
        )
    if k is not None and k < 1:
        raise UsageError(f"--num_speculative_tokens must be at least 1 (got {k})")
    if k is not None and takes_draft and draft is None:
        raise UsageError("--num_speculative_tokens needs --draft_model_name: the model that proposes the tokens")
    if draft is not None and k is None:
        k = DEFAULT_SPECULATIVE_TOKENS
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
    if prefix_caching and fbs is None and takes_slots:
        raise UsageError("--prefix_caching reuses the cache slots of continuous batching: add --full_batch_size")
    if k is not None and fbs is not None:
        raise UsageError("--full_batch_size and speculative decoding cannot be combined yet; choose one")
    lookup, ngram = prompt_lookup, prompt_lookup_ngram
    if lookup is not None:
        if lookup < 1:
            raise UsageError(f"--prompt_lookup must be at least 1 draft token per step (got {lookup})")
        if ngram is None or ngram < 1:
            raise UsageError(f"--prompt_lookup_ngram must be at least 1 (got {ngram})")
        if draft is not None or k is not None:
            raise UsageError("--prompt_lookup drafts from the text itself: drop --draft_model_name / --num_speculative_tokens, or it")
        if fbs is not None:
            raise UsageError("--full_batch_size and prompt-lookup decoding cannot be combined yet; choose one")
        if not sampling.plain_greedy:
            raise UsageError("prompt-lookup decoding is greedy only: drop --temperature and --repetition_penalty, or --prompt_lookup")
    if draft is not None and not sampling.plain_greedy:
        raise UsageError("speculative decoding here is greedy only: drop --temperature and --repetition_penalty, or the draft")
    if comp_ctx_lengths is not None and ctx_len:
        from qeff.serving.ctx_ladder import parse_ladder

        parse_ladder(comp_ctx_lengths, ctx_len)  # one sentence and exit 2 for a bad list, before any slow work
    return ServingOptions(
        full_batch_size=fbs, num_speculative_tokens=k, draft_model_name=draft, prefix_caching=bool(prefix_caching),
        sampling=sampling, prompt_lookup=lookup, prompt_lookup_ngram=ngram or DEFAULT_NGRAM_MAX, comp_ctx_lengths=comp_ctx_lengths,
    )
