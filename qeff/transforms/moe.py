"""Mixture-of-experts decoders whose only difference is the experts: Qwen3-MoE, OLMoE (Mixtral,
the first of them, is in :mod:`qeff.transforms.plain`).

Their attention follows the generic protocol (both normalise queries and keys inside HF's
attention). Their experts modules (``Qwen3MoeExperts``, ``OlmoeExperts``) dispatch through
transformers' experts interface, so the transform switches them to the static dense form of
:mod:`qeff.transforms.experts`; the routers (softmax + ``topk`` with a constant ``k``, optionally
renormalising the top-k weights: ``norm_topk_prob``) stay as HF wrote them. Qwen3-MoE's dense layers (``mlp_only_layers``, ``decoder_sparse_step``) are plain
``Qwen3MoeMLP`` modules.
"""

from __future__ import annotations

from qeff.transforms.registry import ArchSpec, register


def _modules(prefix: str, *extra: str) -> frozenset[str]:
    parts = ("ForCausalLM", "Model", "DecoderLayer", "Attention", "RMSNorm", "RotaryEmbedding", "TopKRouter", "Experts")
    return frozenset(prefix + p for p in (*parts, *extra))


SPECS = [
    register(ArchSpec(name="qwen3_moe", model_types=("qwen3_moe",), modules=_modules("Qwen3Moe", "SparseMoeBlock", "MLP"))),
    register(ArchSpec(name="olmoe", model_types=("olmoe",), modules=_modules("Olmoe", "SparseMoeBlock"))),
]
