"""Architecture registry: what each supported ``model_type`` needs beyond the generic mechanism.

The generic mechanism (a :class:`~qeff.transforms.cache.RetainedStateCache` handed to the HF model
and a mask built from ``position_ids``) does the work for any architecture whose attention calls
``cache.update`` and honours a 4D ``attention_mask``. An :class:`ArchSpec` declares only what
differs: which module classes were checked to follow that protocol, how to reach the decoder and
the head, how the cache is shaped, which HF modules must be replaced by a drop-in subclass (an
attention that does not fit the protocol as written), and which configurations are refused. One
small file per architecture registers its spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ArchSpec", "register", "get_spec", "supported_model_types"]


def _default_decoder(model: nn.Module) -> nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def _default_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.get_output_embeddings()(hidden)


def _default_kv_shape(config) -> tuple[int, int]:
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_kv, head_dim


def _default_windows(config) -> dict[str, int | None]:
    """Mask kind per layer type. Models with ``layer_types`` get one mask per type; a plain
    ``sliding_window`` applies to every layer (Mistral v0.1)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return {t: (window if t == "sliding_attention" else None) for t in sorted(set(layer_types))}
    return {"": window}


def _accept_any(config) -> str | None:
    return None


@dataclass(frozen=True)
class ArchSpec:
    """What one architecture declares. ``modules`` are the class names verified to follow the
    retained-state protocol; any other non-``torch.nn`` module in a model is refused by name.

    ``replace`` maps an HF module class name to a subclass of it whose ``forward`` fits the
    protocol; the transform swaps the class of each such module in place (parameters untouched).
    ``refuse(config)`` returns why a configuration of this architecture is not supported, or None.
    """

    name: str
    model_types: tuple[str, ...]
    modules: frozenset[str]
    decoder: Callable[[nn.Module], nn.Module] = _default_decoder
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _default_head
    kv_shape: Callable[[object], tuple[int, int]] = _default_kv_shape
    windows: Callable[[object], dict[str, int | None]] = _default_windows
    replace: Mapping[str, type[nn.Module]] = field(default_factory=dict)
    refuse: Callable[[object], str | None] = _accept_any
    notes: str = ""
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    for model_type in spec.model_types:
        if model_type in _REGISTRY:
            raise ValueError(f"model_type {model_type!r} is registered twice ({_REGISTRY[model_type].name}, {spec.name})")
        _REGISTRY[model_type] = spec
    return spec


def get_spec(model_type: str) -> ArchSpec | None:
    _load_builtin()
    return _REGISTRY.get(model_type)


def supported_model_types() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


#: Modules of ``qeff.transforms`` that hold the mechanism, not an architecture.
_CORE_MODULES = frozenset({"cache", "experts", "mask", "model", "registry"})
_loaded = False


def _load_builtin() -> None:
    """Import every architecture file in ``qeff/transforms/`` (each registers its spec), so that
    adding an architecture is adding one file. Done lazily to keep ``import qeff`` cheap."""
    global _loaded
    if _loaded:
        return
    import importlib
    import pkgutil
    from pathlib import Path

    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.name not in _CORE_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"qeff.transforms.{info.name}")
    _loaded = True
