"""Small model files for the support / cardless tests: GGUF files written with the ``gguf``
package's own writer, and checkpoint directories whose weights are deliberately absent or broken."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_gguf(path: Path, arch: str, *, name: str | None = None, layers: int = 2, hidden: int = 64, heads: int = 4,
               kv_heads: int = 2, ffn: int = 128, vocab: int = 256, ctx: int = 512, extra: dict | None = None,
               tie: bool = False, tensor_type: str = "F32") -> Path:
    """A GGUF file of a tiny ``arch`` model: llama.cpp metadata keys and random tensors (F32,
    or F16 when ``tensor_type`` says so)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    if name is not None:
        writer.add_name(name)
    writer.add_uint32(f"{arch}.block_count", layers)
    writer.add_uint32(f"{arch}.context_length", ctx)
    writer.add_uint32(f"{arch}.embedding_length", hidden)
    writer.add_uint32(f"{arch}.feed_forward_length", ffn)
    writer.add_uint32(f"{arch}.attention.head_count", heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_uint32(f"{arch}.vocab_size", vocab)
    for key, value in (extra or {}).items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_token_list([f"t{i}" for i in range(vocab)])  # a vocabulary: a long string array
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    dtype = np.float16 if tensor_type == "F16" else np.float32
    tensors = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tie:
        tensors["output.weight"] = (vocab, hidden)
    for i in range(layers):
        tensors[f"blk.{i}.attn_q.weight"] = (hidden, hidden)
        tensors[f"blk.{i}.ffn_up.weight"] = (ffn, hidden)
    for tname, shape in tensors.items():
        writer.add_tensor(tname, rng.standard_normal(shape).astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_config_dir(path: Path, config: dict, *, weights: bytes | None = None, weights_name: str = "model.safetensors") -> Path:
    """A checkpoint directory holding ``config.json`` and, optionally, a weights file of raw bytes."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (path / weights_name).write_bytes(weights)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
