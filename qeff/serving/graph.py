"""Graph variants for serving: continuous batching and a speculative-decoding target.

The base retained-state graph (``DESIGN.md``) runs ``batch_size`` rows that own the cache's
``batch_size`` rows. Two optional inputs change that, with the names and dims Cloud AI 100's
continuous-batching and speculative-decoding flows use (QEfficient's ``batch_index``,
``full_batch_size`` and ``num_logits_to_keep``):

| input | dtype | shape | effect |
|---|---|---|---|
| ``batch_index`` | int64 | ``[batch_size, 1]`` | row ``b`` of the step is cache row ``batch_index[b, 0]``; the cache is ``[full_batch_size, n_kv, ctx_len, head_dim]`` |
| ``num_logits_to_keep`` | int64 | ``[num_logits_to_keep, 1]`` | only its length N is read: ``logits`` is ``[batch_size, N, vocab]``, the last N positions of each row |
| ``comp_ctx_lengths`` | int64 | ``[comp_ctx_lengths]`` | only its length C is read: attention reads cache slots ``0 … C-1`` (every position of the step must be below C); the cache is still written at ``position_ids`` and returned whole (``ctx_len``) |

With ``batch_index`` each cache row is an independent *slot*: a prefill step runs one slot
(``batch_size = 1``), a decode step runs every slot (``batch_size = full_batch_size``), and a slot
freed by a finished prompt is refilled by the next one while the others keep their state. With
``num_logits_to_keep = K + 1`` a target model scores K drafted tokens and the token before them in
one step. With ``comp_ctx_lengths`` of length C ("compute context length", QEfficient's name) a
short sequence in a long cache pays for C slots of attention, not ``ctx_len``: the runner picks C
from a ladder (:mod:`qeff.serving.ctx_ladder`) each step, and nothing is copied when C changes.
Everything else (scatter at ``position_ids``, the mask, padding at ``-1``) is the base
contract: :mod:`qeff.transforms.cache` documents the scatter into slots.
"""

from __future__ import annotations

import torch
from torch import nn

from qeff.serving.variant import BASE, GraphVariant
from qeff.transforms.model import QEffCausalLM

__all__ = ["GraphVariant", "ServingGraph", "BASE"]




class ServingGraph(nn.Module):
    """``forward(input_ids, position_ids, *past, [batch_index], [num_logits_to_keep])``: the
    positional signature the exporter traces, over a transformed model."""

    def __init__(self, qmodel: QEffCausalLM, variant: GraphVariant):
        super().__init__()
        self.qmodel = qmodel
        self.variant = variant
        self.shape = qmodel.shape
        self.transforms = tuple(qmodel.transforms) + (
            (("BatchIndexSlots",) if variant.continuous_batching else ()) + (("LogitsToKeep",) if variant.speculative else ())
            + (("ComputeContextLength",) if variant.comp_ctx else ())
        )

    @property
    def input_names(self) -> list[str]:
        return self.qmodel.input_names + self.variant.extra_inputs

    @property
    def output_names(self) -> list[str]:
        return self.qmodel.output_names

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *rest: torch.Tensor):
        n = 2 * self.shape.num_layers
        past, extra = rest[:n], list(rest[n:])
        batch_index = extra.pop(0) if self.variant.continuous_batching else None
        keep = extra.pop(0) if self.variant.speculative else None
        comp = extra.pop(0) if self.variant.comp_ctx else None
        return self.qmodel(input_ids, position_ids, *past, batch_index=batch_index, num_logits_to_keep=keep,
                           comp_ctx_lengths=comp)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Inputs that only fix the graph's structure; every dim that varies is symbolic, and the
        example's sizes differ from each other so the tracer cannot confuse two dims."""
        batch, seq, ctx = 2, 4, 8
        full = 3 if self.variant.continuous_batching else batch
        args: list[torch.Tensor] = [
            torch.zeros((batch, seq), dtype=torch.int64),
            torch.arange(seq, dtype=torch.int64)[None].repeat(batch, 1),
            *self.qmodel.empty_cache(full, ctx),
        ]
        if self.variant.continuous_batching:
            args.append(torch.tensor([[2], [0]], dtype=torch.int64))
        if self.variant.speculative:
            args.append(torch.zeros((seq - 1, 1), dtype=torch.int64))
        if self.variant.comp_ctx:
            # 6 slots attended: above every example position, below ctx, unlike every other dim.
            args.append(torch.zeros((6,), dtype=torch.int64))
        return tuple(args)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        cache_batch = "full_batch_size" if self.variant.continuous_batching else "batch_size"
        axes: dict[str, dict[int, str]] = {
            "input_ids": {0: "batch_size", 1: "seq_len"},
            "position_ids": {0: "batch_size", 1: "seq_len"},
            "logits": {0: "batch_size", 1: "num_logits_to_keep"} if self.variant.speculative else {0: "batch_size"},
        }
        for name in self.qmodel.input_names[2:] + self.qmodel.output_names[1:]:
            axes[name] = {0: cache_batch, 2: "ctx_len"}
        if self.variant.continuous_batching:
            axes["batch_index"] = {0: "batch_size"}
        if self.variant.speculative:
            axes["num_logits_to_keep"] = {0: "num_logits_to_keep"}
        if self.variant.comp_ctx:
            axes["comp_ctx_lengths"] = {0: "comp_ctx_lengths"}
        return axes
