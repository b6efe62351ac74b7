"""The ``qeff`` command line.

    qeff infer    load → transform → export → verify → compile → execute, each stage cached
    qeff export   export a model's retained-state ONNX graph
    qeff compile  compile an exported graph for a backend (``--dry-run`` for Cloud AI without an SDK)
    qeff execute  run a compiled artifact (an ORT artifact or a Cloud AI QPC)
    qeff verify   HF vs transformed PyTorch vs ONNX Runtime on a model
    qeff list     the cached artifacts under $QEFF_HOME
    qeff check    is a model supported? from its config and file headers, no weights loaded

Flags keep the seed product's spellings (``--model_name``, ``--num_cores``, ``--device_group [0,1]``,
…); each also has a dashed spelling. ``python -m qeff.cloud.infer`` and ``python -m qeff.cloud.execute``
are aliases. Exit codes: 0 success, 1 a failed stage (compiler error, verification outside
tolerance), 2 a usage error (one sentence, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qeff._version import __version__
from qeff.errors import ArtifactError, QEffError, UsageError

__all__ = ["main", "build_parser"]

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


def _compile_args(p):
    _flag(p, "--backend", choices=["ort", "qaic", "auto"], default="auto",
          help="ort = ONNX Runtime on the CPU; qaic = Cloud AI 100; auto = qaic when its SDK is installed, else ort (default)")
    _flag(p, "--batch_size", type=int, default=1, help="rows per batch (default 1)")
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
    p.add_argument("--ort-graph", "--ort_graph", choices=["auto", "fused", "portable"], default="auto",
                   help="ONNX Runtime: the fused CPU graph (llama, mistral, qwen2) or the portable one; auto = fused when "
                        "the architecture is covered (default)")
    _flag(p, "--weights", choices=["fp32", "native", "int8", "int4"], default="fp32",
          help="ONNX Runtime fused graph: fp32; native = a GGUF file's own quantized blocks, exactly; int8/int4 = "
               "round-to-nearest blocks of the float weights (default fp32)")
    p.add_argument("--int8-activations", "--int8_activations", action="store_true",
                   help="ONNX Runtime fused graph with quantized weights: int8 activations inside MatMulNBits (faster, not exact)")


def _run_args(p):
    _flag(p, "--prompt", default=None, help=f'prompt(s), several separated by "|" (default: "{DEFAULT_PROMPT}")')
    _flag(p, "--prompts_txt_file_path", default=None, help="file with one prompt per line")
    _flag(p, "--generation_len", type=int, default=None, help="max new tokens per prompt (default: until EOS or the cache is full)")
    _flag(p, "--ignore_eos", action="store_true",
          help="do not stop a row at EOS: generate exactly --generation_len tokens (or until the cache is full), e.g. for benchmarks")
    _flag(p, "--threads", type=int, default=None, help="ONNX Runtime threads (default: physical cores)")
    p.add_argument("--specialize-decode", "--specialize_decode", action=argparse.BooleanOptionalAction, default=None,
                   help="ONNX Runtime: a second session pinned to decode shapes, ~12%% faster decode for a second copy of "
                        "the weights in memory (default: on when the weights are under 2 GiB)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="stream the first prompt's tokens as they come (default on)")
    p.add_argument("--json", action="store_true", help="print one JSON line of results on stdout; human output goes to stderr")


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
    p.add_argument("--force", action="store_true", help="rebuild every stage even when a cached artifact matches")
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
    _run_args(p)
    p.set_defaults(func=cmd_execute)

    p = sub.add_parser("verify", help="HF vs transformed PyTorch vs ONNX Runtime")
    _model_args(p)
    _run_args(p)
    _flag(p, "--prompt_len", type=int, default=32)
    _flag(p, "--ctx_len", type=int, default=128)
    _flag(p, "--steps", type=int, default=16, help="generated tokens compared per prompt (default 16)")
    _flag(p, "--precision", default=None, metavar="TIERS",
          help="precision tiers to emulate and judge against HF fp32, e.g. fp32,fp16,mxfp6,mxint8,mxfp6+mxint8 (docs/precision.md)")
    _flag(p, "--backend", choices=["ort", "qaic", "torch"], default="ort", help="where --precision tiers run (default ort: emulated on the CPU)")
    _flag(p, "--rows", type=int, default=8, help="--precision: corpus windows, run as one batch (default 8)")
    _flag(p, "--window", type=int, default=512, help="--precision: corpus tokens per window (default 512)")
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


def _compile_options(args, backend: str, out: _Out) -> dict:
    """``qeff.compile``'s options from the command line (Cloud AI's only for the qaic backend)."""
    options = dict(batch_size=args.batch_size, prompt_len=args.prompt_len, ctx_len=args.ctx_len,
                   threads=getattr(args, "threads", None), dry_run=getattr(args, "dry_run", False))
    if backend == "qaic":
        options.update(num_cores=args.num_cores, num_devices=len(_device_group(args) or [0]), mxfp6=args.mxfp6,
                       mxint8=args.mxint8, mos=args.mos if args.mos > 0 else None,
                       aic_enable_depth_first=args.aic_enable_depth_first, aic_hw_version=args.aic_hw_version,
                       extra_options=tuple(args.compiler_option))
    elif args.mos > 0 or args.aic_enable_depth_first or args.compiler_option:
        out.say("[qeff] note: --mos/--aic_enable_depth_first/--compiler_option apply to Cloud AI only")
    return options


def _check_shapes(args, backend: str) -> None:
    """Usage errors of the compile options, before anything is loaded or exported."""
    if min(args.batch_size, args.prompt_len, args.ctx_len) < 1 or args.prompt_len > args.ctx_len:
        raise UsageError(f"need --batch_size, --prompt_len, --ctx_len >= 1 and --prompt_len <= --ctx_len "
                         f"(got {args.batch_size}, {args.prompt_len}, {args.ctx_len})")
    if backend == "ort" and (args.weights != "fp32" or args.int8_activations or args.ort_graph != "auto"):
        if args.mxfp6 or args.mxint8:
            raise UsageError("--mxfp6/--mxint8 on the ort backend run the emulated portable graph; drop --weights, "
                             "--int8-activations and --ort-graph, or the MX flags")
        from qeff.compilers.ort_fused_artifact import check_cpu_options
        from qeff.loading import resolve

        check_cpu_options(resolve(args.model_name, revision=args.revision, cache_dir=args.cache_dir),
                          graph=args.ort_graph, weights=args.weights, int8_activations=args.int8_activations)


def _compile(pipe, backend: str, args, options: dict, *, onnx_path: Path | None = None, force: bool = False, out: _Out | None = None):
    """Compile the exported graph (or ``onnx_path``). On ort, --mxfp6/--mxint8 compile the emulated
    tier instead (:mod:`qeff.precision`; the portable graph is left as it is); otherwise the fused
    CPU graph when it covers the model (:mod:`qeff.cpu_graph`), else the portable graph."""
    import qeff

    if backend == "ort" and (args.mxfp6 or args.mxint8):
        from qeff.precision.commands import emulated_graph

        onnx_path = emulated_graph(onnx_path or pipe.onnx_path, mxfp6=args.mxfp6, mxint8=args.mxint8, force=force)
    elif backend == "ort" and onnx_path is None and pipe is not None:
        from qeff.cpu_graph import compile_cpu

        fused = compile_cpu(pipe, graph=args.ort_graph, weights=args.weights, int8_activations=args.int8_activations,
                            batch_size=args.batch_size, prompt_len=args.prompt_len, ctx_len=args.ctx_len,
                            threads=getattr(args, "threads", None), force=force, say=out.say if out else print)
        if fused is not None:
            return fused
    if onnx_path is None:
        return pipe.compile(backend, force=force, **options)
    return qeff.compile(onnx_path, backend, force=force, progress=True, **options)


def _session_options(args) -> dict:
    return dict(threads=getattr(args, "threads", None), device_ids=_device_group(args),
                specialize_decode=getattr(args, "specialize_decode", None))


def _prompts(args) -> list[str]:
    from qeff.inputs import read_prompts

    prompts = read_prompts(args.prompt, args.prompts_txt_file_path)
    return prompts or [DEFAULT_PROMPT]


def _pipeline(args):
    from qeff.pipeline import Pipeline

    return Pipeline.open(args.model_name, revision=args.revision, cache_dir=args.cache_dir, home=_home(args))


def _run(session, tokenizer, prompts: list[str], args, out: _Out):
    """Generate for every prompt and report what the loop said (rows stopped by a full cache)."""
    from qeff.generation import run_prompts
    from qeff.inputs import check_prompt_lengths

    check_prompt_lengths(tokenizer, prompts, session.ctx_len)
    summary = run_prompts(session, prompts, tokenizer=tokenizer, generation_len=args.generation_len,
                          ignore_eos=getattr(args, "ignore_eos", False), stream=out.human if args.stream else None)
    for message in summary.messages:
        out.say(f"[qeff] {message}")
    return summary


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


def _emit_json(summary, **extra) -> None:
    from qeff._system import peak_rss_mb

    record = {**summary.to_dict(), **extra, "peak_rss_mb": round(peak_rss_mb(), 1)}
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
    from qeff.pipeline import SMALL_MODEL_PARAMS

    out = _Out(args.json)
    start = time.perf_counter()
    prompts = _prompts(args)
    group = _device_group(args)
    backend = _resolve_backend(args.backend)
    if backend == "qaic":
        from qeff import sdk

        sdk.require_compiler()
        sdk.import_runtime()
    _check_shapes(args, backend)
    pipe = _pipeline(args)
    exported = pipe.export(force=args.force, validate=lambda tok: check_prompt_lengths(tok, prompts, args.ctx_len))
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
    options = _compile_options(args, backend, out)
    built = _compile(pipe, backend, args, options, force=args.force, out=out)
    _reuse_note(out, f"{backend} artifact", built)
    session, rebuilt = pipe.open_session(built, rebuild=lambda: _compile(pipe, backend, args, options, out=out), **_session_options(args))
    if rebuilt:
        out.say(f"[qeff] the cached artifact {built.path} could not be opened; rebuilt it")
    summary = _run(session, tokenizer, prompts, args, out)
    _print_figures(out, summary, show_texts=not args.stream or len(prompts) > 1)
    if args.json:
        _emit_json(summary, backend=backend, model=args.model_name, load_s=round(pipe.load_s, 3), device_group=group,
                   artifact=str(built.path), reused={"export": exported.reused, "compile": built.reused and not rebuilt},
                   verify=verify_summary, wall_s=round(time.perf_counter() - start, 3))
    return 0


def cmd_export(args) -> int:
    out = _Out(False)
    pipe = _pipeline(args)
    _reuse_note(out, "export", pipe.export(force=args.force))
    out.say(str(pipe.onnx_path))
    return 0


def cmd_compile(args) -> int:
    out = _Out(False)
    backend = _resolve_backend(args.backend)
    if args.dry_run and backend != "qaic":
        raise UsageError("--dry_run applies to --backend qaic (the ort backend needs no external compiler)")
    options = _compile_options(args, backend, out)
    if args.onnx_path:
        result = _compile(None, backend, args, options, onnx_path=Path(args.onnx_path))
    else:
        _check_shapes(args, backend)
        pipe = _pipeline(args)
        _reuse_note(out, "export", pipe.export())
        result = _compile(pipe, backend, args, options, out=out)
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
                from qeff.tokenizer import open_saved_tokenizer

                tokenizer = open_saved_tokenizer(candidate)
                break
    if tokenizer is None:
        raise UsageError(f"no tokenizer found beside {artifact}; pass --model_name to say where it comes from")
    session = qeff.open_session(artifact, **_session_options(args))
    summary = _run(session, tokenizer, _prompts(args), args, out)
    _print_figures(out, summary, show_texts=not args.stream or len(summary.prompts) > 1)
    if args.json:
        _emit_json(summary, backend=session.backend, artifact=str(artifact), load_s=0.0)
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
        print(json.dumps(report.to_dict()), flush=True)
    return 0 if report.passed else 1


def cmd_check(args) -> int:
    from qeff.support import run_check

    return run_check(args.model_name, revision=args.revision, cache_dir=args.cache_dir, json_mode=args.json)


def cmd_list(args) -> int:
    from qeff.artifacts import read_manifest
    from qeff.layout import qeff_home

    home = _home(args) or qeff_home()
    if not home.is_dir():
        print(f"no artifacts: {home} does not exist")
        return 0
    rows = []
    for manifest in sorted(home.rglob("manifest.json")):
        directory = manifest.parent
        try:
            record = read_manifest(directory) or {}
        except ArtifactError:
            rows.append((str(directory.relative_to(home)), "corrupt", "-", "-"))
            continue
        size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.get("created", 0)))
        kind = record.get("inputs", {}).get("backend") or record.get("inputs", {}).get("stage", "?")
        rows.append((str(directory.relative_to(home)), kind, f"{size / 2**20:.1f} MiB", created))
    if not rows:
        print(f"no artifacts under {home}")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{'artifact':<{width}}  {'kind':<8} {'size':>10}  created   (under {home})")
    for path, kind, size, created in rows:
        print(f"{path:<{width}}  {kind:<8} {size:>10}  {created}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"qeff: error: {exc}", file=sys.stderr)
        return 2
    except QEffError as exc:
        print(f"qeff: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qeff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
