"""The CPU-specific ONNX Runtime graph: a llama-family decoder built from fused contrib ops.

The portable graph (``qeff.exporter``) is standard ONNX for Cloud AI: attention reads all
``ctx_len`` slots through a mask, the cache is written by a scatter, and ~1,600 small nodes run
per decode step. On a CPU, ONNX Runtime has fused kernels for exactly this model
(``com.microsoft`` domain), so this module writes a second graph from the model's own weights:

    Gather(embed) ─ SimplifiedLayerNormalization
      per layer:  MatMul(qkv packed) ─ GroupQueryAttention(rotary inside, cache shared in place)
                  ─ MatMul(o) ─ SkipSimplifiedLayerNormalization ─ MatMul(gate), MatMul(up)
                  ─ x·sigmoid(x)·up ─ MatMul(down) ─ SkipSimplifiedLayerNormalization
    Gather(last valid token of each row) ─ MatMul(lm_head)

About 11 nodes per layer. The compiled artifact's lowering (which of ``_Lowering``'s forms, chosen
by :func:`qeff.compilers.ort_fused_artifact.fused_lowering` from ONNX Runtime's profiler on SmolLM2:
docs/cpu.md) is the structure of onnxruntime-genai's graph for fp32 weights.
``GroupQueryAttention`` appends each row's new keys/values into the cache buffer it is given as both ``past_*`` input and ``present_*`` output (one OrtValue bound to
both, as the portable graph's session does) and attends only over each row's valid length
(``seqlens_k``), with right-padded chunks described by ``query_seqlens``. The session
(:mod:`qeff.runtime.ort_fused`) derives those from ``position_ids``, so the generation loop and
the verification drive this graph through the same ``Session`` interface as any other.

Graph inputs: ``input_ids`` int64 ``(B, S)``; ``seqlens_k`` int32 ``(B,)`` (tokens in each row's
cache after the step, minus one); ``total_sequence_length`` int32 scalar; ``query_seqlens`` int32
``(B,)`` (valid tokens of each row in this chunk); ``last_index`` int64 ``(B,)`` (flat index of each
row's last valid token in ``B*S``; its length is its own dim, ``logits_rows``, so a verify step of
speculative or prompt-lookup decoding gathers K+1 positions per row); ``past_key.{i}`` / ``past_value.{i}`` float32
``(B, n_kv, ctx_len, head_dim)``. Outputs: ``logits`` ``(logits_rows, vocab)`` and the caches
``…_RetainedState``.

Linear weights are either float32 matrices (``MatMul``) or :class:`qeff.quant.NBitsWeight`
blocks (``MatMulNBits``); everything else is float32. Supported: ``FAMILIES`` (RMSNorm, rotary
with halves rotated, SiLU-gated MLP, optional q/k/v biases, sliding windows); anything else keeps
the portable graph (see :func:`unsupported_reason`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qeff.store.layout import LOGITS_ROWS
from qeff.store.layout import ORT_FUSED as FUSED_GRAPH
from qeff.quant.blocks import NBitsWeight

__all__ = ["FAMILIES", "FUSED_GRAPH", "DecoderWeights", "LayerWeights", "unsupported_reason", "write_fused_graph"]

FAMILIES = ("llama", "mistral", "qwen2")
#: Offsets of tensors in the data file are aligned to this, so ONNX Runtime can map them from the
#: file instead of copying them (and the embedding table, read a row at a time, stays mostly on disk).
_ALIGN = 4096
_OPSET = 17
#: A float32 weight larger than this is split (see the LM head in ``_Builder.build``).
_MAX_WEIGHT_BYTES = 32 * 2**20

@dataclass
class LayerWeights:
    """One decoder layer. Matrices are ``(out, in)`` like torch's ``Linear.weight``."""

    input_norm: np.ndarray  # (H,)
    post_norm: np.ndarray  # (H,)
    q: np.ndarray | NBitsWeight  # (n_heads * head_dim, H)
    k: np.ndarray | NBitsWeight  # (n_kv * head_dim, H)
    v: np.ndarray | NBitsWeight
    o: np.ndarray | NBitsWeight  # (H, n_heads * head_dim)
    gate: np.ndarray | NBitsWeight  # (I, H)
    up: np.ndarray | NBitsWeight
    down: np.ndarray | NBitsWeight  # (H, I)
    qkv_bias: np.ndarray | None = None  # (n_heads * hd + 2 * n_kv * hd,) when the model has q/k/v biases
    o_bias: np.ndarray | None = None
    mlp_bias: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # gate, up, down
    window: int | None = None  # sliding window (keys visible: p - window < k <= p)


@dataclass
class DecoderWeights:
    """What the fused graph is made of, whatever the weights' format."""

    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    vocab: int
    embed: np.ndarray  # (vocab, H) float32: gathered a row at a time
    layers: list[LayerWeights]
    norm: np.ndarray  # (H,)
    lm_head: np.ndarray | NBitsWeight  # (vocab, H)
    cos: np.ndarray  # (max_positions, head_dim / 2)
    sin: np.ndarray
    facts: dict = field(default_factory=dict)  # for the manifest: formats, sources


def unsupported_reason(config) -> str | None:
    """Why the fused graph cannot express this configuration, or None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return f"the fused ONNX Runtime graph covers {', '.join(FAMILIES)}, not {model_type}"
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"activation {act!r} (the fused graph has SiLU-gated MLPs)"
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if n_heads % n_kv:
        return f"{n_heads} attention heads are not a multiple of {n_kv} key/value heads"
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if head_dim % 16:
        return f"head_dim {head_dim} (ONNX Runtime's CPU GroupQueryAttention needs a multiple of 16)"
    return None


class _Graph:
    """Collects nodes and initializers for ``path``. A constant of 1 KiB or more is written to
    ``path.data`` (4 KiB aligned) the moment it is made and only its reference is kept, so a graph
    built a layer at a time never holds its weights' bytes all at once (a 7B's int4 graph is
    3.5 GB); smaller ones stay inline. :meth:`save` writes the model file."""

    def __init__(self, path: Path) -> None:
        from onnx import helper

        self.helper = helper
        self.path = Path(path)
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0
        self._data_name = self.path.name + ".data"
        self._data = open(self.path.parent / self._data_name, "wb")
        self._offset = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(self._tensor(name, np.ascontiguousarray(array)))
        return name

    def _tensor(self, name: str, array: np.ndarray):
        from onnx import TensorProto, numpy_helper

        if array.nbytes < 1024:  # small constants stay inline
            return numpy_helper.from_array(array, name)
        pad = -self._offset % _ALIGN
        self._data.write(b"\0" * pad)
        self._offset += pad
        self._data.write(memoryview(array.reshape(-1).view(np.uint8)))  # C-order bytes, no copy
        tensor = TensorProto(name=name, data_type=numpy_helper.helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self._data_name), ("offset", str(self._offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += array.nbytes
        return tensor

    def node(self, op: str, inputs: list[str], n_out: int = 1, *, hint: str | None = None, domain: str = "", **attrs) -> list[str]:
        base = self.name(hint or op)
        outputs = [f"{base}/out{i}" for i in range(n_out)]
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=base, domain=domain or None, **attrs))
        return outputs

    def close(self) -> None:
        self._data.close()

    def save(self, inputs: list, outputs: list, metadata: dict[str, str]) -> int:
        """Close ``path.data`` and write ``path``; returns the data file's size."""
        import onnx

        self._data.close()
        graph = self.helper.make_graph(self.nodes, "qeff_fused_decoder", inputs, outputs, self.initializers)
        model = self.helper.make_model(
            graph, opset_imports=[self.helper.make_opsetid("", _OPSET), self.helper.make_opsetid("com.microsoft", 1)],
            producer_name="qeff",
        )
        model.ir_version = 8
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save_model(model, str(self.path))
        return self._offset


@dataclass
class _Lowering:
    """How linear layers become nodes. ``accuracy_level`` 0 keeps MatMulNBits's activations in
    float32 (results match the dequantized matrix to rounding); 4 quantizes activations to int8
    per block (faster, not exact)."""

    accuracy_level: int = 0
    #: One MatMul for gate|up then a Split, or two MatMuls (measured: see ``benchmarks/ab_fused.py``).
    pack_gate_up: bool = True
    #: A float32 vocabulary projection in column slices of at most ``_MAX_WEIGHT_BYTES`` (lower peak
    #: memory when the session opens), or one MatMul (faster for several rows: docs/cpu.md).
    slice_lm_head: bool = True
    #: A matrix with offsets runs with MatMulNBits's default zero point when that is exact
    #: (:meth:`NBitsWeight.recentred`): no zero-point input, ONNX Runtime's faster kernel path.
    recentre: bool = True
    #: ``SkipSimplifiedLayerNormalization`` names only the outputs the graph reads (the normed
    #: value and the residual sum), as onnxruntime-genai's graph does; True also names its unused
    #: statistics outputs, which ONNX Runtime then allocates and writes on every step (docs/cpu.md).
    norm_stats: bool = False


class _Builder:
    def __init__(self, w: DecoderWeights, lowering: _Lowering, path: Path):
        self.w, self.g, self.low = w, _Graph(path), lowering
        self._blocksums: dict[tuple[str, int], str] = {}

    # -- linear layers ---------------------------------------------------------------------

    def linear(self, x: str, weight, hint: str, bias: np.ndarray | None = None) -> str:
        if isinstance(weight, NBitsWeight):
            y = self._nbits(x, weight, hint)
        else:
            w = np.asarray(weight, dtype=np.float32)
            (y,) = self.g.node("MatMul", [x, self.g.const(f"{hint}.weight_t", w.T)], hint=hint)  # (…, K) @ (K, N)
        if bias is not None:
            (y,) = self.g.node("Add", [y, self.g.const(f"{hint}.bias", bias.astype(np.float32))], hint=f"{hint}.bias")
        return y

    def _nbits(self, x: str, w: NBitsWeight, hint: str) -> str:
        if self.low.recentre and w.offsets is not None:
            w = w.recentred() or w  # the offset term exists anyway; the zero-point input goes
        if w.bits == 8 and self.low.accuracy_level < 4:
            high, low = w.nibbles()  # the float32-accurate CPU kernel is fast for 4 bits only
            (y,) = self.g.node("Add", [self._nbits(x, high, f"{hint}.hi"), self._nbits(x, low, f"{hint}.lo")], hint=f"{hint}.sum")
            return y
        n, k = w.shape
        inputs = [x, self.g.const(f"{hint}.q", w.packed()), self.g.const(f"{hint}.scales", w.scales.reshape(-1))]
        if not (w.zero_points == 2 ** (w.bits - 1)).all():  # the default zero point needs no input
            inputs.append(self.g.const(f"{hint}.zp", w.packed_zero_points().reshape(-1)))
        (y,) = self.g.node("MatMulNBits", inputs, hint=hint, domain="com.microsoft", K=k, N=n, bits=w.bits,
                           block_size=w.block_size, accuracy_level=self.low.accuracy_level)
        if w.offsets is not None and np.any(w.offsets):
            # The per-block offset term: blocksum(x) (…, K/bs) @ offsets.T (K/bs, N).
            (corr,) = self.g.node("MatMul", [self._blocksum(x, w.block_size, k), self.g.const(f"{hint}.offsets_t", w.offsets.T)], hint=f"{hint}.offset")
            (y,) = self.g.node("Add", [y, corr], hint=f"{hint}.plus_offset")
        return y

    def _blocksum(self, x: str, block: int, k: int) -> str:
        key = (x, block)
        if key not in self._blocksums:
            shape = self.g.const("blocks_shape", np.array([0, 0, k // block, block], np.int64))
            (r,) = self.g.node("Reshape", [x, shape], hint="blocks")  # (B, S, K/bs, bs)
            axes = self.g.const("last_axis", np.array([-1], np.int64))
            (s,) = self.g.node("ReduceSum", [r, axes], hint="blocksum", keepdims=0)  # (B, S, K/bs)
            self._blocksums[key] = s
        return self._blocksums[key]

    @staticmethod
    def _stack(parts: list) -> np.ndarray | NBitsWeight:
        if all(isinstance(p, NBitsWeight) for p in parts):
            if len({(p.bits, p.block_size) for p in parts}) == 1:
                return NBitsWeight.concat(parts)
            return None  # type: ignore[return-value]  # mixed formats: keep them apart
        if any(isinstance(p, NBitsWeight) for p in parts):
            return None  # type: ignore[return-value]
        return np.concatenate([np.asarray(p, np.float32) for p in parts], axis=0)

    def _skip_norm(self, x: str, skip: str, gamma: np.ndarray, hint: str, last: bool = False) -> tuple[str, str]:
        """``norm(x + skip)`` and ``x + skip``; the sum is left unnamed after the last layer (nothing
        reads it), and so are the mean and inverse deviation unless ``norm_stats``."""
        g = self.g
        normed, mean, inv_std, total = g.node("SkipSimplifiedLayerNormalization", [x, skip, g.const(hint, gamma)], 4,
                                              hint=hint, domain="com.microsoft", epsilon=self.w.eps)
        if not self.low.norm_stats:
            outputs = g.nodes[-1].output
            outputs[1] = outputs[2] = ""  # optional outputs: an empty name is not computed
            if last:
                del outputs[1:]
        return normed, total

    # -- the decoder -------------------------------------------------------------------------

    def build(self, batch: str = "batch_size", seq: str = "seq_len", ctx: str = "ctx_len"):
        from onnx import TensorProto
        from onnx.helper import make_tensor_value_info as vi

        w, g = self.w, self.g
        kv_shape = [batch, w.n_kv, ctx, w.head_dim]
        inputs = [
            vi("input_ids", TensorProto.INT64, [batch, seq]),
            vi("seqlens_k", TensorProto.INT32, [batch]),
            vi("total_sequence_length", TensorProto.INT32, []),
            vi("query_seqlens", TensorProto.INT32, [batch]),
            vi("last_index", TensorProto.INT64, [LOGITS_ROWS]),
        ]
        outputs = [vi("logits", TensorProto.FLOAT, [LOGITS_ROWS, w.vocab])]
        cos = g.const("cos_cache", w.cos.astype(np.float32))
        sin = g.const("sin_cache", w.sin.astype(np.float32))
        (h,) = g.node("Gather", [g.const("embed_tokens", np.asarray(w.embed, dtype=np.float32)), "input_ids"], hint="embed")  # (B, S, H)
        (x,) = g.node("SimplifiedLayerNormalization", [h, g.const("norm_in.0", w.layers[0].input_norm)],
                      hint="input_norm.0", axis=-1, epsilon=w.eps, stash_type=1)
        for i, layer in enumerate(w.layers):
            past_k, past_v = f"past_key.{i}", f"past_value.{i}"
            inputs += [vi(past_k, TensorProto.FLOAT, kv_shape), vi(past_v, TensorProto.FLOAT, kv_shape)]
            outputs += [vi(f"{past_k}_RetainedState", TensorProto.FLOAT, kv_shape), vi(f"{past_v}_RetainedState", TensorProto.FLOAT, kv_shape)]
            qkv_w = self._stack([layer.q, layer.k, layer.v])
            if qkv_w is not None:
                qkv = self.linear(x, qkv_w, f"layers.{i}.qkv", layer.qkv_bias)  # (B, S, (nh + 2 nkv) hd)
                attn_in = [qkv, "", ""]
            else:
                nq, nk = w.n_heads * w.head_dim, w.n_kv * w.head_dim
                b = layer.qkv_bias
                attn_in = [self.linear(x, layer.q, f"layers.{i}.q", None if b is None else b[:nq]),
                           self.linear(x, layer.k, f"layers.{i}.k", None if b is None else b[nq:nq + nk]),
                           self.linear(x, layer.v, f"layers.{i}.v", None if b is None else b[nq + nk:])]
            attrs = dict(num_heads=w.n_heads, kv_num_heads=w.n_kv, do_rotary=1, rotary_interleaved=0,
                         scale=float(w.head_dim ** -0.5))
            if layer.window is not None:
                attrs["local_window_size"] = int(layer.window)  # keys p - window < k <= p, as the portable mask (tested)
            gqa_inputs = attn_in + [past_k, past_v, "seqlens_k", "total_sequence_length", cos, sin,
                                    "", "", "", "", "", "", "", "query_seqlens"]
            attn, _, _ = g.node("GroupQueryAttention", gqa_inputs, 3, hint=f"layers.{i}.attn", domain="com.microsoft", **attrs)
            # GQA writes the new keys/values into the bound buffer; name its outputs as the graph's.
            g.nodes[-1].output[1] = f"{past_k}_RetainedState"
            g.nodes[-1].output[2] = f"{past_v}_RetainedState"
            o = self.linear(attn, layer.o, f"layers.{i}.o", layer.o_bias)
            x, h = self._skip_norm(o, h, layer.post_norm, f"post_norm.{i}")  # x = norm(o + h); h = o + h
            gb, ub, db = layer.mlp_bias or (None, None, None)
            gu_w = self._stack([layer.gate, layer.up]) if self.low.pack_gate_up else None
            if gu_w is not None:
                bias = None if gb is None else np.concatenate([gb, ub])
                gu = self.linear(x, gu_w, f"layers.{i}.gate_up", bias)
                inter = layer.gate.shape[0]
                split = g.const("split", np.array([inter, inter], np.int64))
                gate, up = g.node("Split", [gu, split], 2, hint=f"layers.{i}.split", axis=-1)
            else:
                gate, up = self.linear(x, layer.gate, f"layers.{i}.gate", gb), self.linear(x, layer.up, f"layers.{i}.up", ub)
            (sig,) = g.node("Sigmoid", [gate], hint=f"layers.{i}.sigmoid")
            (act,) = g.node("Mul", [gate, sig], hint=f"layers.{i}.silu")
            (prod,) = g.node("Mul", [act, up], hint=f"layers.{i}.gated")
            down = self.linear(prod, layer.down, f"layers.{i}.down", db)
            norm = w.layers[i + 1].input_norm if i + 1 < len(w.layers) else w.norm
            x, h = self._skip_norm(down, h, norm, f"input_norm.{i + 1}", last=i + 1 == len(w.layers))
        # Only each row's last valid token reaches the vocabulary projection.
        (flat,) = g.node("Reshape", [x, g.const("flat_shape", np.array([-1, w.hidden], np.int64))], hint="flatten")  # (B*S, H)
        (last,) = g.node("Gather", [flat, "last_index"], hint="last_token", axis=0)  # (B, H)
        head = w.lm_head
        chunks = 1
        if not isinstance(head, NBitsWeight) and self.low.slice_lm_head:
            # ONNX Runtime prepacks a MatMul weight into a copy while the original is still mapped:
            # the largest weight sets the peak memory of opening the session. The vocabulary
            # projection (113 MB in SmolLM2) is the largest by far, so it runs in column slices.
            chunks = max(1, -(-head.nbytes // _MAX_WEIGHT_BYTES))
        if chunks == 1:
            self.linear(last, head, "lm_head")  # (B, vocab)
        else:
            bounds = np.linspace(0, head.shape[0], chunks + 1).astype(int)
            parts = [self.linear(last, head[a:b], f"lm_head.{j}") for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
            g.node("Concat", parts, hint="lm_head", axis=-1)  # (B, vocab)
        g.nodes[-1].output[0] = "logits"  # the last node makes the logits
        return inputs, outputs


def write_fused_graph(weights: DecoderWeights, out_dir: str | os.PathLike, *, accuracy_level: int = 0,
                      metadata: dict[str, str] | None = None, pack_gate_up: bool = True,
                      slice_lm_head: bool = True, recentre: bool = True, norm_stats: bool = False) -> dict:
    """Write ``FUSED_GRAPH`` (+ ``.data``) into ``out_dir``; returns facts for the manifest."""
    out_dir = Path(out_dir)
    builder = _Builder(weights, _Lowering(accuracy_level=accuracy_level, pack_gate_up=pack_gate_up,
                                          slice_lm_head=slice_lm_head, recentre=recentre, norm_stats=norm_stats),
                       out_dir / FUSED_GRAPH)
    try:
        inputs, outputs = builder.build()
    except BaseException:
        builder.g.close()
        raise
    meta = {"qeff.graph": "fused", "qeff.num_layers": str(len(weights.layers)), "qeff.num_kv_heads": str(weights.n_kv),
            "qeff.head_dim": str(weights.head_dim), "qeff.vocab_size": str(weights.vocab), **(metadata or {})}
    data_bytes = builder.g.save(inputs, outputs, meta)
    ops: dict[str, int] = {}
    for node in builder.g.nodes:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"model": FUSED_GRAPH, "data_bytes": data_bytes, "nodes": len(builder.g.nodes), "ops": ops,
            "accuracy_level": accuracy_level, **weights.facts}


def write_linear_graph(weight, path: str | os.PathLike, *, accuracy_level: int = 0, recentre: bool = True) -> Path:
    """A graph of one linear layer ``Y (B, S, N) = X (B, S, K) @ W.T`` lowered as the decoder
    lowers it: the unit under test of the exactness tests (``tests/test_quant_*.py``)."""
    from onnx import TensorProto
    from onnx.helper import make_tensor_value_info as vi

    path = Path(path)
    builder = _Builder(None, _Lowering(accuracy_level=accuracy_level, recentre=recentre), path)  # type: ignore[arg-type]
    n, k = weight.shape
    builder.linear("X", weight, "linear")
    builder.g.nodes[-1].output[0] = "Y"
    builder.g.save([vi("X", TensorProto.FLOAT, ["B", "S", k])], [vi("Y", TensorProto.FLOAT, ["B", "S", n])], {})
    return path
