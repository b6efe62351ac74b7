"""``qeff verify``: HF vs transformed PyTorch vs ONNX Runtime on a model; with ``--precision``,
the emulated precision tiers judged against HF fp32 (:mod:`qeff.precision.commands`)."""

from __future__ import annotations

import json

from qeff.cli import arguments as a
from qeff.cli.building import pipeline
from qeff.cli.options import Invocation
from qeff.cli.output import Out, stages

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="HF vs transformed PyTorch vs ONNX Runtime")
    a.model_args(p)
    a.run_args(p)
    a.flag(p, "--prompt_len", type=int, default=32)
    a.flag(p, "--ctx_len", type=int, default=128)
    a.flag(p, "--steps", type=int, default=16, help="generated tokens compared per prompt (default 16)")
    a.verify_layers_arg(p)
    a.flag(p, "--precision", default=None, metavar="TIERS",
           help="precision tiers to emulate and judge against HF fp32, e.g. fp32,fp16,mxfp6,mxint8,mxfp6+mxint8 (docs/precision.md)")
    a.flag(p, "--backend", choices=["ort", "qaic", "torch"], default="ort", help="where --precision tiers run (default ort: emulated on the CPU)")
    a.flag(p, "--rows", type=int, default=8, help="--precision: corpus windows, run as one batch (default 8)")
    a.flag(p, "--window", type=int, default=512, help="--precision: corpus tokens per window (default 512)")
    a.flag(p, "--no_keep_tiers", action="store_true",
           help="--precision: remove each emulated tier once measured (each holds the fp32 weights twice: "
                "1.3 GB for SmolLM2-135M, ~54 GB for a 7B model); by default they are cached for the next run")
    p.set_defaults(func=run)


def run(inv: Invocation) -> int:
    out = Out(inv.json)
    prompts = list(inv.run.prompts)
    if inv.verify.precision is not None:
        from qeff.precision.commands import verify_precision

        return verify_precision(inv.verify.precision, pipeline(inv), prompts, out.say)
    pipe = pipeline(inv)
    pipe.export()
    ids = [pipe.tokenizer(p)["input_ids"] for p in prompts]
    _, report = pipe.verify_cached(ids, prompt_len=inv.shape.prompt_len, ctx_len=inv.shape.ctx_len, steps=inv.verify.steps)
    for c in report.comparisons:
        out.say(c.describe() + f"; cache MSE {c.cache_mse:.3g} max-abs {c.cache_max_abs:.3g}")
        for failure in c.failures:
            out.say(f"  - {failure}")
        if c.first_divergence:
            out.say(f"  {c.first_divergence.describe()}")
    if inv.json:
        print(json.dumps({**report.to_dict(), "stages": stages(inv)}), flush=True)
    return 0 if report.passed else 1
