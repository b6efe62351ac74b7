"""ONNX passes that turn the portable exported graph into an *emulated* graph for ONNX Runtime.

The emulated graph is a separate artifact (``<export>/tier-<name>/model.onnx``); the portable
graph handed to the real compiler is never changed. Each pass is fake quantization: values are
rounded to what the accelerator's format can hold and computed on in float32.

**mxfp6** (offline, in the weights): every constant MatMul/Gemm operand (an initializer) is
rounded to MXFP6 in blocks of 32 along the reduction dimension (rows of a MatMul's ``B``; Gemm's
``transB`` respected). An initializer that something else also reads (a tied embedding's
``Gather``) is copied first, so only the MatMul sees the rounded one: the device compresses only
MatMul weights ("AI100 stores Matmul weights in MXFP6 format while keeping the rest of the
weights in FP16 format", Cloud AI SDK docs).

**fp16**: every float tensor that carries model data (it depends on ``input_ids`` or the cache,
i.e. the activations) is rounded to float16 where an op produces it: a ``Cast`` to float16 and
back is inserted after the op, so the next op reads fp16 values; the constants those ops read
(weights, biases, norm scales) are rounded to fp16. What stays float32, and why:

- *inside one op*: ORT computes each op in float32 (a MatMul's sums, a Softmax's exponentials) and
  only its output is rounded — a model of fp16 storage with wider accumulation;
- *normalization statistics*: ``Pow``/``ReduceMean`` of an activation and every op computed from
  them and constants alone (``+ eps``, ``Sqrt``, ``1/x``) — the mean of x² in fp16 overflows for
  |x| > 256, and Cloud AI runs RMSNorm as one fused op (QEfficient's ``CustomRMSNorm``); the op
  that rescales the activation by the statistic is rounded;
- *position tables*: tensors computed from ``position_ids`` alone (rotary angles, the attention
  mask) — the device reads rotary ``cos``/``sin`` from fp16 tables built offline, so ``Cos``/``Sin``
  outputs are rounded but the angles are not (an angle of 1000 rad in fp16 is off by up to 0.25);
- *exact ops*: data movement (``Reshape``, ``Gather``, ``Where``, ``Concat``, the cache scatter, …)
  and ``Max``/``Neg``-like selections return values they were given, already fp16.

**mxint8**: the key/value states are fake-quantized to MXINT8 (blocks of 32 along ``head_dim``)
where they enter the cache scatter, by standard ONNX ops in the graph; slots that the scatter
writes back unchanged (padding) hold MXINT8 values already, and re-quantizing an MX block is exact,
so they do not change. Attention then reads the quantized cache, as on the device.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qeff.errors import QEffError
from qeff.precision import mx
from qeff.precision.tiers import Tier

__all__ = ["EmulationReport", "emulate_model", "emulate_file", "build_tier", "TIER_DIR_PREFIX", "mx_fake_quant_nodes"]

TIER_DIR_PREFIX = "tier-"
#: Graph inputs that carry positions, not model data (see the fp16 pass).
POSITION_INPUTS = frozenset({"position_ids", "batch_index"})
_FLOATS = {TensorProto.FLOAT}
#: Ops whose output values are some of their inputs' values: rounding them again changes nothing.
_EXACT = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand", "Tile",
    "Gather", "GatherElements", "GatherND", "Slice", "Split", "Concat", "Pad",
    "Where", "ScatterElements", "ScatterND", "Max", "Min", "ReduceMax", "ReduceMin", "Neg", "Abs", "Relu",
})
#: Ops that start a normalization statistic (kept float32) when they read an activation.
_STAT_SEEDS = frozenset({"Pow", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2"})
#: Ops that continue a statistic when every activation they read is a statistic.
_STAT_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "ReduceMean", "ReduceSum",
                       "Neg", "Abs", "Max", "Min", "Clip", "Cast", "Identity"})
#: Position-table outputs that the device holds in fp16.
_TABLES = frozenset({"Cos", "Sin"})
#: Below this many elements, a weight is quantized in one piece; above, in slabs (bounded memory).
_SLAB = 1 << 21


@dataclass
class EmulationReport:
    """What a tier's passes changed (for the manifest and the docs)."""

    tier: str
    mxfp6_weights: int = 0
    mxfp6_params: int = 0
    mxfp6_copies: int = 0  # initializers copied because a non-MatMul op also reads them
    fp16_rounded_tensors: int = 0  # Cast pairs inserted
    fp16_constants: int = 0  # constant tensors rounded to fp16
    fp32_statistics: int = 0  # op outputs kept float32 as normalization statistics
    fp32_position_ops: int = 0  # op outputs kept float32 as position tables
    mxint8_cache_writes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# -- helpers ------------------------------------------------------------------------------------


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                out.setdefault(name, []).append((node, i))
    return out


def _taken(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}


def _unique(graph: onnx.GraphProto, base: str, taken: set[str] | None = None) -> str:
    """A tensor name not yet in ``graph`` (``taken``: the graph's names, kept up to date by the
    caller that asks for many; computing them per call made the fp16 pass quadratic)."""
    taken = _taken(graph) if taken is None else taken
    name, k = base, 1
    while name in taken:
        name, k = f"{base}.{k}", k + 1
    taken.add(name)
    return name


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, from ONNX shape inference on a weight-free copy of the graph."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    known = {i.name for i in g.input}
    for init in model.graph.initializer:
        if init.name not in known:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    inferred = onnx.shape_inference.infer_shapes(light)
    types = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in model.graph.node:  # Constant outputs, when inference left them out
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and node.output[0] not in types:
                    types[node.output[0]] = attr.t.data_type
    return types


def _constant_value(graph: onnx.GraphProto, producers: dict, inits: dict, name: str) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
    return None


# -- mxfp6: MatMul weights ------------------------------------------------------------------------


def _weight_operands(node: onnx.NodeProto) -> list[tuple[int, int]]:
    """(input index, reduction axis) of each operand that may be a weight."""
    if node.op_type == "MatMul":
        return [(1, -2), (0, -1)]
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        return [(1, 1 if attrs.get("transB", 0) else 0), (0, 0 if attrs.get("transA", 0) else 1)]
    return []


def _mx_weight(arr: np.ndarray, fmt: mx.ElementFormat, axis: int) -> np.ndarray:
    axis %= arr.ndim
    if arr.size <= _SLAB or arr.ndim != 2:
        return mx.fake_quantize(arr, fmt, axis=axis)
    other = 1 - axis
    out = np.empty_like(arr)
    step = max(1, _SLAB // arr.shape[axis])
    for start in range(0, arr.shape[other], step):
        index = [slice(None), slice(None)]
        index[other] = slice(start, start + step)
        out[tuple(index)] = mx.fake_quantize(arr[tuple(index)], fmt, axis=axis)
    return out


def apply_mxfp6(model: onnx.ModelProto, fmt: mx.ElementFormat, report: EmulationReport) -> None:
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    done: dict[tuple[str, int], str] = {}
    for node in graph.node:
        for index, axis in _weight_operands(node):
            name = node.input[index] if index < len(node.input) else ""
            init = inits.get(name)
            if init is None or init.data_type not in _FLOATS or len(init.dims) < 2:
                continue
            key = (name, axis % len(init.dims))
            if key not in done:
                arr = numpy_helper.to_array(init)
                rounded = _mx_weight(arr.astype(np.float32), fmt, axis)
                users = consumers.get(name, [])
                ndim = len(init.dims)
                # Round in place only when every reader is a MatMul/Gemm reading it along this axis.
                shared = not all(any(j == i and a % ndim == key[1] for j, a in _weight_operands(n)) for n, i in users)
                if shared:
                    new = _unique(graph, f"{name}/mxfp6")
                    graph.initializer.append(numpy_helper.from_array(rounded, new))
                    report.mxfp6_copies += 1
                else:
                    init.CopyFrom(numpy_helper.from_array(rounded, name))
                    new = name
                done[key] = new
                report.mxfp6_weights += 1
                report.mxfp6_params += int(arr.size)
            node.input[index] = done[key]


# -- fp16: activations and the constants they meet -----------------------------------------------


def apply_fp16(model: onnx.ModelProto, report: EmulationReport) -> None:
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        report.notes.append("control-flow subgraphs are left in float32")
    types = _elem_types(model)
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}

    # Which tensors carry model data, and which of those are normalization statistics.
    act = {i.name for i in graph.input if i.name not in POSITION_INPUTS and i.name not in inits}
    stats: set[str] = set()
    for node in graph.node:
        if node.op_type in ("Shape", "Size"):
            continue  # metadata of a tensor, not its values
        data_in = [i for i in node.input if i in act]
        if not data_in:
            continue
        act.update(node.output)
        if node.op_type in _STAT_SEEDS or (node.op_type in _STAT_OPS and all(i in stats for i in data_in)):
            stats.update(node.output)

    def is_float(name: str) -> bool:
        return types.get(name) in _FLOATS

    rounded_outputs: list[str] = []
    rounding_nodes: set[int] = set()  # nodes whose constant inputs are rounded
    for node in graph.node:
        float_out = [o for o in node.output if o and is_float(o)]
        if not float_out:
            continue
        if node.op_type in _TABLES and not any(i in act for i in node.input):
            rounded_outputs += float_out  # the fp16 tables the device reads
            continue
        if not any(o in act for o in float_out):
            if node.op_type != "Constant":
                report.fp32_position_ops += 1
            continue
        if any(o in stats for o in float_out):
            report.fp32_statistics += 1
            continue
        rounding_nodes.add(id(node))
        exact = node.op_type in _EXACT or (node.op_type == "Cast" and all(is_float(i) for i in node.input if i))
        if not exact:
            rounded_outputs += [o for o in float_out if o in act]

    # Constants read by data-carrying ops (weights, biases, norm scales, mask fills) → fp16.
    consumers = _consumers(graph)
    taken = _taken(graph)
    cache: dict[str, str] = {}
    for node in graph.node:
        if id(node) not in rounding_nodes:
            continue
        for index, name in enumerate(node.input):
            if not name or name in act or not is_float(name):
                continue
            value = _constant_value(graph, producers, inits, name)
            if value is None or value.dtype != np.float32 or mx.fp16_exact(value):
                continue
            if name not in cache:
                rounded = mx.round_fp16(value)
                users = consumers.get(name, [])
                if name in inits and all(id(n) in rounding_nodes for n, _ in users):
                    inits[name].CopyFrom(numpy_helper.from_array(rounded, name))
                    cache[name] = name
                else:
                    new = _unique(graph, f"{name}/fp16", taken)
                    graph.initializer.append(numpy_helper.from_array(rounded, new))
                    cache[name] = new
                report.fp16_constants += 1
            node.input[index] = cache[name]

    # A Cast pair after each op that produces a data tensor in float32.
    targets = set(rounded_outputs)
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        pairs = []
        for k, out in enumerate(node.output):
            if out in targets:
                raw, half = _unique(graph, f"{out}/fp32", taken), _unique(graph, f"{out}/fp16", taken)
                node.output[k] = raw
                pairs += [helper.make_node("Cast", [raw], [half], to=TensorProto.FLOAT16, name=f"{out}/to_fp16"),
                          helper.make_node("Cast", [half], [out], to=TensorProto.FLOAT, name=f"{out}/from_fp16")]
        new_nodes.append(node)
        new_nodes += pairs
        report.fp16_rounded_tensors += len(pairs) // 2
    del graph.node[:]
    graph.node.extend(new_nodes)


# -- mxint8: the KV cache ---------------------------------------------------------------------------


def mx_fake_quant_nodes(x: str, out: str, *, dim: int, prefix: str, fmt: mx.ElementFormat = mx.INT8) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """ONNX nodes computing ``out = fake_quantize(x)`` along the last axis of a rank-4 float32
    tensor whose last dim is ``dim`` (static), in blocks of 32, for an integer MX element format.

    The block exponent is floor(log2(amax)) made exact: an estimate from ``Log`` is corrected by
    comparing against ``2**e`` (``Log`` can be off by one next to powers of two). A block holding
    NaN or Inf decodes to NaN, as the spec's NaN scale does.
    """
    if fmt.kind != "int":
        raise QEffError("in-graph MX fake quantization supports integer elements (MXINT8) only")
    nb = -(-dim // mx.BLOCK)
    pad = nb * mx.BLOCK - dim
    c = lambda suffix, value, dtype=np.float32: numpy_helper.from_array(np.array(value, dtype=dtype), f"{prefix}/{suffix}")  # noqa: E731
    consts = [
        c("blocked_shape", [0, 0, 0, nb, mx.BLOCK], np.int64),
        c("flat_shape", [0, 0, 0, nb * mx.BLOCK], np.int64),
        c("tiny", 2.0 ** -127), c("inv_ln2", 1.0 / np.log(2.0)), c("two", 2.0), c("one", 1.0), c("zero", 0.0),
        c("emax", float(fmt.emax)), c("emin_scale", float(mx.SCALE_MIN_EXP)), c("emax_scale", float(mx.SCALE_MAX_EXP)),
        c("steps", float(1 << fmt.mbits)), c("qmax", 127.0), c("qmin", -127.0), c("nan", np.nan),
    ]

    def n(op: str, ins: list[str], outs: list[str], **kw) -> onnx.NodeProto:
        # Names starting with "@" are the caller's tensors; the others are this subgraph's own.
        names = [i[1:] if i.startswith("@") else f"{prefix}/{i}" for i in ins]
        return helper.make_node(op, names, [f"{prefix}/{o}" for o in outs], name=f"{prefix}/{outs[0]}", **kw)

    nodes = []
    src = x
    if pad:
        consts.append(c("pads", [0, 0, 0, 0, 0, 0, 0, pad], np.int64))
        nodes.append(n("Pad", ["@" + x, "pads"], ["padded"]))
        src = f"{prefix}/padded"
    nodes += [
        n("Reshape", ["@" + src, "blocked_shape"], ["blocks"]),  # (B, H, S, nb, 32)
        n("Abs", ["blocks"], ["abs"]),
        n("ReduceMax", ["abs"], ["amax"], axes=[-1], keepdims=1),  # (B, H, S, nb, 1)
        n("Max", ["amax", "tiny"], ["amax_safe"]),
        n("Log", ["amax_safe"], ["ln"]),
        n("Mul", ["ln", "inv_ln2"], ["log2"]),
        n("Floor", ["log2"], ["e0"]),
        n("Pow", ["two", "e0"], ["p0"]),
        n("Greater", ["p0", "amax_safe"], ["too_big"]),
        n("Cast", ["too_big"], ["too_big_f"], to=TensorProto.FLOAT),
        n("Sub", ["e0", "too_big_f"], ["e1"]),
        n("Add", ["e1", "one"], ["e1_next"]),
        n("Pow", ["two", "e1_next"], ["p1_next"]),
        n("LessOrEqual", ["p1_next", "amax_safe"], ["too_small"]),
        n("Cast", ["too_small"], ["too_small_f"], to=TensorProto.FLOAT),
        n("Add", ["e1", "too_small_f"], ["floor_log2"]),  # exact floor(log2(amax))
        n("Sub", ["floor_log2", "emax"], ["shared"]),
        n("Clip", ["shared", "emin_scale", "emax_scale"], ["shared_clipped"]),
        n("Pow", ["two", "shared_clipped"], ["scale"]),
        n("Div", ["blocks", "scale"], ["scaled"]),  # exact: a power of two
        n("Mul", ["scaled", "steps"], ["fixed"]),
        n("Round", ["fixed"], ["rounded"]),  # ties to even
        n("Clip", ["rounded", "qmin", "qmax"], ["clipped"]),  # saturate (symmetric)
        n("Div", ["clipped", "steps"], ["elements"]),
        n("Mul", ["elements", "scale"], ["decoded"]),
        # ReduceMax skips NaN in ONNX Runtime: find non-finite elements on their own.
        n("IsNaN", ["blocks"], ["is_nan"]),
        n("IsInf", ["blocks"], ["is_inf"]),
        n("Or", ["is_nan", "is_inf"], ["not_finite"]),
        n("Cast", ["not_finite"], ["not_finite_f"], to=TensorProto.FLOAT),
        n("ReduceMax", ["not_finite_f"], ["any_not_finite"], axes=[-1], keepdims=1),
        n("Greater", ["any_not_finite", "zero"], ["bad"]),
        n("Where", ["bad", "nan", "decoded"], ["decoded_or_nan"]),
        n("Reshape", ["decoded_or_nan", "flat_shape"], ["flat"]),
    ]
    last = f"{prefix}/flat"
    if pad:
        consts += [c("starts", [0], np.int64), c("ends", [dim], np.int64), c("axes", [3], np.int64)]
        nodes.append(n("Slice", ["flat", "starts", "ends", "axes"], ["unpadded"]))
        last = f"{prefix}/unpadded"
    nodes.append(helper.make_node("Identity", [last], [out], name=f"{prefix}/out"))
    return nodes, consts


def apply_mxint8(model: onnx.ModelProto, report: EmulationReport) -> None:
    graph = model.graph
    past = {i.name: i for i in graph.input if i.name.startswith(("past_key.", "past_value."))}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type in ("ScatterElements", "ScatterND") and node.input[0] in past:
            dims = past[node.input[0]].type.tensor_type.shape.dim
            if len(dims) != 4 or not dims[3].dim_value:
                raise QEffError(f"cannot emulate MXINT8 on {node.input[0]}: its head_dim is not static")
            prefix = f"{node.input[0]}/mxint8"
            quantized = _unique(graph, f"{prefix}/updates")
            nodes, consts = mx_fake_quant_nodes(node.input[2], quantized, dim=dims[3].dim_value, prefix=prefix)
            graph.initializer.extend(consts)
            new_nodes += nodes
            node.input[2] = quantized
            report.mxint8_cache_writes += 1
        new_nodes.append(node)
    if not report.mxint8_cache_writes:
        raise QEffError("no cache scatter found to emulate MXINT8 on (expected ScatterElements into past_key.*/past_value.*)")
    del graph.node[:]
    graph.node.extend(new_nodes)


# -- the tier ---------------------------------------------------------------------------------------


def emulate_model(model: onnx.ModelProto, tier: Tier) -> EmulationReport:
    """Apply ``tier``'s passes to ``model`` in place (weights loaded in memory)."""
    start = time.perf_counter()
    report = EmulationReport(tier=tier.name)
    if tier.mxfp6:
        apply_mxfp6(model, mx.FORMATS[f"fp6_{tier.fp6}"], report)
    if tier.fp16:
        apply_fp16(model, report)
    if tier.mxint8:
        apply_mxint8(model, report)
    from qeff.exporter import stamp_metadata

    stamp_metadata(model, {"qeff.precision_tier": tier.name, "qeff.emulated": "true"})
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def emulate_file(src: str | Path, out_dir: str | Path, tier: Tier) -> EmulationReport:
    """Load ``src`` (with its external data), emulate ``tier``, save ``out_dir/model.onnx`` (+ data)."""
    from qeff.exporter import DATA_FILE, EXTERNAL_THRESHOLD

    model = onnx.load(str(src))
    report = emulate_model(model, tier)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=EXTERNAL_THRESHOLD)
    return report


def build_tier(onnx_path: str | Path, tier: Tier, *, force: bool = False, progress: bool = False):
    """The emulated graph of ``tier`` as a cached artifact beside the exported graph
    (``<export dir>/tier-<name>/model.onnx``); fp32 is the exported graph itself. Returns the
    :class:`qeff.store.artifacts.Built` (its ``path`` is the directory)."""
    from qeff.store.artifacts import Built, build_artifact
    from qeff.compilers import onnx_identity
    from qeff.exporter import library_versions

    onnx_path = Path(onnx_path)
    if tier.is_fp32:
        return Built(onnx_path.parent, {}, reused=True, seconds=0.0, build_seconds=0.0)
    manifest = {"stage": "emulate", "tier": tier.name, "onnx": onnx_identity(onnx_path), "versions": library_versions()}

    def build(tmp: Path) -> dict:
        from qeff.progress import stage

        with stage(f"Emulating {tier.name} in the ONNX graph", enabled=progress):
            return emulate_file(onnx_path, tmp, tier).to_dict()

    def size_hint() -> int:
        """For the message if the disk fills up: the tier is a full copy of the graph's weights."""
        return sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + "*") if p.is_file())

    return build_artifact(onnx_path.parent / f"{TIER_DIR_PREFIX}{tier.slug}", manifest, build, required=("model.onnx",),
                          force=force, size_hint=size_hint)
