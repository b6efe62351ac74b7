"""Stand-in for the Cloud AI SDK's ``qaicrt`` runtime module — TESTS ONLY, never used by qeff.

It offers the calls QEfficient's ``QAICInferenceSession`` makes (quic/efficient-transformers,
``QEfficient/generation/cloud_infer.py``) and computes with ONNX Runtime underneath, on the ONNX
graph named in a ``programqpc.bin`` written by ``fake_qaic_compiler.py``. It enforces what the
real runtime is documented or observed to enforce, so that a wrapper passing against it has its
buffer handling right:

- a ``Program`` must be loaded, then activated, before an ``ExecObj`` is made from it; a QPC
  compiled for n devices needs a context of n devices and, for n > 1, ``devMapping``;
- every binding gets a buffer in ``setData``; a buffer's byte size must equal its dims times the
  binding's element size; only retained-state bindings (``is_partial_buf_allowed``) may be zero-size;
- the shapes passed must be one of the compiled specializations ("No matching dimension found"),
  which is how the runtime picks prefill or decode;
- retained state lives on the device: a zero-size ``past_*`` input reads the device copy, every
  ``*_RetainedState`` output updates it, and a zero-size ``*_RetainedState`` buffer returns nothing.
  The device copy starts as seeded random garbage (device memory is not zeroed for you).

``Program.runs`` records each execution (specialization index, which retained tensors crossed
the host boundary) for tests to assert on.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np


def _sibling(name: str):
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_qeff_test_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The fake ``QAicApi_pb2`` this runtime's IO descriptors are parsed by.
aicapi = _sibling("fake_qaicapi")

_NP = {
    aicapi.FLOAT_TYPE: np.float32,
    aicapi.FLOAT_16_TYPE: np.float16,
    aicapi.INT64_I_TYPE: np.int64,
    aicapi.INT32_I_TYPE: np.int32,
}


class QStatus(enum.Enum):
    QS_SUCCESS = 0
    QS_ERROR = 1
    QS_INVAL = 2


class QLogLevel(enum.Enum):
    QL_DEBUG = 0
    QL_INFO = 1


class QIDList(list):
    pass


class QBuffer:
    def __init__(self, data: bytes = b""):
        self._data = bytes(data)

    @property
    def size(self) -> int:
        return len(self._data)

    def __bytes__(self) -> bytes:
        return self._data


class BufferDimensionsVecRef(list):
    """A list of ``(element size, dims)``."""

    def __init__(self, items=()):
        super().__init__(self._entry(i) for i in items)

    @staticmethod
    def _entry(item):
        itemsize, dims = item
        return (int(itemsize), [int(d) for d in dims])

    def __setitem__(self, index, item):
        super().__setitem__(index, self._entry(item))


class Context:
    def __init__(self, devices: QIDList | None = None):
        self.devices = list(devices) if devices is not None else [0]
        self.log_level = None

    def setLogLevel(self, level) -> QStatus:  # noqa: N802
        self.log_level = level
        return QStatus.QS_SUCCESS


class Qpc:
    def __init__(self, path: str):
        qpc_file = Path(path) / "programqpc.bin"
        if not qpc_file.is_file():
            raise RuntimeError(f"Failed to open QPC {path}")  # the real constructor fails too
        self.path = Path(path)
        self.program = json.loads(qpc_file.read_text())
        self._bindings, self._shapes = _describe(self.program)

    def getIoDescriptor(self):  # noqa: N802
        allowed = []
        if len(self._shapes) > 1:  # like a real single-specialization QPC, list none for one
            allowed = [
                [{"type": b["type"], "dims": shapes[b["name"]]} for b in self._bindings] for shapes in self._shapes
            ]
        raw = {"bindings": self._bindings, "allowed_shapes": allowed}
        return QStatus.QS_SUCCESS, bytearray(json.dumps(raw).encode())


def _describe(program: dict) -> tuple[list[dict], list[dict[str, list[int]]]]:
    """Bindings (selected set = first specialization) and each specialization's dims per name."""
    import onnx

    model = onnx.load(program["onnx"], load_external_data=False)
    custom = program["custom_io"]
    ios = [(i, aicapi.BUFFER_IO_TYPE_INPUT) for i in model.graph.input] + [
        (o, aicapi.BUFFER_IO_TYPE_OUTPUT) for o in model.graph.output
    ]
    shapes = []
    for spec in program["specializations"]:
        shapes.append(
            {
                io.name: [spec[d.dim_param] if d.dim_param else d.dim_value for d in io.type.tensor_type.shape.dim]
                for io, _ in ios
            }
        )
    bindings = []
    for index, (io, direction) in enumerate(ios):
        elem = io.type.tensor_type.elem_type
        if io.name in custom:
            kind = aicapi.FLOAT_16_TYPE if custom[io.name] == "float16" else aicapi._OPAQUE_TYPE
        else:
            kind = {onnx.TensorProto.FLOAT: aicapi.FLOAT_TYPE, onnx.TensorProto.INT64: aicapi.INT64_I_TYPE}[elem]
        dims = shapes[0][io.name]
        itemsize = np.dtype(_NP[kind]).itemsize if kind in _NP else 1
        retained = io.name.startswith("past_")
        bindings.append(
            {
                "name": io.name,
                "index": index,
                "dims": dims,
                "size": int(np.prod(dims)) * itemsize,
                "type": kind,
                "dir": direction,
                "is_partial_buf_allowed": retained,
            }
        )
    return bindings, shapes


class QAicProgramProperties:
    __slots__ = ("SubmitRetryTimeoutMs", "devMapping")  # pybind objects refuse unknown attributes

    def __init__(self):
        self.SubmitRetryTimeoutMs = 0
        self.devMapping = ""


class Program:
    def __init__(self, context: Context, device, qpc: Qpc, properties: QAicProgramProperties):
        n = qpc.program["num_devices"]
        if len(context.devices) != n:
            raise RuntimeError(f"QPC compiled for {n} device(s), context has {context.devices}")
        if n > 1 and properties.devMapping != ":".join(map(str, context.devices)):
            raise RuntimeError(f"multi-device QPC needs devMapping over {context.devices}, got {properties.devMapping!r}")
        if n == 1 and device is not None and device not in context.devices:
            raise RuntimeError(f"device {device} is not in the context {context.devices}")
        self.context, self.qpc, self.properties = context, qpc, properties
        self.bindings = qpc._bindings
        self.shapes = qpc._shapes
        self.loaded = self.active = False
        self.device_state: dict[str, np.ndarray] = {}
        self.runs: list[dict] = []
        self._session = None

    def load(self) -> QStatus:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(self.qpc.program["onnx"], sess_options=opts, providers=["CPUExecutionProvider"])
        self.loaded = True
        return QStatus.QS_SUCCESS

    def activate(self) -> QStatus:
        if not self.loaded:
            return QStatus.QS_ERROR
        rng = np.random.default_rng(1234)
        shapes = self.shapes[0]
        self.device_state = {
            b["name"]: rng.standard_normal(shapes[b["name"]]).astype(np.float32)
            for b in self.bindings
            if b["dir"] == aicapi.BUFFER_IO_TYPE_INPUT and b["name"].startswith("past_")
        }
        self.active = True
        return QStatus.QS_SUCCESS

    def deactivate(self) -> QStatus:
        self.active = False
        self.device_state = {}
        return QStatus.QS_SUCCESS


class ExecObj:
    def __init__(self, context: Context, program: Program):
        if not program.active:
            raise RuntimeError("ExecObj needs an activated Program")
        self.context, self.program = context, program
        self._buffers: list[QBuffer] | None = None
        self._dims: list | None = None
        self._status = QStatus.QS_ERROR
        self._outputs: list[QBuffer] = []
        self.error = ""

    def setData(self, qbuffers, buf_dims) -> QStatus:  # noqa: N802
        n = len(self.program.bindings)
        if len(qbuffers) != n or len(buf_dims) != n:
            return QStatus.QS_INVAL
        self._buffers = list(qbuffers)
        self._dims = [(int(s), [int(d) for d in dims]) for s, dims in buf_dims]
        return QStatus.QS_SUCCESS

    def waitForCompletion(self) -> QStatus:  # noqa: N802
        return self._status

    def getData(self):  # noqa: N802
        return self._status, list(self._outputs)

    def _fail(self, message: str) -> None:
        self.error = message
        sys.stderr.write(f"fake qaicrt: {message}\n")
        self._status = QStatus.QS_ERROR

    def _execute(self) -> None:
        program = self.program
        if not program.active or self._buffers is None:
            return self._fail("execution without an active program or data")
        passed: dict[str, tuple[list[int], bytes] | None] = {}
        for b, buf, (itemsize, dims) in zip(program.bindings, self._buffers, self._dims):
            if buf.size == 0:
                if not b["is_partial_buf_allowed"] and b["dir"] == aicapi.BUFFER_IO_TYPE_INPUT:
                    return self._fail(f"no data for input {b['name']}")
                passed[b["name"]] = None
                continue
            if b["type"] not in _NP or np.dtype(_NP[b["type"]]).itemsize != itemsize:
                return self._fail(f"{b['name']}: element size {itemsize} does not match the binding's type")
            if int(np.prod(dims)) * itemsize != buf.size:
                return self._fail(f"{b['name']}: buffer of {buf.size} bytes for dims {dims}")
            passed[b["name"]] = (dims, bytes(buf))
        for index, shapes in enumerate(program.shapes):
            if all(v is None or v[0] == shapes[name] for name, v in passed.items()):
                break
        else:
            return self._fail("No matching dimension found")
        feeds = {}
        for b in program.bindings:
            if b["dir"] != aicapi.BUFFER_IO_TYPE_INPUT:
                continue
            given = passed[b["name"]]
            if given is None:
                feeds[b["name"]] = program.device_state[b["name"]]
            else:
                dims, data = given
                feeds[b["name"]] = np.frombuffer(data, _NP[b["type"]]).reshape(dims).astype(
                    np.float32 if b["name"].startswith("past_") else _NP[b["type"]]
                )
        names = [b["name"] for b in program.bindings if b["dir"] == aicapi.BUFFER_IO_TYPE_OUTPUT]
        results = dict(zip(names, program._session.run(names, feeds)))
        outputs, crossed = [], sorted(n for n, v in passed.items() if v is not None and n.startswith("past_"))
        for b, buf in zip(program.bindings, self._buffers):
            name = b["name"]
            if b["dir"] == aicapi.BUFFER_IO_TYPE_INPUT:
                outputs.append(buf)
                continue
            if name.endswith("_RetainedState"):
                program.device_state[name[: -len("_RetainedState")]] = results[name]
            if passed[name] is None:
                outputs.append(QBuffer(b""))
            else:
                outputs.append(QBuffer(results[name].astype(_NP[b["type"]]).tobytes()))
        program.runs.append({"specialization": index, "seq_len": program.shapes[index]["input_ids"][1], "crossed": crossed})
        self._outputs = outputs
        self._status = QStatus.QS_SUCCESS


class Queue:
    def __init__(self, context: Context, device: int):
        if device not in context.devices:
            raise RuntimeError(f"queue device {device} is not in the context {context.devices}")
        self.context = context

    def enqueue(self, exec_obj: ExecObj) -> QStatus:
        exec_obj._status = QStatus.QS_ERROR
        exec_obj._execute()
        return QStatus.QS_SUCCESS
