"""Which serving graph a run asks for (:class:`GraphVariant`): a plain value, importable without
torch, so the CLI can parse its flags and name its artifacts before any heavy import. The graph
itself is :mod:`qeff.serving.graph`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GraphVariant", "BASE"]


@dataclass(frozen=True)
class GraphVariant:
    #: A ``batch_index`` input; the cache's batch dim is ``full_batch_size``.
    continuous_batching: bool = False
    #: A ``num_logits_to_keep`` input; ``logits`` has one row per kept position.
    speculative: bool = False
    #: A ``comp_ctx_lengths`` input (compute context length): attention reads only the first
    #: ``len(comp_ctx_lengths)`` cache slots; the retained cache stays ``ctx_len`` long.
    comp_ctx: bool = False

    @property
    def is_base(self) -> bool:
        return not (self.continuous_batching or self.speculative or self.comp_ctx)

    @property
    def extra_inputs(self) -> list[str]:
        return ((["batch_index"] if self.continuous_batching else []) + (["num_logits_to_keep"] if self.speculative else [])
                + (["comp_ctx_lengths"] if self.comp_ctx else []))

    def to_dict(self) -> dict:
        # comp_ctx only when set: the manifests (and cache keys) of the earlier variants stay what they were.
        out = {"continuous_batching": self.continuous_batching, "speculative": self.speculative}
        if self.comp_ctx:
            out["comp_ctx"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> GraphVariant:
        return cls(**(data or {}))

    def describe(self) -> str:
        parts = ((["continuous batching"] if self.continuous_batching else []) + (["speculative target"] if self.speculative else [])
                 + (["compute-context ladder"] if self.comp_ctx else []))
        return " + ".join(parts) or "base"


BASE = GraphVariant()
