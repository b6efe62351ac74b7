"""The precision parts of the ``qeff`` command line (:mod:`qeff.cli` declares the flags, resolves
them into a :class:`LadderOptions` and calls these; no ``Namespace`` comes here).

    qeff verify --precision fp32,fp16,mxfp6,mxint8,mxfp6+mxint8 [--json]   the ladder against HF fp32
    qeff infer  --backend ort --mxfp6 [--mxint8]                          runs the emulated tier
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from qeff.errors import UsageError
from qeff.precision.tiers import Tier, check_backend, parse_tiers, tier_for_flags

__all__ = ["emulated_graph", "LadderOptions", "ladder_options", "verify_precision", "LADDER_KEYS"]

#: The per-tier keys of ``qeff verify --precision --json`` (more may follow them).
LADDER_KEYS = ("kld_mean", "kld_p99", "kld_max", "top1_agree", "top5_overlap", "ppl_ref", "ppl",
               "tokens_matched", "tokens_total", "passed")


def emulated_graph(onnx_path: Path, *, mxfp6: bool, mxint8: bool, force: bool = False, progress: bool = True) -> Path:
    """The graph ONNX Runtime runs for Cloud AI's ``--mxfp6``/``--mxint8``: the emulated tier,
    built (and cached) beside the portable graph. Says so on stderr."""
    from qeff.precision.emulate import build_tier

    tier = tier_for_flags(mxfp6=mxfp6, mxint8=mxint8)
    built = build_tier(onnx_path, tier, force=force, progress=progress)
    formats = ", ".join(f for f, on in (("MatMul weights in MXFP6 E2M3", mxfp6), ("KV cache in MXINT8", mxint8)) if on)
    print(f"[qeff] ort backend: emulating Cloud AI's {tier.name} tier ({formats}, activations in fp16) with "
          f"{built.path / 'model.onnx'}: Cloud AI's numbers, not its speed", file=sys.stderr, flush=True)
    return built.path / "model.onnx"


@dataclass(frozen=True)
class LadderOptions:
    """What ``qeff verify --precision`` runs: the tiers, and the corpus windows they are judged on."""

    tiers: tuple[Tier, ...]
    rows: int = 8
    window: int = 512
    steps: int = 16
    prompt_len: int = 32
    threads: int | None = None
    keep_tiers: bool = True
    json: bool = False


def ladder_options(precision: str, *, backend: str, rows: int, window: int, steps: int, prompt_len: int,
                   threads: int | None = None, keep_tiers: bool = True, json_mode: bool = False) -> LadderOptions:
    """The tiers ``qeff verify --precision`` asks for, and its sizes; usage errors before any slow work."""
    tiers = parse_tiers(precision)
    check_backend(tiers, backend)
    if backend != "ort":
        raise UsageError(f"--precision runs emulated tiers on the ort backend; on {backend} compile with its own "
                         f"flags (--mxfp6, --mxint8) and compare on the device")
    if rows < 1 or window < 2:
        raise UsageError(f"--rows must be at least 1 and --window at least 2 (got {rows}, {window})")
    return LadderOptions(tiers=tuple(tiers), rows=rows, window=window, steps=steps, prompt_len=prompt_len, threads=threads,
                         keep_tiers=keep_tiers, json=json_mode)


def verify_precision(options: LadderOptions, pipe, prompts: list[str], say) -> int:
    """``qeff verify --precision``: build, run and judge each tier of ``pipe``'s model (a
    :class:`qeff.pipeline.Pipeline`); one JSON line on stdout with ``options.json``."""
    from qeff.data import corpus_token_ids
    from qeff.precision.ladder import run_ladder

    rows, window = options.rows, options.window
    pipe.export()
    tokenizer = pipe.tokenizer
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    corpus = corpus_token_ids(tokenizer)
    if len(corpus) < rows * window:
        raise UsageError(f"the corpus has {len(corpus)} tokens for this tokenizer; --rows {rows} x --window {window} "
                         f"needs {rows * window}")
    ladder = run_ladder(pipe.model, pipe.onnx_path, list(options.tiers), corpus_ids=corpus, prompt_token_ids=prompt_ids[:rows],
                        rows=rows, window=window, steps=options.steps, prompt_len=options.prompt_len,
                        threads=options.threads, keep_tiers=options.keep_tiers, log=say)
    say(ladder.describe())
    for tier in ladder.tiers:
        for failure in tier.failures:
            say(f"  - {tier.tier}: {failure}")
    if options.json:
        record = ladder.to_dict()
        record["tiers"] = {name: {**{k: values[k] for k in LADDER_KEYS}, **values} for name, values in record["tiers"].items()}
        print(json.dumps(record), flush=True)
    return 0 if ladder.passed else 1
