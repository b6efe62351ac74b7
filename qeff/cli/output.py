"""What the subcommands print: human lines (stdout, or stderr when ``--json`` reserves stdout for
its one JSON line), the figures of a run, and the JSON record."""

from __future__ import annotations

import json
import sys

from qeff.cli.options import Invocation, eos_mode

__all__ = ["Out", "reuse_note", "print_figures", "emit_json", "ladder_record", "say_comparisons", "stages", "warn_untested_libraries"]


class Out:
    """Human lines go to stdout, or to stderr when --json reserves stdout for the JSON line."""

    def __init__(self, json_mode: bool):
        self.json_mode = json_mode
        self.human = sys.stderr if json_mode else sys.stdout

    def say(self, *parts) -> None:
        print(*parts, file=self.human, flush=True)


def reuse_note(out: Out, what: str, built) -> None:
    if built.reused:
        out.say(f"[qeff] reused cached {what} {built.path} (saved {built.build_seconds:.1f} s)")
    else:
        out.say(f"[qeff] built {what} {built.path} in {built.seconds:.1f} s")


def print_figures(out: Out, summary, *, show_texts: bool) -> None:
    if show_texts:
        for prompt, text in zip(summary.prompts, summary.text):
            out.say(f"\n=== {prompt!r}\n{text}")
    out.say(
        f"\n[qeff] batch size {summary.batch_size} × {summary.batches} batch(es), {summary.new_tokens} new tokens\n"
        f"  time to first token : {summary.ttft_s * 1000:9.1f} ms\n"
        f"  decode              : {summary.decode_tok_s:9.2f} tokens/s\n"
        f"  total               : {summary.total_tok_s:9.2f} tokens/s\n"
        f"  end to end          : {summary.e2e_s:9.3f} s"
    )
    figures = summary.to_dict()
    if figures.get("full_batch_size"):
        hits = sum(figures["prefix_hit_tokens"])
        out.say(f"  continuous batching : {figures['full_batch_size']} slots, {figures['decode_steps']} decode steps, "
                f"occupancy {figures['slot_occupancy']:.0%}" + (f", {hits} prompt tokens reused from cache" if hits else ""))
    if figures.get("num_speculative_tokens"):
        out.say(f"  speculative         : {figures['mean_accepted_tokens']:.2f} tokens per verify step (K={figures['num_speculative_tokens']}, "
                f"draft {figures['draft_model_name']}), {figures['acceptance_rate']:.0%} of drafted tokens accepted")


def stages(inv: Invocation | None) -> list[dict]:
    """Each stage's peak RSS and wall time this run (:mod:`qeff.meter`): the ``stages`` of --json."""
    meter = inv.meter if inv is not None else None
    return meter.to_list() if meter is not None else []


def ladder_record(session) -> dict:
    """Which compute-context ladder a run used (``--comp_ctx_lengths``): the rungs its session
    switches between (None: every step attends all ``ctx_len`` slots) and the lengths its steps
    attended, so a ``--json`` reader knows which ladder gave its figures."""
    ladder = getattr(session, "ladder", None)
    attended = getattr(session, "attended", None) or []
    return {"comp_ctx_lengths": list(ladder) if ladder else None, "attended_lengths": sorted(set(attended))}


def emit_json(summary, inv: Invocation | None = None, **extra) -> None:
    from qeff._system import peak_rss_mb

    record = {**summary.to_dict(), **extra, "peak_rss_mb": round(peak_rss_mb(), 1), "stages": stages(inv)}
    if inv is not None:
        record["eos"] = eos_mode(inv.run)
    record.pop("messages", None)
    print(json.dumps(record, default=str), flush=True)


def say_comparisons(out: Out, report, *, cached: bool) -> None:
    for c in report.comparisons:
        out.say(f"[qeff] verify {c.reference} vs {c.candidate}: {'ok' if c.passed else 'FAILED'} — logits MSE "
                f"{c.logits_mse:.2e}, max-abs {c.logits_max_abs:.2e}, tokens {c.tokens_matched}/{c.tokens_total}"
                + (" (cached)" if cached else ""))


def warn_untested_libraries() -> None:
    """One line on stderr when torch, transformers, onnx or onnxruntime is not the release the
    lock was tested with (issue 17): a verdict on another release is not the suite's verdict."""
    from qeff.compat import untested_warning

    line = untested_warning()
    if line:
        print(f"qeff: {line}", file=sys.stderr, flush=True)
