"""Granite and GraniteMoE: Llama with multipliers. The embedding, residual and attention multipliers
live in the decoder; the logits are divided by ``logits_scaling`` in ``GraniteForCausalLM.forward``
(and ``GraniteMoeForCausalLM.forward``), which the wrapper does not call, so the head below does it.
GraniteMoE's experts go through transformers' experts interface and become the static dense form
of :mod:`qeff.transforms.experts`; its router (``topk`` of the logits, then a softmax over the k
chosen) stays as HF wrote it."""

from __future__ import annotations

import torch
from torch import nn

from qeff.transforms.registry import ArchSpec, register


def _scaled_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.get_output_embeddings()(hidden) / model.config.logits_scaling


GRANITE = register(
    ArchSpec(
        name="granite",
        model_types=("granite",),
        modules=frozenset(
            {
                "GraniteForCausalLM", "GraniteModel", "GraniteDecoderLayer", "GraniteAttention", "GraniteMLP",
                "GraniteRMSNorm", "GraniteRotaryEmbedding",
            }
        ),
        head=_scaled_head,
    )
)

GRANITEMOE = register(
    ArchSpec(
        name="granitemoe",
        model_types=("granitemoe",),
        modules=frozenset(
            {
                "GraniteMoeForCausalLM", "GraniteMoeModel", "GraniteMoeDecoderLayer", "GraniteMoeAttention",
                "GraniteMoeMoE", "GraniteMoeTopKRouter", "GraniteMoeExperts", "GraniteMoeRMSNorm",
                "GraniteMoeRotaryEmbedding",
            }
        ),
        head=_scaled_head,
    )
)
