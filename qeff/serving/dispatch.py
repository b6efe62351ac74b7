"""Run prompts through a serving session for the command line: continuous batching or speculative
decoding, figures in the shape ``qeff infer --json`` prints (per-prompt results in input order)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qeff.generation.continuous import generate_continuous
from qeff.generation.engine import in_batches
from qeff.generation.result import RunSummary, batch_figures
from qeff.generation.speculative import generate_speculative
from qeff.serving.options import ServingOptions

__all__ = ["run_serving", "wants_serving", "ServingSummary"]


@dataclass
class ServingSummary(RunSummary):
    """:class:`~qeff.generation.result.RunSummary` plus the serving figures (flat in :meth:`to_dict`)."""

    serving: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("serving"))
        return out


def wants_serving(session, draft) -> bool:
    return bool(getattr(session, "full_batch_size", None)) or draft is not None


def run_serving(session, tokenizer, prompts: list[str], opts: ServingOptions, *, generation_len, draft=None, on_text=None,
                ignore_eos: bool = False) -> ServingSummary:
    """``on_text(prompt_index, token)`` streams tokens as they come (the CLI streams prompt 0);
    ``ignore_eos`` (speculative and prompt-lookup decoding): rows stop at generation_len only."""
    if getattr(session, "full_batch_size", None):
        result = generate_continuous(session, prompts, tokenizer=tokenizer, generation_len=generation_len, sampling=opts.sampling,
                                     prefix_caching=opts.prefix_caching, on_token=on_text)
        results = [result]
        extra = {
            "full_batch_size": result.full_batch_size,
            "decode_steps": result.steps,
            "slot_occupancy": round(result.slot_occupancy, 4),
            "slots": result.slots,
            "prefix_hit_tokens": result.prefix_hit_tokens,
            "ttft_per_prompt_s": [round(t, 4) for t in result.ttft_per_prompt_s],
        }
        texts, token_ids = result.texts, result.token_ids
    else:
        k = opts.num_speculative_tokens or opts.prompt_lookup
        results, texts, token_ids = [], [], []
        for rows, real, offset in in_batches(prompts, session.batch_size):
            def stream(r, token, offset=offset):
                if on_text is not None and r + offset < len(prompts) and r < real:
                    on_text(r + offset, token)

            r = generate_speculative(session, draft, rows, tokenizer=tokenizer, generation_len=generation_len, num_speculative_tokens=k, on_token=stream,
                                     eos_token_id=[] if ignore_eos else None)
            results.append(r)
            texts += r.texts[:real]
            token_ids += r.token_ids[:real]
        rows = sum(r.verify_rows for r in results)
        proposed = sum(r.proposed_tokens for r in results)
        extra = {
            "num_speculative_tokens": k,
            "draft_model_name": opts.draft_model_name or ("prompt lookup" if opts.prompt_lookup else None),
            "prompt_lookup": opts.prompt_lookup,
            "prompt_lookup_ngram": opts.prompt_lookup_ngram if opts.prompt_lookup else None,
            "mean_accepted_tokens": round(sum(r.mean_accepted_tokens * r.verify_rows for r in results) / rows, 4) if rows else 0.0,
            "acceptance_rate": round(sum(r.accepted_drafts for r in results) / proposed, 4) if proposed else 0.0,
            "verify_steps": sum(r.steps for r in results),
            "draft_s": round(sum(r.draft_s for r in results), 4),
            "verify_s": round(sum(r.verify_s for r in results), 4),
        }
    return ServingSummary(
        prompts=list(prompts), text=texts, token_ids=token_ids, messages=[m for r in results for m in r.messages],
        **batch_figures(results), batch_size=session.batch_size, sampling=opts.sampling.to_dict(), serving=extra,
    )
