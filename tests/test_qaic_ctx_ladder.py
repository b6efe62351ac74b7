"""Cloud AI 100 compile files for the compute-context ladder, without the SDK: the
specializations follow QEfficient's documented layout (every prefill entry, then every decode
entry, each binding ``comp_ctx_lengths`` to one ladder length, values as strings), the fake
compiler finds every key a symbolic dim of a real exported ladder graph, and a graph/options
mismatch is one sentence."""

from __future__ import annotations

import json

import pytest

import qeff
from qeff import sdk
from qeff.compilers.qaic import QaicCompileOptions, compile, specializations
from qeff.errors import ArtifactError, UsageError
from qeff.serving.variant import GraphVariant
from tests.fakes.qaic_helpers import install_fake_compiler, tiny_retained_onnx
from tests.serving_helpers import serving_model

EXEC = "/opt/qti-aic/exec/qaic-exec"


def expected(o: QaicCompileOptions, ladder) -> list[dict[str, str]]:
    """The layout restated: prefill (batch_size rows, prompt_len) per length, then decode
    (full_batch_size or batch_size rows, one token) per length."""
    rows = o.full_batch_size or o.batch_size
    extra = {"full_batch_size": str(o.full_batch_size)} if o.full_batch_size else {}
    pre = [{"batch_size": str(o.batch_size), "seq_len": str(o.prompt_len), "ctx_len": str(o.ctx_len), **extra,
            "comp_ctx_lengths": str(c)} for c in ladder]
    dec = [{"batch_size": str(rows), "seq_len": "1", "ctx_len": str(o.ctx_len), **extra, "comp_ctx_lengths": str(c)}
           for c in ladder]
    return pre + dec


@pytest.fixture(scope="module")
def ladder_graphs(module_tmp):
    out = module_tmp("qaic-ladder")
    qmodel = qeff.transform(serving_model("llama", seed=1))
    return {name: qeff.export(qmodel, out / name, variant=v).path
            for name, v in (("cc", GraphVariant(comp_ctx=True)), ("cb_cc", GraphVariant(continuous_batching=True, comp_ctx=True)))}


@pytest.mark.parametrize("case", ["cc", "cb_cc"])
def test_specializations_one_prefill_and_one_decode_per_length(case, ladder_graphs, tmp_path, monkeypatch):
    fbs = 4 if case == "cb_cc" else None
    options = QaicCompileOptions(ctx_len=4096, prompt_len=32, full_batch_size=fbs, comp_ctx_lengths=(256, 1024))
    assert options.comp_ctx_lengths == (256, 1024, 4096)  # ctx_len closes the ladder
    install_fake_compiler(tmp_path / "bin", "qaic-exec")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(sdk, "EXEC_DIR", tmp_path / "no-sdk")
    result = compile(ladder_graphs[case], tmp_path / "out", options)
    written = json.loads((result.out_dir / "specializations.json").read_text())["specializations"]
    assert written == expected(options, (256, 1024, 4096))
    assert all(isinstance(v, str) for e in written for v in e.values())  # the compiler rejects integers
    program = json.loads((result.qpc_dir / "programqpc.bin").read_text())  # the fake checked every key is a graph dim
    assert [{k: str(v) for k, v in s.items()} for s in program["specializations"]] == written
    assert "comp_ctx_lengths" not in (result.out_dir / "custom_io.yaml").read_text()  # an int64 input, not retained state
    assert result.manifest["options"]["comp_ctx_lengths"] == [256, 1024, 4096]


def test_plain_options_keep_their_specializations_and_keys():
    plain = QaicCompileOptions()
    assert "comp_ctx_lengths" not in plain.to_dict()
    assert all("comp_ctx_lengths" not in e for e in specializations(plain)["specializations"])


def test_graph_and_options_must_agree(ladder_graphs, tmp_path):
    plain = tiny_retained_onnx(tmp_path / "plain" / "model.onnx")
    with pytest.raises(ArtifactError, match="no comp_ctx_lengths input"):
        compile(plain, tmp_path / "a", QaicCompileOptions(comp_ctx_lengths=(64,)), dry_run=True, compiler=EXEC)
    with pytest.raises(ArtifactError, match="has a comp_ctx_lengths input"):
        compile(ladder_graphs["cc"], tmp_path / "b", QaicCompileOptions(), dry_run=True, compiler=EXEC)


@pytest.mark.parametrize("ladder, message", [((512,), "goes past ctx_len"), ((64, 32), "strictly increasing"), ((0,), "at least 1")])
def test_bad_ladders_are_one_sentence(ladder, message):
    with pytest.raises(UsageError, match=message):
        QaicCompileOptions(ctx_len=128, comp_ctx_lengths=ladder)
