"""ONNX Runtime checked decoder layer by decoder layer, on sub-graphs of the exported graph.

:func:`qeff.verification.verify` runs the whole exported graph in one ONNX Runtime session: the
session holds every weight in fp32 (~27 GB for a 7B), more than the machine may have. This module
checks the same graph one part at a time, so that the peak holds about one decoder layer:

- the graph is read without its external data and its nodes are split (:func:`partition`) into a
  **prefix** (embedding, masks, rotary tables: everything that comes before layer 0 or that only
  depends on ``position_ids`` and shapes), one **layer** part per decoder layer (nodes in the scope
  ``/…/layers.N/…``, GPT-2's ``h.N``, MPT's ``blocks.N``), and a **suffix** (final norm, LM head);
- each part becomes a small ONNX model whose initializers keep their external-data entries
  (offset and length into the same ``model.onnx.data``), loaded from bytes with ONNX Runtime
  reading only that part's weights from the export's folder; one session lives at a time;
- a large initializer whose stored bytes are, byte for byte, a float32 tensor the PyTorch model
  already holds (the vocabulary table of the prefix's Gather and the tied head's Gemm: 1 GB for a
  1B) is handed to ONNX Runtime as that tensor (``SessionOptions.add_initializer``: ORT uses the
  caller's buffer instead of reading its own copy) — the same bytes, computed on, with no second
  copy; one that differs in any byte is read from the file as before, so a drifted export is
  still compared as exported;
- the transformed PyTorch model is driven teacher-forced over the schedule
  :func:`qeff.verification.session_trace` uses (one right-padded batch, prefill chunks of
  ``prompt_len``, then each reference token), with forward hooks keeping each decoder layer's input
  and output; the slots each step changes in its cache are kept too (spilled to a temporary
  folder, deleted at the end) and replayed per layer;
- each layer's part runs on the PyTorch layer's input, the prefix's outputs (run in ONNX Runtime
  on the step's real graph inputs) and the layer's PyTorch cache before the step, and its hidden
  output and its retained cache are compared with PyTorch's; the suffix runs on PyTorch's last
  hidden state and its logits (and the layers' last retained caches) make the
  :class:`~qeff.verification.Comparison`, so the end-to-end measures apply unchanged.

What this proves and what it does not is in docs/verification.md ("Per-layer check"): each layer
is checked on PyTorch's inputs, so an error that only grows through the graph's own propagation
(each layer within tolerance, the sum of them not) is seen only in the suffix's logits, which are
computed on PyTorch's final hidden state too.

Hooks read only the layers' arguments and outputs, never their parameters: a model whose layers
materialize their weights in a forward pre-hook and drop them after (layer-streamed verification)
is driven the same way.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qeff.divergence import LAYER_RTOL, FirstDivergence, decoder_layers, layer_output_names
from qeff.errors import UnsupportedModelError, UsageError
from qeff.generation import prefill_chunks
from qeff.store.scratch import ScratchDir
from qeff.verification import Comparison, Tolerances, Trace, compare

if TYPE_CHECKING:
    import onnx
    import onnxruntime

    from qeff.transforms import QEffCausalLM

__all__ = ["Part", "Partition", "partition", "check_layers", "LayerStat", "resident_tensors"]

_SCOPE = re.compile(r"^/(?:[^/]+/)*?([^/.]+)\.(\d+)/")
#: Ops whose output depends on their input's shape only, not its values: a Shape of a layer's cache
#: input is a position-only tensor (the tracer shares such tensors between layers).
_SHAPE_OPS = frozenset({"Shape", "Size"})


# --- the partition ---------------------------------------------------------------------------------


@dataclass
class Part:
    """One sub-graph: its nodes (in the graph's order), the tensors it is fed, those it hands out,
    and the initializers it reads (by name, their data still in the external file)."""

    name: str  # "prefix", "layer 3", "suffix"
    layer: int | None
    nodes: list = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    initializers: list[str] = field(default_factory=list)


@dataclass
class Partition:
    """The exported graph split into a prefix, one part per decoder layer and a suffix.

    ``hidden_in[i]``/``hidden_out[i]`` are the graph tensors that are layer ``i``'s input and output
    hidden states (``hidden_in[i] == hidden_out[i - 1]`` for ``i > 0``; ``hidden_in[0]`` is the
    prefix's embedding)."""

    model: onnx.ModelProto  # the whole graph, without its external data
    directory: Path  # where the external data files are
    scope: str  # the layer list's name in the node scopes: "layers", "h", "blocks"
    prefix: Part
    layers: list[Part]
    suffix: Part
    hidden_in: list[str]
    hidden_out: list[str]
    types: dict[str, int]  # tensor -> onnx element type (graph inputs, outputs and inferred)
    #: initializer name -> whether its stored bytes equal the in-memory tensor offered for it (a cache:
    #: each comparison reads the whole tensor from the data file)
    matches: dict[str, bool] = field(default_factory=dict)
    #: initializers ONNX Runtime took from memory instead of the file, in the order sessions took them
    shared: list[str] = field(default_factory=list)
    #: what :meth:`session` offers by default (name -> a float32 array this process holds)
    resident: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def weight_bytes(self, part: Part) -> int:
        """The bytes of ``part``'s initializers (external or inline)."""
        inits = {t.name: t for t in self.model.graph.initializer}
        return sum(_tensor_bytes(inits[name]) for name in part.initializers)

    def submodel(self, part: Part) -> onnx.ModelProto:
        """``part`` as a model of its own; its initializers still point into the external data file."""
        import onnx
        from onnx import helper

        graph = self.model.graph
        inits = {t.name: t for t in graph.initializer}

        def info(name: str):
            return helper.make_tensor_value_info(name, self.types.get(name, onnx.TensorProto.FLOAT), None)

        sub = helper.make_graph(
            part.nodes, f"{graph.name}-{part.name.replace(' ', '')}",
            [info(n) for n in part.inputs], [info(n) for n in part.outputs],
            initializer=[inits[n] for n in part.initializers],
        )
        model = helper.make_model(sub, opset_imports=list(self.model.opset_import), producer_name="qeff.layer_check")
        model.ir_version = self.model.ir_version
        return model

    def stored_equal(self, name: str, array: np.ndarray) -> bool:
        """Whether initializer ``name`` is stored in the external data file as exactly ``array``'s
        bytes (float32, the same shape, C order): read 16 MB at a time, nothing mapped or kept."""
        if name in self.matches:
            return self.matches[name]
        import onnx

        tensor = next((t for t in self.model.graph.initializer if t.name == name), None)
        info = {e.key: e.value for e in tensor.external_data} if tensor is not None else {}
        same = (tensor is not None and tensor.data_location == onnx.TensorProto.EXTERNAL
                and tensor.data_type == onnx.TensorProto.FLOAT and array.dtype == np.float32
                and array.flags.c_contiguous and tuple(tensor.dims) == array.shape
                and int(info.get("length", array.nbytes)) == array.nbytes and "location" in info)
        if same:
            flat = array.reshape(-1).view(np.uint8)
            chunk = np.empty(min(16 << 20, flat.size), np.uint8)
            with open(self.directory / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                done = 0
                while same and done < flat.size:
                    n = f.readinto(memoryview(chunk)[: min(chunk.size, flat.size - done)])
                    same = n > 0 and np.array_equal(chunk[:n], flat[done: done + n])
                    done += n
        self.matches[name] = same
        return same

    def session(self, part: Part, *, threads: int | None = None,
                resident: dict[str, np.ndarray] | None = None) -> onnxruntime.InferenceSession:
        """An ONNX Runtime session of ``part`` alone: it reads only that part's weights from the
        external data file (by offset; nothing is written). Prepacking is off: packed copies of
        the weight matrices would double what the session holds. An initializer of ``resident``
        (name -> a float32 array this process holds; default :attr:`resident`) whose stored bytes
        are the array's (:meth:`stored_equal`) is taken from the array, without a copy; the session
        keeps it alive."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.directory))
        opts.add_session_config_entry("session.disable_prepacking", "1")
        kept = []
        resident = self.resident if resident is None else resident
        for name in part.initializers:
            array = resident.get(name)
            if array is not None and self.stored_equal(name, array):
                value = ort.OrtValue.ortvalue_from_numpy(array)  # CPU: wraps the array's buffer
                opts.add_initializer(name, value)
                kept.append(value)
                self.shared.append(name)
        session = ort.InferenceSession(self.submodel(part).SerializeToString(), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        session._qeff_initializers = kept  # each OrtValue holds its array: they outlive the session
        return session


def _tensor_bytes(tensor) -> int:
    from onnx import TensorProto, helper

    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.data_location != TensorProto.EXTERNAL and tensor.raw_data:
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def _types(model) -> dict[str, int]:
    from onnx import shape_inference

    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    try:
        inferred = shape_inference.infer_shapes(model).graph
        types.update({v.name: v.type.tensor_type.elem_type for v in inferred.value_info if v.type.tensor_type.elem_type})
    except Exception:  # noqa: BLE001 - a graph shape inference cannot read: float is the default
        pass
    return types


def partition(model_path: str | os.PathLike) -> Partition:
    """Split the exported graph at ``model_path`` (read without its external data).

    Rules, for any architecture whose exporter scopes nodes by module path:

    - *static* nodes (no graph input upstream: constants, an ``Identity`` aliasing a shared
      initializer) are copied into every part that needs them;
    - *position-only* nodes (upstream of them only ``position_ids``, initializers, and the shapes
      of other inputs) go to the prefix wherever their scope is: the tracer computes the rotary
      tables or the cache's length once inside layer 0 and shares them with later layers;
    - the other nodes go to the layer of their scope; an unscoped one goes to the suffix when it
      depends on a layer's output, else to the prefix.

    A layer may then take from other layers only the previous layer's output (its hidden state):
    anything else is refused with :class:`~qeff.errors.UnsupportedModelError` (one sentence)."""
    source = Path(model_path)
    if not source.is_file():
        raise UsageError(f"{source}: no exported graph there")
    try:
        return _partition(source)
    except LookupError as exc:
        raise UnsupportedModelError(f"{source}: this graph cannot be checked layer by layer ({exc})") from None


def _partition(source: Path) -> Partition:
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in inits]

    containers: dict[str, int] = {}
    matches = [_SCOPE.match(node.name) for node in graph.node]
    for m in matches:
        if m:
            containers[m.group(1)] = containers.get(m.group(1), 0) + 1
    if not containers:
        raise LookupError("no node of the graph carries a layer scope (/…/layers.N/…)")
    scope = max(containers, key=containers.get)
    layer_of = [int(m.group(2)) if m and m.group(1) == scope else None for m in matches]
    num_layers = max(i for i in layer_of if i is not None) + 1

    hidden_out = layer_output_names(model)
    # Per tensor: does its value depend on a graph input (dynamic), on input_ids or the cache
    # values (data), on a layer's data-dependent node (after a layer)?
    dynamic = set(graph_inputs)
    data = {n for n in graph_inputs if n == "input_ids" or n.startswith("past_")}
    # Position-only tensors the prefix can compute: graph inputs and what position nodes make.
    computable = set(graph_inputs) | inits
    producer: dict[str, int] = {}
    kind: list[str] = []  # per node: "static", "position", "data"
    for n, node in enumerate(graph.node):
        ins = [t for t in node.input if t]
        is_dynamic = any(t in dynamic for t in ins)
        is_data = node.op_type not in _SHAPE_OPS and any(t in data for t in ins)
        # A Shape of a tensor inside a layer is position-only in value, but the prefix cannot compute it.
        is_position = is_dynamic and not is_data and all(t in computable for t in ins)
        kind.append("position" if is_position else "data" if is_dynamic else "static")
        for out in node.output:
            producer[out] = n
            if is_dynamic:
                dynamic.add(out)
            if is_data:
                data.add(out)
            if not is_dynamic or is_position:
                computable.add(out)

    # Where each non-static node goes: -1 prefix, i a layer, num_layers the suffix.
    SUFFIX = num_layers
    home: list[int | None] = [None] * len(graph.node)
    after_layer: set[str] = set()
    for n, node in enumerate(graph.node):
        if kind[n] == "static":
            continue
        if kind[n] == "position":
            home[n] = -1
        elif layer_of[n] is not None:
            home[n] = layer_of[n]
            after_layer.update(node.output)
        elif any(t in after_layer for t in node.input):
            home[n] = SUFFIX
            after_layer.update(node.output)
        else:
            home[n] = -1

    parts = [Part("prefix", None)] + [Part(f"layer {i}", i) for i in range(num_layers)] + [Part("suffix", None)]

    # Static nodes each part needs, copied in (their whole static cone).
    static_needed: list[set[int]] = [set() for _ in parts]
    for n, node in enumerate(graph.node):
        if home[n] is None:
            continue
        stack = [producer[t] for t in node.input if t in producer and home[producer[t]] is None]
        needed = static_needed[home[n] + 1]
        while stack:
            s = stack.pop()
            if s in needed:
                continue
            needed.add(s)
            stack.extend(producer[t] for t in graph.node[s].input if t in producer and home[producer[t]] is None)
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, set[int]] = {}
    for n, node in enumerate(graph.node):
        if home[n] is not None:
            for t in node.input:
                if t:
                    consumers.setdefault(t, set()).add(home[n])
    for index, part in enumerate(parts):
        members = [n for n in range(len(graph.node)) if n in static_needed[index] or home[n] == index - 1]
        part.nodes = [graph.node[n] for n in members]
        made = {o for n in members for o in graph.node[n].output}
        read = []
        for n in members:
            for t in graph.node[n].input:
                if t and t not in made and t not in read:
                    read.append(t)
        part.initializers = [t for t in read if t in inits]
        part.inputs = [t for t in read if t not in inits]
        part.outputs = [t for n in members if home[n] == index - 1 for t in graph.node[n].output
                        if t in graph_outputs or (consumers.get(t, set()) - {index - 1})]

    layers = parts[1:-1]
    prefix_out = set(parts[0].outputs)
    hidden_in = []
    for i, part in enumerate(layers):
        foreign = [t for t in part.inputs if t not in prefix_out and t not in graph_inputs]
        if i == 0:
            candidates = [t for t in part.inputs if t in prefix_out and t in data]
            if len(candidates) != 1:
                raise LookupError(f"layer 0 takes {len(candidates)} data tensors from the prefix ({candidates[:4]}), not one hidden state")
            hidden_in.append(candidates[0])
            expected = []
        else:
            hidden_in.append(hidden_out[i - 1])
            expected = [hidden_out[i - 1]]
        if foreign != expected:
            raise LookupError(f"layer {i} takes {foreign[:4]} from other layers, not only the hidden state {expected}")
        if hidden_out[i] not in part.outputs:
            raise LookupError(f"layer {i}'s output {hidden_out[i]} is not produced in its scope")
    suffix = parts[-1]
    foreign = [t for t in suffix.inputs if t not in prefix_out and t not in graph_inputs]
    if foreign != [hidden_out[-1]]:
        raise LookupError(f"the suffix takes {foreign[:4]} from the layers, not only the last hidden state")
    return Partition(model=model, directory=source.parent.resolve(), scope=scope, prefix=parts[0], layers=layers,
                     suffix=suffix, hidden_in=hidden_in, hidden_out=hidden_out, types=_types(model))


# --- the PyTorch side ------------------------------------------------------------------------------


class _Spill:
    """Arrays kept in a temporary folder (deleted on close) and read back memory-mapped: the
    caches of every step of a big model do not stay in memory."""

    def __init__(self):
        self._scratch = ScratchDir("qeff-layer-check-")  # locked: a killed run's is reclaimed (qeff.store.scratch)
        self.dir = self._scratch.path
        self._count = 0

    def put(self, array) -> Path:
        path = self.dir / f"{self._count}.npy"
        self._count += 1
        np.save(path, np.ascontiguousarray(array))
        return path

    @staticmethod
    def get(path: Path) -> np.ndarray:
        return np.load(path, mmap_mode="r")

    def close(self) -> None:
        self._scratch.close()


@dataclass
class _Step:
    """One step of the schedule and what PyTorch did in it (arrays spilled, by path)."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    changes: list[tuple[Path, Path] | None]  # per cache tensor: (slots, their values after the step), None: unchanged
    hidden_in: list[Path]  # per layer, its input (B, S, H)
    hidden_out: list[Path]  # per layer, its output (B, S, H)
    logits: np.ndarray  # (B, V)


def _schedule(prompts: Sequence[Sequence[int]], tokens: Sequence[Sequence[int]], batch: int, prompt_len: int):
    """(input_ids, position_ids, rows whose logits this step gives) of each step, as
    :func:`qeff.verification.session_trace` drives a session."""
    n_rows = len(prompts)
    lengths = [len(p) for p in prompts]
    for ids, pos, ends in prefill_chunks(prompts, batch, prompt_len):
        yield ids, pos, [int(r) for r in np.flatnonzero(ends[:n_rows])]
    for t in range(1, len(tokens[0])):
        ids = np.zeros((batch, 1), dtype=np.int64)
        pos = np.full((batch, 1), -1, dtype=np.int64)
        for r in range(n_rows):
            ids[r, 0] = tokens[r][t - 1]
            pos[r, 0] = lengths[r] + t - 1
        yield ids, pos, list(range(n_rows))


def _change(before: np.ndarray, after: np.ndarray, spill: _Spill) -> tuple[Path, Path] | None:
    """The slots a step changed in one (B, heads, ctx_len, head_dim) cache tensor, and their new
    values: whatever the step wrote (a valid token's keys, or a pad's write anywhere), found by
    comparison, not assumed. Only these are kept: a whole cache per step of a 7B at ctx_len 2048
    would take 64 GB of disk over 32 steps."""
    slots = np.flatnonzero((before != after).any(axis=(0, 1, 3)))
    if not slots.size:
        return None
    return spill.put(slots), spill.put(after[:, :, slots, :])


class _Replay:
    """Some cache tensors (by index: 2i key, 2i + 1 value of layer i) replayed from empty through
    the steps' changes: ``current`` is PyTorch's cache before the next step, then after it."""

    def __init__(self, steps: list[_Step], shapes: Sequence[tuple[int, ...]], indices: Sequence[int]):
        self.steps = steps
        self.current = {i: np.zeros(shapes[i], np.float32) for i in indices}

    def advance(self, k: int) -> None:
        for i, array in self.current.items():
            change = self.steps[k].changes[i]
            if change is not None:
                slots, values = (_Spill.get(p) for p in change)
                array[:, :, np.asarray(slots), :] = values


def _cache_indices(layer: int) -> tuple[int, int]:
    """The cache tensors of ``layer`` in the graph's order (its key, its value)."""
    return 2 * layer, 2 * layer + 1


def _torch_steps(qmodel, schedule, batch: int, ctx_len: int, spill: _Spill) -> tuple[list[_Step], list[tuple[int, ...]]]:
    """PyTorch over the schedule: each step's layer inputs and outputs, cache changes and logits;
    and the cache tensors' shapes."""
    import torch

    _, layers = decoder_layers(qmodel.model, qmodel.spec.decoder(qmodel.model))
    n = len(layers)
    seen_in: list = [None] * n
    seen_out: list = [None] * n

    def keep_in(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen_in[i] = hidden.detach().float().clone()

        return hook

    def keep_out(i):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            seen_out[i] = out.detach().float().clone()

        return hook

    handles = [layer.register_forward_pre_hook(keep_in(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(keep_out(i)) for i, layer in enumerate(layers)]
    cache = qmodel.empty_cache(batch, ctx_len)
    shapes = [tuple(c.shape) for c in cache]
    steps = []
    try:
        for ids, pos, _ in schedule:
            seen_in[:] = [None] * n
            seen_out[:] = [None] * n
            with torch.no_grad():
                out = qmodel(torch.from_numpy(ids), torch.from_numpy(pos), *cache)
            if any(h is None for h in (*seen_in, *seen_out)):
                raise LookupError("a decoder layer did not run (its hooks saw nothing)")
            changes = [_change(before.numpy(), after.numpy(), spill) for before, after in zip(cache, out[1:])]
            cache = list(out[1:])
            steps.append(_Step(ids, pos, changes, [spill.put(h.numpy()) for h in seen_in],
                               [spill.put(h.numpy()) for h in seen_out], out[0][:, 0, :].float().numpy().copy()))
    finally:
        for h in handles:
            h.remove()
    return steps, shapes


# --- comparing -------------------------------------------------------------------------------------


@dataclass
class LayerStat:
    """The worst difference of one layer's hidden output over the steps (PyTorch vs its part)."""

    layer: int
    hidden_max_abs: float = 0.0
    hidden_relative: float = 0.0
    cache_max_abs: float = 0.0
    cache_mse: float = 0.0
    seconds: float = 0.0  # building its session and running every step


def _hidden_diff(ref: np.ndarray, got: np.ndarray, valid: np.ndarray) -> tuple[float, float, float]:
    """(max-abs, its scale, relative) over the valid tokens of one row; relative per token, as
    :func:`qeff.divergence.locate` measures layers (one token's massive activations must not hide
    the others)."""
    a = np.asarray(ref, np.float64)[valid]
    b = np.asarray(got, np.float64)[valid]
    if a.shape != b.shape:
        return float("inf"), 0.0, float("inf")
    if not a.size:
        return 0.0, 0.0, 0.0
    d = np.abs(a - b).max(axis=-1)
    scale = np.maximum(np.abs(a).max(axis=-1), 1e-30)
    return float(d.max()), float(np.abs(a).max()), float((d / scale).max())


def _cache_diff(ref: np.ndarray, got: np.ndarray, n_slots: int) -> tuple[np.ndarray, float]:
    """(max-abs per slot, MSE) of one row's (heads, slots, head_dim) cache over its written slots."""
    d = np.asarray(ref[:, :n_slots, :], np.float64) - np.asarray(got[:, :n_slots, :], np.float64)
    if not d.size:
        return np.zeros(0), 0.0
    return np.abs(d).max(axis=(0, 2)), float((d * d).mean())


def _when(step: int) -> str:
    return "step 0 (prefill)" if step == 0 else f"step {step} (decode)"


@dataclass
class _Hit:
    """A difference over tolerance at one (step, row): sorted by step, row, then place."""

    step: int
    row: int
    order: int  # -1 the prefix, i a layer, num_layers the suffix
    measure: str
    value: float
    bound: float
    layer: int | None
    where: str


def check_layers(
    onnx_path: str | os.PathLike,
    qmodel: QEffCausalLM,
    prompts: Sequence[Sequence[int]],
    tokens: Sequence[Sequence[int]],
    *,
    prompt_len: int,
    ctx_len: int,
    batch_size: int | None = None,
    tolerances: Tolerances | None = None,
    layer_rtol: float = LAYER_RTOL,
    threads: int | None = None,
    candidate: str = "ort",
    stats: list[LayerStat] | None = None,
    traces: list[Trace] | None = None,
    progress: bool = False,
) -> Comparison:
    """Transformed PyTorch vs the exported graph at ``onnx_path``, one decoder layer's sub-graph
    at a time (see the module docstring): a :class:`~qeff.verification.Comparison` named
    ``pytorch_vs_<candidate>`` whose failures name the layer ("layer 3: hidden max-abs … at step 0
    (prefill), row 1") and whose ``first_divergence`` is filled when it fails.

    ``tokens[r]`` are the reference's greedy tokens of row ``r`` (one per step; all but the last
    are fed). ``stats``, when given, receives one :class:`LayerStat` per layer; ``traces`` the two
    :class:`~qeff.verification.Trace` s compared (PyTorch's, then the parts')."""
    prompts = [list(map(int, p)) for p in prompts]
    tokens = [list(map(int, t)) for t in tokens]
    if not prompts or any(not p for p in prompts):
        raise UsageError("check_layers() needs at least one non-empty prompt")
    if len(tokens) != len(prompts) or not tokens[0] or any(len(t) != len(tokens[0]) for t in tokens):
        raise UsageError("check_layers() needs the same number (at least one) of reference tokens for every prompt")
    batch = batch_size or len(prompts)
    if batch < len(prompts):
        raise UsageError(f"{len(prompts)} prompts do not fit batch_size={batch}")
    if max(len(p) for p in prompts) + len(tokens[0]) - 1 > ctx_len:
        raise UsageError(f"the prompts plus {len(tokens[0])} steps do not fit ctx_len={ctx_len}")
    tol = tolerances or Tolerances()
    from qeff.progress import stage

    with stage("Checking ONNX Runtime one decoder layer at a time", enabled=progress):
        return _check_layers(onnx_path, qmodel, prompts, tokens, batch, prompt_len, ctx_len, tol, layer_rtol, threads,
                             candidate, stats, traces)


#: Below this many bytes an initializer is read from the file even when PyTorch holds it: comparing
#: the stored bytes costs more than the copy saves.
RESIDENT_MIN_BYTES = 1 << 20


def resident_tensors(qmodel) -> dict[str, np.ndarray]:
    """The float32 parameters ``qmodel`` holds in memory now (not a streamed layer's meta ones),
    by their names in the exported graph (the wrapper's ``named_parameters``), as arrays that
    share their memory: what a part's session may take instead of reading its own copy."""
    import torch

    out = {}
    for name, p in qmodel.named_parameters(remove_duplicate=False):
        if (p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
                and p.numel() * 4 >= RESIDENT_MIN_BYTES):
            out[name] = p.detach().numpy()
    return out


def _check_layers(onnx_path, qmodel, prompts, tokens, batch, prompt_len, ctx_len, tol, layer_rtol, threads, candidate,
                  stats, traces) -> Comparison:
    part = partition(onnx_path)
    part.resident = resident_tensors(qmodel)
    n_rows = len(prompts)
    schedule = list(_schedule(prompts, tokens, batch, prompt_len))
    spill = _Spill()
    try:
        steps, shapes = _torch_steps(qmodel, schedule, batch, ctx_len, spill)
        tables = getattr(getattr(qmodel, "offload", None), "tables", None)
        if tables is not None:  # layer-streamed: the last layer's spare tensors are not needed by the sub-graphs
            tables.release_spares()
        return _check(part, steps, schedule, prompts, tokens, n_rows, tol, layer_rtol, threads, candidate, spill,
                      stats if stats is not None else [], traces if traces is not None else [],
                      shapes)
    finally:
        spill.close()


def _feeds(part: Part, step: _Step, prefix_out: dict[str, np.ndarray], past: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """What ``part`` reads: the prefix's outputs, the step's graph inputs, the cache tensors
    ``past`` holds (by index) before the step."""
    feeds = {}
    for name in part.inputs:
        if name in prefix_out:
            feeds[name] = prefix_out[name]
        elif name == "input_ids":
            feeds[name] = step.input_ids
        elif name == "position_ids":
            feeds[name] = step.position_ids
        elif name.startswith("past_"):
            kind, index = name.split(".")
            feeds[name] = past[2 * int(index) + (kind == "past_value")]
    return feeds


def _past_read(part: Part) -> list[int]:
    """The cache tensors (by index) ``part`` reads as graph inputs."""
    out = []
    for name in part.inputs:
        if name.startswith(("past_key.", "past_value.")):
            kind, index = name.split(".")
            out.append(2 * int(index) + (kind == "past_value"))
    return out


def _check(part: Partition, steps: list[_Step], schedule, prompts, tokens, n_rows, tol, layer_rtol, threads, candidate,
           spill: _Spill, stats: list[LayerStat], traces: list[Trace], cache_shape: list[tuple[int, ...]]) -> Comparison:
    num_layers = part.num_layers
    hits: list[_Hit] = []
    per_layer: dict[tuple[int, int], list[dict]] = {}  # (step index, row) -> per-layer hidden entries
    written = np.zeros(n_rows, dtype=np.int64)
    written_after: list[np.ndarray] = []
    for s in steps:
        for r in range(n_rows):
            valid = s.position_ids[r] >= 0
            if valid.any():
                written[r] = max(written[r], int(s.position_ids[r][valid].max()) + 1)
        written_after.append(written.copy())
    # Step index in the schedule -> the comparison's step (0 for every prefill chunk).
    n_prefill = len(steps) - (len(tokens[0]) - 1)
    step_no = [0 if k < n_prefill else k - n_prefill + 1 for k in range(len(steps))]

    # The prefix, on each step's real graph inputs: its outputs are fed to every later part.
    prefix_dir = []
    session = part.session(part.prefix, threads=threads)
    replay = _Replay(steps, cache_shape, _past_read(part.prefix))
    for k, s in enumerate(steps):
        outs = session.run(part.prefix.outputs, _feeds(part.prefix, s, {}, replay.current))
        replay.advance(k)
        named = dict(zip(part.prefix.outputs, outs))
        prefix_dir.append({name: spill.put(value) for name, value in named.items()})
        embedded = named[part.hidden_in[0]]
        ref_in = _Spill.get(s.hidden_in[0])
        for r in range(n_rows):
            max_abs, _, relative = _hidden_diff(ref_in[r], embedded[r], s.position_ids[r] >= 0)
            if not relative <= layer_rtol:
                hits.append(_Hit(step_no[k], r, -1, "embedding max-abs (relative)", relative, layer_rtol, None,
                                 "before the first decoder layer (the embedding)"))
    del session

    def prefix_outputs(k: int, names) -> dict[str, np.ndarray]:
        return {n: np.asarray(_Spill.get(prefix_dir[k][n])) for n in names if n in prefix_dir[k]}

    written = written_after[-1]
    ref_cache: list[list[np.ndarray]] = [[] for _ in range(n_rows)]  # per row, its written slots
    got_cache: list[list[np.ndarray]] = [[] for _ in range(n_rows)]
    for i, layer in enumerate(part.layers):
        stat = LayerStat(i)
        start = time.perf_counter()
        session = part.session(layer, threads=threads)
        retained_names = [f"past_key.{i}_RetainedState", f"past_value.{i}_RetainedState"]
        outputs = [part.hidden_out[i], *retained_names]
        missing = [n for n in retained_names if n not in layer.outputs]
        if missing:
            raise LookupError(f"layer {i}'s sub-graph does not produce {missing}")
        own = _cache_indices(i)
        replay = _Replay(steps, cache_shape, sorted({*own, *_past_read(layer)}))
        for k, s in enumerate(steps):
            feeds = _feeds(layer, s, prefix_outputs(k, layer.inputs), replay.current)
            for name, index in zip((f"past_key.{i}", f"past_value.{i}"), own):
                if name in feeds:
                    feeds[name] = replay.current[index]
            feeds[part.hidden_in[i]] = np.asarray(_Spill.get(s.hidden_in[i]))
            hidden, key, value = session.run(outputs, feeds)
            replay.advance(k)  # PyTorch's cache after the step
            ref_out = _Spill.get(s.hidden_out[i])
            for r in range(n_rows):
                max_abs, scale, relative = _hidden_diff(ref_out[r], hidden[r], s.position_ids[r] >= 0)
                stat.hidden_max_abs = max(stat.hidden_max_abs, max_abs)
                stat.hidden_relative = max(stat.hidden_relative, relative)
                finite = ref_out[r].shape == hidden[r].shape  # else None, as qeff.divergence records it (plain JSON)
                per_layer.setdefault((k, r), []).append({"layer": i, "max_abs": max_abs if finite else None, "scale": scale,
                                                         "relative": relative if finite else None})
                if not finite:
                    hits.append(_Hit(step_no[k], r, i, "layer output shape (hidden size)", float(hidden.shape[-1]),
                                     float(ref_out.shape[-1]), i, f"layer {i} of {num_layers} ({part.scope}.{i})"))
                elif not relative <= layer_rtol:
                    hits.append(_Hit(step_no[k], r, i, "layer output max-abs (relative)", relative, layer_rtol, i,
                                     f"layer {i} of {num_layers} ({part.scope}.{i})"))
                for j, got in enumerate((key, value)):
                    ref = replay.current[own[j]]
                    if ref.shape[1:] != got.shape[1:]:
                        hits.append(_Hit(step_no[k], r, i, f"cache shape ({'past_key' if j == 0 else 'past_value'}.{i})",
                                         float(got.shape[1]), float(ref.shape[1]), i, f"layer {i} of {num_layers} (its cache)"))
                        continue
                    per_slot, mse = _cache_diff(ref[r], got[r], int(written_after[k][r]))
                    if not per_slot.size:
                        continue
                    stat.cache_max_abs = max(stat.cache_max_abs, float(per_slot.max()))
                    stat.cache_mse = max(stat.cache_mse, mse)
                    name = f"{'past_key' if j == 0 else 'past_value'}.{i}"
                    over = np.flatnonzero(~(per_slot <= tol.cache_max_abs))
                    if over.size:
                        hits.append(_Hit(step_no[k], r, i, f"cache max-abs (slot {int(over[0])} of {name})",
                                         float(per_slot[over[0]]), tol.cache_max_abs, i, f"layer {i} of {num_layers} (its cache)"))
                    elif not mse <= tol.cache_mse:
                        hits.append(_Hit(step_no[k], r, i, f"cache MSE ({name})", mse, tol.cache_mse, i,
                                         f"layer {i} of {num_layers} (its cache)"))
            if k == len(steps) - 1:
                for r in range(n_rows):
                    ref_cache[r] += [replay.current[own[j]][r, :, : written[r], :].copy() for j in (0, 1)]
                    got_cache[r] += [c[r, :, : written[r], :].copy() for c in (key, value)]
        del session
        stat.seconds = time.perf_counter() - start
        stats.append(stat)

    # The suffix on PyTorch's last hidden state: the logits of the comparison.
    session = part.session(part.suffix, threads=threads)
    logit_rows: list[list[np.ndarray]] = [[] for _ in range(n_rows)]
    ref_rows: list[list[np.ndarray]] = [[] for _ in range(n_rows)]
    replay = _Replay(steps, cache_shape, _past_read(part.suffix))
    for k, (s, (_, _, rows)) in enumerate(zip(steps, schedule)):
        feeds = _feeds(part.suffix, s, prefix_outputs(k, part.suffix.inputs), replay.current)
        replay.advance(k)
        feeds[part.hidden_out[-1]] = np.asarray(_Spill.get(s.hidden_out[-1]))
        (logits,) = session.run(["logits"], feeds)
        for r in rows:
            logit_rows[r].append(logits[r, 0].astype(np.float32))
            ref_rows[r].append(s.logits[r])
    del session

    pt = Trace("pytorch", [np.stack(rows) for rows in ref_rows], ref_cache)
    ort = Trace(candidate, [np.stack(rows) for rows in logit_rows], got_cache)
    traces += [pt, ort]
    comparison = compare(pt, ort, tol)

    # Logits of each (step, row) the suffix computed: a difference there with every layer within
    # tolerance is the suffix's (final norm or LM head).
    for r in range(n_rows):
        for t, (a, b) in enumerate(zip(pt.logits[r], ort.logits[r])):
            d = a.astype(np.float64) - b.astype(np.float64)
            max_abs, mse = float(np.abs(d).max()), float((d * d).mean())
            if not max_abs <= tol.logits_max_abs:
                hits.append(_Hit(t, r, num_layers, "logits max-abs", max_abs, tol.logits_max_abs, None,
                                 "after the last decoder layer (final norm or LM head): no layer's output differs"))
            elif not mse <= tol.logits_mse:
                hits.append(_Hit(t, r, num_layers, "logits MSE", mse, tol.logits_mse, None,
                                 "after the last decoder layer (final norm or LM head): no layer's output differs"))

    named: dict[int, _Hit] = {}
    for hit in sorted(hits, key=lambda h: (h.step, h.row, h.order)):
        named.setdefault(hit.order, hit)
    layer_failures = [
        f"{'layer ' + str(h.order) if 0 <= h.order < num_layers else 'embedding' if h.order < 0 else 'final norm or LM head'}: "
        f"{h.measure} {h.value:.3g} > {h.bound:.3g} at {_when(h.step)}, row {h.row}"
        for h in sorted(named.values(), key=lambda h: h.order) if h.order < num_layers
    ]
    comparison.failures += layer_failures
    if comparison.failures:
        comparison.first_divergence = _first_divergence(hits, per_layer, step_no, steps, prompts, num_layers, layer_rtol)
    return comparison


def _first_divergence(hits, per_layer, step_no, steps, prompts, num_layers, layer_rtol) -> FirstDivergence | None:
    if not hits:
        return None
    first = min(hits, key=lambda h: (h.step, h.row, h.order))
    result = FirstDivergence(step=first.step, row=first.row, measure=first.measure, value=first.value, bound=first.bound,
                             num_layers=num_layers, layer=first.layer, where=first.where, layer_rtol=layer_rtol)
    length = len(prompts[first.row])
    result.positions = list(range(length)) if first.step == 0 else [length + first.step - 1]
    # The layers' differences at that step and row (over its prefill chunks: the worst of each layer).
    entries: dict[int, dict] = {}
    for k, no in enumerate(step_no):
        if no != first.step:
            continue
        for e in per_layer.get((k, first.row), []):
            if not (steps[k].position_ids[first.row] >= 0).any():
                continue
            old = entries.get(e["layer"])
            if old is None or e["relative"] is None or (old["relative"] is not None and e["relative"] > old["relative"]):
                entries[e["layer"]] = dict(e)
    result.layers = [entries[i] for i in sorted(entries)]
    return result
