"""ONNX Runtime session: the retained cache lives in OrtValues that stay bound between steps.

Binding modes (``binding=``):

- ``"inplace"`` (default): each layer's cache is ONE OrtValue bound both as ``past_*`` input and
  as ``…_RetainedState`` output. The graph reads the old cache only through the scatter (and the
  gather of pad slots that feeds it), which ORT's CPU kernels run in place, so nothing is copied.
  ``tests/test_ort_binding.py`` proves it bit-exact against ``"swap"`` and ``"numpy"`` over whole
  generations; ``benchmarks/`` measures the difference.
- ``"swap"``: two OrtValues per tensor, input and output swapped after each step.
- ``"numpy"``: plain ``InferenceSession.run`` with the cache round-tripping through numpy —
  the slow reference the other two are checked against.

``specialize_decode=True`` opens a second session for decode with every dim pinned
(``batch_size``, ``seq_len = 1``, ``ctx_len``, and with a compute-context ladder
``comp_ctx_lengths`` = its first rung: decode steps at longer rungs run in the general session), the ORT counterpart of a Cloud AI decode
specialization: ORT then folds the graph's shape arithmetic away (~4,000 → ~1,600 nodes per step
on SmolLM2-135M). It costs a second copy of the weights (ORT prepacks each session's MatMul
weights privately); ``benchmarks/bench_generate.py --specialize-decode`` measures the trade.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qeff._system import physical_cores
from qeff.errors import ArtifactError, BackendUnavailableError, UsageError
from qeff.serving import ctx_ladder

__all__ = ["OrtSession", "session_options", "onnxruntime_module", "open_inference_session", "CacheInputs", "RetainedCache",
           "BINDINGS", "ladder_of", "comp_ctx_feed"]

BINDINGS = ("inplace", "swap", "numpy")


def onnxruntime_module():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from exc
    return onnxruntime


def session_options(threads: int | None = None, *, optimized_path: str | None = None):
    ort = onnxruntime_module()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", Path(optimized_path).name + ".data"
        )
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return opts



def open_inference_session(model_path: Path, opts):
    """An ONNX Runtime CPU session of ``model_path``, or one sentence saying why the file cannot be
    opened (missing, or corrupt/incomplete: ORT raises its own pybind error types)."""
    ort = onnxruntime_module()
    try:
        return ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if not Path(model_path).is_file():
            raise ArtifactError(f"{model_path} does not exist; export or compile the model first") from exc
        raise ArtifactError(
            f"ONNX Runtime cannot load {model_path} ({str(exc).splitlines()[0][:200]}); "
            f"the file is corrupt or incomplete: delete its directory to rebuild it"
        ) from exc


class CacheInputs:
    """The retained-state cache a session's graph declares: ``past_names`` (``past_key.{i}``,
    ``past_value.{i}``, in graph order), ``num_layers``, ``num_kv_heads``, ``head_dim``."""

    def __init__(self, session):
        inputs = {i.name: i for i in session.get_inputs()}
        self.input_names = set(inputs)
        self.past_names = [n for n in inputs if n.startswith("past_")]
        self.num_layers = len(self.past_names) // 2
        past0 = inputs["past_key.0"].shape  # [batch_size, n_kv, ctx_len, head_dim]
        self.num_kv_heads, self.head_dim = int(past0[1]), int(past0[3])

    def shape(self, rows: int, ctx_len: int) -> tuple[int, int, int, int]:
        """One cache tensor's shape for ``rows`` rows (or slots) of ``ctx_len`` positions."""
        return (rows, self.num_kv_heads, ctx_len, self.head_dim)


class RetainedCache:
    """The cache of an ONNX Runtime session as OrtValues that stay bound between steps: the one
    place every ORT session (portable, fused, serving) binds ``past_*`` and ``…_RetainedState``.

    ``inplace`` (the default): ONE OrtValue per tensor, bound as both the input and the output, so
    the graph's scatter (or GroupQueryAttention's shared buffer) updates it where it lies and no
    step copies the cache. Otherwise two per tensor, swapped after each step (:meth:`swap`)."""

    def __init__(self, cache: CacheInputs, rows: int, ctx_len: int, *, inplace: bool = True):
        ort = onnxruntime_module()
        shape = cache.shape(rows, ctx_len)
        new = lambda: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32), "cpu")  # noqa: E731
        self.names = list(cache.past_names)
        self.inputs = [new() for _ in self.names]
        self.outputs = self.inputs if inplace else [new() for _ in self.names]
        self._ios: list = []

    def bind(self, *ios) -> None:
        """Bind the cache to these IO bindings (and remember them for :meth:`swap`)."""
        self._ios = list(ios)
        self._bind()

    def _bind(self) -> None:
        for io in self._ios:
            for name, src, dst in zip(self.names, self.inputs, self.outputs):
                io.bind_ortvalue_input(name, src)
                io.bind_ortvalue_output(name + "_RetainedState", dst)

    def swap(self) -> None:
        """After a step with two buffers per tensor: what was written is what the next step reads."""
        if self.outputs is not self.inputs:
            self.inputs, self.outputs = self.outputs, self.inputs
            self._bind()

    def read(self) -> list[np.ndarray]:
        """A copy of the cache, ``[k0, v0, k1, v1, …]``."""
        return [v.numpy().copy() for v in self.inputs]

    def write(self, tensors: list[np.ndarray]) -> None:
        """Overwrite the whole cache in place (the bound buffers stay the same)."""
        if len(tensors) != len(self.names):
            raise UsageError(f"expected {len(self.names)} cache tensors, got {len(tensors)}")
        for value, tensor in zip(self.inputs, tensors):
            value.update_inplace(np.ascontiguousarray(tensor, dtype=np.float32))


def ladder_of(cache: CacheInputs, comp_ctx_lengths, ctx_len: int):
    """The ladder a session runs: None for a graph without ``comp_ctx_lengths``; else the one asked
    for (a list, a ``--comp_ctx_lengths`` string; None = :func:`qeff.serving.ctx_ladder.default_ladder`)."""
    if "comp_ctx_lengths" not in cache.input_names:
        if comp_ctx_lengths is not None and ctx_ladder.parse_ladder(comp_ctx_lengths, ctx_len) is not None:
            raise UsageError("this graph has no comp_ctx_lengths input: export it with the compute-context ladder "
                             "(GraphVariant(comp_ctx=True)), or drop comp_ctx_lengths")
        return None
    # A ladder graph always runs a ladder; "off" is the full length, one rung.
    return ctx_ladder.parse_ladder(comp_ctx_lengths, ctx_len) or (ctx_len,)


def comp_ctx_feed(ladder, position_ids: np.ndarray, attended: list[int]) -> np.ndarray | None:
    """The ``comp_ctx_lengths`` input of a step: zeros of the smallest rung above its positions
    (only the length is read), recorded in ``attended``; None without a ladder."""
    if ladder is None:
        return None
    rung = ctx_ladder.pick(ladder, position_ids)
    attended.append(rung)
    return np.zeros((rung,), dtype=np.int64)


class OrtSession:
    backend = "ort"

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        batch_size: int,
        ctx_len: int,
        threads: int | None = None,
        binding: str = "inplace",
        prompt_len: int | None = None,
        specialize_decode: bool = False,
        comp_ctx_lengths=None,
    ):
        if binding not in BINDINGS:
            raise UsageError(f"unknown ORT binding {binding!r}; choose one of {', '.join(BINDINGS)}")
        if batch_size < 1 or ctx_len < 1:
            raise UsageError(f"batch_size and ctx_len must be positive (got {batch_size}, {ctx_len})")
        ort = onnxruntime_module()
        self.model_path = Path(model_path)
        self.threads = threads or physical_cores()
        self.session = open_inference_session(self.model_path, session_options(self.threads))
        cache = CacheInputs(self.session)
        self.past_names, self.num_layers = cache.past_names, cache.num_layers
        self.num_kv_heads, self.head_dim = cache.num_kv_heads, cache.head_dim
        self.vocab_size = int(self.session.get_outputs()[0].shape[2])
        self.batch_size, self.ctx_len, self.binding = batch_size, ctx_len, binding
        self.prompt_len = prompt_len  # ORT takes any seq_len; set when opened from an artifact
        #: The compute-context ladder (a graph with ``comp_ctx_lengths``; None = the graph attends
        #: ctx_len) and the length each step attended, for tests and reports.
        self.ladder = ladder_of(cache, comp_ctx_lengths, ctx_len)
        self.attended: list[int] = []
        self._logits = ort.OrtValue.ortvalue_from_shape_and_type((batch_size, 1, self.vocab_size), np.float32, "cpu")
        self.decode_session = self.session
        if binding == "numpy":
            self._np_cache = [np.zeros(cache.shape(batch_size, ctx_len), np.float32) for _ in self.past_names]
            return
        if specialize_decode:
            opts = session_options(self.threads)
            pins = [("batch_size", batch_size), ("seq_len", 1), ("ctx_len", ctx_len)]
            if self.ladder is not None:
                # The first rung, where short sequences decode: pinned like the rest (the unpinned
                # comp_ctx_lengths dim cost ~12% a step); longer rungs decode in the general session.
                pins.append(("comp_ctx_lengths", self.ladder[0]))
            for dim, value in pins:
                opts.add_free_dimension_override_by_name(dim, value)
            self.decode_session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._io = self.session.io_binding()
        self._decode_io = self._io if self.decode_session is self.session else self.decode_session.io_binding()
        ios = [self._io] if self._decode_io is self._io else [self._io, self._decode_io]
        for io in ios:
            io.bind_ortvalue_output("logits", self._logits)
        self._cache = RetainedCache(cache, batch_size, ctx_len, inplace=binding == "inplace")
        self._cache.bind(*ios)

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
        comp = comp_ctx_feed(self.ladder, position_ids, self.attended)
        if self.binding == "numpy":
            feeds = {"input_ids": input_ids, "position_ids": position_ids, **dict(zip(self.past_names, self._np_cache))}
            if comp is not None:
                feeds["comp_ctx_lengths"] = comp
            outs = self.session.run(None, feeds)
            self._np_cache = outs[1:]
            return outs[0][:, 0, :]
        decode = input_ids.shape[1] == 1 and (comp is None or comp.shape[0] == self.ladder[0])
        session, io = (self.decode_session, self._decode_io) if decode else (self.session, self._io)
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("position_ids", position_ids)
        if comp is not None:
            io.bind_cpu_input("comp_ctx_lengths", comp)
        session.run_with_iobinding(io)
        self._cache.swap()  # nothing to do when bound in place
        return self._logits.numpy()[:, 0, :]

    def read_cache(self) -> list[np.ndarray]:
        if self.binding == "numpy":
            return [c.copy() for c in self._np_cache]
        return self._cache.read()

    def close(self) -> None:
        self.session = self.decode_session = None
