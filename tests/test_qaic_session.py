"""QaicSession's contract, without hardware: a tiny random Llama is transformed, exported, compiled
by qeff's real compile step (with the fake compiler on PATH) and run through ``QaicSession`` over
a stand-in ``qaicrt`` that computes with ONNX Runtime and enforces the runtime's constraints
(compiled shapes only, every buffer sized right, retained state kept on the "device", which
starts as garbage). It must give the same tokens as the ORT backend, through the same loop.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qeff import sdk as qeff_sdk
from qeff.compilers import qaic as qaic_compile
from qeff.compilers.qaic import QaicCompileOptions
from qeff.errors import ArtifactError, BackendUnavailableError, UsageError
from qeff.generation import generate
from qeff.runtime.base import Session
from qeff.runtime.ort import OrtSession
from qeff.runtime.qaic import QaicSession

_spec = importlib.util.spec_from_file_location("_qeff_test_qaic_helpers", Path(__file__).parent / "fakes" / "qaic_helpers.py")
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

TINY_LLAMA = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def onnx_path(module_tmp) -> Path:
    from qeff.exporter import export
    from qeff.intake.loading import from_config
    from qeff.transforms import transform

    qmodel = transform(from_config("llama", TINY_LLAMA, seed=0))
    return export(qmodel, module_tmp("tiny_llama")).path


@pytest.fixture
def sdk(tmp_path, monkeypatch):
    """The fake compiler first (and alone) on PATH, the fake runtime importable as qaicrt."""
    H.install_fake_compiler(tmp_path / "bin", "qaic-exec")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return H.install_fake_runtime(monkeypatch)


def _compile(onnx_path: Path, out: Path, **options) -> Path:
    return qaic_compile.compile(onnx_path, out, QaicCompileOptions(**options)).out_dir


def _ort_tokens(onnx_path, batch_size, ctx_len, prompt_len, prompts, generation_len):
    ort = OrtSession(onnx_path, batch_size=batch_size, ctx_len=ctx_len, threads=1)
    return generate(ort, prompt_token_ids=prompts, prompt_len=prompt_len, generation_len=generation_len)


CASES = {
    # id: (compile options, device_ids, prompts, generation_len)
    "bs2_multichunk_prefill": (dict(batch_size=2, prompt_len=4, ctx_len=32), None, [[5, 17, 3, 99, 42, 7, 1], [12, 8]], 12),
    "bs3_padding_row": (dict(batch_size=3, prompt_len=8, ctx_len=24), None, [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]], 6),
    "decode_only_qpc": (dict(batch_size=1, prompt_len=1, ctx_len=16), None, [[3, 1, 4, 1, 5]], 5),
    "fills_the_cache": (dict(batch_size=1, prompt_len=4, ctx_len=12), None, [[9, 9, 8]], None),
    "mxfp6_mxint8_2devices": (dict(batch_size=1, prompt_len=4, ctx_len=32, mxfp6=True, mxint8=True, num_devices=2),
                              [3, 5], [[7, 6, 5, 4, 3]], 8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tokens_as_ort(case, onnx_path, sdk, tmp_path):
    options, device_ids, prompts, generation_len = CASES[case]
    compile_dir = _compile(onnx_path, tmp_path / "qpc", **options)
    with QaicSession(compile_dir / "qpcs", device_ids=device_ids) as session:
        assert isinstance(session, Session)
        # Dimensions come from the artifact, not from the caller.
        assert (session.batch_size, session.prompt_len, session.ctx_len) == (
            options["batch_size"], options["prompt_len"], options["ctx_len"])
        assert session.num_layers == TINY_LLAMA["num_hidden_layers"] and session.vocab_size == TINY_LLAMA["vocab_size"]
        got = generate(session, prompt_token_ids=prompts, generation_len=generation_len)
        runs = session._program.runs

    want = _ort_tokens(onnx_path, options["batch_size"], options["ctx_len"], options["prompt_len"], prompts, generation_len)
    assert got.token_ids == want.token_ids
    assert got.stop_reasons == want.stop_reasons
    # Prefill ran in prompt_len chunks on the prefill specialization, then decode on seq_len 1.
    chunks = -(-max(len(p) for p in prompts) // options["prompt_len"])
    assert [r["seq_len"] for r in runs[:chunks]] == [options["prompt_len"]] * chunks
    assert all(r["seq_len"] == 1 for r in runs[chunks:])
    assert len(runs) == chunks + max(len(t) for t in got.token_ids) - 1
    # No retained tensor ever crossed the host boundary: the cache stayed on the device.
    assert all(r["crossed"] == [] for r in runs)


def test_shapes_not_compiled_are_refused(onnx_path, sdk, tmp_path):
    compile_dir = _compile(onnx_path, tmp_path / "qpc", batch_size=2, prompt_len=4, ctx_len=16)
    with QaicSession(compile_dir) as session:
        ids = np.zeros((2, 3), np.int64)
        with pytest.raises(UsageError, match=r"accepts input shapes \(2, 4\) or \(2, 1\) only \(got \(2, 3\)\)"):
            session.run(ids, ids)
        with pytest.raises(UsageError, match="accepts input shapes"):
            session.run(np.zeros((1, 4), np.int64), np.zeros((1, 4), np.int64))
        logits = session.run(np.ones((2, 4), np.int64), np.tile(np.arange(4), (2, 1)))
        assert logits.shape == (2, TINY_LLAMA["vocab_size"]) and logits.dtype == np.float32


def test_the_stand_in_enforces_the_runtime_constraints(onnx_path, sdk, tmp_path):
    """Proof that the contract tests above are not passing against a permissive fake."""
    compile_dir = _compile(onnx_path, tmp_path / "qpc", batch_size=1, prompt_len=4, ctx_len=16)
    session = QaicSession(compile_dir)
    rt, exe = sdk, session._exec
    ids_i = session._index["input_ids"]
    # A seq_len that was not compiled: "No matching dimension found".
    session._set("input_ids", np.zeros((1, 3), np.int64))
    session._set("position_ids", np.zeros((1, 3), np.int64))
    assert exe.setData(session._qbuffers, session._buf_dims) == rt.QStatus.QS_SUCCESS
    session._queue.enqueue(exe)
    assert exe.waitForCompletion() != rt.QStatus.QS_SUCCESS and "No matching dimension" in exe.error
    # A buffer whose size disagrees with its dims.
    session._buf_dims[ids_i] = (8, [1, 4])
    exe.setData(session._qbuffers, session._buf_dims)
    session._queue.enqueue(exe)
    assert exe.waitForCompletion() != rt.QStatus.QS_SUCCESS and "bytes for dims" in exe.error
    # int32 ids where the program takes int64.
    session._set("input_ids", np.zeros((1, 4), np.int32))
    exe.setData(session._qbuffers, session._buf_dims)
    session._queue.enqueue(exe)
    assert "element size" in exe.error
    # Binding the retained state (not skipping it) moves it across the boundary, and is recorded.
    session._set("input_ids", np.zeros((1, 4), np.int64))
    session._set("position_ids", np.tile(np.arange(4), (1, 1)))
    past = session._index["past_key.0_RetainedState"]
    session._qbuffers[past] = rt.QBuffer(bytes(1 * 2 * 16 * 8 * 2))  # float16 custom IO
    session._buf_dims[past] = (2, [1, 2, 16, 8])
    exe.setData(session._qbuffers, session._buf_dims)
    session._queue.enqueue(exe)
    assert exe.waitForCompletion() == rt.QStatus.QS_SUCCESS
    assert session._program.runs[-1]["crossed"] == ["past_key.0_RetainedState"]
    session.close()
    # An ExecObj needs a loaded and activated program.
    program = rt.Program(rt.Context(rt.QIDList([0])), 0, rt.Qpc(str(compile_dir / "qpcs")), rt.QAicProgramProperties())
    with pytest.raises(RuntimeError, match="activated"):
        rt.ExecObj(program.context, program)


def test_qpc_path_forms(onnx_path, sdk, tmp_path):
    compile_dir = _compile(onnx_path, tmp_path / "qpc", batch_size=1, prompt_len=2, ctx_len=8)
    for path in (compile_dir, compile_dir / "qpcs", compile_dir / "qpcs" / "programqpc.bin"):
        with QaicSession(path) as session:
            assert session.qpc_dir == compile_dir / "qpcs"
    with pytest.raises(ArtifactError, match="no QPC at"):
        QaicSession(tmp_path / "nowhere")


def test_specializations_file_must_match_the_qpc(onnx_path, sdk, tmp_path):
    compile_dir = _compile(onnx_path, tmp_path / "qpc", batch_size=1, prompt_len=4, ctx_len=16)
    spec = json.loads((compile_dir / "specializations.json").read_text())
    spec["specializations"][0]["seq_len"] = "8"
    (compile_dir / "specializations.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="recompile"):
        QaicSession(compile_dir)


def test_device_group_must_match_the_compiled_device_count(onnx_path, sdk, tmp_path):
    compile_dir = _compile(onnx_path, tmp_path / "qpc", batch_size=1, prompt_len=4, ctx_len=16, num_devices=2)
    with pytest.raises(UsageError, match="compiled for 2 device"):
        QaicSession(compile_dir, device_ids=[0])
    with QaicSession(compile_dir) as session:  # defaults to 0 … n-1
        assert session.device_ids == [0, 1]
        assert session._program.properties.devMapping == "0:1"


def test_read_cache_is_refused_and_close_is_final(onnx_path, sdk, tmp_path):
    compile_dir = _compile(onnx_path, tmp_path / "qpc", batch_size=1, prompt_len=4, ctx_len=16)
    session = QaicSession(compile_dir)
    with pytest.raises(UsageError, match="keeps the retained cache on the device"):
        session.read_cache()
    session.close()
    session.close()
    with pytest.raises(UsageError, match="not active"):
        session.run(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64))


def test_without_the_sdk_the_error_names_the_install_location(onnx_path, sdk, tmp_path, monkeypatch):
    compile_dir = _compile(onnx_path, tmp_path / "qpc", batch_size=1, prompt_len=4, ctx_len=16)
    monkeypatch.setitem(sys.modules, "qaicrt", None)  # import qaicrt fails, even from the SDK dir
    with pytest.raises(BackendUnavailableError) as err:
        QaicSession(compile_dir)
    assert "qaicrt" in str(err.value) and str(qeff_sdk.LIB_DIR) in str(err.value)
    assert str(qeff_sdk.LIB_DIR).startswith("/opt/qti-aic/dev/lib/")
