"""The run steps ``qeff infer`` and ``qeff execute`` share: the session's options, and the
generation over every prompt (in batches, through the slots of continuous batching, or
speculatively with a draft) from the typed run and serving options."""

from __future__ import annotations

from qeff.cli.options import Invocation, eos_mode
from qeff.cli.output import Out
from qeff.errors import UsageError

__all__ = ["session_options", "run"]


def session_options(inv: Invocation) -> dict:
    """The keyword arguments of opening a session: threads, devices, the decode session, the ladder."""
    return dict(threads=inv.run.threads, device_ids=inv.device_group, specialize_decode=inv.run.specialize_decode,
                comp_ctx_lengths=inv.serving.comp_ctx_lengths if inv.serving else None)


def run(session, tokenizer, prompts: list[str], inv: Invocation, out: Out, draft=None):
    """Generate for every prompt and report what the loop said (rows stopped by a full cache)."""
    from qeff.generation import run_prompts
    from qeff.inputs import check_prompt_lengths
    from qeff.serving.dispatch import wants_serving
    from qeff.validation import check_fits

    opts, options = inv.serving, inv.run
    check_fits("--generation_len", options.generation_len, session.ctx_len, "generated token")  # execute: the artifact's context
    mode = eos_mode(options)
    if mode == "suppress":
        from qeff.generation import EosSuppressed, eos_ids

        session = EosSuppressed(session, eos_ids(tokenizer))
        if draft is not None and hasattr(draft, "run"):  # a draft model proposes what the target may keep
            draft = EosSuppressed(draft, eos_ids(tokenizer))
    check_prompt_lengths(tokenizer, prompts, session.ctx_len)
    if getattr(getattr(session, "variant", None), "speculative", False) and draft is None:
        raise UsageError("this artifact is a speculative-decoding target: run it with qeff infer --draft_model_name")
    if opts.prefix_caching and not getattr(session, "full_batch_size", None):
        raise UsageError("--prefix_caching reuses the cache slots of continuous batching: use an artifact compiled with --full_batch_size")
    if wants_serving(session, draft):
        summary = _run_serving(session, tokenizer, prompts, inv, out, draft)
    else:
        summary = run_prompts(session, prompts, tokenizer=tokenizer, generation_len=options.generation_len,
                              ignore_eos=mode != "stop", stream=out.human if options.stream else None,
                              sampling=opts.sampling)
    for message in summary.messages:
        out.say(f"[qeff] {message}")
    return summary


def _run_serving(session, tokenizer, prompts, inv: Invocation, out: Out, draft):
    import numpy as np

    from qeff.generation import TextStreamer
    from qeff.serving.dispatch import run_serving

    options = inv.run
    streamer = TextStreamer(tokenizer, out=out.human) if options.stream else None
    if streamer:
        out.human.write(f"\n{prompts[0]}")
    on_text = (lambda i, token: streamer(np.array([token]), np.array([True])) if i == 0 else None) if streamer else None
    summary = run_serving(session, tokenizer, prompts, inv.serving, generation_len=options.generation_len, draft=draft,
                          on_text=on_text, ignore_eos=eos_mode(options) != "stop")
    if streamer:
        streamer.end()
    return summary
