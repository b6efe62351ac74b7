"""Cloud AI 100 session: runs a QPC through the SDK's Python runtime, ``qaicrt``.

The retained cache never leaves the device. Every ``past_*`` input and ``*_RetainedState`` output
is bound to a zero-size buffer: the runtime then reads the cache from, and writes it back to, the
device's own memory (the SDK's LLM guide: "If a zero-size past_key_values input is passed to the
model, the KV cache will be picked from the on-board DDR"). Each ``run`` sends only ``input_ids``
and ``position_ids`` and fetches only ``logits``; the runtime picks the compiled specialization
(prefill ``seq_len = prompt_len`` or decode ``seq_len = 1``) from the shapes of those buffers.

Batch size, prompt_len and ctx_len are read from the QPC's IO descriptor (its allowed shapes, one
per specialization) and checked against ``specializations.json`` beside the QPC when it is there.

The serving QPCs (:mod:`qeff.compilers.qaic` with ``full_batch_size`` / ``num_speculative_tokens``)
open as the same class, with the interface of :class:`qeff.runtime.ort_serving.ServingOrtSession`
that the serving loops drive:

- continuous batching (a ``batch_index`` input; the cache holds ``full_batch_size`` slots):
  ``run(ids, pos, batch_index=…)`` prefills one prompt (1 row of ``prompt_len``) or decodes every
  slot (``full_batch_size`` rows of 1), as the two compiled specializations allow;
- a speculative target (a ``num_logits_to_keep`` input): ``run(ids, pos, keep=K+1)`` verifies K+1
  positions per row in the decode specialization; prefill keeps 1;
- a compute-context ladder (a ``comp_ctx_lengths`` input; one prefill and one decode
  specialization per rung): each step runs in the smallest rung its positions fit
  (:func:`qeff.serving.ctx_ladder.pick`, as ONNX Runtime's session), recorded in ``attended``.

The ``logits`` buffer (and ``num_logits_to_keep``'s) is sized per run for the specialization the
input shapes select, since the runtime checks every buffer against that specialization.

The qaicrt calls follow QEfficient's ``QAICInferenceSession``
(``QEfficient/generation/cloud_infer.py``, quic/efficient-transformers): ``Context(QIDList)``,
``Queue(context, device)``, ``Qpc(dir).getIoDescriptor()`` parsed by ``QAicApi_pb2.IoDesc``,
``Program(context, device, qpc, QAicProgramProperties)`` + ``load``/``activate``,
``ExecObj(context, program)``, ``QBuffer`` + ``BufferDimensionsVecRef`` → ``setData``,
``Queue.enqueue``, ``waitForCompletion``, ``getData``. Checked against that code, not yet on hardware.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from qeff import sdk
from qeff.store.layout import QAIC_MANIFEST_FILE as MANIFEST_FILE
from qeff.store.layout import QPC_FILE, QPC_SUBDIR, SPECIALIZATIONS_FILE
from qeff.errors import ArtifactError, QEffError, UsageError
from qeff.serving import ctx_ladder
from qeff.serving.variant import GraphVariant

__all__ = ["QaicSession"]

#: Inputs this session feeds on every run besides the retained state: the plain graph's, then the
#: serving variants' (continuous batching, speculative target).
_FED = ("input_ids", "position_ids")
_SERVING = ("batch_index", "num_logits_to_keep", "comp_ctx_lengths")

# aicapi buffer types → numpy; looked up by name because SDK versions differ in what they define.
_AIC_TYPES = {
    "FLOAT_TYPE": np.float32,
    "FLOAT_16_TYPE": np.float16,
    "INT8_Q_TYPE": np.int8,
    "UINT8_Q_TYPE": np.uint8,
    "INT16_Q_TYPE": np.int16,
    "INT32_Q_TYPE": np.int32,
    "INT32_I_TYPE": np.int32,
    "INT64_I_TYPE": np.int64,
    "INT8_TYPE": np.int8,
}


def _locate(qpc_path: str | os.PathLike) -> Path:
    path = Path(qpc_path)
    for candidate in (path, path / QPC_SUBDIR):
        if (candidate / QPC_FILE).is_file():
            return candidate
    if path.name == QPC_FILE and path.is_file():
        return path.parent
    raise ArtifactError(
        f"no QPC at {path}: expected {path / QPC_FILE} or {path / QPC_SUBDIR / QPC_FILE}; "
        f"compile one with `qeff compile --backend qaic`"
    )


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} cannot be read: {exc}") from exc


class QaicSession:
    """A loaded QPC on a device group, with the :class:`qeff.runtime.base.Session` interface.

    ``qpc_path`` is the QPC directory (``…/qpcs``) or the compile directory above it. ``device_ids``
    are the device group (QIDs); by default ``0 … n-1`` for a QPC compiled for ``n`` devices.
    """

    backend = "qaic"

    def __init__(
        self,
        qpc_path: str | os.PathLike,
        *,
        device_ids: Sequence[int] | None = None,
        activate: bool = True,
        debug_logs: bool = False,
    ):
        self.qpc_dir = _locate(qpc_path)
        self.compile_dir = self.qpc_dir.parent
        manifest = _read_json(self.compile_dir / MANIFEST_FILE)
        compiled_devices = manifest.get("options", {}).get("num_devices") if manifest else None
        if device_ids is None:
            device_ids = list(range(compiled_devices or 1))
        self.device_ids = [int(d) for d in device_ids]
        if not self.device_ids or len(set(self.device_ids)) != len(self.device_ids):
            raise UsageError(f"device_ids must be distinct device ids, at least one (got {list(device_ids)})")
        if compiled_devices and len(self.device_ids) != compiled_devices:
            raise UsageError(
                f"the QPC at {self.qpc_dir} was compiled for {compiled_devices} device(s) but the device group "
                f"{self.device_ids} has {len(self.device_ids)}; pass {compiled_devices} device ids"
            )
        self._rt, self._api = sdk.import_runtime()
        rt = self._rt
        self._ok = rt.QStatus.QS_SUCCESS
        self._dtypes = {getattr(self._api, n): np.dtype(t) for n, t in _AIC_TYPES.items() if hasattr(self._api, n)}
        self._exec = None

        self._context = rt.Context(rt.QIDList(self.device_ids))
        self._queue = rt.Queue(self._context, self.device_ids[0])
        if debug_logs:
            self._check(self._context.setLogLevel(rt.QLogLevel.QL_DEBUG), "setLogLevel")
        qpc = rt.Qpc(str(self.qpc_dir))
        status, raw = qpc.getIoDescriptor()
        self._check(status, f"read the IO descriptor of {self.qpc_dir}")
        iodesc = self._api.IoDesc()
        iodesc.ParseFromString(bytes(raw))
        self._read_io(iodesc)
        self._check_specializations_file()

        props = rt.QAicProgramProperties()
        for timeout in ("SubmitRetryTimeoutMs", "dataPathTimeoutMs"):  # named differently across SDKs
            if hasattr(props, timeout):
                setattr(props, timeout, 60_000)
        if len(self.device_ids) > 1:
            props.devMapping = ":".join(map(str, self.device_ids))
        device = self.device_ids[0] if len(self.device_ids) == 1 else None
        self._program = rt.Program(self._context, device, qpc, props)
        self._check(self._program.load(), f"load {self.qpc_dir} on devices {self.device_ids}")
        self._make_buffers()
        if activate:
            self.activate()

    # -- the IO descriptor ------------------------------------------------------------------

    def _read_io(self, iodesc) -> None:
        api = self._api
        bindings = list(iodesc.selected_set.bindings)
        self._bindings = bindings
        self._index = {b.name: b.index for b in bindings}
        inputs = [b.name for b in bindings if b.dir == api.BUFFER_IO_TYPE_INPUT]
        outputs = [b.name for b in bindings if b.dir == api.BUFFER_IO_TYPE_OUTPUT]
        missing = [n for n in ("input_ids", "position_ids", "past_key.0") if n not in inputs]
        missing += [n for n in ("logits",) if n not in outputs]
        if missing:
            raise ArtifactError(f"the QPC at {self.qpc_dir} is not a qeff retained-state program: no {', '.join(missing)}")
        self._retained = {n for n in inputs if n.startswith("past_")} | {n for n in outputs if n.endswith("_RetainedState")}
        driven = {*_FED, *_SERVING, "logits"} | self._retained
        extra = sorted(set(inputs + outputs) - driven)
        if extra:
            raise ArtifactError(f"the QPC at {self.qpc_dir} has IO this session does not drive: {', '.join(extra)}")
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key."))
        self.variant = GraphVariant(continuous_batching="batch_index" in inputs, speculative="num_logits_to_keep" in inputs,
                                    comp_ctx="comp_ctx_lengths" in inputs)

        # One shape set per specialization; a single-specialization QPC may list none.
        by_index = {b.index: b.name for b in bindings}
        if len(iodesc.allowed_shapes):
            shape_sets = [
                {by_index[i]: [int(d) for d in s.dims] for i, s in enumerate(allowed.shapes) if i in by_index}
                for allowed in iodesc.allowed_shapes
            ]
        else:
            shape_sets = [{b.name: [int(d) for d in b.dims] for b in bindings}]
        specs, self._shape_sets = [], []
        for shapes in shape_sets:
            (batch, seq), cache = shapes["input_ids"], shapes["past_key.0"]
            spec = {"batch_size": batch, "seq_len": seq, "ctx_len": cache[2]}
            if self.variant.continuous_batching:
                spec["full_batch_size"] = cache[0]
            if self.variant.speculative:
                spec["num_logits_to_keep"] = shapes["num_logits_to_keep"][0]
            if self.variant.comp_ctx:
                spec["comp_ctx_lengths"] = shapes["comp_ctx_lengths"][0]
            if spec not in specs:
                specs.append(spec)
                self._shape_sets.append(shapes)
        # Prefill first, as compiled: the longest chunk, or a speculative target's one kept logit.
        order = sorted(range(len(specs)), key=lambda i: (specs[i].get("num_logits_to_keep", 1) != 1, -specs[i]["seq_len"],
                                                         specs[i].get("comp_ctx_lengths", 0)))
        specs, self._shape_sets = [specs[i] for i in order], [self._shape_sets[i] for i in order]
        same = ("ctx_len", "full_batch_size") if self.variant.continuous_batching else ("ctx_len", "batch_size")
        if any(len({s.get(k) for s in specs}) != 1 for k in same):
            raise ArtifactError(f"the QPC at {self.qpc_dir} mixes batch sizes or ctx_lens across specializations: {specs}")
        self.specializations = specs
        self.ctx_len = specs[0]["ctx_len"]
        #: The prefill chunk length; 1 for a decode-only QPC.
        self.prompt_len = specs[0]["seq_len"]
        #: Continuous batching: the cache's slots (None otherwise); rows of a decode step.
        self.full_batch_size = specs[0].get("full_batch_size")
        #: Rows per step: every slot with continuous batching (decode), else the compiled batch.
        self.batch_size = self.full_batch_size or specs[0]["batch_size"]
        #: Rows the cache holds (the slots of continuous batching, else the batch).
        self.cache_rows = self.full_batch_size or self.batch_size
        #: K of a speculative target: its decode step verifies K+1 positions (None otherwise).
        self.num_speculative_tokens = (max(s["num_logits_to_keep"] for s in specs) - 1) if self.variant.speculative else None
        #: The compute-context ladder's rungs (None without one) and the rung each step attended.
        self.ladder = tuple(sorted({s["comp_ctx_lengths"] for s in specs})) if self.variant.comp_ctx else None
        self.attended: list[int] = []
        logits = self._binding("logits")
        self.vocab_size = int(logits.dims[-1])
        self._logits_dtype = self._dtype(logits)
        self._fed_dtypes = {n: self._dtype(self._binding(n)) for n in (*_FED, *_SERVING) if n in self._index}
        # A zero buffer per specialization for each output and shape-only input sized by it.
        self._sized = [{n: np.zeros(shapes[n], self._logits_dtype if n == "logits" else self._fed_dtypes[n])
                        for n in ("logits", "num_logits_to_keep", "comp_ctx_lengths") if n in shapes} for shapes in self._shape_sets]

    def _binding(self, name: str):
        return self._bindings[[b.name for b in self._bindings].index(name)]

    def _dtype(self, binding) -> np.dtype:
        try:
            return self._dtypes[binding.type]
        except KeyError:
            raise ArtifactError(f"the QPC at {self.qpc_dir}: IO {binding.name} has buffer type {binding.type} unknown to qeff") from None

    def _check_specializations_file(self) -> None:
        recorded = _read_json(self.compile_dir / SPECIALIZATIONS_FILE)
        if recorded is None:
            return
        try:
            wanted = [{k: int(v) for k, v in s.items()} for s in recorded["specializations"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{self.compile_dir / SPECIALIZATIONS_FILE} is malformed: {exc}") from exc
        key = lambda s: (s["batch_size"], s["seq_len"], s["ctx_len"])  # noqa: E731
        if sorted(map(key, wanted)) != sorted(map(key, self.specializations)):
            raise ArtifactError(
                f"the QPC at {self.qpc_dir} holds specializations {self.specializations} but "
                f"{self.compile_dir / SPECIALIZATIONS_FILE} says {wanted}; recompile"
            )

    # -- buffers -----------------------------------------------------------------------------

    def _make_buffers(self) -> None:
        rt = self._rt
        qbuffers, dims = [None] * len(self._bindings), [None] * len(self._bindings)
        for b in self._bindings:
            if b.name in self._retained:
                # Zero-size: the runtime keeps this tensor in device memory (QEfficient's skip_buffers
                # binds np.array([]), whose (itemsize, shape) is (8, (0,)); kept identical).
                empty = np.array([])
                qbuffers[b.index], dims[b.index] = rt.QBuffer(empty.tobytes()), (empty.itemsize, list(empty.shape))
            else:
                qbuffers[b.index] = rt.QBuffer(bytes(int(b.size)))
                dims[b.index] = (self._dtype(b).itemsize, [int(d) for d in b.dims])
        self._qbuffers = qbuffers
        self._buf_dims = rt.BufferDimensionsVecRef(dims)
        for name, array in self._sized[0].items():
            self._set(name, array)
        self._sized_for = 0  # the specialization the sized buffers are set for

    def _set(self, name: str, array: np.ndarray) -> None:
        i = self._index[name]
        self._qbuffers[i] = self._rt.QBuffer(array.tobytes())
        self._buf_dims[i] = (array.itemsize, list(array.shape))

    def _check(self, status, what: str) -> None:
        if status is not None and status != self._ok:
            raise QEffError(f"Cloud AI runtime could not {what} (status {status}) on devices {self.device_ids}")

    # -- the Session interface ---------------------------------------------------------------

    def activate(self) -> None:
        """Put the program on the device(s) (done by the constructor unless ``activate=False``)."""
        if self._exec is None:
            self._check(self._program.activate(), f"activate {self.qpc_dir}")
            self._exec = self._rt.ExecObj(self._context, self._program)

    def deactivate(self) -> None:
        """Free the device(s); the retained cache is lost."""
        if self._exec is not None:
            self._exec = None
            self._program.deactivate()

    def run(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        *,
        batch_index: np.ndarray | None = None,
        keep: int | None = None,
    ) -> np.ndarray:
        """(B, S) ids and positions (-1 = pad) → (B, vocab) logits, or (B, keep, vocab) with ``keep``.

        ``batch_index`` (B,) or (B, 1): the slots the rows run in (continuous-batching QPCs; required
        then). ``keep``: speculative targets, the kept logits of the specialization the step runs
        in (1 in prefill, K+1 in decode)."""
        ids = np.ascontiguousarray(input_ids, dtype=self._fed_dtypes["input_ids"])
        pos = np.ascontiguousarray(position_ids, dtype=self._fed_dtypes["position_ids"])
        if ids.ndim != 2 or ids.shape != pos.shape:
            raise UsageError(f"input_ids {ids.shape} and position_ids {pos.shape} must be equal (batch, seq_len) arrays")
        rung = None
        if self.ladder is not None:
            rung = ctx_ladder.pick(self.ladder, pos)
        spec = self._pick(ids.shape, keep, rung)
        if self._exec is None:
            raise UsageError("the session is not active: call activate() first")
        rows = ids.shape[0]
        self._set("input_ids", ids)
        self._set("position_ids", pos)
        if self.variant.continuous_batching:
            self._set("batch_index", self._slots(batch_index, rows))
        elif batch_index is not None:
            raise UsageError("batch_index given to a QPC without continuous batching")
        if rung is not None:
            self.attended.append(rung)
        if spec != self._sized_for:
            for name, array in self._sized[spec].items():
                self._set(name, array)
            self._sized_for = spec
        self._check(self._exec.setData(self._qbuffers, self._buf_dims), "set the buffers")
        self._check(self._queue.enqueue(self._exec), "enqueue the run")
        status = self._exec.waitForCompletion()
        if status != self._ok:
            raise QEffError(
                f"Cloud AI run failed (status {status}) for input shape {ids.shape} on devices {self.device_ids}; "
                f"the QPC at {self.qpc_dir} was compiled for {self.specializations}"
            )
        status, outputs = self._exec.getData()
        self._check(status, "read the outputs")
        logits = np.frombuffer(bytes(outputs[self._index["logits"]]), self._logits_dtype)
        logits = logits.reshape(rows, -1, self.vocab_size)
        return logits if keep is not None else logits[:, -1, :]

    def _pick(self, shape: tuple[int, ...], keep: int | None, rung: int | None = None) -> int:
        """The specialization a step of input ``shape`` runs in (at ``rung`` of a ladder). A
        speculative target's prefill and verify steps may have the same shape (prompt_len = K+1):
        ``keep`` tells them apart, and without it the step keeps one logit per row."""
        fits = [i for i, s in enumerate(self.specializations)
                if (s["batch_size"], s["seq_len"]) == tuple(shape) and s.get("comp_ctx_lengths") == rung]
        if not fits:
            shapes = " or ".join(dict.fromkeys(f"({s['batch_size']}, {s['seq_len']})" for s in self.specializations))
            raise UsageError(f"the QPC at {self.qpc_dir} accepts input shapes {shapes} only (got {tuple(shape)})")
        kept = [self.specializations[i].get("num_logits_to_keep", 1) for i in fits]
        wanted = 1 if keep is None and 1 in kept else keep
        if wanted is None:
            return fits[0]
        if wanted not in kept:
            what = (f"keeps {' or '.join(map(str, kept))} logits per row" if self.variant.speculative
                    else "has no num_logits_to_keep input: it keeps 1 logit per row")
            raise UsageError(f"the QPC at {self.qpc_dir} {what} in a step of input shape {tuple(shape)} (asked keep={keep})")
        return fits[kept.index(wanted)]

    def _slots(self, batch_index, rows: int) -> np.ndarray:
        """``batch_index`` as the QPC takes it, (rows, 1): distinct slots of the cache."""
        if batch_index is None:
            raise UsageError("this continuous-batching QPC needs batch_index: the slot of each row")
        index = np.ascontiguousarray(np.asarray(batch_index).reshape(-1, 1), dtype=self._fed_dtypes["batch_index"])
        slots = index[:, 0].tolist()
        if len(slots) != rows or min(slots) < 0 or max(slots) >= self.cache_rows or len(set(slots)) != rows:
            raise UsageError(f"batch_index {slots} must name {rows} distinct slots in [0, {self.cache_rows})")
        return index

    def read_cache(self) -> list[np.ndarray]:
        raise UsageError(
            "the qaic session keeps the retained cache on the device and never copies it out; "
            "compare logits or tokens against this backend instead"
        )

    def close(self) -> None:
        if getattr(self, "_program", None) is not None:
            self.deactivate()
        self._program = self._queue = self._context = None

    def __enter__(self) -> QaicSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
