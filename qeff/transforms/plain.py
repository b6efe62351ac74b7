"""Architectures the generic mechanism handles as HF wrote them.

Each attention here calls ``cache.update`` and adds the 4D mask it is given (checked in
transformers 5.24); position embeddings, learned (GPT-2) or rotary (the rest, including GPT-J and
CodeGen's interleaved rotary and Phi's partial rotary), are computed from the ``position_ids`` the
wrapper passes. Starcoder2's ``sliding_window`` is read by the generic window rule (Phi-3, whose LongRoPE needs
more, is in :mod:`qeff.transforms.phi3`).
GPTBigCode's multi-query cache shape comes from its config's ``num_key_value_heads`` (1 when
``multi_query``).
Mixtral's experts are made static by :mod:`qeff.transforms.experts`, like every HF experts module.
"""

from __future__ import annotations

from qeff.transforms.registry import ArchSpec, register


def _spec(name: str, *classes: str) -> ArchSpec:
    return ArchSpec(name=name, model_types=(name,), modules=frozenset(classes))


SPECS = [
    register(spec)
    for spec in (
        _spec("gpt2", "GPT2LMHeadModel", "GPT2Model", "GPT2Block", "GPT2Attention", "GPT2MLP", "Conv1D"),
        _spec(
            "codegen",
            "CodeGenForCausalLM", "CodeGenModel", "CodeGenBlock", "CodeGenAttention", "CodeGenMLP",
            "CodeGenRotaryEmbedding",
        ),
        _spec("gptj", "GPTJForCausalLM", "GPTJModel", "GPTJBlock", "GPTJAttention", "GPTJMLP", "GPTJRotaryEmbedding"),
        _spec(
            "phi", "PhiForCausalLM", "PhiModel", "PhiDecoderLayer", "PhiAttention", "PhiMLP", "PhiRotaryEmbedding",
        ),
        _spec(
            "starcoder2",
            "Starcoder2ForCausalLM", "Starcoder2Model", "Starcoder2DecoderLayer", "Starcoder2Attention",
            "Starcoder2MLP", "Starcoder2RotaryEmbedding",
        ),
        _spec(
            "gemma",
            "GemmaForCausalLM", "GemmaModel", "GemmaDecoderLayer", "GemmaAttention", "GemmaMLP", "GemmaRMSNorm",
            "GemmaRotaryEmbedding", "GemmaTextScaledWordEmbedding",
        ),
        _spec(
            "olmo2",
            "Olmo2ForCausalLM", "Olmo2Model", "Olmo2DecoderLayer", "Olmo2Attention", "Olmo2MLP", "Olmo2RMSNorm",
            "Olmo2RotaryEmbedding",
        ),
        _spec(
            "gpt_bigcode",
            "GPTBigCodeForCausalLM", "GPTBigCodeModel", "GPTBigCodeBlock", "GPTBigCodeAttention", "GPTBigCodeMLP",
        ),
        _spec(
            "mixtral",
            "MixtralForCausalLM", "MixtralModel", "MixtralDecoderLayer", "MixtralAttention", "MixtralRMSNorm",
            "MixtralRotaryEmbedding", "MixtralSparseMoeBlock", "MixtralTopKRouter", "MixtralExperts",
        ),
    )
]
