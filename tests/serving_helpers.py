"""Shared pieces of the serving tests: tiny exports and batch-1 references."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import qeff
from qeff.runtime.ort import OrtSession
from qeff.serving.graph import GraphVariant
from tests.tiny import random_prompts, tiny_model

CB = GraphVariant(continuous_batching=True)
TLM = GraphVariant(speculative=True)


def export_variants(out: Path, arch: str = "llama", seed: int = 1, variants=("base", "cb")) -> dict[str, Path]:
    qmodel = qeff.transform(tiny_model(arch, seed=seed))
    table = {"base": None, "cb": CB, "tlm": TLM}
    return {name: qeff.export(qmodel, out / name, variant=table[name]).path for name in variants}


def batch1_reference(onnx_path: Path, prompts, *, ctx_len: int, prompt_len: int, generation_len, eos=(), sampling=None):
    """Each prompt alone (batch 1) through the ordinary loop over the base graph: the reference
    continuous batching must reproduce. ``sampling`` keys each prompt by its input index."""
    session = OrtSession(onnx_path, batch_size=1, ctx_len=ctx_len)
    gens = generation_len if isinstance(generation_len, list) else [generation_len] * len(prompts)
    out = []
    for i, (p, g) in enumerate(zip(prompts, gens)):
        r = qeff.generate(session, prompt_token_ids=[p], prompt_len=prompt_len, generation_len=g, eos_token_id=list(eos),
                          sampling=sampling, sample_keys=[i])
        out.append((r.token_ids[0], r.stop_reasons[0]))
    return out


def random_workload(seed: int, n: int = 10, max_prompt: int = 20, max_gen: int = 16, max_arrival: int = 30):
    """Prompts of mixed lengths (1 … max_prompt tokens), generation lengths and arrival steps."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_prompt + 1, n).tolist()
    prompts = random_prompts(lengths, seed=seed + 100)
    gens = rng.integers(1, max_gen + 1, n).tolist()
    arrivals = rng.integers(0, max_arrival + 1, n).tolist()
    return prompts, gens, arrivals
