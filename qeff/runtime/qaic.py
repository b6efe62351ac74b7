"""Cloud AI 100 session: runs a QPC through the SDK's Python runtime, ``qaicrt``.

The retained cache never leaves the device. Every ``past_*`` input and ``*_RetainedState`` output
is bound to a zero-size buffer: the runtime then reads the cache from, and writes it back to, the
device's own memory (the SDK's LLM guide: "If a zero-size past_key_values input is passed to the
model, the KV cache will be picked from the on-board DDR"). Each ``run`` sends only ``input_ids``
and ``position_ids`` and fetches only ``logits``; the runtime picks the compiled specialization
(prefill ``seq_len = prompt_len`` or decode ``seq_len = 1``) from the shapes of those buffers.

Batch size, prompt_len and ctx_len are read from the QPC's IO descriptor (its allowed shapes, one
per specialization) and checked against ``specializations.json`` beside the QPC when it is there.

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
from qeff.layout import QAIC_MANIFEST_FILE as MANIFEST_FILE
from qeff.layout import QPC_FILE, QPC_SUBDIR, SPECIALIZATIONS_FILE
from qeff.errors import ArtifactError, QEffError, UsageError

__all__ = ["QaicSession"]

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
        if manifest and manifest.get("options", {}).get("comp_ctx_lengths"):
            raise UsageError(
                f"the QPC at {self.qpc_dir} was compiled with a compute-context ladder, and qeff's Cloud AI runtime does not "
                f"switch its specializations yet; run it with QEfficient, or recompile without --comp_ctx_lengths"
            )
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
        driven = {"input_ids", "position_ids", "logits"} | self._retained
        extra = sorted(set(inputs + outputs) - driven)
        if extra:
            raise ArtifactError(f"the QPC at {self.qpc_dir} has IO this session does not drive: {', '.join(extra)}")
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key."))

        # One shape set per specialization; a single-specialization QPC may list none.
        by_index = {b.index: b.name for b in bindings}
        if len(iodesc.allowed_shapes):
            shape_sets = [
                {by_index[i]: [int(d) for d in s.dims] for i, s in enumerate(allowed.shapes) if i in by_index}
                for allowed in iodesc.allowed_shapes
            ]
        else:
            shape_sets = [{b.name: [int(d) for d in b.dims] for b in bindings}]
        specs = []
        for shapes in shape_sets:
            (batch, seq), ctx = shapes["input_ids"], shapes["past_key.0"][2]
            spec = {"batch_size": batch, "seq_len": seq, "ctx_len": ctx}
            if spec not in specs:
                specs.append(spec)
        specs.sort(key=lambda s: -s["seq_len"])  # prefill first, as compiled
        if len({s["batch_size"] for s in specs}) != 1 or len({s["ctx_len"] for s in specs}) != 1:
            raise ArtifactError(f"the QPC at {self.qpc_dir} mixes batch sizes or ctx_lens across specializations: {specs}")
        self.specializations = specs
        self.batch_size = specs[0]["batch_size"]
        self.ctx_len = specs[0]["ctx_len"]
        #: The prefill chunk length; 1 for a decode-only QPC.
        self.prompt_len = specs[0]["seq_len"]
        self._seq_lens = {s["seq_len"] for s in specs}
        logits = self._binding("logits")
        self.vocab_size = int(logits.dims[-1])
        self._logits_dtype = self._dtype(logits)
        self._ids_dtype = self._dtype(self._binding("input_ids"))
        self._pos_dtype = self._dtype(self._binding("position_ids"))

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
        logits = np.zeros((self.batch_size, 1, self.vocab_size), self._logits_dtype)
        self._set("logits", logits)

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

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=self._ids_dtype)
        pos = np.ascontiguousarray(position_ids, dtype=self._pos_dtype)
        if ids.ndim != 2 or ids.shape != pos.shape:
            raise UsageError(f"input_ids {ids.shape} and position_ids {pos.shape} must be equal (batch, seq_len) arrays")
        if ids.shape[0] != self.batch_size or ids.shape[1] not in self._seq_lens:
            shapes = " or ".join(f"({self.batch_size}, {s})" for s in sorted(self._seq_lens, reverse=True))
            raise UsageError(f"the QPC at {self.qpc_dir} accepts input shapes {shapes} only (got {ids.shape})")
        if self._exec is None:
            raise UsageError("the session is not active: call activate() first")
        self._set("input_ids", ids)
        self._set("position_ids", pos)
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
        return logits.reshape(self.batch_size, 1, self.vocab_size)[:, 0, :]

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
