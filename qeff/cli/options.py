"""The command line's edge: a parsed ``Namespace`` resolved, once, into typed records.

:func:`resolve` is the only reader of the flags' values (``getattr(args, …)`` lives here and
nowhere else; :func:`qeff.cli.main` takes only the subcommand's ``run`` from the ``Namespace``): it runs every argument check before any work starts, in the order the checks have
always run (so that a command line with a mistake gets the sentence it always got), and returns an
:class:`Invocation` of frozen records — the model (:class:`ModelOptions`), the graph's static
:class:`~qeff.shape.Shape`, the compile, run and serving options, what to verify. The subcommands
read those; the library gets typed values from them, never the ``Namespace``
(``tests/test_cli_edge.py`` holds the library to that).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qeff import validation
from qeff.cli.arguments import DEFAULT_PROMPT
from qeff.errors import UsageError
from qeff.inputs import parse_device_group, read_prompts
from qeff.serving.ngram import DEFAULT_NGRAM_MAX
from qeff.serving.options import ServingOptions, serving_options
from qeff.shape import Shape

if TYPE_CHECKING:  # the precision modules load when --precision is given, not for every command line
    from qeff.precision.commands import LadderOptions

__all__ = ["ModelOptions", "CompileOptions", "RunOptions", "VerifyOptions", "StoreOptions", "Invocation", "resolve", "eos_mode"]


@dataclass(frozen=True)
class ModelOptions:
    """Which model, from where, and how the stages that load it may run."""

    model_name: str | None
    cache_dir: str | None = None
    revision: str | None = None
    skip_memory_check: bool = False
    verify_layers: bool = False
    #: Rebuild every stage even when a cached artifact matches.
    force: bool = False


@dataclass(frozen=True)
class CompileOptions:
    """How the exported graph is compiled: the backend as asked (``auto`` is settled when the
    command runs: it asks whether the Cloud AI SDK is installed), the CPU graph and Cloud AI's flags."""

    backend: str = "auto"
    ort_graph: str = "auto"
    weights: str = "fp32"
    int8_activations: bool = False
    num_cores: int = 16
    mxfp6: bool = False
    mxint8: bool = False
    mos: int = -1
    aic_enable_depth_first: bool = False
    aic_hw_version: str | None = None
    compiler_options: tuple[str, ...] = ()
    dry_run: bool = False
    onnx_path: Path | None = None


@dataclass(frozen=True)
class RunOptions:
    """What a generation run does: its prompts (read once: a prompts file may be a pipe that a
    second read finds empty, issue 19), how long, what EOS does, and the session's threads."""

    prompts: tuple[str, ...] = ()
    generation_len: int | None = None
    ignore_eos: bool = False
    suppress_eos: bool = False
    threads: int | None = None
    specialize_decode: bool | None = None
    stream: bool = True


@dataclass(frozen=True)
class VerifyOptions:
    """``qeff infer --verify/--no-verify`` (None: by the model's size) and ``qeff verify``'s own."""

    want: bool | None = None
    steps: int | None = None
    #: ``qeff verify --precision``: the tiers to emulate and judge (None: the plain verification).
    precision: LadderOptions | None = None


@dataclass(frozen=True)
class StoreOptions:
    """``qeff doctor --full`` and what ``qeff clean`` removes beyond the leftovers of killed runs."""

    full: bool = False
    damaged: bool = False
    logs: bool = False
    superseded: bool = False


@dataclass
class Invocation:
    """One command line, typed. The records are frozen; the last three fields are what the checks
    and the run found (the memory preflight's estimates and verification mode, the stage meter)."""

    command: str
    home: Path | None = None
    json: bool = False
    verify_cache: bool = False
    device_group: list[int] | None = None
    model: ModelOptions | None = None
    shape: Shape | None = None
    compile: CompileOptions | None = None
    run: RunOptions | None = None
    serving: ServingOptions | None = None
    verify: VerifyOptions | None = None
    #: ``qeff execute --qpc_path``.
    artifact: Path | None = None
    store: StoreOptions | None = None
    #: Whether --full_batch_size or --num_speculative_tokens was given, as the memory preflight has
    #: always read them (a draft model alone settles K later, in :attr:`serving`).
    serving_flags: bool = False
    estimates: dict[str, int] | None = None
    verify_mode: object = None
    meter: object = None


def _serving(args: argparse.Namespace, ctx_len: int | None) -> ServingOptions:
    """The serving flags present on this subcommand, checked (:func:`qeff.serving.options.serving_options`)."""
    return serving_options(
        full_batch_size=getattr(args, "full_batch_size", None), num_speculative_tokens=getattr(args, "num_speculative_tokens", None),
        draft_model_name=getattr(args, "draft_model_name", None), prefix_caching=bool(getattr(args, "prefix_caching", False)),
        temperature=getattr(args, "temperature", 0.0), top_k=getattr(args, "top_k", 0), top_p=getattr(args, "top_p", 1.0),
        repetition_penalty=getattr(args, "repetition_penalty", 1.0), seed=getattr(args, "seed", 0),
        prompt_lookup=getattr(args, "prompt_lookup", None), prompt_lookup_ngram=getattr(args, "prompt_lookup_ngram", DEFAULT_NGRAM_MAX),
        comp_ctx_lengths=getattr(args, "comp_ctx_lengths", None), ctx_len=ctx_len, batch_size=getattr(args, "batch_size", None),
        takes_draft=hasattr(args, "draft_model_name"), takes_slots=hasattr(args, "full_batch_size"),
    )


def resolve(args: argparse.Namespace, *, checks: bool = True) -> Invocation:
    """Every argument of ``args`` checked and typed, before any work starts (:mod:`qeff.validation`):
    sizes, threads, the cache directory, prompts, the serving and precision flags. ``checks=False``
    (the memory preflight alone, :func:`qeff.cli.memory_preflight`): the records only, without the
    checks that touch the disk or read the prompts."""
    command = args.command
    home = getattr(args, "home", None)
    if checks:
        validation.check_home(home)
    serving = None
    if hasattr(args, "batch_size"):  # infer, compile: the serving flags' own errors come first
        serving = _serving(args, getattr(args, "ctx_len", None))
    shape = None
    if hasattr(args, "ctx_len"):
        rows = 1 if getattr(args, "batch_size", None) is None else args.batch_size  # --batch_size: 1 unless asked
        if checks:
            shape = validation.check_sizes(
                batch_size=rows, prompt_len=args.prompt_len, ctx_len=args.ctx_len, generation_len=getattr(args, "generation_len", None),
                num_cores=getattr(args, "num_cores", None), steps=getattr(args, "steps", None),
                num_speculative_tokens=serving.num_speculative_tokens if serving else None)
            validation.check_fits("--prompt_lookup", serving.prompt_lookup if serving else None, args.ctx_len, "drafted token", extra=1)
        else:
            shape = Shape(batch_size=rows, prompt_len=args.prompt_len, ctx_len=args.ctx_len)
    elif hasattr(args, "generation_len") and checks:
        validation.check_positive("--generation_len", args.generation_len, optional=True)
    threads = getattr(args, "threads", None)
    if hasattr(args, "threads") and checks:
        threads = validation.check_threads(threads)
    run = None
    if hasattr(args, "prompts_txt_file_path"):
        prompts: tuple[str, ...] = ()
        if checks:  # decoded and checked now, not after the model is loaded
            prompts = tuple(read_prompts(args.prompt, args.prompts_txt_file_path, ctx_len=shape.ctx_len if shape else None)
                            or [DEFAULT_PROMPT])
        run = RunOptions(prompts=prompts, generation_len=args.generation_len, ignore_eos=bool(args.ignore_eos),
                         suppress_eos=bool(args.suppress_eos), threads=threads, specialize_decode=args.specialize_decode,
                         stream=bool(args.stream))
    if serving is None and hasattr(args, "prompt_lookup") and checks:  # execute: its run's serving flags
        serving = _serving(args, None)
    device_group = parse_device_group(getattr(args, "device_group", None)) if checks else None
    verify = None
    if command == "infer":
        verify = VerifyOptions(want=args.verify)
    elif command == "verify":
        ladder = None
        if args.precision is not None and checks:  # the tiers are arguments too: named before the model is looked at
            from qeff.precision.commands import ladder_options

            ladder = ladder_options(args.precision, backend=args.backend, rows=args.rows, window=args.window, steps=args.steps,
                                    prompt_len=args.prompt_len, threads=threads, keep_tiers=not args.no_keep_tiers, json_mode=args.json)
        verify = VerifyOptions(want=True, steps=args.steps, precision=ladder)
    return Invocation(
        command=command, home=Path(home) if home else None, json=bool(getattr(args, "json", False)),
        verify_cache=bool(getattr(args, "verify_cache", False)), device_group=device_group,
        model=_model(args), shape=shape, compile=_compile(args), run=run, serving=serving, verify=verify,
        artifact=Path(args.qpc_path) if getattr(args, "qpc_path", None) else None, store=_store(args),
        serving_flags=bool(getattr(args, "full_batch_size", None) or getattr(args, "num_speculative_tokens", None)),
    )


def _model(args: argparse.Namespace) -> ModelOptions | None:
    if not hasattr(args, "model_name"):
        return None
    return ModelOptions(model_name=args.model_name, cache_dir=getattr(args, "cache_dir", None), revision=getattr(args, "revision", None),
                        skip_memory_check=bool(getattr(args, "skip_memory_check", False)),
                        verify_layers=bool(getattr(args, "verify_layers", False)), force=bool(getattr(args, "force", False)))


def _compile(args: argparse.Namespace) -> CompileOptions | None:
    if not hasattr(args, "ort_graph"):  # the commands that compile: infer, compile
        return None
    return CompileOptions(
        backend=args.backend, ort_graph=args.ort_graph, weights=args.weights, int8_activations=bool(args.int8_activations),
        num_cores=args.num_cores, mxfp6=bool(args.mxfp6), mxint8=bool(args.mxint8), mos=args.mos,
        aic_enable_depth_first=bool(args.aic_enable_depth_first), aic_hw_version=args.aic_hw_version,
        compiler_options=tuple(args.compiler_option), dry_run=bool(getattr(args, "dry_run", False)),
        onnx_path=Path(args.onnx_path) if getattr(args, "onnx_path", None) else None,
    )


def _store(args: argparse.Namespace) -> StoreOptions:
    return StoreOptions(full=bool(getattr(args, "full", False)), damaged=bool(getattr(args, "damaged", False)),
                        logs=bool(getattr(args, "logs", False)), superseded=bool(getattr(args, "superseded", False)))


def eos_mode(run: RunOptions | None) -> str:
    """What EOS does to a row this run (qeff.generation.EOS_MODES): stop, continue or suppress."""
    ignore, suppress = (run.ignore_eos, run.suppress_eos) if run is not None else (False, False)
    if ignore and suppress:
        raise UsageError("--ignore_eos and --suppress_eos exclude each other: choose whether EOS is emitted (ignore) "
                         "or never chosen (suppress)")
    return "suppress" if suppress else "continue" if ignore else "stop"
