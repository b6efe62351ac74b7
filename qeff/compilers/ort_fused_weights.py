"""Where the fused graph's weights come from: a loaded HF model (float32, or re-quantized by
round-to-nearest), or — for ``--weights native`` — the GGUF file's own blocks
(:mod:`qeff.quant.gguf`). Every source yields one :class:`qeff.compilers.ort_fused.DecoderWeights`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qeff.compilers.ort_fused import DecoderWeights, LayerWeights, unsupported_reason
from qeff.errors import UnsupportedModelError
from qeff.quant.blocks import rtn_quantize

__all__ = ["from_hf", "from_gguf", "rotary_tables", "layer_windows", "dims"]


def dims(config) -> tuple[int, int, int, int]:
    """(hidden, n_heads, n_kv, head_dim) of a llama-family config."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return config.hidden_size, n_heads, n_kv, head_dim


def layer_windows(config) -> list[int | None]:
    """The sliding window of each layer (None = full attention), as the transform reads it."""
    from qeff.transforms.registry import _default_windows

    windows = _default_windows(config)
    types = getattr(config, "layer_types", None) or [""] * config.num_hidden_layers
    return [windows.get(t) for t in types]


def rotary_tables(config, max_positions: int, rotary_module=None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables ``(max_positions, head_dim / 2)`` computed by the model's own rotary module
    (its rope type, scaling and attention factor included). Without a loaded model, the
    architecture's rotary class is built from the config alone."""
    import torch

    if rotary_module is None:
        import importlib

        module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
        classes = [getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding") and not n.startswith("_")]
        if not classes:
            raise UnsupportedModelError(f"no rotary embedding class in transformers' {config.model_type} module")
        rotary_module = classes[0](config)
    with torch.no_grad():
        positions = torch.arange(max_positions)[None]
        cos, sin = rotary_module(torch.zeros(1, dtype=torch.float32), positions)  # (1, P, head_dim)
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    half = cos.shape[-1] // 2
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        raise UnsupportedModelError("the rotary tables are not two equal halves (partial or interleaved rotary)")
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


def _quantizer(weights: str, block_size: int):
    if weights == "fp32":
        return lambda w: w
    bits = {"int8": 8, "int4": 4}[weights]
    return lambda w: rtn_quantize(w, bits, block_size)


def from_hf(model, max_positions: int, *, weights: str = "fp32", block_size: int = 32,
            quantize_lm_head: bool = True) -> DecoderWeights:
    """The fused graph's weights, read from a loaded HF llama-family model (never modified).

    ``weights``: ``fp32`` as they are; ``int8`` / ``int4``: round-to-nearest blockwise
    (``block_size`` values per scale) for every linear layer — the embedding table stays float32
    (it is gathered a row at a time, so it costs no bandwidth), the LM head is quantized unless
    ``quantize_lm_head`` is False."""
    config = model.config
    reason = unsupported_reason(config)
    if reason:
        raise UnsupportedModelError(reason)
    hidden, n_heads, n_kv, head_dim = dims(config)
    quant = _quantizer(weights, block_size)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    prefix = "model."
    windows = layer_windows(config)
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"{prefix}layers.{i}."
        get = lambda name: state[p + name]  # noqa: E731
        qkv_bias = None
        if p + "self_attn.q_proj.bias" in state:
            qkv_bias = np.concatenate([get("self_attn.q_proj.bias"), get("self_attn.k_proj.bias"), get("self_attn.v_proj.bias")])
        mlp_bias = None
        if p + "mlp.gate_proj.bias" in state:
            mlp_bias = (get("mlp.gate_proj.bias"), get("mlp.up_proj.bias"), get("mlp.down_proj.bias"))
        layers.append(LayerWeights(
            input_norm=get("input_layernorm.weight"), post_norm=get("post_attention_layernorm.weight"),
            q=quant(get("self_attn.q_proj.weight")), k=quant(get("self_attn.k_proj.weight")),
            v=quant(get("self_attn.v_proj.weight")), o=quant(get("self_attn.o_proj.weight")),
            gate=quant(get("mlp.gate_proj.weight")), up=quant(get("mlp.up_proj.weight")), down=quant(get("mlp.down_proj.weight")),
            qkv_bias=qkv_bias, o_bias=state.get(p + "self_attn.o_proj.bias"), mlp_bias=mlp_bias, window=windows[i],
        ))
    embed = state[prefix + "embed_tokens.weight"]
    lm_head = state.get("lm_head.weight", embed)
    cos, sin = rotary_tables(config, max_positions, getattr(model.model, "rotary_emb", None))
    return DecoderWeights(
        hidden=hidden, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, eps=float(config.rms_norm_eps),
        vocab=embed.shape[0], embed=embed, layers=layers, norm=state[prefix + "norm.weight"],
        lm_head=quant(lm_head) if quantize_lm_head else lm_head, cos=cos, sin=sin,
        facts={"weights": weights, "block_size": block_size if weights != "fp32" else None, "source": "hf"},
    )


def from_gguf(path: Path, config, max_positions: int):
    """The fused graph's weights from a llama-family GGUF file's own blocks (``config``: the HF
    config the model was loaded with, which says the head counts and the rotary)."""
    import gguf

    from qeff.quant.gguf import tensor_weight

    reason = unsupported_reason(config)
    if reason:
        raise UnsupportedModelError(reason)
    reader = gguf.GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else "?"
    tensors = {t.name: t for t in reader.tensors}
    hidden, n_heads, n_kv, head_dim = dims(config)
    # transformers undoes llama.cpp's q/k row permutation for the "llama" architecture only.
    permute = arch == "llama"
    types: dict[str, int] = {}

    def get(name: str, heads: int | None = None):
        if name not in tensors:
            raise UnsupportedModelError(f"{path.name} has no tensor {name!r} (architecture {arch})")
        t = tensors[name]
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        return tensor_weight(t, permute_heads=heads if permute else None)

    def optional(name: str):
        return get(name) if name in tensors else None

    windows = layer_windows(config)
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"blk.{i}."
        biases = [optional(p + f"attn_{x}.bias") for x in "qkv"]
        layers.append(LayerWeights(
            input_norm=get(p + "attn_norm.weight"), post_norm=get(p + "ffn_norm.weight"),
            q=get(p + "attn_q.weight", n_heads), k=get(p + "attn_k.weight", n_kv), v=get(p + "attn_v.weight"),
            o=get(p + "attn_output.weight"), gate=get(p + "ffn_gate.weight"), up=get(p + "ffn_up.weight"),
            down=get(p + "ffn_down.weight"),
            qkv_bias=np.concatenate(biases) if all(b is not None for b in biases) else None,
            window=windows[i],
        ))
    embed_tensor = tensors["token_embd.weight"]
    embed = np.asarray(gguf.dequantize(embed_tensor.data, embed_tensor.tensor_type), dtype=np.float32).reshape(-1, hidden)
    lm_head = get("output.weight") if "output.weight" in tensors else tensor_weight(embed_tensor)
    cos, sin = rotary_tables(config, max_positions)
    return DecoderWeights(
        hidden=hidden, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, eps=float(config.rms_norm_eps),
        vocab=embed.shape[0], embed=embed, layers=layers, norm=get("output_norm.weight"), lm_head=lm_head,
        cos=cos, sin=sin, facts={"weights": "native", "source": "gguf", "gguf_types": types, "architecture": arch},
    )
