"""The fused CPU graph (qeff.compilers.ort_fused) against the portable graph, on tiny models.

The portable graph is the reference here: it is verified against HF eager by
tests/test_architectures.py and friends; the fused graph must compute the same logits (fp32
rounding apart), the same cache slots and the same greedy tokens through the same Session
interface, for ragged batches, multi-chunk prompts, idle rows and sliding windows.
"""

from __future__ import annotations

import numpy as np
import pytest

import qeff
from qeff.compilers.ort_fused import FUSED_GRAPH, write_fused_graph
from qeff.compilers.ort_fused_artifact import compile_fused
from qeff.compilers.ort_fused_weights import from_hf
from qeff.cpu_graph import check_against_portable
from qeff.errors import UsageError, VerificationError
from qeff.runtime.ort import OrtSession
from qeff.runtime.ort_fused import FusedOrtSession, step_inputs
from qeff.verification import Tolerances, compare, session_trace
from tests.tiny import TINY_CONFIGS, random_prompts, tiny_model

CTX = 40  # not a multiple of the prefill chunk: the last chunk of a long prompt is partial
PROMPT_LEN = 8
PROMPTS = random_prompts((19, 3, 8), seed=11)  # 3 chunks, 1 chunk (mostly padding), exactly 1 chunk


def fused_model(name: str):
    """The cards' tiny models; qwen2's with 16-dim heads (its card has 8, which ONNX Runtime's CPU
    GroupQueryAttention refuses — see test_unsupported_configs_fall_back), same layer windows."""
    if name == "qwen2":
        model_type, config = TINY_CONFIGS["qwen2"]
        return qeff.from_config(model_type, {**config, "hidden_size": 112}, seed=7)
    return tiny_model(name, seed=7)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral-sliding"])
def built(request, module_tmp):
    model = fused_model(request.param)
    root = module_tmp(f"fused-{request.param}")
    onnx_path = qeff.export(qeff.transform(model), root / "export").path
    fused_dir = root / "fused"
    fused_dir.mkdir()
    facts = write_fused_graph(from_hf(model, CTX), fused_dir)
    return model, onnx_path, fused_dir / FUSED_GRAPH, facts


def sessions(onnx_path, fused_path, batch=4):
    return (OrtSession(onnx_path, batch_size=batch, ctx_len=CTX, prompt_len=PROMPT_LEN),
            FusedOrtSession(fused_path, batch_size=batch, ctx_len=CTX, prompt_len=PROMPT_LEN))


def test_the_graph_is_made_of_fused_ops(built):
    _, _, _, facts = built
    ops = facts["ops"]
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert facts["nodes"] < 40  # the portable graph of the same model has ~800


def test_greedy_tokens_equal_the_portable_graph(built):
    # Batch 4 with 3 prompts: row 3 is idle filler the whole time.
    _, onnx_path, fused_path, _ = built
    portable, fused = sessions(onnx_path, fused_path)
    want = qeff.generate(portable, prompt_token_ids=PROMPTS, generation_len=CTX, ignore_eos=True)
    got = qeff.generate(fused, prompt_token_ids=PROMPTS, generation_len=CTX, ignore_eos=True)
    assert got.token_ids == want.token_ids and got.stop_reasons == want.stop_reasons == ["ctx_len"] * 3


def test_logits_and_cache_match_the_portable_graph(built):
    _, onnx_path, fused_path, _ = built
    portable, fused = sessions(onnx_path, fused_path)
    tokens = qeff.generate(portable, prompt_token_ids=PROMPTS, generation_len=16, ignore_eos=True).token_ids
    portable, _ = sessions(onnx_path, fused_path)
    ref = session_trace(portable, "portable", PROMPTS, tokens, PROMPT_LEN)
    cand = session_trace(fused, "fused", PROMPTS, tokens, PROMPT_LEN)
    result = compare(ref, cand, Tolerances(logits_max_abs=1e-5, logits_mse=1e-12, cache_max_abs=1e-5, cache_mse=1e-12))
    # Measured: logits max-abs ~2e-7, cache max-abs ~1.5e-7 (2-layer models, fp32).
    assert result.passed, result.describe()
    assert result.tokens_matched == result.tokens_total == 48


def test_the_build_check_fails_on_a_seeded_fault(built, tmp_path):
    # The check compile_fused runs must not be foolable: one o_proj scaled by 1.01 is caught.
    model, onnx_path, _, _ = built
    weights = from_hf(model, CTX)
    weights.layers[1].o = weights.layers[1].o * np.float32(1.01)
    write_fused_graph(weights, tmp_path)
    session = FusedOrtSession(tmp_path / FUSED_GRAPH, batch_size=2, ctx_len=CTX, prompt_len=PROMPT_LEN)
    with pytest.raises(VerificationError, match="differs from the portable graph"):
        check_against_portable(session, onnx_path, prompt_len=PROMPT_LEN)


def test_unsupported_configs_fall_back():
    from qeff.compilers.ort_fused import unsupported_reason

    assert "multiple of 16" in unsupported_reason(tiny_model("qwen2").config)  # head_dim 8
    assert "gpt2" in unsupported_reason(qeff.from_config("gpt2", {"n_layer": 1, "n_embd": 32, "n_head": 2}).config)
    assert unsupported_reason(fused_model("qwen2").config) is None


def test_a_wrong_window_is_caught(tmp_path):
    # local_window_size is the window itself (keys p - w < k <= p); one less is a different model.
    model = tiny_model("mistral-sliding", seed=7)
    onnx_path = qeff.export(qeff.transform(model), tmp_path / "export").path
    weights = from_hf(model, CTX)
    for layer in weights.layers:
        layer.window -= 1
    write_fused_graph(weights, tmp_path)
    session = FusedOrtSession(tmp_path / FUSED_GRAPH, batch_size=2, ctx_len=CTX, prompt_len=PROMPT_LEN)
    with pytest.raises(VerificationError):
        check_against_portable(session, onnx_path, prompt_len=PROMPT_LEN)


def test_compile_fused_builds_once_checks_and_opens(tmp_path):
    model = tiny_model("llama", seed=7)
    onnx_path = qeff.export(qeff.transform(model), tmp_path / "export").path
    loads = []

    def load():
        loads.append(1)
        return model

    def check(session, gate):
        return check_against_portable(session, onnx_path, prompt_len=PROMPT_LEN, gate=gate)

    first = compile_fused(onnx_path.parent, batch_size=2, prompt_len=PROMPT_LEN, ctx_len=CTX, load_model=load, check=check)
    again = compile_fused(onnx_path.parent, batch_size=2, prompt_len=PROMPT_LEN, ctx_len=CTX, load_model=load, check=check)
    assert not first.reused and again.reused and len(loads) == 1  # a cached build never loads the model
    check = first.manifest["outputs"]["check"]
    assert check["passed"] and check["gated"] and check["tokens_matched"] == check["tokens_total"] > 0
    session = qeff.open_session(first.path)
    assert isinstance(session, FusedOrtSession) and session.batch_size == 2 and session.ctx_len == CTX


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_rtn_weights_are_reported_not_gated(tmp_path, weights):
    model = tiny_model("llama", seed=7)
    onnx_path = qeff.export(qeff.transform(model), tmp_path / "export").path
    built = compile_fused(onnx_path.parent, batch_size=1, prompt_len=PROMPT_LEN, ctx_len=CTX, weights=weights, load_model=lambda: model,
                          check=lambda session, gate: check_against_portable(session, onnx_path, prompt_len=PROMPT_LEN, gate=gate))
    check = built.manifest["outputs"]["check"]
    assert not check["gated"] and check["logits_max_abs"] > 1e-5  # the weights did change
    assert check["kld_mean"] > 0 and 0 < check["top1_agree"] <= 1  # precision metrics (qeff.metrics) reported
    assert built.manifest["outputs"]["ops"]["MatMulNBits"] > 0 and "MatMul" not in built.manifest["outputs"]["ops"]


def test_native_weights_need_a_gguf_source(tmp_path):
    model = tiny_model("llama", seed=7)
    onnx_path = qeff.export(qeff.transform(model), tmp_path / "export").path
    with pytest.raises(UsageError, match="GGUF"):
        compile_fused(onnx_path.parent, weights="native", load_model=lambda: model)
    with pytest.raises(UsageError, match="GGUF"):
        compile_fused(onnx_path.parent, weights="native", gguf_path=onnx_path)


# -- translating position_ids --------------------------------------------------------------


def test_step_inputs_ragged_prefill_and_idle_rows():
    pos = np.array([[8, 9, 10, -1], [8, -1, -1, -1], [-1, -1, -1, -1]])
    columns, seqlens_k, total, query, last = step_inputs(pos, ctx_len=16)
    assert columns == 3  # the all-padding fourth column is cut
    assert query.tolist() == [3, 1, 0]
    assert seqlens_k.tolist() == [10, 8, 0]  # tokens after the step - 1; idle rows hold a placeholder
    assert int(total) == 11
    assert last.tolist() == [2, 3, 6]  # flat index into (B * columns)


def test_step_inputs_decode():
    columns, seqlens_k, total, query, last = step_inputs(np.array([[5], [-1], [0]]), ctx_len=8)
    assert (columns, seqlens_k.tolist(), int(total), query.tolist(), last.tolist()) == (1, [5, 0, 0], 6, [1, 0, 1], [0, 1, 2])


@pytest.mark.parametrize("pos", [[[0, 2, 3]], [[-1, 0, 1]], [[0, 1, -1, 2]]])
def test_step_inputs_refuse_what_the_kernels_cannot_express(pos):
    with pytest.raises(UsageError, match="consecutive and right-padded"):
        step_inputs(np.array(pos), ctx_len=8)


def test_step_inputs_refuse_a_chunk_past_the_cache():
    with pytest.raises(UsageError, match="does not fit ctx_len=8"):
        step_inputs(np.array([[6, 7, 8]]), ctx_len=8)


def test_a_failed_check_caches_nothing(tmp_path):
    model = tiny_model("llama", seed=7)
    onnx_path = qeff.export(qeff.transform(model), tmp_path / "export").path

    def failing(session, gate):
        raise VerificationError("seeded")

    with pytest.raises(VerificationError):
        compile_fused(onnx_path.parent, batch_size=1, prompt_len=PROMPT_LEN, ctx_len=CTX, load_model=lambda: model, check=failing)
    assert not list(onnx_path.parent.glob("ort-fused*/manifest.json"))


def test_unpacked_gate_up_lowering_matches_too(built, tmp_path):
    # Artifacts for several rows use two MatMuls for gate and up instead of one + Split.
    model, onnx_path, _, _ = built
    facts = write_fused_graph(from_hf(model, CTX), tmp_path, pack_gate_up=False)
    assert "Split" not in facts["ops"]
    portable, fused = sessions(onnx_path, tmp_path / FUSED_GRAPH)
    want = qeff.generate(portable, prompt_token_ids=PROMPTS, generation_len=16, ignore_eos=True).token_ids
    assert qeff.generate(fused, prompt_token_ids=PROMPTS, generation_len=16, ignore_eos=True).token_ids == want


def test_a_large_lm_head_runs_in_slices(built, tmp_path, monkeypatch):
    # Real vocabularies are split in ~32 MB column slices (peak memory of opening the session);
    # shrink the limit so the tiny model's head is sliced too, and compare.
    import qeff.compilers.ort_fused as fused_module

    model, onnx_path, _, _ = built
    monkeypatch.setattr(fused_module, "_MAX_WEIGHT_BYTES", 4096)
    facts = write_fused_graph(from_hf(model, CTX), tmp_path)
    assert facts["ops"]["Concat"] == 1 and facts["ops"]["MatMul"] > 5 * 2 + 1
    portable, fused = sessions(onnx_path, tmp_path / FUSED_GRAPH)
    tokens = qeff.generate(portable, prompt_token_ids=PROMPTS, generation_len=8, ignore_eos=True).token_ids
    portable, _ = sessions(onnx_path, tmp_path / FUSED_GRAPH)
    ref = session_trace(portable, "portable", PROMPTS, tokens, PROMPT_LEN)
    cand = session_trace(fused, "fused", PROMPTS, tokens, PROMPT_LEN)
    assert compare(ref, cand, Tolerances(logits_max_abs=1e-5, logits_mse=1e-12, cache_max_abs=1e-5, cache_mse=1e-12)).passed


def test_unsliced_lm_head_lowering_matches_too(built, tmp_path, monkeypatch):
    # Artifacts for several rows keep the vocabulary projection in one MatMul whatever its size
    # (faster at batch 4, docs/cpu.md): with the same shrunken limit, no slices and no Concat.
    import qeff.compilers.ort_fused as fused_module

    model, onnx_path, _, _ = built
    monkeypatch.setattr(fused_module, "_MAX_WEIGHT_BYTES", 4096)
    facts = write_fused_graph(from_hf(model, CTX), tmp_path, pack_gate_up=False, slice_lm_head=False)
    assert "Concat" not in facts["ops"] and facts["ops"]["MatMul"] == 5 * model.config.num_hidden_layers + 1
    portable, fused = sessions(onnx_path, tmp_path / FUSED_GRAPH)
    tokens = qeff.generate(portable, prompt_token_ids=PROMPTS, generation_len=8, ignore_eos=True).token_ids
    portable, _ = sessions(onnx_path, tmp_path / FUSED_GRAPH)
    ref = session_trace(portable, "portable", PROMPTS, tokens, PROMPT_LEN)
    cand = session_trace(fused, "fused", PROMPTS, tokens, PROMPT_LEN)
    assert compare(ref, cand, Tolerances(logits_max_abs=1e-5, logits_mse=1e-12, cache_max_abs=1e-5, cache_mse=1e-12)).passed


def test_a_one_row_fp32_artifact_has_genai_s_structure_and_its_own_identity(tmp_path, monkeypatch):
    # Issue 21: ONNX Runtime's profiler on SmolLM2 decode steps found the one-row fp32 graph paying
    # for a sliced LM head (+ Concat), a Split after a packed gate|up, and norm statistics nobody
    # reads (docs/cpu.md). A batch-1 fp32 artifact now has one head MatMul, two gate/up MatMuls and
    # unnamed statistics outputs, computes what the portable graph computes, and an artifact built
    # with the old structure is rebuilt rather than served.
    from collections import Counter

    import onnx

    import qeff.compilers.ort_fused as fused_module
    import qeff.compilers.ort_fused_artifact as artifact_module

    monkeypatch.setattr(fused_module, "_MAX_WEIGHT_BYTES", 4096)  # the tiny head is sliced under the old rule
    model = fused_model("llama")
    onnx_path = qeff.export(qeff.transform(model), tmp_path / "export").path
    build = lambda: compile_fused(onnx_path.parent, batch_size=1, prompt_len=PROMPT_LEN, ctx_len=CTX,  # noqa: E731
                                  load_model=lambda: model)

    old = dict(pack_gate_up=True, slice_lm_head=True, norm_stats=True)
    with monkeypatch.context() as patch:
        patch.setattr(artifact_module, "fused_lowering", lambda batch_size, weights: old)
        assert not build().reused
    built = build()
    assert not built.reused  # the old structure's artifact is not served for the new one
    assert build().reused

    graph = onnx.load(str(built.path / FUSED_GRAPH), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    assert "Concat" not in ops and "Split" not in ops
    assert ops["MatMul"] == 5 * model.config.num_hidden_layers + 1
    norms = [n for n in graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert all(list(n.output[1:3]) == ["", ""] for n in norms[:-1])
    assert len(norms[-1].output) == 1  # the last residual sum is read by nothing

    portable = OrtSession(onnx_path, batch_size=1, ctx_len=CTX, prompt_len=PROMPT_LEN)
    fused = FusedOrtSession(built.path / FUSED_GRAPH, batch_size=1, ctx_len=CTX, prompt_len=PROMPT_LEN)
    prompts = PROMPTS[:1]
    tokens = qeff.generate(portable, prompt_token_ids=prompts, generation_len=16, ignore_eos=True).token_ids
    assert qeff.generate(fused, prompt_token_ids=prompts, generation_len=16, ignore_eos=True).token_ids == tokens
    portable = OrtSession(onnx_path, batch_size=1, ctx_len=CTX, prompt_len=PROMPT_LEN)
    fused = FusedOrtSession(built.path / FUSED_GRAPH, batch_size=1, ctx_len=CTX, prompt_len=PROMPT_LEN)
    ref = session_trace(portable, "portable", prompts, tokens, PROMPT_LEN)
    cand = session_trace(fused, "fused", prompts, tokens, PROMPT_LEN)
    assert compare(ref, cand, Tolerances(logits_max_abs=1e-5, logits_mse=1e-12, cache_max_abs=1e-5, cache_mse=1e-12)).passed
