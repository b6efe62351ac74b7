"""Exact lowerings of SmolLM2's Q4_1 file against the fp32 fused graph: checked, then timed interleaved.

    python benchmarks/ab_native.py [--variants fp32,native,native-zp,native-fp32-head,native-a8]
                                   [--rounds 30] [--steps 8] [--threads 2]

Every variant is the fused decoder built from the GGUF file's own blocks (``from_gguf``); ``fp32``
is the same graph on the de-quantized float32 matrices (the numbers HF loads):

    native            the default lowering: Q4_1 blocks with MatMulNBits's default zero point
                      ((q - 8) d + (m + 8 d), NBitsWeight.recentred), the Q8_0 head as two 4-bit halves
    native-zp         the previous lowering: zero points 0 as an input, offset m
    native-fp32-head  native, but the head as a float32 MatMul of its exact de-quantized values
    native-a8         native with int8 activations (accuracy_level 4): not exact, for scale

First each variant runs 64 teacher-forced decode steps after a 33-token prompt beside ``fp32``
(logits max-abs difference, argmax agreement: an exact lowering differs by float32 rounding only);
then rounds of ``--steps`` decode steps, every variant once per round in a rotating order, so
machine load hits all alike. Prints each variant's median ms/step and its per-round time ratio to
fp32 (median, and in how many rounds it was faster). docs/cpu.md, "Exact native weights at
batch 1", has what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

CTX = 256


def _variants(native):
    from qeff.quant.blocks import NBitsWeight

    def dense(w):
        return w.dequantize() if isinstance(w, NBitsWeight) else w

    names = ("q", "k", "v", "o", "gate", "up", "down")
    fp32 = dataclasses.replace(native, layers=[dataclasses.replace(layer, **{n: dense(getattr(layer, n)) for n in names})
                                               for layer in native.layers], lm_head=dense(native.lm_head))
    return {
        "fp32": (fp32, {}),
        "native": (native, {}),
        "native-zp": (native, {"recentre": False}),
        "native-fp32-head": (dataclasses.replace(native, lm_head=dense(native.lm_head)), {}),
        "native-a8": (native, {"accuracy_level": 4}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="fp32,native,native-zp,native-fp32-head,native-a8")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoConfig

    from qeff.compilers.ort_fused import FUSED_GRAPH, write_fused_graph
    from qeff.compilers.ort_fused_weights import from_gguf
    from qeff.intake.loading import embedded_gguf
    from qeff.runtime.ort_fused import FusedOrtSession

    names = ["fp32"] + [n for n in args.variants.split(",") if n and n != "fp32"]
    path = embedded_gguf()
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    root = Path(tempfile.mkdtemp(prefix="ab-native-"))
    built = _variants(from_gguf(path, config, CTX))
    sessions = {}
    for name in names:
        weights, lowering = built[name]
        (root / name).mkdir()
        write_fused_graph(weights, root / name, **lowering)
        sessions[name] = FusedOrtSession(root / name / FUSED_GRAPH, batch_size=1, ctx_len=CTX, prompt_len=64, threads=args.threads)
    del built
    prompt = np.arange(100, 133)[None]

    def trace(session, tokens=None):
        logits = [session.run(prompt, np.arange(33)[None]).copy()]
        for t in range(64):
            token = int(logits[-1].argmax()) if tokens is None else tokens[t]
            logits.append(session.run(np.array([[token]]), np.array([[33 + t]])).copy())
        return np.stack(logits)

    reference = trace(sessions["fp32"])
    tokens = [int(x.argmax()) for x in reference[:-1]]
    for name in names[1:]:
        logits = trace(sessions[name], tokens)
        agree = int((logits.argmax(-1) == reference.argmax(-1)).sum())
        print(f"{name}: logits max-abs vs fp32 {np.abs(logits - reference).max():.2e} (max |logit| {np.abs(reference).max():.1f}), "
              f"argmax equal {agree}/{len(reference)}", flush=True)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            session = sessions[name]
            session.run(prompt, np.arange(33)[None])
            start = time.perf_counter()
            for t in range(args.steps):
                session.run(np.array([[7]]), np.array([[33 + t]]))
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    for name in names:
        ratios = [b / a for a, b in zip(times["fp32"], times[name])]
        print(f"{name:<18} median {statistics.median(times[name]):7.2f} ms/step; time / fp32 per round: median "
              f"{statistics.median(ratios):.3f}, faster in {sum(x < 1 for x in ratios)}/{len(ratios)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
