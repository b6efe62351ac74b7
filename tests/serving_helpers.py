"""Shared pieces of the serving tests: tiny exports and batch-1 references.

The serving proofs compare token sequences, so they need tiny models whose tokens depend on the
context. Random models with *tied* embeddings (the cards' tiny tiers of smollm2 and qwen2) just
repeat the last token whatever came before, which would make every equality here pass vacuously
(a prefill into the wrong slot changed nothing). The configs below are untied, and
``test_the_tiny_models_read_their_context`` checks that they depend on their context."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import qeff
from qeff.runtime.ort import OrtSession
from qeff.serving.graph import GraphVariant
from tests.tiny import random_prompts

CB = GraphVariant(continuous_batching=True)
TLM = GraphVariant(speculative=True)

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
SERVING_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(_BASE)),
    "mistral-sliding": ("mistral", dict(_BASE, sliding_window=6)),  # prompts and generations outrun the window
    "qwen2": ("qwen2", dict(_BASE)),
}


def serving_model(arch: str = "llama", seed: int = 1, **overrides):
    model_type, config = SERVING_CONFIGS[arch]
    return qeff.from_config(model_type, dict(config, **overrides), seed=seed)


def export_variants(out: Path, arch: str = "llama", seed: int = 1, variants=("base", "cb")) -> dict[str, Path]:
    qmodel = qeff.transform(serving_model(arch, seed=seed))
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


def serving_checkpoint(path: Path, tokenizer, seed: int = 4) -> Path:
    """A local checkpoint of :func:`serving_model`'s llama (tokens that depend on their context) with
    ``tokenizer``'s vocabulary and special ids, the tokenizer saved beside it: what the CLI tests load."""
    serving_model("llama", seed=seed, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
