"""Compressed weights for the fused ONNX Runtime graph: MatMulNBits blocks (``blocks``), made by
round-to-nearest from float weights or re-encoded exactly from a GGUF file's own blocks (``gguf``)."""

from __future__ import annotations

from qeff.quant.blocks import NBitsWeight, pack_codes, rtn_quantize

__all__ = ["NBitsWeight", "pack_codes", "rtn_quantize"]
