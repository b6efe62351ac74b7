"""The ``qeff`` command line.

    qeff infer    load → transform → export → verify → compile → execute, each stage cached
    qeff export   export a model's retained-state ONNX graph
    qeff compile  compile an exported graph for a backend (``--dry-run`` for Cloud AI without an SDK)
    qeff execute  run a compiled artifact (an ORT artifact or a Cloud AI QPC)
    qeff verify   HF vs transformed PyTorch vs ONNX Runtime on a model
    qeff list     the cached artifacts under $QEFF_HOME
    qeff check    is a model supported? from its config and file headers, no weights loaded
    qeff doctor   verify every cached artifact; show stale temporaries and locks
    qeff clean    remove what killed runs left behind (never a build in progress); --superseded:
                  also what another qeff or library version built (this one never reuses it)

Flags keep the seed product's spellings (``--model_name``, ``--num_cores``, ``--device_group [0,1]``,
…); each also has a dashed spelling. ``python -m qeff.cloud.infer`` and ``python -m qeff.cloud.execute``
are aliases. Exit codes: 0 success, 1 a failed stage (compiler error, verification outside
tolerance, a full disk), 2 a usage error (one sentence, no traceback). ``--debug`` (anywhere on the
command line, or ``QEFF_DEBUG=1``) adds the traceback to any error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from qeff._version import __version__
from qeff.errors import ArtifactError, QEffError, UsageError

__all__ = ["main", "build_parser", "preflight"]

DEFAULT_PROMPT = "The capital of France is"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: exit 2 with one sentence too
        self.print_usage(sys.stderr)
        self.exit(2, f"qeff: error: {message}\n")


def _flag(parser, name: str, *more: str, **kwargs):
    """--seed_style and --dashed-style spellings of one option."""
    dashed = name.replace("_", "-")
    spellings = [name] + ([dashed] if dashed != name else []) + list(more)
    return parser.add_argument(*spellings, **kwargs)


def _model_args(p):
    _flag(p, "--model_name", "-m", default="smollm2-135m",
          help="model card/alias, HF repo id, local HF directory or .gguf file (default: smollm2-135m, the embedded SmolLM2-135M-Instruct)")
    _flag(p, "--cache_dir", default=None, help="Hugging Face cache directory (default: HF's own)")
    _flag(p, "--revision", default=None, help="hub revision (branch, tag or commit)")
    _flag(p, "--home", default=None, help="artifact cache directory (default: $QEFF_HOME or ./qeff_models)")
    _cache_args(p)
    p.add_argument("--skip-memory-check", "--skip_memory_check", action="store_true",
                   help="run even when the memory preflight estimates a stage will not fit (or QEFF_SKIP_MEMORY_CHECK=1)")


def _cache_args(p):
    _flag(p, "--verify_cache", action="store_true",
          help="recompute the full digest of every cached file before reusing it (default: sizes, stat and a sampled digest)")


def _compile_args(p):
    _flag(p, "--backend", choices=["ort", "qaic", "auto"], default="auto",
          help="ort = ONNX Runtime on the CPU; qaic = Cloud AI 100; auto = qaic when its SDK is installed, else ort (default)")
    _flag(p, "--batch_size", type=int, default=None, help="rows per batch (default 1)")
    _flag(p, "--prompt_len", type=int, default=32, help="prefill chunk length in tokens (default 32)")
    _flag(p, "--ctx_len", type=int, default=128, help="cache slots per row: prompt + generated tokens (default 128)")
    _flag(p, "--num_cores", type=int, default=16, help="Cloud AI cores per device (default 16)")
    _flag(p, "--device_group", default=None, help="Cloud AI device ids used together, e.g. [0,1] or 0,1 (default: [0])")
    _flag(p, "--mxfp6", action="store_true", help="Cloud AI: MatMul weights in MXFP6 (ort: emulated, with fp16 activations)")
    _flag(p, "--mxint8", action="store_true", help="Cloud AI: the KV cache in MXINT8 (ort: emulated, with fp16 activations)")
    _flag(p, "--mos", type=int, default=-1, help="Cloud AI: -mos effort (default -1 = not passed)")
    _flag(p, "--aic_enable_depth_first", action="store_true", help="Cloud AI: depth-first scheduling")
    _flag(p, "--aic_hw_version", default=None, help="Cloud AI: -aic-hw-version (default: what the compiler documents)")
    _flag(p, "--compiler_option", action="append", default=[], metavar="FLAG",
          help="extra Cloud AI compiler flag, passed through (repeatable), e.g. -stats-level=70")
    from qeff.serving.options import add_compile_args

    add_compile_args(p)
    p.add_argument("--ort-graph", "--ort_graph", choices=["auto", "fused", "portable"], default="auto",
                   help="ONNX Runtime: the fused CPU graph (llama, mistral, qwen2) or the portable one; auto = fused when "
                        "the architecture is covered and no serving variant is asked for (default)")
    _flag(p, "--weights", choices=["fp32", "native", "int8", "int4"], default="fp32",
          help="ONNX Runtime fused graph: fp32; native = a GGUF file's own quantized blocks, exactly; int8/int4 = "
               "round-to-nearest blocks of the float weights (default fp32)")
    p.add_argument("--int8-activations", "--int8_activations", action="store_true",
                   help="ONNX Runtime fused graph with quantized weights: int8 activations inside MatMulNBits (faster, not exact)")


def _run_args(p):
    _flag(p, "--prompt", default=None, help=f'prompt(s), several separated by "|" (default: "{DEFAULT_PROMPT}")')
    _flag(p, "--prompts_txt_file_path", default=None,
          help="file with one prompt per line, read once (a pipe works); a line may hold at most --ctx_len × 256 bytes")
    _flag(p, "--generation_len", type=int, default=None, help="max new tokens per prompt (default: until EOS or the cache is full)")
    _flag(p, "--ignore_eos", action="store_true",
          help="do not stop a row at EOS: it emits EOS and goes on, exactly --generation_len tokens (or until the cache is full), "
               "e.g. for benchmarks (vLLM's ignore_eos)")
    _flag(p, "--suppress_eos", action="store_true",
          help="never choose EOS (its logits are -inf): exactly --generation_len tokens, as HF min_new_tokens and "
               "llama.cpp --ignore-eos; token comparisons with those hold only this way")
    _flag(p, "--threads", type=int, default=None, help="ONNX Runtime threads (default: physical cores)")
    p.add_argument("--specialize-decode", "--specialize_decode", action=argparse.BooleanOptionalAction, default=None,
                   help="ONNX Runtime: a second session pinned to decode shapes, ~12%% faster decode for a second copy of "
                        "the weights in memory (default: on when the weights are under 2 GiB)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="stream the first prompt's tokens as they come (default on)")
    p.add_argument("--json", action="store_true", help="print one JSON line of results on stdout; human output goes to stderr")
    from qeff.serving.options import add_run_args

    add_run_args(p)


def _verify_layers_arg(p) -> None:
    _flag(p, "--verify-layers", "--verify_layers", action="store_true",
          help="verify with one decoder layer's weights in memory at a time, read from the safetensors files "
               "(default: when the memory preflight says the in-memory verification does not fit; "
               "QEFF_STREAMED_VERIFY=1 always, =0 never; docs/memory.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qeff", description="Run and verify HF causal LMs on static-shape accelerators (ONNX Runtime, Cloud AI 100).")
    parser.add_argument("--version", action="version", version=f"qeff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("infer", help="load → transform → export → verify → compile → execute (stages cached)")
    _model_args(p)
    _compile_args(p)
    _run_args(p)
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="check HF vs PyTorch vs ONNX Runtime before compiling (default: on for models up to 2B parameters)")
    _verify_layers_arg(p)
    p.add_argument("--force", action="store_true", help="rebuild every stage even when a cached artifact matches")
    from qeff.serving.options import add_draft_args

    add_draft_args(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("export", help="export the retained-state ONNX graph")
    _model_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even when a cached export matches")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compile", help="compile an exported graph for a backend")
    _model_args(p)
    _flag(p, "--onnx_path", default=None, help="an exported model.onnx (default: export --model_name first)")
    _compile_args(p)
    _flag(p, "--dry_run", action="store_true", help="qaic: write the compiler's files and print its command without running it")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("execute", help="run a compiled artifact")
    _flag(p, "--qpc_path", "--artifact", required=True, help="a compile directory (ort_… or qpc_…) or a QPC directory")
    _flag(p, "--model_name", "-m", default=None, help="where the tokenizer comes from (default: the one saved beside the export)")
    _flag(p, "--device_group", default=None, help="Cloud AI device ids, e.g. [0,1]")
    _cache_args(p)
    _run_args(p)
    from qeff.serving.options import add_lookup_args

    add_lookup_args(p)
    p.set_defaults(func=cmd_execute)

    p = sub.add_parser("verify", help="HF vs transformed PyTorch vs ONNX Runtime")
    _model_args(p)
    _run_args(p)
    _flag(p, "--prompt_len", type=int, default=32)
    _flag(p, "--ctx_len", type=int, default=128)
    _flag(p, "--steps", type=int, default=16, help="generated tokens compared per prompt (default 16)")
    _verify_layers_arg(p)
    _flag(p, "--precision", default=None, metavar="TIERS",
          help="precision tiers to emulate and judge against HF fp32, e.g. fp32,fp16,mxfp6,mxint8,mxfp6+mxint8 (docs/precision.md)")
    _flag(p, "--backend", choices=["ort", "qaic", "torch"], default="ort", help="where --precision tiers run (default ort: emulated on the CPU)")
    _flag(p, "--rows", type=int, default=8, help="--precision: corpus windows, run as one batch (default 8)")
    _flag(p, "--window", type=int, default=512, help="--precision: corpus tokens per window (default 512)")
    _flag(p, "--no_keep_tiers", action="store_true",
          help="--precision: remove each emulated tier once measured (each holds the fp32 weights twice: "
               "1.3 GB for SmolLM2-135M, ~54 GB for a 7B model); by default they are cached for the next run")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("check", help="is a model supported? answered from its config and file headers, without loading weights")
    _flag(p, "--model_name", "-m", required=True,
          help="model card/alias, HF repo id, local HF directory or .gguf file")
    _flag(p, "--cache_dir", default=None, help="Hugging Face cache directory (default: HF's own)")
    _flag(p, "--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("list", help="list cached artifacts")
    _flag(p, "--home", default=None, help="artifact cache directory (default: $QEFF_HOME or ./qeff_models)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("doctor", help="verify every cached artifact; show stale temporaries and locks")
    _flag(p, "--home", default=None, help="artifact cache directory (default: $QEFF_HOME or ./qeff_models)")
    p.add_argument("--full", action="store_true", help="recompute every file's full digest (default: the quick check)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("clean", help="remove stale temporaries and locks of killed runs (never a build in progress)")
    _flag(p, "--home", default=None, help="artifact cache directory (default: $QEFF_HOME or ./qeff_models)")
    p.add_argument("--damaged", action="store_true", help="also remove artifacts that fail their integrity check")
    p.add_argument("--logs", action="store_true", help="also remove the kept logs of failed compiles")
    p.add_argument("--superseded", action="store_true",
                   help="also remove artifacts built by another qeff or library version (never reused by this one)")
    p.set_defaults(func=cmd_clean)
    return parser


# -- output ---------------------------------------------------------------------------------


class _Out:
    """Human lines go to stdout, or to stderr when --json reserves stdout for the JSON line."""

    def __init__(self, json_mode: bool):
        self.json_mode = json_mode
        self.human = sys.stderr if json_mode else sys.stdout

    def say(self, *parts) -> None:
        print(*parts, file=self.human, flush=True)


def _home(args) -> Path | None:
    return Path(args.home) if getattr(args, "home", None) else None


def _resolve_backend(name: str) -> str:
    """``auto`` is qaic when the Cloud AI SDK is installed (compiler and runtime), else ort."""
    if name != "auto":
        return name
    from qeff import sdk

    return "qaic" if sdk.status().available else "ort"


def _reuse_note(out: _Out, what: str, built) -> None:
    if built.reused:
        out.say(f"[qeff] reused cached {what} {built.path} (saved {built.build_seconds:.1f} s)")
    else:
        out.say(f"[qeff] built {what} {built.path} in {built.seconds:.1f} s")


def _device_group(args) -> list[int] | None:
    from qeff.inputs import parse_device_group

    return parse_device_group(getattr(args, "device_group", None))


def _compile_options(args, backend: str, out: _Out, serving=None) -> dict:
    """``qeff.compile``'s options from the command line (Cloud AI's only for the qaic backend;
    ``serving``: the continuous-batching / speculative-target options of the graph variant)."""
    options = dict(batch_size=args.batch_size, prompt_len=args.prompt_len, ctx_len=args.ctx_len,
                   threads=getattr(args, "threads", None), dry_run=getattr(args, "dry_run", False))
    if serving is not None:
        options.update(full_batch_size=serving.full_batch_size, num_speculative_tokens=serving.num_speculative_tokens)
    if backend == "qaic":
        options.update(num_cores=args.num_cores, num_devices=len(_device_group(args) or [0]), mxfp6=args.mxfp6,
                       mxint8=args.mxint8, mos=args.mos if args.mos > 0 else None,
                       aic_enable_depth_first=args.aic_enable_depth_first, aic_hw_version=args.aic_hw_version,
                       extra_options=tuple(args.compiler_option))
    elif args.mos > 0 or args.aic_enable_depth_first or args.compiler_option:
        out.say("[qeff] note: --mos/--aic_enable_depth_first/--compiler_option apply to Cloud AI only")
    return options


def _check_cpu_graph(args, backend: str) -> None:
    """Usage errors of the CPU graph options, before anything is loaded or exported (the sizes were
    checked by :func:`_check_args`)."""
    if backend == "ort" and (args.weights != "fp32" or args.int8_activations or args.ort_graph == "fused" or args.mxfp6 or args.mxint8):
        if _ladder_asked(args):
            raise UsageError("--comp_ctx_lengths applies to the portable graph (the fused CPU graph attends the valid length "
                             "already, and the emulated tiers keep the plain graph); drop it, or --ort-graph/--weights/--mxfp6/--mxint8")
    if backend == "ort" and (args.weights != "fp32" or args.int8_activations or args.ort_graph == "fused"):
        if getattr(args, "full_batch_size", None) or getattr(args, "num_speculative_tokens", None):
            raise UsageError("continuous batching and speculative targets run the portable graph; drop --ort-graph fused, "
                             "--weights and --int8-activations, or the serving flags")
    if backend == "ort" and (args.weights != "fp32" or args.int8_activations or args.ort_graph != "auto"):
        if args.mxfp6 or args.mxint8:
            raise UsageError("--mxfp6/--mxint8 on the ort backend run the emulated portable graph; drop --weights, "
                             "--int8-activations and --ort-graph, or the MX flags")
        from qeff.compilers.ort_fused_artifact import check_cpu_options
        from qeff.loading import resolve

        check_cpu_options(resolve(args.model_name, revision=args.revision, cache_dir=args.cache_dir),
                          graph=args.ort_graph, weights=args.weights, int8_activations=args.int8_activations)


def _target(args, backend: str, options: dict):
    """The run's :class:`qeff.cpu_graph.CompileTarget`: which graph :meth:`Pipeline.compile` builds."""
    from qeff.cpu_graph import CompileTarget

    ort = backend == "ort"
    return CompileTarget(backend, graph=args.ort_graph, weights=args.weights, int8_activations=args.int8_activations,
                         mxfp6=ort and bool(args.mxfp6), mxint8=ort and bool(args.mxint8), options=options,
                         comp_ctx_lengths=getattr(args, "comp_ctx_lengths", None))


def _compile(pipe, backend: str, args, options: dict, *, onnx_path: Path | None = None, force: bool = False, variant=None,
             out: _Out | None = None):
    """Compile the exported graph (or its serving ``variant``): :meth:`Pipeline.compile` decides
    which graph from the run's target (the fused CPU graph, the emulated tier of --mxfp6/--mxint8
    on ort, or the portable graph). ``onnx_path`` (``qeff compile --onnx_path``, no pipeline): that
    graph as given, or its emulated tier."""
    import qeff

    if backend == "ort" and (args.mxfp6 or args.mxint8):
        _check_no_emulated_serving(args, variant)
    if onnx_path is None:
        return pipe.compile(_target(args, backend, options), force=force, variant=variant, say=out.say if out else print)
    if backend == "ort" and (args.mxfp6 or args.mxint8):
        from qeff.precision.commands import emulated_graph

        onnx_path = emulated_graph(onnx_path, mxfp6=args.mxfp6, mxint8=args.mxint8, force=force)
    return qeff.compile(onnx_path, backend, force=force, progress=True, **options)


def _ladder_asked(args) -> bool:
    from qeff.serving.options import serving_options

    return serving_options(args).ladder_asked


def _check_no_emulated_serving(args, variant) -> None:
    """On ort, --mxfp6/--mxint8 emulate the formats on the base graph (qeff.precision); the
    serving graph variants are not emulated."""
    emulated = getattr(args, "mxfp6", False) or getattr(args, "mxint8", False)
    if emulated and variant is not None and not variant.is_base:
        raise UsageError(
            "--mxfp6/--mxint8 on the ort backend emulate the accelerator formats on the base graph only; "
            "drop them, or --full_batch_size / the draft model"
        )


def _session_options(args) -> dict:
    return dict(threads=getattr(args, "threads", None), device_ids=_device_group(args),
                specialize_decode=getattr(args, "specialize_decode", None),
                comp_ctx_lengths=getattr(args, "comp_ctx_lengths", None))


def _prompts(args) -> list[str]:
    """The run's prompts, read once: a prompts file may be a pipe (``<(…)``, ``/dev/stdin``) that a
    second read finds empty (issue 19), so the argument check's reading is the one the run uses."""
    from qeff.inputs import read_prompts

    prompts = getattr(args, "_prompts_read", None)
    if prompts is None:
        prompts = read_prompts(args.prompt, args.prompts_txt_file_path, ctx_len=getattr(args, "ctx_len", None))
        args._prompts_read = prompts = prompts or [DEFAULT_PROMPT]
    return prompts


def _pipeline(args):
    from qeff.pipeline import Pipeline

    pipe = Pipeline.open(args.model_name, revision=args.revision, cache_dir=args.cache_dir, home=_home(args),
                         verify_layers=True if getattr(args, "verify_layers", False) else None)
    pipe.verify_mode = getattr(args, "_verify_mode", None)  # the memory preflight's choice, when it made one
    return pipe


def _run(session, tokenizer, prompts: list[str], args, out: _Out, draft=None):
    """Generate for every prompt (in batches, through the slots of continuous batching, or
    speculatively with a draft) and report what the loop said (rows stopped by a full cache)."""
    from qeff.generation import run_prompts
    from qeff.inputs import check_prompt_lengths
    from qeff.serving.dispatch import wants_serving
    from qeff.serving.options import serving_options
    from qeff.validation import check_fits

    opts = serving_options(args)
    check_fits("--generation_len", args.generation_len, session.ctx_len, "generated token")  # execute: the artifact's context
    ignore_eos = _eos_mode(args) != "stop"
    if _eos_mode(args) == "suppress":
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
        summary = _run_serving(session, tokenizer, prompts, args, out, opts, draft)
    else:
        summary = run_prompts(session, prompts, tokenizer=tokenizer, generation_len=args.generation_len,
                              ignore_eos=ignore_eos, stream=out.human if args.stream else None,
                              sampling=opts.sampling)
    for message in summary.messages:
        out.say(f"[qeff] {message}")
    return summary


def _eos_mode(args) -> str:
    """What EOS does to a row this run (qeff.generation.EOS_MODES): stop, continue or suppress."""
    ignore, suppress = bool(getattr(args, "ignore_eos", False)), bool(getattr(args, "suppress_eos", False))
    if ignore and suppress:
        raise UsageError("--ignore_eos and --suppress_eos exclude each other: choose whether EOS is emitted (ignore) "
                         "or never chosen (suppress)")
    return "suppress" if suppress else "continue" if ignore else "stop"


def _print_figures(out: _Out, summary, *, show_texts: bool) -> None:
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


def _run_serving(session, tokenizer, prompts, args, out: _Out, opts, draft):
    import numpy as np

    from qeff.generation import TextStreamer
    from qeff.serving.dispatch import run_serving

    streamer = TextStreamer(tokenizer, out=out.human) if args.stream else None
    if streamer:
        out.human.write(f"\n{prompts[0]}")
    on_text = (lambda i, token: streamer(np.array([token]), np.array([True])) if i == 0 else None) if streamer else None
    summary = run_serving(session, tokenizer, prompts, opts, generation_len=args.generation_len, draft=draft, on_text=on_text,
                          ignore_eos=_eos_mode(args) != "stop")
    if streamer:
        streamer.end()
    return summary


def _stages(args) -> list[dict]:
    """Each stage's peak RSS and wall time this run (:mod:`qeff.meter`): the ``stages`` of --json."""
    meter = getattr(args, "_meter", None)
    return meter.to_list() if meter is not None else []


def _emit_json(summary, args=None, **extra) -> None:
    from qeff._system import peak_rss_mb

    record = {**summary.to_dict(), **extra, "peak_rss_mb": round(peak_rss_mb(), 1), "stages": _stages(args)}
    if args is not None:
        record["eos"] = _eos_mode(args)
    record.pop("messages", None)
    print(json.dumps(record, default=str), flush=True)


def _say_comparisons(out: _Out, report, *, cached: bool) -> None:
    for c in report.comparisons:
        out.say(f"[qeff] verify {c.reference} vs {c.candidate}: {'ok' if c.passed else 'FAILED'} — logits MSE "
                f"{c.logits_mse:.2e}, max-abs {c.logits_max_abs:.2e}, tokens {c.tokens_matched}/{c.tokens_total}"
                + (" (cached)" if cached else ""))


# -- commands -------------------------------------------------------------------------------


def cmd_infer(args) -> int:
    from qeff.inputs import check_prompt_lengths
    from qeff.meter import measured
    from qeff.pipeline import SMALL_MODEL_PARAMS
    from qeff.serving.options import serving_options

    out = _Out(args.json)
    start = time.perf_counter()
    serving = serving_options(args)
    _eos_mode(args)  # the EOS flags' usage error comes before any work
    prompts = _prompts(args)
    group = _device_group(args)
    backend = _resolve_backend(args.backend)
    if backend == "ort":
        _check_no_emulated_serving(args, serving.variant)
    if backend == "qaic" and not serving.variant.is_base:
        raise UsageError(
            "continuous batching and speculative decoding run on the ort backend here; for Cloud AI 100, compile with "
            "`qeff compile --backend qaic --full_batch_size N` (or --num_speculative_tokens K): qeff has no runtime for those QPCs yet"
        )
    if backend == "qaic" and serving.ladder_asked:
        raise UsageError("a compute-context ladder QPC has no runtime in qeff yet; build it with `qeff compile --backend qaic "
                         "--comp_ctx_lengths …` and run it with QEfficient, or drop --comp_ctx_lengths")
    if serving.prompt_lookup and (backend == "qaic" or args.mxfp6 or args.mxint8):
        raise UsageError("prompt-lookup decoding runs on the ort backend's fp32/int8/int4 graphs here; drop --prompt_lookup, "
                         "or --backend qaic / --mxfp6 / --mxint8")
    if backend == "qaic":
        from qeff import sdk

        sdk.require_compiler()
        sdk.import_runtime()
    _check_cpu_graph(args, backend)
    pipe = _pipeline(args)

    def validate(tok) -> None:
        check_prompt_lengths(tok, prompts, args.ctx_len)
        if serving.draft_model_name is not None:
            _check_draft_tokenizer(args, serving, tok)

    exported = pipe.export(force=args.force, validate=validate)
    _reuse_note(out, "export", exported)
    tokenizer = pipe.tokenizer
    want_verify = args.verify if args.verify is not None else pipe.num_parameters <= SMALL_MODEL_PARAMS
    verify_summary = None
    if want_verify:
        ids = [tokenizer(p)["input_ids"] for p in prompts[: args.batch_size]]
        longest = max(len(i) for i in ids)
        steps = max(1, min(16, args.ctx_len - longest))
        if longest < args.ctx_len:
            built, report = pipe.verify_cached(ids, prompt_len=args.prompt_len, ctx_len=args.ctx_len, steps=steps, force=args.force)
            verify_summary = {c.name: {"logits_mse": c.logits_mse, "logits_max_abs": c.logits_max_abs, "tokens_matched": c.tokens_matched,
                                       "tokens_total": c.tokens_total, "passed": c.passed} for c in report.comparisons}
            _say_comparisons(out, report, cached=built.reused)
            if not report.passed:
                failures = " | ".join(
                    f"{c.reference} vs {c.candidate}: " + "; ".join([*c.failures, *([c.first_divergence.describe()] if c.first_divergence else [])])
                    for c in report.comparisons if not c.passed
                )
                raise QEffError(f"verification failed: {failures}; run `qeff verify` for the full report, or --no-verify to skip")
    variant = serving.variant
    if not variant.is_base:
        # Verification above ran on the base graph; this run's graph adds the serving inputs.
        _reuse_note(out, f"{variant.describe()} export", pipe.export(force=args.force, variant=variant))
    options = _compile_options(args, backend, out, serving)
    built = _compile(pipe, backend, args, options, force=args.force, variant=variant, out=out)
    _reuse_note(out, f"{backend} artifact", built)
    if serving.prompt_lookup and not _is_fused(built):
        # The portable graph verifies several positions only in its num_logits_to_keep variant.
        from qeff.serving.variant import GraphVariant

        variant = GraphVariant(speculative=True)
        options = dict(options, num_speculative_tokens=serving.prompt_lookup)
        _reuse_note(out, f"{variant.describe()} export", pipe.export(force=args.force, variant=variant))
        built = _compile(pipe, backend, args, options, force=args.force, variant=variant, out=out)
        _reuse_note(out, f"{backend} artifact", built)
    with measured("run"):
        session, rebuilt = pipe.open_session(built, rebuild=lambda: _compile(pipe, backend, args, options, variant=variant, out=out),
                                             **_session_options(args))
        if rebuilt:
            out.say(f"[qeff] the cached artifact {built.path} could not be opened; rebuilt it")
        draft = _open_draft(args, serving, out, backend) if serving.draft_model_name else None
        if serving.prompt_lookup:
            from qeff.serving.ngram import NgramDrafter
            from qeff.serving.speculative import can_verify

            if not can_verify(session):  # a fused graph cached before it could return several positions
                raise UsageError(f"the cached artifact {built.path} returns one position's logits per step; "
                                 "rerun with --force to rebuild it for --prompt_lookup")
            draft = NgramDrafter(serving.prompt_lookup_ngram)
        summary = _run(session, tokenizer, prompts, args, out, draft=draft)
    _print_figures(out, summary, show_texts=not args.stream or len(prompts) > 1)
    if args.json:
        _emit_json(summary, args, backend=backend, model=args.model_name, load_s=round(pipe.load_s, 3), device_group=group,
                   artifact=str(built.path), reused={"export": exported.reused, "compile": built.reused and not rebuilt},
                   repaired={k: b.repaired for k, b in (("export", exported), ("compile", built)) if b.repaired} or None,
                   verify=verify_summary, fused_check=_fused_check_record(pipe, built), wall_s=round(time.perf_counter() - start, 3))
    return 0


def _is_fused(built) -> bool:
    from qeff.layout import ORT_FUSED

    return (built.manifest.get("outputs") or {}).get("model") == ORT_FUSED


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


def _check_draft_tokenizer(args, serving, target_tokenizer) -> None:
    from qeff.loading import load_tokenizer, resolve
    from qeff.serving.speculative import check_same_tokenizer

    draft_tokenizer = load_tokenizer(resolve(serving.draft_model_name, cache_dir=args.cache_dir))
    check_same_tokenizer(target_tokenizer, draft_tokenizer, target=args.model_name, draft=serving.draft_model_name)


def _open_draft(args, serving, out: _Out, backend: str):
    """The draft of speculative decoding: its base graph, compiled with the target's shapes."""
    from qeff.pipeline import Pipeline

    pipe = Pipeline.open(serving.draft_model_name, cache_dir=args.cache_dir, home=_home(args))
    _reuse_note(out, "draft export", pipe.export(force=args.force))
    built = pipe.compile(backend, force=args.force, **_compile_options(args, backend, out))
    _reuse_note(out, f"draft {backend} artifact", built)
    return pipe.open_session(built, **_session_options(args))[0]


def cmd_export(args) -> int:
    out = _Out(False)
    pipe = _pipeline(args)
    _reuse_note(out, "export", pipe.export(force=args.force))
    out.say(str(pipe.onnx_path))
    return 0


def cmd_compile(args) -> int:
    from qeff.serving.options import serving_options

    out = _Out(False)
    serving = serving_options(args)
    backend = _resolve_backend(args.backend)
    if args.dry_run and backend != "qaic":
        raise UsageError("--dry_run applies to --backend qaic (the ort backend needs no external compiler)")
    options = _compile_options(args, backend, out, serving)
    if args.onnx_path:
        result = _compile(None, backend, args, options, onnx_path=Path(args.onnx_path))
    else:
        _check_cpu_graph(args, backend)
        pipe = _pipeline(args)
        _reuse_note(out, "export", pipe.export(variant=serving.variant))
        result = _compile(pipe, backend, args, options, variant=serving.variant, out=out)
    if args.dry_run:
        out.say(f"[qeff] wrote the compiler's files to {result.out_dir}; run the compile by hand with:\n{result.shell_command()}")
        return 0
    _reuse_note(out, f"{backend} artifact", result)
    out.say(str(result.path))
    return 0


def cmd_execute(args) -> int:
    import qeff

    out = _Out(args.json)
    artifact = Path(args.qpc_path)
    if not artifact.exists():
        raise UsageError(f"--qpc_path {str(artifact)!r} does not exist")
    tokenizer = None
    if args.model_name:
        from qeff.loading import load_tokenizer, resolve

        tokenizer = load_tokenizer(resolve(args.model_name))
    else:
        for candidate in (artifact, *artifact.parents[:3]):
            if (candidate / "tokenizer_config.json").is_file():
                from qeff.artifacts import check_holder
                from qeff.tokenizer import open_saved_tokenizer

                check_holder(candidate, levels=0)  # the export's tokenizer files against its manifest (issue 19)
                tokenizer = open_saved_tokenizer(candidate)
                break
    if tokenizer is None:
        raise UsageError(f"no tokenizer found beside {artifact}; pass --model_name to say where it comes from")
    from qeff.serving.options import serving_options

    lookup = serving_options(args).prompt_lookup
    _eos_mode(args)
    session = qeff.open_session(artifact, **_session_options(args))
    draft = None
    if lookup:
        from qeff.serving.ngram import NgramDrafter
        from qeff.serving.speculative import can_verify

        if not can_verify(session):
            raise UsageError(f"the artifact {artifact} returns one position's logits per step, so it cannot verify drafted "
                             "tokens; build one with `qeff infer --prompt_lookup N` (its artifact line names it), or drop --prompt_lookup")
        draft = NgramDrafter(serving_options(args).prompt_lookup_ngram)
    summary = _run(session, tokenizer, _prompts(args), args, out, draft=draft)
    _print_figures(out, summary, show_texts=not args.stream or len(summary.prompts) > 1)
    if args.json:
        _emit_json(summary, args, backend=session.backend, artifact=str(artifact), load_s=0.0)
    return 0


def cmd_verify(args) -> int:
    out = _Out(args.json)
    if args.precision is not None:
        from qeff.precision.commands import check_precision_args, verify_precision

        tiers = check_precision_args(args)
        return verify_precision(args, tiers, _pipeline(args), _prompts(args), out.say)
    pipe = _pipeline(args)
    pipe.export()
    ids = [pipe.tokenizer(p)["input_ids"] for p in _prompts(args)]
    _, report = pipe.verify_cached(ids, prompt_len=args.prompt_len, ctx_len=args.ctx_len, steps=args.steps)
    for c in report.comparisons:
        out.say(c.describe() + f"; cache MSE {c.cache_mse:.3g} max-abs {c.cache_max_abs:.3g}")
        for failure in c.failures:
            out.say(f"  - {failure}")
        if c.first_divergence:
            out.say(f"  {c.first_divergence.describe()}")
    if args.json:
        print(json.dumps({**report.to_dict(), "stages": _stages(args)}), flush=True)
    return 0 if report.passed else 1


def _warn_untested_libraries() -> None:
    """One line on stderr when torch, transformers, onnx or onnxruntime is not the release the
    lock was tested with (issue 17): a verdict on another release is not the suite's verdict."""
    from qeff.compat import untested_warning

    line = untested_warning()
    if line:
        print(f"qeff: {line}", file=sys.stderr, flush=True)


def cmd_check(args) -> int:
    from qeff.support import run_check

    _warn_untested_libraries()
    return run_check(args.model_name, revision=args.revision, cache_dir=args.cache_dir, json_mode=args.json)


def cmd_list(args) -> int:
    from qeff.artifacts import read_manifest
    from qeff.layout import qeff_home

    home = _home(args) or qeff_home()
    if not home.is_dir():
        print(f"no artifacts: {home} does not exist")
        return 0
    from qeff._system import library_versions
    from qeff.artifacts import owner_of_temporary
    from qeff.atomic import human_bytes
    from qeff.doctor import is_qeff_artifact, scan, superseded_because
    from qeff.home import require_cache

    require_cache(home, "list")

    current = library_versions()
    rows = []
    superseded: list[tuple[str, int]] = []
    for manifest in sorted(home.rglob("manifest.json")):
        directory = manifest.parent
        rel = str(directory.relative_to(home))
        if any(owner_of_temporary(part) for part in directory.relative_to(home).parts):
            continue  # a build in progress (or one a killed run left): not an artifact
        if directory == home or not is_qeff_artifact(directory):
            continue  # another tool's manifest.json among the user's files
        try:
            record = read_manifest(directory) or {}
        except ArtifactError:
            rows.append((rel, "corrupt", "-", "-", ""))
            continue
        size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.get("created", 0)))
        kind = record.get("inputs", {}).get("backend") or record.get("inputs", {}).get("stage", "?")
        # What is nested in a superseded artifact goes with it (a verify record has no versions).
        old = superseded_because(record, current) is not None or any(Path(d) in Path(rel).parents for d, _ in superseded)
        if old:
            superseded.append((rel, size))
        rows.append((rel, kind, f"{size / 2**20:.1f} MiB", created, "superseded" if old else ""))
    stale = scan(home, check=False, command="list").stale
    if stale:
        print(f"{len(stale)} stale leftover(s) of killed runs ({human_bytes(sum(x.bytes for x in stale))}): "
              f"`qeff doctor` lists them, `qeff clean` removes them")
    if not rows:
        print(f"no artifacts under {home}")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{'artifact':<{width}}  {'kind':<8} {'size':>10}  {'created':<16}  state   (under {home})")
    for path, kind, size, created, state in rows:
        print(f"{path:<{width}}  {kind:<8} {size:>10}  {created:<16}  {state or 'current'}")
    if superseded:
        print(f"{len(superseded)} superseded artifact(s) ({human_bytes(sum(b for _, b in superseded))}) were built by another "
              f"qeff or library version and will never be reused: `qeff clean --superseded` removes them")
    return 0


def cmd_doctor(args) -> int:
    from qeff.artifacts import qeff_home
    from qeff.doctor import format_scan, scan

    _warn_untested_libraries()
    found = scan(_home(args) or qeff_home(), full=args.full)
    print("\n".join(format_scan(found)))
    return 0 if found.healthy else 1


def cmd_clean(args) -> int:
    from qeff.artifacts import qeff_home
    from qeff.atomic import human_bytes
    from qeff.doctor import ArtifactStatus, clean

    home = _home(args) or qeff_home()
    done = clean(home, damaged=args.damaged, logs=args.logs, superseded=args.superseded)

    def what(item) -> str:
        if not isinstance(item, ArtifactStatus):
            return item.kind
        return "damaged artifact" if item.problem else f"superseded artifact ({item.superseded})"

    for item in done.removed:
        print(f"removed {what(item)}: {item.path}")
    for item, why in done.kept:
        print(f"kept {what(item)}: {item.path} ({why})")
    print(f"freed {human_bytes(done.freed)} under {home}")
    return 0


def _check_args(args) -> None:
    """Every argument checked before any work starts (:mod:`qeff.validation`): sizes, threads,
    the cache directory, prompts, the model's files and the memory its KV cache would need."""
    from qeff import validation

    validation.check_home(getattr(args, "home", None))
    if hasattr(args, "batch_size"):
        from qeff.serving.options import serving_options

        serving_options(args)  # the serving flags' own errors; settles --batch_size (None → 1)
    if hasattr(args, "ctx_len"):
        validation.check_sizes(batch_size=getattr(args, "batch_size", 1), prompt_len=args.prompt_len, ctx_len=args.ctx_len,
                               generation_len=getattr(args, "generation_len", None), num_cores=getattr(args, "num_cores", None),
                               steps=getattr(args, "steps", None),
                               num_speculative_tokens=serving_options(args).num_speculative_tokens if hasattr(args, "batch_size") else None)
        validation.check_fits("--prompt_lookup", serving_options(args).prompt_lookup if hasattr(args, "batch_size") else None,
                              args.ctx_len, "drafted token", extra=1)
    elif hasattr(args, "generation_len"):
        validation.check_positive("--generation_len", args.generation_len, optional=True)
    if hasattr(args, "threads"):
        args.threads = validation.check_threads(args.threads)
    if hasattr(args, "prompts_txt_file_path"):
        _prompts(args)  # decoded and checked now, not after the model is loaded
    if getattr(args, "precision", None) is not None:
        from qeff.precision.commands import check_precision_args

        check_precision_args(args)  # the tiers are arguments too: named before the model is looked at
    if getattr(args, "model_name", None) and hasattr(args, "skip_memory_check"):
        _reclaim(args)
        if not getattr(args, "onnx_path", None):
            _check_memory(args)


def _reclaim(args) -> None:
    """Free what killed runs of this model left in the cache, before this run is even checked:
    a run the memory preflight refuses must not leave a killed one's 12 GB behind (issue 18)."""
    from qeff.atomic import human_bytes
    from qeff.doctor import reclaim
    from qeff.layout import qeff_home, slug

    done = reclaim((_home(args) or qeff_home()) / slug(args.model_name))
    if done.removed:
        print(f"[qeff] reclaimed {human_bytes(done.freed)} that killed runs left: "
              + ", ".join(str(x.path) for x in done.removed), file=sys.stderr, flush=True)


def _check_memory(args) -> None:
    """Each stage's peak estimated from the weight files' headers and the mode (:mod:`qeff.memory`);
    a run with a stage that cannot fit is refused now, in one sentence, not killed by the kernel
    mid-export (issue 18: a 3B model's export was, at 23.4 GB, after 6 minutes)."""
    from qeff import memory, validation
    from qeff.loading import resolve
    from qeff.preflight import model_shape

    cache_dir = getattr(args, "cache_dir", None)
    source = resolve(args.model_name, revision=getattr(args, "revision", None), cache_dir=cache_dir)
    shape = model_shape(source, cache_dir=cache_dir)
    if getattr(args, "draft_model_name", None):
        from qeff.preflight import check_draft

        check_draft(resolve(args.draft_model_name, cache_dir=cache_dir), cache_dir=cache_dir)
    if shape is None:
        return
    rows = getattr(args, "full_batch_size", None) or getattr(args, "batch_size", 1) or 1
    ctx_len = getattr(args, "ctx_len", 1)
    if memory.skip_requested(args.skip_memory_check):
        return
    available = validation.available_memory()
    if hasattr(args, "ctx_len"):
        # The KV cache alone, with its own arithmetic in the sentence (a typo'd --ctx_len is the
        # common case). The weights are left to the staged estimates below, which say which stage
        # cannot fit them: this sentence would blame --ctx_len for a model too large at any context.
        from dataclasses import replace

        # The run's buffers too (logits, attention, activations: issue 19's --batch_size 100000).
        from qeff.serving.options import serving_options

        verifying = args.command == "verify" or (args.command == "infer" and args.verify is not False)
        kv_only = replace(shape, weight_bytes=None) if shape.weight_bytes is not None else shape
        k = (serving_options(args).num_speculative_tokens or serving_options(args).prompt_lookup) if hasattr(args, "batch_size") else None
        chunk = max(args.prompt_len, (k or 0) + 1)  # a speculative target's verify step runs K + 1 tokens
        validation.check_memory(kv_only, batch_size=rows, ctx_len=ctx_len, prompt_len=chunk,
                                copies=2 if verifying else 1, available=available)
    if shape.weight_bytes is None:  # headers that do not say
        return
    mode = _memory_mode(args, source, shape, rows, ctx_len)
    mode = memory.choose_verification(shape, mode, available=available,
                                      want=memory.streamed_verify_setting(getattr(args, "verify_layers", False)))
    if mode.verify:
        args._verify_mode = mode  # the pipeline verifies as the preflight priced it
    if mode.graph == "fused":  # the build's check runs where its two sessions fit (qeff.cpu_graph says so when not)
        from dataclasses import replace

        mode = replace(mode, fused_check=memory.fused_check_fits(memory.sizes(shape, mode), mode, available))
    estimates = memory.check(shape, mode, available=available, what=f"qeff {args.command} of {args.model_name}")
    args._estimates = {e.stage: e.bytes for e in estimates}


def _memory_mode(args, source, shape, rows: int, ctx_len: int):
    """The :class:`qeff.memory.Mode` these options run: which stages, which graph, which weights."""
    from qeff.memory import Mode

    command = args.command
    if command == "infer":
        verify = args.verify if args.verify is not None else (shape.weight_bytes or 0) // 4 <= _small_model_params()
    else:
        verify = command == "verify"
    graph = "portable"
    if command in ("infer", "compile"):
        backend = _resolve_backend(args.backend)
        serving = getattr(args, "full_batch_size", None) or getattr(args, "num_speculative_tokens", None)
        if backend == "qaic":
            graph = "qaic"
        elif not (serving or args.mxfp6 or args.mxint8 or args.ort_graph == "portable") and _fused_covers(source):
            graph = "fused"
    return Mode(command=command, verify=verify, graph=graph, weights=getattr(args, "weights", "fp32"), batch_size=rows,
                ctx_len=ctx_len, export_cached=_export_cached(args, source), streamed=_streamed(args, source))


def _streamed(args, source) -> bool:
    """Whether the export will be written from the weight files (qeff.pipeline's rule: a
    safetensors directory, local or a hub repo's cached snapshot, and the base graph; the serving
    flags export another graph)."""
    from qeff.loading import files_dir
    from qeff.weights import safetensors_dir

    serving = getattr(args, "full_batch_size", None) or getattr(args, "num_speculative_tokens", None)
    return not serving and bool(safetensors_dir(files_dir(source, cache_dir=getattr(args, "cache_dir", None))))


def _small_model_params() -> int:
    from qeff.pipeline import SMALL_MODEL_PARAMS

    return SMALL_MODEL_PARAMS


def _fused_covers(source) -> bool:
    """Whether ``--ort-graph auto`` will pick the fused graph for this model (from its config)."""
    from types import SimpleNamespace

    from qeff.compilers.ort_fused import unsupported_reason
    from qeff.configs import read_config

    try:
        values = read_config(source).values
    except QEffError:
        return False
    return unsupported_reason(SimpleNamespace(**values)) is None


def _export_cached(args, source) -> bool:
    """Whether the export this run needs is in the cache already (then the export stage, and the
    load when nothing else needs the model, do not run). Manifests only: no file is digested."""
    from qeff.artifacts import _canonical, manifest_hash, read_manifest
    from qeff.layout import export_dir_name, qeff_home, slug
    from qeff.pipeline import export_manifest

    if getattr(args, "force", False):
        return False
    manifest = export_manifest(source.identity())
    target = (_home(args) or qeff_home()) / slug(args.model_name) / export_dir_name(manifest_hash(manifest))
    try:
        record = read_manifest(target)
    except ArtifactError:
        return False
    return record is not None and _canonical(record.get("inputs")) == _canonical(manifest)


def preflight(argv: list[str]) -> dict[str, int]:
    """Every check a command line's run makes before any work, the memory preflight included,
    without running it: each stage's estimated peak (bytes), or the :class:`UsageError` the run
    would end with. ``make bench-scale`` asks it before writing a 3B checkpoint's 6 GB."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    return dict(getattr(args, "_estimates", {}))


def memory_preflight(argv: list[str]) -> dict[str, int]:
    """The memory preflight alone of a command line (no cache clean-up, no other check): each
    stage's estimated peak (bytes), or the one-sentence :class:`UsageError` the run would be
    refused with. The pytest plugin's full tier asks it before a stage that may not fit, so that
    a stage runs exactly when the same command would (the streamed modes included)."""
    args = build_parser().parse_args(argv)
    if hasattr(args, "batch_size"):
        from qeff.serving.options import serving_options

        serving_options(args)  # settles --batch_size (None → 1)
    _check_memory(args)
    return dict(getattr(args, "_estimates", {}))


def _fail(line: str, exc: BaseException, debug: bool, code: int) -> int:
    if debug:
        traceback.print_exception(exc)
    print(line, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    from contextlib import nullcontext

    from qeff.artifacts import verify_cache
    from qeff.atomic import is_disk_full
    from qeff.meter import metering

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("QEFF_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with verify_cache("full") if getattr(args, "verify_cache", False) else nullcontext():
            _check_args(args)
            with metering(getattr(args, "_estimates", None)) as args._meter:
                return args.func(args)
    except UsageError as exc:
        return _fail(f"qeff: error: {exc}", exc, debug, 2)
    except QEffError as exc:
        return _fail(f"qeff: {type(exc).__name__}: {exc}", exc, debug, 1)
    except KeyboardInterrupt as exc:
        return _fail("qeff: interrupted", exc, debug, 130)
    except Exception as exc:  # noqa: BLE001 - the promise is one sentence, never a traceback
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        if is_disk_full(exc):
            return _fail(f"qeff: DiskFullError: the disk is full ({first})", exc, debug, 1)
        if isinstance(exc, OSError):
            return _fail(f"qeff: error: {exc.strerror or first}{f': {exc.filename}' if exc.filename else ''}", exc, debug, 1)
        return _fail(f"qeff: internal error ({type(exc).__name__}: {first}); run again with --debug for the traceback",
                     exc, debug, 1)


if __name__ == "__main__":
    raise SystemExit(main())
