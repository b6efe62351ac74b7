"""Where the fused graph's weights come from: a loaded HF model (float32, or re-quantized by
round-to-nearest), or — for ``--weights native`` — the GGUF file's own blocks
(:mod:`qeff.quant.gguf`). Every source yields one :class:`qeff.compilers.ort_fused.DecoderWeights`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from qeff.compilers.ort_fused import DecoderWeights, LayerWeights, unsupported_reason
from qeff.errors import NotStreamableError, UnsupportedModelError
from qeff.quant.blocks import NBitsWeight, rtn_quantize

__all__ = ["from_hf", "from_safetensors", "streamable_reason", "LazyLayers", "from_gguf", "rotary_tables", "layer_windows", "dims"]


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


#: Rows quantized at a time: rtn_quantize holds a few float32 temporaries of its input's size,
#: which for a 128256-row vocabulary projection would be GBs; rows are independent, so the
#: result is the same bytes.
_QUANT_CHUNK_BYTES = 64 * 2**20


def _quantizer(weights: str, block_size: int) -> Callable[[np.ndarray], np.ndarray | NBitsWeight]:
    if weights == "fp32":
        return lambda w: w
    bits = {"int8": 8, "int4": 4}[weights]

    def quantize(w: np.ndarray) -> NBitsWeight:
        rows = max(1, _QUANT_CHUNK_BYTES // max(1, 4 * w.shape[1]))
        if w.shape[0] <= rows:
            return rtn_quantize(w, bits, block_size)
        return NBitsWeight.concat([rtn_quantize(w[i:i + rows], bits, block_size) for i in range(0, w.shape[0], rows)])

    return quantize


class LazyLayers(Sequence):
    """The decoder layers, each built (read and quantized) when the graph builder reaches it and
    dropped soon after: the builder looks one layer ahead (the next layer's input norm), so the
    last two are kept. A fused build from files holds two layers' weights, never the model's."""

    def __init__(self, count: int, make: Callable[[int], LayerWeights]):
        self._count, self._make = count, make
        self._recent: dict[int, LayerWeights] = {}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(i)
        if i not in self._recent:
            self._recent[i] = self._make(i)
            for old in sorted(self._recent)[:-2]:
                del self._recent[old]
        return self._recent[i]


def _decoder(config, tensor: Callable[[str], np.ndarray], has: Callable[[str], bool], max_positions: int, *,
             weights: str, block_size: int, quantize_lm_head: bool, rotary_module, source: str) -> DecoderWeights:
    """What :func:`from_hf` and :func:`from_safetensors` share: ``tensor(name)`` is the float32
    value a loaded model holds under that state-dict name (read when asked), ``has(name)`` whether
    it exists. Layers are :class:`LazyLayers`: read and quantized one at a time."""
    reason = unsupported_reason(config)
    if reason:
        raise UnsupportedModelError(reason)
    hidden, n_heads, n_kv, head_dim = dims(config)
    quant = _quantizer(weights, block_size)
    prefix = "model."
    windows = layer_windows(config)

    def layer(i: int) -> LayerWeights:
        p = f"{prefix}layers.{i}."
        get = lambda name: tensor(p + name)  # noqa: E731
        qkv_bias = None
        if has(p + "self_attn.q_proj.bias"):
            qkv_bias = np.concatenate([get("self_attn.q_proj.bias"), get("self_attn.k_proj.bias"), get("self_attn.v_proj.bias")])
        mlp_bias = None
        if has(p + "mlp.gate_proj.bias"):
            mlp_bias = (get("mlp.gate_proj.bias"), get("mlp.up_proj.bias"), get("mlp.down_proj.bias"))
        return LayerWeights(
            input_norm=get("input_layernorm.weight"), post_norm=get("post_attention_layernorm.weight"),
            q=quant(get("self_attn.q_proj.weight")), k=quant(get("self_attn.k_proj.weight")),
            v=quant(get("self_attn.v_proj.weight")), o=quant(get("self_attn.o_proj.weight")),
            gate=quant(get("mlp.gate_proj.weight")), up=quant(get("mlp.up_proj.weight")), down=quant(get("mlp.down_proj.weight")),
            qkv_bias=qkv_bias, o_bias=get("self_attn.o_proj.bias") if has(p + "self_attn.o_proj.bias") else None,
            mlp_bias=mlp_bias, window=windows[i],
        )

    embed = tensor(prefix + "embed_tokens.weight")
    head = embed if not has("lm_head.weight") else tensor("lm_head.weight")
    lm_head = quant(head) if quantize_lm_head else head
    del head
    cos, sin = rotary_tables(config, max_positions, rotary_module)
    return DecoderWeights(
        hidden=hidden, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, eps=float(config.rms_norm_eps),
        vocab=embed.shape[0], embed=embed, layers=LazyLayers(config.num_hidden_layers, layer),  # type: ignore[arg-type]
        norm=tensor(prefix + "norm.weight"), lm_head=lm_head, cos=cos, sin=sin,
        facts={"weights": weights, "block_size": block_size if weights != "fp32" else None, "source": source},
    )


def from_hf(model, max_positions: int, *, weights: str = "fp32", block_size: int = 32,
            quantize_lm_head: bool = True) -> DecoderWeights:
    """The fused graph's weights, read from a loaded HF llama-family model (never modified).

    ``weights``: ``fp32`` as they are; ``int8`` / ``int4``: round-to-nearest blockwise
    (``block_size`` values per scale) for every linear layer — the embedding table stays float32
    (it is gathered a row at a time, so it costs no bandwidth), the LM head is quantized unless
    ``quantize_lm_head`` is False."""
    state = model.state_dict()
    return _decoder(model.config, lambda name: state[name].detach().float().numpy(), state.__contains__, max_positions,
                    weights=weights, block_size=block_size, quantize_lm_head=quantize_lm_head,
                    rotary_module=getattr(model.model, "rotary_emb", None), source="hf")


#: The state-dict names the fused graph reads from a checkpoint (per layer, and once).
_LAYER_NAMES = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def streamable_reason(directory: Path, config=None) -> str | None:
    """Why :func:`from_safetensors` cannot build from ``directory``'s files (a name transformers
    would convert on load, a tensor in a dtype it does not read, an untied head that is not
    there), or None when it can. Headers only."""
    from qeff.weights import SafetensorsWeights, safetensors_dir

    if not safetensors_dir(Path(directory)):
        return f"{directory} is not a directory of safetensors files"
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(directory))
    reason = unsupported_reason(config)
    if reason:
        return reason
    files = SafetensorsWeights(directory)
    wanted = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in _LAYER_NAMES]
    if "lm_head.weight" not in files and not getattr(config, "tie_word_embeddings", False):
        wanted.append("lm_head.weight")
    missing = [n for n in wanted if n not in files]
    if missing:
        return f"the checkpoint holds no tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    unread = sorted({files._where[n][1]["dtype"] for n in files.names()} - {"F32", "F16", "BF16"})
    if unread:
        return f"weights stored as {', '.join(unread)}"
    return None


def from_safetensors(directory: str | Path, max_positions: int, *, weights: str = "fp32", block_size: int = 32,
                     quantize_lm_head: bool = True, config=None) -> DecoderWeights:
    """The fused graph's weights read from a safetensors checkpoint one tensor at a time
    (:class:`qeff.weights.SafetensorsWeights`), never loading the model: each tensor is converted
    to float32 as ``from_pretrained(dtype=float32)`` converts it, quantized at once for int8/int4,
    and its float32 copy dropped. Same values as :func:`from_hf` on the loaded model, so the same
    graph bytes (tests/test_fused_stream.py); the config (``AutoConfig`` of the directory unless
    given) says the rotary and the windows."""
    import torch

    from qeff.weights import SafetensorsWeights

    directory = Path(directory)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(directory))
    reason = streamable_reason(directory, config)
    if reason:
        raise NotStreamableError(f"the fused graph cannot be built from {directory}'s files: {reason}")
    files = SafetensorsWeights(directory)

    def tensor(name: str) -> np.ndarray:
        return files.get(name).to(torch.float32).numpy()

    return _decoder(config, tensor, files.__contains__, max_positions, weights=weights, block_size=block_size,
                    quantize_lm_head=quantize_lm_head, rotary_module=None, source="safetensors")


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
