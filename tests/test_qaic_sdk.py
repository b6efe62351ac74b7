"""The Cloud AI 100 backend on the real SDK and hardware. Everywhere else these tests skip, naming
where the SDK was looked for.

``QEFF_QAIC_DEVICES`` (default ``0``) picks the device ids, e.g. ``QEFF_QAIC_DEVICES=0,1`` compiles
for and runs on two devices.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from qeff import sdk
from qeff.compilers.qaic import QaicCompileOptions, compile
from qeff.sdk import require_compiler as find_compiler
from qeff.errors import BackendUnavailableError

TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
)
DEVICES = [int(d) for d in os.environ.get("QEFF_QAIC_DEVICES", "0").split(",")]


@pytest.fixture(scope="module")
def sdk_compiler() -> Path:
    try:
        return find_compiler()
    except BackendUnavailableError as exc:
        pytest.skip(f"Cloud AI SDK compiler not installed: {exc}")


@pytest.fixture(scope="module")
def sdk_runtime() -> None:
    try:
        sdk.import_runtime()
    except BackendUnavailableError as exc:
        pytest.skip(f"Cloud AI SDK runtime not installed (expected qaicrt in {sdk.LIB_DIR}/): {exc}")


@pytest.fixture(scope="module")
def onnx_path(module_tmp) -> Path:
    from qeff.exporter import export
    from qeff.intake.loading import from_config
    from qeff.transforms import transform

    return export(transform(from_config("llama", TINY_LLAMA, seed=0)), module_tmp("tiny_llama")).path


def test_real_compile_writes_a_qpc(sdk_compiler, onnx_path, tmp_path):
    options = QaicCompileOptions(batch_size=1, prompt_len=8, ctx_len=64, num_cores=4, num_devices=len(DEVICES))
    result = compile(onnx_path, tmp_path / "qpc", options, timeout_s=1800)
    assert (result.qpc_dir / "programqpc.bin").is_file()


def test_real_run_matches_onnxruntime(sdk_compiler, sdk_runtime, onnx_path, tmp_path):
    from qeff.generation import generate
    from qeff.runtime.ort import OrtSession
    from qeff.runtime.qaic import QaicSession

    options = QaicCompileOptions(batch_size=2, prompt_len=8, ctx_len=64, num_cores=4, num_devices=len(DEVICES))
    result = compile(onnx_path, tmp_path / "qpc", options, timeout_s=1800)
    prompts = [[5, 17, 3, 99, 42, 7, 1, 200, 33, 4], [12, 8]]
    ort = OrtSession(onnx_path, batch_size=2, ctx_len=64)
    with QaicSession(result.qpc_dir, device_ids=DEVICES) as device:
        assert (device.batch_size, device.prompt_len, device.ctx_len) == (2, 8, 64)
        ids = np.zeros((2, 8), np.int64)
        ids[0], ids[1, :2] = prompts[0][:8], prompts[1]
        pos = np.where(np.arange(8) < np.array([[8], [2]]), np.arange(8), -1)
        # fp16 on the device: the first prefill chunk's logits agree to fp16 precision.
        got, want = device.run(ids, pos), ort.run(ids, pos)
        assert np.abs(got - want).max() <= 2e-2 * max(1.0, float(np.abs(want).max()))
    with QaicSession(result.qpc_dir, device_ids=DEVICES) as device:
        got = generate(device, prompt_token_ids=prompts, generation_len=8)
    want = generate(OrtSession(onnx_path, batch_size=2, ctx_len=64), prompt_token_ids=prompts, prompt_len=8, generation_len=8)
    assert got.token_ids == want.token_ids
