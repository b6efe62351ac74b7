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

    @property
    def is_base(self) -> bool:
        return not (self.continuous_batching or self.speculative)

    @property
    def extra_inputs(self) -> list[str]:
        return (["batch_index"] if self.continuous_batching else []) + (["num_logits_to_keep"] if self.speculative else [])

    def to_dict(self) -> dict:
        return {"continuous_batching": self.continuous_batching, "speculative": self.speculative}

    @classmethod
    def from_dict(cls, data: dict | None) -> GraphVariant:
        return cls(**(data or {}))

    def describe(self) -> str:
        parts = (["continuous batching"] if self.continuous_batching else []) + (["speculative target"] if self.speculative else [])
        return " + ".join(parts) or "base"


BASE = GraphVariant()
