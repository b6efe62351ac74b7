"""Retained-state transform: HF causal LM → fixed-size-cache PyTorch module (see ``model.py``)."""

from __future__ import annotations

from qeff.transforms.model import (
    CacheShape,
    QEffCausalLM,
    check_parameters_unchanged,
    input_names,
    output_names,
    parameter_fingerprint,
    transform,
)
from qeff.transforms.registry import ArchSpec, get_spec, register, supported_model_types

__all__ = [
    "ArchSpec",
    "CacheShape",
    "QEffCausalLM",
    "check_parameters_unchanged",
    "get_spec",
    "input_names",
    "output_names",
    "parameter_fingerprint",
    "register",
    "supported_model_types",
    "transform",
]
