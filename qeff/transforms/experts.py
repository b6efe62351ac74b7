"""Mixture-of-experts layers with static shapes: every expert runs on every token.

HF's experts (``@use_experts_implementation`` classes, e.g. ``MixtralExperts``) pick the tokens of
each expert with ``nonzero``/``where`` and loop over the experts that were hit. A trace of that
records only the experts the example input happened to route to, and the shapes it computes on
depend on the data: neither is a graph a static-shape compiler can run. Here each expert processes
all tokens and its output is weighted by a dense routing matrix that is zero where the router did
not choose it, so the result is the same sum HF computes, with shapes fixed by the model alone:

    hidden (T, H), top_k_index / top_k_weights (T, K)
      routing  (E, T, 1)   top-k weights scattered into the E experts, 0 elsewhere
      up       (E, T, 2I)  all experts, all tokens (MatMul with the stacked expert weights)
      down     (E, T, H)
      out      (T, H)      sum over experts of routing * down

It costs E/K times the expert FLOPs of the sparse form: the price of a static graph. The router
(softmax + ``topk`` with a constant ``k``) is already static and stays as HF wrote it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

__all__ = ["DENSE_EXPERTS", "dense_experts_forward", "experts_modules", "use_dense_experts"]

#: The name under which the dense form is registered in transformers' experts interface.
DENSE_EXPERTS = "qeff_dense"


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x (E or 1, T, in) through every expert's weight (E, out, in), or (E, in, out) if transposed → (E, T, out)."""
    out = torch.matmul(x, weight if transposed else weight.transpose(1, 2))
    return out if bias is None else out + bias[:, None, :]


def dense_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Drop-in for an ``@use_experts_implementation`` forward (same arguments, same result)."""
    num_tokens = hidden_states.shape[0]
    routing = torch.zeros(
        (num_tokens, self.num_experts), dtype=top_k_weights.dtype, device=top_k_weights.device
    ).scatter(1, top_k_index, top_k_weights)  # (T, E)
    routing = routing.transpose(0, 1)[:, :, None]  # (E, T, 1)

    prefix = "gate_up" if self.has_gate else "up"
    weight = getattr(self, f"{prefix}_proj")
    bias = getattr(self, f"{prefix}_proj_bias") if self.has_bias else None
    up = _project(hidden_states[None], weight, bias, self.is_transposed)  # (E, T, 2I) or (E, T, I)
    if self.has_gate:  # HF's gate functions take (rows, 2I): fold the experts into the rows
        up = self._apply_gate(up.reshape(-1, up.shape[-1])).view(up.shape[0], up.shape[1], -1)  # (E, T, I)
    else:
        up = self.act_fn(up)
    down_bias = self.down_proj_bias if self.has_bias else None
    down = _project(up, self.down_proj, down_bias, self.is_transposed)  # (E, T, H)
    if self.has_post_expert_norm:
        down = self.post_expert_norm(down)
    out = (down * routing.to(down.dtype)).sum(dim=0)  # (T, H)
    return out.to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(DENSE_EXPERTS, dense_experts_forward)


def experts_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose forward dispatches through transformers' experts interface (the decorator
    ``use_experts_implementation`` gives them these layout flags)."""
    flags = ("has_gate", "has_bias", "is_transposed", "num_experts")
    return [m for m in model.modules() if all(hasattr(m, f) for f in flags)]


def use_dense_experts(model: nn.Module) -> bool:
    """Switch every experts module of ``model`` to the dense form; False if it has none."""
    if not experts_modules(model):
        return False
    model.set_experts_implementation(DENSE_EXPERTS)
    return True
