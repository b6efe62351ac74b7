"""Gemma 2: logit soft-capping, alternating sliding-window layers.

Attention soft-capping (``tanh`` of the scores, before the mask is added) is inside HF's eager
attention and needs nothing. The final soft-capping is applied by ``Gemma2ForCausalLM.forward``,
which the wrapper does not call: the head below applies it. The per-layer windows come from
``config.layer_types`` through the generic window rule.
"""

from __future__ import annotations

import torch
from torch import nn

from qeff.transforms.registry import ArchSpec, register


def _softcapped_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    cap = model.config.final_logit_softcapping
    if cap is not None:  # the same three ops, in the same order, as Gemma2ForCausalLM.forward
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits


GEMMA2 = register(
    ArchSpec(
        name="gemma2",
        model_types=("gemma2",),
        modules=frozenset(
            {
                "Gemma2ForCausalLM", "Gemma2Model", "Gemma2DecoderLayer", "Gemma2Attention", "Gemma2MLP",
                "Gemma2RMSNorm", "Gemma2RotaryEmbedding", "Gemma2TextScaledWordEmbedding",
            }
        ),
        head=_softcapped_head,
    )
)
