"""Where two traces part: the first step, row and decoder layer of a failed comparison.

A failed :class:`~qeff.verification.Comparison` says *that* two models differ; this module says
*where*, so a failing port points at its cause:

1. **step and row** — the first teacher-forced step (0 = the prefill's last token), and within it
   the first row, whose logits are over a tolerance (max-abs or MSE) or whose greedy token differs
   beyond the near-tie margin. When every logit is within tolerance and only the cache is not, the
   first cache slot over tolerance names the step that wrote it and its layer directly.
2. **layer** — both models are replayed up to that step with each decoder layer's output exposed,
   and compared layer by layer on that row's tokens of that step (every prompt token for step 0,
   the one fed token after): the first layer whose output differs by more than ``layer_rtol`` of
   the reference's magnitude is named. A linear scan over one replay: every layer's output comes
   from the same run, so bisecting would save nothing. No layer over tolerance while the logits
   part means the cause is after the last layer (final norm or LM head).

How each side exposes its layers:

- HF eager (the untouched model): one forward over the row's whole sequence at batch 1, with
  forward hooks on the decoder's layer list;
- the transformed PyTorch model: a fresh replay of the same padded, chunked batch schedule the
  comparison drove, with the same hooks on the wrapper's copy;
- ONNX Runtime: a debug copy of the session's graph with each layer's output added as a graph
  output. The exporter names nodes by module scope (``/model/layers.3/…``, GPT-2's
  ``/transformer/h.3/…``, MPT's ``/transformer/blocks.3/…``); layer ``N``'s output is the float
  tensor produced in scope ``N`` that scope ``N + 1`` (or, after the last layer, a node outside
  every layer: the final norm) consumes and that depends on ``input_ids``: the tracer shares
  position-only tensors (rotary cos/sin) across layers, and those must not be taken for the
  residual stream. When several remain (fusions in an optimized graph leave unscoped nodes), the
  one produced last is the layer's output (the others feed it). ``tests/test_divergence.py``
  checks these tensors equal the PyTorch layers' outputs for every supported architecture.

All of this runs only when a comparison has already failed: success costs nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from qeff.store.serialization import from_dict, to_dict

if TYPE_CHECKING:  # torch is imported where a model runs: reading a report needs none of it
    import torch
    from torch import nn

__all__ = [
    "FirstDivergence",
    "LayerProbe",
    "HfLayers",
    "ReplayLayers",
    "TorchStepper",
    "OrtStepper",
    "session_stepper",
    "first_parting",
    "locate",
    "decoder_layers",
    "layer_output_names",
    "describe",
    "LAYER_RTOL",
]

#: A layer's output "differs" when, on some token, its max-abs difference exceeds this fraction of
#: the reference output's max-abs on that token. fp32 noise measured (max over tokens and layers):
#: <= 8e-7 on the tiny 2-layer models; 1.6e-6 (HF vs PyTorch) and 6.8e-6 (PyTorch vs ORT) on
#: SmolLM2-135M's 30 layers (two prompts, prefill and decode steps); the seeded faults of
#: tests/faults.py give 1e-2 and more.
LAYER_RTOL = 1e-4


@dataclass
class FirstDivergence:
    """Where a failed comparison's traces first part. ``layer`` is None when no decoder layer's
    output differs (``where`` then says what is left: the final norm and LM head) or when the
    layers could not be compared (``note`` says why)."""

    step: int
    row: int
    measure: str  # what parted first at (step, row): "logits max-abs", "logits MSE", "greedy token", "cache …"
    value: float
    bound: float
    num_layers: int
    layer: int | None = None
    where: str = ""  # e.g. "layer 1 of 2 (layers.1)" or "after the last decoder layer (final norm or LM head)"
    positions: list[int] = field(default_factory=list)  # the row's positions compared at that step
    layers: list[dict] = field(default_factory=list)  # per layer: {"layer", "max_abs", "scale", "relative"} (None: shapes differ)
    layer_rtol: float = LAYER_RTOL
    note: str = ""

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FirstDivergence:
        return from_dict(cls, data)

    def describe(self) -> str:
        return describe(self.to_dict())


def describe(data: dict | None) -> str:
    """One sentence from a :class:`FirstDivergence` or its ``to_dict()`` (reports keep dicts)."""
    if not data:
        return ""
    step = data["step"]
    when = "step 0 (prefill)" if step == 0 else f"step {step} (decode)"
    if data["measure"].startswith("cache shape"):
        parted = f"{data['measure']}: {data['value']:.0f} where the reference has {data['bound']:.0f}"
    elif data["measure"].startswith("greedy token"):
        parted = f"{data['measure']} {data['value']:.3g} >= {data['bound']:.3g}"
    else:
        parted = f"{data['measure']} {data['value']:.3g} > {data['bound']:.3g}"
    text = f"first divergence at {when}, row {data['row']}: {parted}; " + (data.get("where") or "layer unknown")
    layer, layers = data.get("layer"), data.get("layers") or []
    if layer is not None and layer < len(layers) and layers[layer]["relative"] is not None:
        entry = layers[layer]
        text += f", its output differs by max-abs {entry['max_abs']:.3g} ({entry['relative']:.2g} of its scale)"
    if data.get("note"):
        text += f" ({data['note']})"
    return text


# --- step and row ----------------------------------------------------------------------------------


def first_parting(ref, cand, tol, prompt_lengths: Sequence[int]) -> tuple[int, int, str, float, float, int | None] | None:
    """(step, row, measure, value, bound, cache layer or None) of the first parting of two
    :class:`~qeff.verification.Trace` s, in step order then row order; None if nothing is over."""
    steps = ref.logits[0].shape[0]
    for t in range(steps):
        for r, (a, b) in enumerate(zip(ref.logits, cand.logits)):
            d = a[t].astype(np.float64) - b[t].astype(np.float64)  # (V,)
            max_abs, mse = float(np.abs(d).max()), float((d * d).mean())
            if not max_abs <= tol.logits_max_abs:  # NaN parts too
                return t, r, "logits max-abs", max_abs, tol.logits_max_abs, None
            if not mse <= tol.logits_mse:
                return t, r, "logits MSE", mse, tol.logits_mse, None
            if int(a[t].argmax()) != int(b[t].argmax()):
                top2 = np.sort(a[t])[-2:]
                margin = float(top2[1] - top2[0])
                if margin >= tol.ambiguity_margin:
                    return t, r, "greedy token (reference top-2 margin)", margin, tol.ambiguity_margin, None
    # Every logit within tolerance: the first cache slot over tolerance names the step that wrote it.
    best = None
    for r, (ref_layers, cand_layers) in enumerate(zip(ref.cache, cand.cache)):
        for i, (a, b) in enumerate(zip(ref_layers, cand_layers)):  # (H, slots, D); a may keep fewer slots
            name = f"{'past_key' if i % 2 == 0 else 'past_value'}.{i // 2}"
            if (a.shape[0], a.shape[2]) != (b.shape[0], b.shape[2]):
                hit = (0, r, f"cache shape ({name} heads)", float(b.shape[0]), float(a.shape[0]), i // 2)
            else:
                offset = b.shape[1] - a.shape[1]  # a sliding-window reference keeps only its last slots
                d = a.astype(np.float64) - b[:, offset:, :].astype(np.float64)
                per_slot_max = np.abs(d).max(axis=(0, 2)) if d.size else np.zeros(0)
                per_slot_mse = (d * d).mean(axis=(0, 2)) if d.size else np.zeros(0)
                over = np.flatnonzero(~((per_slot_max <= tol.cache_max_abs) & (per_slot_mse <= tol.cache_mse)))
                if not over.size:
                    continue
                k = int(over[0])
                slot = k + offset
                step = 0 if slot < prompt_lengths[r] else slot - prompt_lengths[r] + 1
                if not per_slot_max[k] <= tol.cache_max_abs:
                    measure, value, bound = "cache max-abs", float(per_slot_max[k]), tol.cache_max_abs
                else:
                    measure, value, bound = "cache MSE", float(per_slot_mse[k]), tol.cache_mse
                hit = (step, r, f"{measure} (slot {slot} of {name})", value, bound, i // 2)
            if best is None or hit[:2] < best[:2]:
                best = hit
    return best


# --- per-layer outputs -----------------------------------------------------------------------------


class LayerProbe(Protocol):
    """One side of a comparison, able to show its decoder layers' outputs on ``row``'s tokens of
    ``step``: a list with one (tokens, hidden) array per layer."""

    num_layers: int

    def hidden(self, row: int, step: int) -> list[np.ndarray]: ...


def decoder_layers(model: nn.Module, decoder: nn.Module | None = None) -> tuple[str, nn.ModuleList]:
    """The decoder's list of layers (``layers``, GPT-2's ``h``, MPT's ``blocks``): the one
    ModuleList child of the decoder as long as ``config.num_hidden_layers``."""
    from qeff.offload import layer_child  # torch: imported where a model runs

    found = layer_child(model, decoder)
    if found is None:
        raise LookupError(f"{type(decoder if decoder is not None else model).__name__} has no list of "
                          f"{model.config.num_hidden_layers} layers")
    return found


class _Hooks:
    """Forward hooks that keep each layer's output (B, S, H) of the last call."""

    def __init__(self, layers: nn.ModuleList):
        self.outputs: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = [layer.register_forward_hook(self._keep(i)) for i, layer in enumerate(layers)]

    def _keep(self, i: int):
        def hook(module, args, output):
            self.outputs[i] = (output[0] if isinstance(output, (tuple, list)) else output).detach()

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class HfLayers:
    """HF eager on the untouched model: the row's prompt plus the fed tokens before ``step`` in
    one forward at batch 1 (as its own row, like the reference trace)."""

    def __init__(self, model: nn.Module, prompt_token_ids: Sequence[Sequence[int]], fed_tokens: Sequence[Sequence[int]]):
        self.model, self.prompts, self.fed = model, prompt_token_ids, fed_tokens
        self.scope, self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)

    def hidden(self, row: int, step: int) -> list[np.ndarray]:
        import torch

        prompt = list(self.prompts[row])
        sequence = prompt + list(self.fed[row][:step])
        hooks = _Hooks(self.layers)
        try:
            with torch.no_grad():
                self.model(input_ids=torch.tensor([sequence]), use_cache=False)
        finally:
            hooks.remove()
        keep = slice(0, len(prompt)) if step == 0 else slice(len(sequence) - 1, len(sequence))
        return [out[0, keep].float().numpy() for out in hooks.outputs]  # each (tokens, H)


class Stepper(Protocol):
    """A model run step by step on a fresh retained cache, returning each layer's output."""

    num_layers: int

    def start(self, batch_size: int, ctx_len: int) -> None: ...

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> list[np.ndarray]: ...


class TorchStepper:
    """The transformed PyTorch model (its wrapper's copy, hooked)."""

    def __init__(self, qmodel):
        self.qmodel = qmodel
        self.scope, self.layers = decoder_layers(qmodel.model, qmodel.spec.decoder(qmodel.model))
        self.num_layers = len(self.layers)

    def start(self, batch_size: int, ctx_len: int) -> None:
        self._cache = self.qmodel.empty_cache(batch_size, ctx_len)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> list[np.ndarray]:
        import torch

        hooks = _Hooks(self.layers)
        try:
            with torch.no_grad():
                out = self.qmodel(torch.from_numpy(input_ids), torch.from_numpy(position_ids), *self._cache)
        finally:
            hooks.remove()
        self._cache = list(out[1:])
        return [h.float().numpy() for h in hooks.outputs]  # each (B, S, H)


_SCOPE = re.compile(r"^/(?:[^/]+/)*?([^/.]+)\.(\d+)/")


def layer_output_names(model) -> list[str]:
    """The tensor that is each decoder layer's output in an exported graph (see the module
    docstring for the rule). ``model`` is an ``onnx.ModelProto`` (external data need not be loaded)."""
    from onnx import TensorProto, shape_inference

    graph = model.graph
    scopes: dict[str, int | None] = {}  # tensor -> layer index of its producer (None: outside every layer)
    order: dict[str, int] = {}
    containers: dict[str, int] = {}
    node_scope = []
    for n, node in enumerate(graph.node):
        m = _SCOPE.match(node.name)
        node_scope.append((m.group(1), int(m.group(2))) if m else None)
        if m:
            containers[m.group(1)] = containers.get(m.group(1), 0) + 1
    if not containers:
        raise LookupError("no node of the graph carries a layer scope (/…/layers.N/…)")
    container = max(containers, key=containers.get)  # the layer list: by far the most nodes
    layer_of = [s[1] if s is not None and s[0] == container else None for s in node_scope]
    for n, node in enumerate(graph.node):
        for out in node.output:
            scopes[out], order[out] = layer_of[n], n
    num_layers = max(i for i in layer_of if i is not None) + 1

    # Tensors that depend on input_ids (the residual stream does; rotary tables and masks do not).
    from_ids = {"input_ids"}
    for node in graph.node:
        if any(i in from_ids for i in node.input):
            from_ids.update(o for o in node.output if o)
    try:
        inferred = shape_inference.infer_shapes(model).graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.output)}
    except Exception:  # a graph shape inference cannot read: decide on the other rules alone
        types = {}
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}

    candidates: dict[int, set[str]] = {i: set() for i in range(num_layers)}
    for n, node in enumerate(graph.node):
        consumer = layer_of[n]
        for t in node.input:
            producer = scopes.get(t)
            if producer is None or producer == consumer or t not in from_ids:
                continue
            if types.get(t, TensorProto.FLOAT) not in floats:  # unknown (a fused op's output): keep
                continue
            if consumer == producer + 1 or (producer == num_layers - 1 and consumer is None):
                candidates[producer].add(t)
    names = []
    for i in range(num_layers):
        if not candidates[i]:
            raise LookupError(f"no tensor leaves layer {i} of the graph's {container}.N scopes")
        names.append(max(candidates[i], key=order.get))  # the others feed it
    return names


class OrtStepper:
    """ONNX Runtime on a debug copy of ``model_path`` whose layer outputs are graph outputs. The
    copy is held in memory (the graph without its weights) and reads the original's external data."""

    def __init__(self, model_path: str | os.PathLike, threads: int | None = None):
        import onnx
        import onnxruntime as ort

        source = Path(model_path)
        model = onnx.load(str(source), load_external_data=False)
        self.layer_names = layer_output_names(model)
        self.num_layers = len(self.layer_names)
        known = {o.name for o in model.graph.output}
        for name in self.layer_names:
            if name not in known:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        # Loaded from bytes, reading the original's external data where it is: nothing is written.
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(source.parent.resolve()))
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_")]
        past0 = inputs["past_key.0"].shape  # [batch_size, n_kv, ctx_len, head_dim]
        self._kv = (int(past0[1]), int(past0[3]))

    def start(self, batch_size: int, ctx_len: int) -> None:
        self._cache = [np.zeros((batch_size, self._kv[0], ctx_len, self._kv[1]), np.float32) for _ in self.past_names]

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> list[np.ndarray]:
        feeds = {"input_ids": input_ids, "position_ids": position_ids, **dict(zip(self.past_names, self._cache))}
        retained = [n + "_RetainedState" for n in self.past_names]
        outs = self.session.run(retained + self.layer_names, feeds)
        self._cache = outs[: len(retained)]
        return [o.astype(np.float32) for o in outs[len(retained) :]]  # each (B, S, H)

def session_stepper(session) -> Callable[[], Stepper] | None:
    """How to see the layers of a backend session's graph, or None (a Cloud AI QPC cannot show them)."""
    path = getattr(session, "model_path", None)
    if getattr(session, "backend", None) != "ort" or path is None:
        return None
    threads = getattr(session, "threads", None)
    return lambda: OrtStepper(path, threads=threads)


class ReplayLayers:
    """A :class:`Stepper` driven over exactly the schedule :func:`qeff.verification.session_trace`
    uses (one right-padded batch, chunked prefill, then teacher-forced decode), stopped at ``step``."""

    def __init__(
        self,
        stepper: Stepper,
        prompt_token_ids: Sequence[Sequence[int]],
        fed_tokens: Sequence[Sequence[int]],
        *,
        batch_size: int,
        prompt_len: int,
        ctx_len: int,
    ):
        self.stepper, self.prompts, self.fed = stepper, prompt_token_ids, fed_tokens
        self.batch_size, self.prompt_len, self.ctx_len = batch_size, prompt_len, ctx_len
        self.num_layers = stepper.num_layers
        self.scope = getattr(stepper, "scope", None)

    def close(self) -> None:
        if hasattr(self.stepper, "close"):
            self.stepper.close()

    def hidden(self, row: int, step: int) -> list[np.ndarray]:
        from qeff.generation import prefill_chunks

        self.stepper.start(self.batch_size, self.ctx_len)
        pieces: list[list[np.ndarray]] = [[] for _ in range(self.num_layers)]
        for ids, pos, _ in prefill_chunks(self.prompts, self.batch_size, self.prompt_len):
            outs = self.stepper.step(ids, pos)
            if step == 0:
                valid = pos[row] >= 0
                for i, out in enumerate(outs):
                    pieces[i].append(out[row, valid])
        if step == 0:
            return [np.concatenate(p) for p in pieces]  # each (prompt tokens, H)
        lengths = [len(p) for p in self.prompts]
        for t in range(1, step + 1):
            ids = np.zeros((self.batch_size, 1), dtype=np.int64)
            pos = np.full((self.batch_size, 1), -1, dtype=np.int64)
            for r in range(len(self.prompts)):
                ids[r, 0] = self.fed[r][t - 1]
                pos[r, 0] = lengths[r] + t - 1
            outs = self.stepper.step(ids, pos)
        return [out[row, :1] for out in outs]  # each (1, H)


def locate(
    ref,
    cand,
    tol,
    *,
    ref_layers: Callable[[], LayerProbe] | None,
    cand_layers: Callable[[], LayerProbe] | None,
    prompt_lengths: Sequence[int],
    layer_rtol: float = LAYER_RTOL,
) -> FirstDivergence | None:
    """The first divergence of two traces. ``ref_layers``/``cand_layers`` build each side's
    :class:`LayerProbe` (called only when the layers must be compared; None when a backend cannot
    show its layers). A probe that fails leaves ``layer`` None and says why in ``note``: locating
    must never hide the failure it explains."""
    found = first_parting(ref, cand, tol, prompt_lengths)
    if found is None:
        return None
    step, row, measure, value, bound, cache_layer = found
    num_layers = len(ref.cache[row]) // 2
    result = FirstDivergence(step=step, row=row, measure=measure, value=value, bound=bound, num_layers=num_layers,
                             layer_rtol=layer_rtol)
    length = prompt_lengths[row]
    result.positions = list(range(length)) if step == 0 else [length + step - 1]
    if cache_layer is not None:  # the cache itself names its layer
        result.layer = cache_layer
        result.where = f"layer {cache_layer} of {num_layers} (its cache)"
        return result
    if ref_layers is None or cand_layers is None:
        result.note = "per-layer outputs are not available from this backend"
        return result
    probes: list = []
    try:
        for build in (ref_layers, cand_layers):
            probes.append(build())
        a_layers, b_layers = (p.hidden(row, step) for p in probes)
    except Exception as exc:  # noqa: BLE001 - reported, never raised: the comparison already failed
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        result.note = f"could not compare the layers: {type(exc).__name__}: {first_line}"
        return result
    finally:
        for probe in probes:
            if hasattr(probe, "close"):
                probe.close()
    scope = next((p.scope for p in probes if getattr(p, "scope", None)), "layers")
    for i, (a, b) in enumerate(zip(a_layers, b_layers)):  # each (tokens, H)
        scale = float(np.abs(a).max()) if a.size else 0.0
        if a.shape != b.shape:  # None, not inf: the record stays plain JSON
            result.layers.append({"layer": i, "max_abs": None, "scale": scale, "relative": None})
            continue
        d = np.abs(a.astype(np.float64) - b.astype(np.float64)).max(axis=-1)  # (tokens,)
        # Relative per token: one token's massive activations (SmolLM2's first token reaches 2e4
        # where the others stay near 5e2) must not hide a difference in the others.
        token_scale = np.maximum(np.abs(a).max(axis=-1).astype(np.float64), 1e-30)  # (tokens,)
        relative = float((d / token_scale).max()) if d.size else 0.0
        result.layers.append({"layer": i, "max_abs": float(d.max()) if d.size else 0.0, "scale": scale, "relative": relative})
    over = [e["layer"] for e in result.layers if e["relative"] is None or not e["relative"] <= layer_rtol]  # NaN too
    if over:
        result.layer = over[0]
        result.where = f"layer {over[0]} of {num_layers} ({scope}.{over[0]})"
    else:
        result.where = "after the last decoder layer (final norm or LM head): no layer's output differs"
    return result
