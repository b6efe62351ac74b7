"""Cloud AI 100 compile files for the serving graphs (continuous batching, speculative targets),
without the SDK: golden files, the facts QEfficient's compile flow states for them, and a fake
compiler that checks every specialization key is a symbolic dim of the graph.

Regenerate the golden files (then read the diff!) with ``QEFF_UPDATE_GOLDEN=1 pytest tests/test_qaic_serving_compile.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qeff import sdk
from qeff.compilers.qaic import QaicCompileOptions, compile, qpc_dir_name
from qeff.errors import ArtifactError, UsageError
from tests.fakes.qaic_helpers import install_fake_compiler, tiny_retained_onnx

GOLDEN = Path(__file__).parent / "golden" / "qaic"
UPDATE = os.environ.get("QEFF_UPDATE_GOLDEN") == "1"

# case id → (options, the directory name)
GRID = {
    "cb_fbs4": (QaicCompileOptions(full_batch_size=4), "qpc_16cores_1BS_32PL_128CL_4FBS_1devices_fp16"),
    "cb_fbs8_pl1_cl256_mxint8_2dev": (
        QaicCompileOptions(full_batch_size=8, prompt_len=1, ctx_len=256, mxint8=True, num_devices=2),
        "qpc_16cores_1BS_1PL_256CL_8FBS_2devices_fp16_mxint8",
    ),
    "tlm_bs2_nst3_mxfp6": (
        QaicCompileOptions(batch_size=2, num_speculative_tokens=3, mxfp6=True),
        "qpc_16cores_2BS_32PL_128CL_3NST_1devices_mxfp6",
    ),
    "cb_tlm_fbs2_nst4": (
        QaicCompileOptions(full_batch_size=2, num_speculative_tokens=4, prompt_len=64, ctx_len=512),
        "qpc_16cores_1BS_64PL_512CL_2FBS_4NST_1devices_fp16",
    ),
}


def graph_for(options: QaicCompileOptions, out: Path) -> Path:
    return tiny_retained_onnx(out / "model.onnx", continuous_batching=options.full_batch_size is not None,
                              speculative=options.num_speculative_tokens is not None)


def expected_specializations(o: QaicCompileOptions) -> list[dict[str, str]]:
    """QEfficient's rules, restated: prefill runs batch_size rows (1 with continuous batching) and
    binds full_batch_size; decode runs full_batch_size rows; a speculative target decodes K+1
    positions and keeps K+1 logits (1 in prefill)."""
    prefill = {"batch_size": str(o.batch_size), "seq_len": str(o.prompt_len), "ctx_len": str(o.ctx_len)}
    decode = {"batch_size": str(o.full_batch_size or o.batch_size), "seq_len": "1", "ctx_len": str(o.ctx_len)}
    if o.full_batch_size:
        prefill["full_batch_size"] = decode["full_batch_size"] = str(o.full_batch_size)
    if o.num_speculative_tokens:
        decode["seq_len"] = str(o.num_speculative_tokens + 1)
        prefill["num_logits_to_keep"], decode["num_logits_to_keep"] = "1", str(o.num_speculative_tokens + 1)
    return [prefill, decode]


@pytest.mark.parametrize("case", sorted(GRID))
def test_golden_files_and_facts(case, tmp_path):
    options, dir_name = GRID[case]
    onnx_path = graph_for(options, tmp_path / "onnx")
    compiler = "/opt/qti-aic/exec/qaic-exec"
    out = tmp_path / qpc_dir_name(options)
    result = compile(onnx_path, out, options, dry_run=True, compiler=compiler)
    assert qpc_dir_name(options) == dir_name
    rendered = {p.name: p.read_text().replace(str(onnx_path), "{onnx}") for p in sorted(out.iterdir()) if p.name != "compile.json"}
    golden_dir = GOLDEN / case
    if UPDATE:
        golden_dir.mkdir(parents=True, exist_ok=True)
        for old in golden_dir.iterdir():
            old.unlink()
        for fname, text in rendered.items():
            (golden_dir / fname).write_text(text)
    expected = {p.name: p.read_text() for p in sorted(golden_dir.iterdir())}
    assert rendered == expected
    spec = json.loads(expected["specializations.json"])["specializations"]
    assert spec == expected_specializations(options)
    # batch_index and num_logits_to_keep are int64 inputs the runtime feeds: not retained state.
    assert "batch_index" not in expected["custom_io.yaml"] and "num_logits_to_keep" not in expected["custom_io.yaml"]
    assert result.manifest["options"]["full_batch_size" if options.full_batch_size else "batch_size"]


def test_plain_options_keep_their_manifest_keys():
    assert "full_batch_size" not in QaicCompileOptions().to_dict()
    assert QaicCompileOptions(full_batch_size=3).to_dict()["full_batch_size"] == 3


@pytest.mark.parametrize("case", sorted(GRID))
def test_fake_compiler_accepts_the_serving_specializations(case, tmp_path, monkeypatch):
    options, _ = GRID[case]
    install_fake_compiler(tmp_path / "bin", "qaic-exec")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(sdk, "EXEC_DIR", tmp_path / "no-sdk")
    result = compile(graph_for(options, tmp_path / "onnx"), tmp_path / "out", options)
    program = json.loads((result.qpc_dir / "programqpc.bin").read_text())
    assert [{k: str(v) for k, v in s.items()} for s in program["specializations"]] == expected_specializations(options)


def test_the_graph_must_match_the_serving_options(tmp_path):
    plain = tiny_retained_onnx(tmp_path / "plain" / "model.onnx")
    slots = tiny_retained_onnx(tmp_path / "cb" / "model.onnx", continuous_batching=True)
    kw = dict(dry_run=True, compiler="/opt/qti-aic/exec/qaic-exec")
    with pytest.raises(ArtifactError, match="no batch_index input"):
        compile(plain, tmp_path / "a", QaicCompileOptions(full_batch_size=4), **kw)
    with pytest.raises(ArtifactError, match="has a batch_index input"):
        compile(slots, tmp_path / "b", QaicCompileOptions(), **kw)
    with pytest.raises(ArtifactError, match="no num_logits_to_keep input"):
        compile(slots, tmp_path / "c", QaicCompileOptions(full_batch_size=4, num_speculative_tokens=2), **kw)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"full_batch_size": 0}, "full_batch_size must be a positive integer"),
        ({"full_batch_size": 4, "batch_size": 2}, "leave batch_size at 1"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer"),
        ({"num_speculative_tokens": 200, "ctx_len": 128}, "needs ctx_len above it"),
    ],
)
def test_bad_serving_options(kwargs, message):
    with pytest.raises(UsageError, match=message):
        QaicCompileOptions(**kwargs)
