"""``qeff infer``: load → transform → export → verify → compile → execute, each stage cached."""

from __future__ import annotations

import argparse
import time

from qeff.cli import arguments as a
from qeff.cli.building import check_cpu_graph, check_no_emulated_serving, compile_graph, compile_options, is_fused, open_draft, pipeline
from qeff.cli.checks import resolve_backend
from qeff.cli.options import Invocation, eos_mode
from qeff.cli.output import Out, emit_json, ladder_record, print_figures, reuse_note, say_comparisons
from qeff.cli.running import run as run_prompts
from qeff.cli.running import session_options
from qeff.errors import QEffError, UsageError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("infer", help="load → transform → export → verify → compile → execute (stages cached)")
    a.model_args(p)
    a.compile_args(p)
    a.run_args(p)
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="check HF vs PyTorch vs ONNX Runtime before compiling (default: on for models up to 2B parameters)")
    a.verify_layers_arg(p)
    p.add_argument("--force", action="store_true", help="rebuild every stage even when a cached artifact matches")
    a.draft_args(p)
    p.set_defaults(func=run)


def _check(inv: Invocation, backend: str) -> None:
    """This command's combinations of flags that cannot run, before any work."""
    serving, o = inv.serving, inv.compile
    if backend == "ort":
        check_no_emulated_serving(inv, serving.variant)
    if backend == "qaic" and not serving.variant.is_base:
        raise UsageError(
            "continuous batching and speculative decoding run on the ort backend here; for Cloud AI 100, compile with "
            "`qeff compile --backend qaic --full_batch_size N` (or --num_speculative_tokens K): qeff has no runtime for those QPCs yet"
        )
    if backend == "qaic" and serving.ladder_asked:
        raise UsageError("a compute-context ladder QPC has no runtime in qeff yet; build it with `qeff compile --backend qaic "
                         "--comp_ctx_lengths …` and run it with QEfficient, or drop --comp_ctx_lengths")
    if serving.prompt_lookup and (backend == "qaic" or o.mxfp6 or o.mxint8):
        raise UsageError("prompt-lookup decoding runs on the ort backend's fp32/int8/int4 graphs here; drop --prompt_lookup, "
                         "or --backend qaic / --mxfp6 / --mxint8")
    if backend == "qaic":
        from qeff import sdk

        sdk.require_compiler()
        sdk.import_runtime()
    check_cpu_graph(inv, backend)


def _verify(inv: Invocation, pipe, prompts: list[str], out: Out) -> dict | None:
    """HF vs PyTorch vs ONNX Runtime on the base graph before compiling (when asked, or for a
    small model); a failure stops the run with what failed."""
    from qeff.pipeline import SMALL_MODEL_PARAMS

    want = inv.verify.want if inv.verify.want is not None else pipe.num_parameters <= SMALL_MODEL_PARAMS
    if not want:
        return None
    shape, tokenizer = inv.shape, pipe.tokenizer
    ids = [tokenizer(p)["input_ids"] for p in prompts[: shape.batch_size]]
    longest = max(len(i) for i in ids)
    steps = max(1, min(16, shape.ctx_len - longest))
    if longest >= shape.ctx_len:
        return None
    built, report = pipe.verify_cached(ids, prompt_len=shape.prompt_len, ctx_len=shape.ctx_len, steps=steps, force=inv.model.force)
    summary = {c.name: {"logits_mse": c.logits_mse, "logits_max_abs": c.logits_max_abs, "tokens_matched": c.tokens_matched,
                        "tokens_total": c.tokens_total, "passed": c.passed} for c in report.comparisons}
    say_comparisons(out, report, cached=built.reused)
    if not report.passed:
        failures = " | ".join(
            f"{c.reference} vs {c.candidate}: " + "; ".join([*c.failures, *([c.first_divergence.describe()] if c.first_divergence else [])])
            for c in report.comparisons if not c.passed
        )
        raise QEffError(f"verification failed: {failures}; run `qeff verify` for the full report, or --no-verify to skip")
    return summary


def run(inv: Invocation) -> int:
    from qeff.inputs import check_prompt_lengths
    from qeff.meter import measured

    out = Out(inv.json)
    start = time.perf_counter()
    serving, force = inv.serving, inv.model.force
    eos_mode(inv.run)  # the EOS flags' usage error comes before any work
    prompts = list(inv.run.prompts)
    backend = resolve_backend(inv.compile.backend)
    _check(inv, backend)
    pipe = pipeline(inv)

    def validate(tok) -> None:
        check_prompt_lengths(tok, prompts, inv.shape.ctx_len)
        if serving.draft_model_name is not None:
            _check_draft_tokenizer(inv, tok)

    exported = pipe.export(force=force, validate=validate)
    reuse_note(out, "export", exported)
    tokenizer = pipe.tokenizer
    verify_summary = _verify(inv, pipe, prompts, out)
    variant = serving.variant
    if not variant.is_base:
        # Verification above ran on the base graph; this run's graph adds the serving inputs.
        reuse_note(out, f"{variant.describe()} export", pipe.export(force=force, variant=variant))
    options = compile_options(inv, backend, out, serving)
    built = compile_graph(pipe, backend, inv, options, force=force, variant=variant, out=out)
    reuse_note(out, f"{backend} artifact", built)
    if serving.prompt_lookup and not is_fused(built):
        # The portable graph verifies several positions only in its num_logits_to_keep variant.
        from qeff.serving.variant import GraphVariant

        variant = GraphVariant(speculative=True)
        options = dict(options, num_speculative_tokens=serving.prompt_lookup)
        reuse_note(out, f"{variant.describe()} export", pipe.export(force=force, variant=variant))
        built = compile_graph(pipe, backend, inv, options, force=force, variant=variant, out=out)
        reuse_note(out, f"{backend} artifact", built)
    with measured("run"):
        session, rebuilt = pipe.open_session(built, rebuild=lambda: compile_graph(pipe, backend, inv, options, variant=variant, out=out),
                                             **session_options(inv))
        if rebuilt:
            out.say(f"[qeff] the cached artifact {built.path} could not be opened; rebuilt it")
        draft = open_draft(inv, serving, out, backend, session_options(inv)) if serving.draft_model_name else None
        if serving.prompt_lookup:
            from qeff.serving.ngram import NgramDrafter
            from qeff.serving.speculative import can_verify

            if not can_verify(session):  # a fused graph cached before it could return several positions
                raise UsageError(f"the cached artifact {built.path} returns one position's logits per step; "
                                 "rerun with --force to rebuild it for --prompt_lookup")
            draft = NgramDrafter(serving.prompt_lookup_ngram)
        summary = run_prompts(session, tokenizer, prompts, inv, out, draft=draft)
    print_figures(out, summary, show_texts=not inv.run.stream or len(prompts) > 1)
    if inv.json:
        emit_json(summary, inv, backend=backend, model=inv.model.model_name, load_s=round(pipe.load_s, 3), device_group=inv.device_group,
                  artifact=str(built.path), reused={"export": exported.reused, "compile": built.reused and not rebuilt},
                  repaired={k: b.repaired for k, b in (("export", exported), ("compile", built)) if b.repaired} or None,
                  verify=verify_summary, fused_check=_fused_check_record(pipe, built), **ladder_record(session), wall_s=round(time.perf_counter() - start, 3))
    return 0


def _fused_check_record(pipe, built) -> dict | None:
    """The fused graph's check against the portable graph for --json: whether it ran, and its
    figures, or why it did not (None for an artifact that is not the fused graph)."""
    check = pipe.graph_checks.get(str(built.path))
    if not isinstance(check, dict):
        return None
    if check.get("ran") is False:
        return {"ran": False, "reason": check.get("reason")}
    keys = ("passed", "gated", "logits_max_abs", "logits_mse", "kld_mean", "top1_agree", "tokens_matched", "tokens_total")
    return {"ran": True, **{k: check.get(k) for k in keys}}


def _check_draft_tokenizer(inv: Invocation, target_tokenizer) -> None:
    from qeff.intake.loading import load_tokenizer, resolve
    from qeff.serving.speculative import check_same_tokenizer

    draft = inv.serving.draft_model_name
    draft_tokenizer = load_tokenizer(resolve(draft, cache_dir=inv.model.cache_dir))
    check_same_tokenizer(target_tokenizer, draft_tokenizer, target=inv.model.model_name, draft=draft)
