"""A machine-speed probe, measured side by side with every benchmark.

Benchmarks compare tokens/s with a committed baseline, but a shared 2-core machine runs 1.5-3x
slower under load. The probe is a fixed small ONNX graph (8 MatMul + Add + Relu layers, 64 wide,
seeded weights) run by ONNX Runtime with the benchmark's thread count: like a tiny-tier decode
step, its speed is set by per-node overhead and the CPU's state. Measured between the benchmark's
repeats, its median rate goes into the record and the baseline; comparisons then use figures
normalised by ``probe_now / probe_at_baseline`` (see :func:`pytest_qeff.baseline.check`).
"""

from __future__ import annotations

import statistics
import time

__all__ = ["Probe"]

_WIDTH, _LAYERS = 64, 8


def _graph() -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(_LAYERS):
        w = numpy_helper.from_array(rng.standard_normal((_WIDTH, _WIDTH)).astype(np.float32) / 8, f"w{i}")
        b = numpy_helper.from_array(rng.standard_normal(_WIDTH).astype(np.float32), f"b{i}")
        inits += [w, b]
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"h{i}"]),
        ]
        x = f"h{i}"
    graph = helper.make_graph(
        nodes, "qeff_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _WIDTH])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, _WIDTH])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


class Probe:
    """``rate()`` = runs per second of the probe graph, over ``runs`` runs."""

    def __init__(self, threads: int | None = None):
        import numpy as np
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(_graph(), opts, providers=["CPUExecutionProvider"])
        self._feed = {"x": np.ones((1, _WIDTH), np.float32)}
        self._rates: list[float] = []
        self.rate(200)  # warm-up

    def rate(self, runs: int = 2000) -> float:
        run = self._session.run
        start = time.perf_counter()
        for _ in range(runs):
            run(None, self._feed)
        value = runs / (time.perf_counter() - start)
        self._rates.append(value)
        return value

    def median(self) -> float:
        return statistics.median(self._rates[1:]) if len(self._rates) > 1 else float("nan")
