"""The serving options of the ``qeff`` command line, and how a run dispatches on them.

    --full_batch_size N           continuous batching over N cache slots (compile; not with --batch_size)
    --num_speculative_tokens K    the target verifies K drafted tokens per step (compile)
    --draft_model_name M          the draft model of speculative decoding (infer; default K = 3)
    --prompt_lookup N             prompt-lookup decoding: N tokens drafted per step from the text itself (infer, execute)
    --prompt_lookup_ngram M       the longest n-gram looked up (default 3)
    --comp_ctx_lengths L          compute context length: attention reads the first C slots, C from the ladder L (compile)
    --prefix_caching              reuse a free slot's cached prompt prefix (with --full_batch_size)
    --temperature T --top_k K --top_p P --repetition_penalty R --seed S   sampling (greedy when T = 0)

:func:`serving_options` validates them all before any slow work: a bad value is one sentence and
exit 2.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from qeff.errors import UsageError
from qeff.serving.variant import BASE, GraphVariant
from qeff.serving.ngram import DEFAULT_NGRAM_MAX
from qeff.serving.sampling import SamplingParams

__all__ = ["ServingOptions", "add_compile_args", "add_run_args", "add_draft_args", "serving_options", "DEFAULT_SPECULATIVE_TOKENS"]

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


def _flag(parser, name: str, **kwargs):
    dashed = name.replace("_", "-")
    return parser.add_argument(*([name, dashed] if dashed != name else [name]), **kwargs)


def add_compile_args(p) -> None:
    _flag(p, "--full_batch_size", type=int, default=None,
          help="continuous batching: N cache slots, each prompt admitted into a free one as soon as a row finishes (not with --batch_size)")
    _flag(p, "--num_speculative_tokens", type=int, default=None,
          help="speculative decoding: tokens the draft proposes per step, verified by the target in one step (default 3 with --draft_model_name)")
    _flag(p, "--comp_ctx_lengths", default=None, metavar="L",
          help="compute context length of the portable graph: each step attends only the first C cache slots, C the smallest "
               "of these comma-separated lengths above every position (e.g. 256,1024; ctx_len is added last). Default on the "
               "ort portable graph: 256, 1024, 4096, … up to --ctx_len; 'off' attends all --ctx_len slots every step. Cloud AI: "
               "one prefill and one decode specialization per length")


def add_draft_args(p) -> None:
    _flag(p, "--draft_model_name", default=None,
          help="speculative decoding: the draft model (card, HF id, local dir or .gguf); it must share the target's tokenizer")
    add_lookup_args(p)


def add_lookup_args(p) -> None:
    _flag(p, "--prompt_lookup", type=int, default=None, metavar="N",
          help="prompt-lookup decoding: each step drafts up to N tokens that followed the latest earlier occurrence of the "
               "text's last few tokens (prompt + generated), verified by the model in one step; greedy, same tokens as without it")
    _flag(p, "--prompt_lookup_ngram", type=int, default=DEFAULT_NGRAM_MAX, metavar="M",
          help=f"prompt-lookup decoding: the longest n-gram looked up, tried from M tokens down to 1 (default {DEFAULT_NGRAM_MAX})")


def add_run_args(p) -> None:
    _flag(p, "--prefix_caching", action="store_true",
          help="with --full_batch_size: a prompt that starts like a free slot's previous prompt reuses those cache entries")
    _flag(p, "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    _flag(p, "--top_k", type=int, default=0, help="sample among the k most likely tokens; 0 = no limit (default)")
    _flag(p, "--top_p", type=float, default=1.0, help="sample among the most likely tokens whose probability reaches p, in (0, 1] (default 1)")
    _flag(p, "--repetition_penalty", type=float, default=1.0, help="> 1 discourages tokens already seen; 1 = off (default)")
    _flag(p, "--seed", type=int, default=0, help="seed of every prompt's own random stream (default 0)")


def serving_options(args: argparse.Namespace) -> ServingOptions:
    """Validate the serving flags present on ``args`` and settle ``args.batch_size`` (None → 1).
    Idempotent: the options are kept on ``args``, so later calls return them unchanged."""
    settled = getattr(args, "_serving_options", None)
    if settled is not None:
        return settled
    fbs = getattr(args, "full_batch_size", None)
    k = getattr(args, "num_speculative_tokens", None)
    draft = getattr(args, "draft_model_name", None)
    if fbs is not None and fbs < 1:
        raise UsageError(f"--full_batch_size must be at least 1 (got {fbs})")
    if hasattr(args, "batch_size"):
        if fbs is not None and args.batch_size is not None:
            raise UsageError(
                "--full_batch_size and --batch_size exclude each other: with continuous batching prefill runs one "
                "prompt at a time and decode runs --full_batch_size slots"
            )
        if args.batch_size is None:
            args.batch_size = 1
    if k is not None and k < 1:
        raise UsageError(f"--num_speculative_tokens must be at least 1 (got {k})")
    if k is not None and hasattr(args, "draft_model_name") and draft is None:
        raise UsageError("--num_speculative_tokens needs --draft_model_name: the model that proposes the tokens")
    if draft is not None and k is None:
        k = DEFAULT_SPECULATIVE_TOKENS
    sampling = SamplingParams(
        temperature=getattr(args, "temperature", 0.0),
        top_k=getattr(args, "top_k", 0),
        top_p=getattr(args, "top_p", 1.0),
        repetition_penalty=getattr(args, "repetition_penalty", 1.0),
        seed=getattr(args, "seed", 0),
    )
    prefix = bool(getattr(args, "prefix_caching", False))
    if prefix and fbs is None and hasattr(args, "full_batch_size"):
        raise UsageError("--prefix_caching reuses the cache slots of continuous batching: add --full_batch_size")
    if k is not None and fbs is not None:
        raise UsageError("--full_batch_size and speculative decoding cannot be combined yet; choose one")
    lookup = getattr(args, "prompt_lookup", None)
    ngram = getattr(args, "prompt_lookup_ngram", DEFAULT_NGRAM_MAX)
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
    comp = getattr(args, "comp_ctx_lengths", None)
    if comp is not None and getattr(args, "ctx_len", None):
        from qeff.serving.ctx_ladder import parse_ladder

        parse_ladder(comp, args.ctx_len)  # one sentence and exit 2 for a bad list, before any slow work
    args._serving_options = ServingOptions(
        full_batch_size=fbs, num_speculative_tokens=k, draft_model_name=draft, prefix_caching=prefix, sampling=sampling,
        prompt_lookup=lookup, prompt_lookup_ngram=ngram or DEFAULT_NGRAM_MAX, comp_ctx_lengths=comp,
    )
    return args._serving_options
