"""GPT-OSS: attention sinks, windowed and full layers alternating, 4-of-N experts with biases.

Nothing needs replacing; each part was checked against the static-graph contract:

- **Sinks.** HF's eager attention for GPT-OSS appends one learned logit per head (``sinks``) to
  every row of scores, softmaxes, and drops that column: the sink takes probability mass but
  contributes no value. It runs after the additive mask, so with the retained cache's mask it is
  the same computation; a padded query (every slot masked with ``finfo.min``) puts all its mass on
  the sink and yields zeros, not NaNs.
- **Windows.** ``layer_types`` alternate ``sliding_attention`` (window 128) and ``full_attention``:
  the generic window rule gives one mask per type.
- **RoPE.** YaRN scaling (factor 32 over 4096 original positions) is static: its frequencies and
  attention factor are fixed at init, unlike dynamic NTK or LongRoPE.
- **Experts.** ``GptOssExperts`` dispatch through transformers' experts interface (transposed,
  interleaved gate/up, with biases) with their own clamped SwiGLU (``_apply_gate``: the gate
  clamped above at ``swiglu_limit``, the up projection to ``±limit``, ``(up + 1) * gate *
  sigmoid(alpha * gate)``); the dense form of :mod:`qeff.transforms.experts` calls that same gate
  and adds both biases. The router (``topk`` of biased logits, then a softmax over the k chosen)
  stays as HF wrote it.
"""

from __future__ import annotations

from qeff.transforms.registry import ArchSpec, register

GPT_OSS = register(
    ArchSpec(
        name="gpt_oss",
        model_types=("gpt_oss",),
        modules=frozenset(
            {
                "GptOssForCausalLM", "GptOssModel", "GptOssDecoderLayer", "GptOssAttention", "GptOssMLP",
                "GptOssTopKRouter", "GptOssExperts", "GptOssRMSNorm", "GptOssRotaryEmbedding",
            }
        ),
    )
)
