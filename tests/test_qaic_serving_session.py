"""The Cloud AI runtime of the serving QPCs, without hardware: continuous-batching,
speculative-target and compute-context-ladder graphs are exported from a tiny Llama whose tokens depend on their context,
compiled by qeff's real compile step (the fake compiler on PATH) and driven by the serving loops
through ``QaicSession`` over the stand-in ``qaicrt`` (tests/fakes/fake_qaicrt.py: it computes with
ONNX Runtime and refuses any buffer that is not one of the compiled specializations). The same
loops over ONNX Runtime's serving session on the same graph must give the same tokens; each check
is shown failing on a seeded fault. This is the stand-in, not a card: see docs/cloud-ai-100.md.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import qeff
from qeff.compilers import qaic as qaic_compile
from qeff.compilers.qaic import QaicCompileOptions
from qeff.errors import UsageError
from qeff.runtime.ort import OrtSession
from qeff.runtime.ort_serving import ServingOrtSession
from qeff.runtime.qaic import QaicSession
from qeff.serving.continuous import generate_continuous
from qeff.serving.speculative import generate_speculative
from qeff.serving.variant import GraphVariant
from tests.serving_helpers import CB, TLM, random_workload, serving_model
from tests.tiny import random_prompts

_spec = importlib.util.spec_from_file_location("_qeff_test_qaic_helpers", Path(__file__).parent / "fakes" / "qaic_helpers.py")
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

CTX, PL, SLOTS, K = 32, 4, 3, 3


@pytest.fixture(scope="module")
def graphs(module_tmp) -> dict[str, Path]:
    """The target's plain, continuous-batching and speculative graphs, and a draft that agrees
    often but not always (the target with its weights nudged), so verify steps accept and reject."""
    import torch

    out = module_tmp("qaic-serving")
    target = serving_model("llama", seed=1)
    near = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02 * p.std())
    qtarget = qeff.transform(target)
    return {
        "base": qeff.export(qtarget, out / "base").path,
        "cb": qeff.export(qtarget, out / "cb", variant=CB).path,
        "tlm": qeff.export(qtarget, out / "tlm", variant=TLM).path,
        "cc": qeff.export(qtarget, out / "cc", variant=GraphVariant(comp_ctx=True)).path,
        "draft": qeff.export(qeff.transform(near), out / "draft").path,
    }


@pytest.fixture
def sdk(tmp_path, monkeypatch):
    """The fake compiler first (and alone) on PATH, the fake runtime importable as qaicrt."""
    H.install_fake_compiler(tmp_path / "bin", "qaic-exec")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return H.install_fake_runtime(monkeypatch)


def _qpc(onnx_path: Path, out: Path, **options) -> Path:
    return qaic_compile.compile(onnx_path, out, QaicCompileOptions(**options)).out_dir


WORKLOAD = random_workload(seed=3, n=7, max_prompt=10, max_gen=8, max_arrival=6)


def _cb(session, prompt_len=None):
    prompts, gens, arrivals = WORKLOAD
    return generate_continuous(session, prompt_token_ids=prompts, prompt_len=prompt_len, generation_len=gens,
                               arrival_steps=arrivals, eos_token_id=[])


def _ort_cb(graphs):
    return _cb(ServingOrtSession(graphs["cb"], batch_size=SLOTS, full_batch_size=SLOTS, ctx_len=CTX, threads=1), PL)


@pytest.fixture
def cb_qpc(graphs, sdk, tmp_path) -> Path:
    return _qpc(graphs["cb"], tmp_path / "qpc", full_batch_size=SLOTS, prompt_len=PL, ctx_len=CTX)


def test_continuous_batching_gives_the_tokens_of_onnx_runtime(graphs, cb_qpc):
    with QaicSession(cb_qpc) as session:
        # Dimensions come from the QPC: prefill one prompt (1 × PL), decode every slot (SLOTS × 1).
        assert (session.full_batch_size, session.batch_size, session.cache_rows) == (SLOTS, SLOTS, SLOTS)
        assert (session.prompt_len, session.ctx_len) == (PL, CTX)
        assert session.variant.continuous_batching and not session.variant.speculative
        got = _cb(session)
        runs = session._program.runs
    want = _ort_cb(graphs)
    assert got.token_ids == want.token_ids and got.stop_reasons == want.stop_reasons
    assert got.slots == want.slots and len(set(got.slots)) == SLOTS  # every slot was used
    assert [r["seq_len"] for r in runs if r["specialization"] == 0] == [PL] * got.prefill_runs
    assert sum(r["specialization"] == 1 for r in runs) == got.steps
    assert got.prefill_runs > len(WORKLOAD[0])  # some prompts took several chunks
    assert all(r["crossed"] == [] for r in runs)  # the slots' cache never left the device


def test_seeded_fault_a_prefill_into_the_wrong_slot_is_caught(graphs, cb_qpc, monkeypatch):
    """The equality above can fail: prefilling each prompt one slot over (decode then reads a
    slot holding another prompt, or garbage) changes the tokens."""
    real = QaicSession._slots

    def shifted(self, batch_index, rows):
        index = real(self, batch_index, rows)
        return (index + 1) % self.cache_rows if rows == 1 else index

    monkeypatch.setattr(QaicSession, "_slots", shifted)
    with QaicSession(cb_qpc) as session:
        got = _cb(session)
    assert got.token_ids != _ort_cb(graphs).token_ids


def test_continuous_batching_inputs_are_checked(cb_qpc):
    with QaicSession(cb_qpc) as session:
        one = np.ones((1, PL), np.int64)
        with pytest.raises(UsageError, match="needs batch_index"):
            session.run(one, np.arange(PL)[None])
        with pytest.raises(UsageError, match=r"must name 3 distinct slots in \[0, 3\)"):
            session.run(np.ones((SLOTS, 1), np.int64), np.zeros((SLOTS, 1), np.int64), batch_index=[0, 0, 1])
        with pytest.raises(UsageError, match=r"distinct slots in \[0, 3\)"):
            session.run(one, np.arange(PL)[None], batch_index=[3])
        with pytest.raises(UsageError, match=r"accepts input shapes \(1, 4\) or \(3, 1\) only \(got \(2, 1\)\)"):
            session.run(np.ones((2, 1), np.int64), np.zeros((2, 1), np.int64), batch_index=[0, 1])
        logits = session.run(one, np.arange(PL)[None], batch_index=[[2]])
        assert logits.shape == (1, session.vocab_size)


def _speculate(target, graphs):
    prompts = random_prompts([7, 3], seed=11)
    draft = OrtSession(graphs["draft"], batch_size=2, ctx_len=CTX, threads=1)
    return generate_speculative(target, draft, prompt_token_ids=prompts, prompt_len=PL, generation_len=14,
                                eos_token_id=[], num_speculative_tokens=K)


@pytest.fixture
def tlm_qpc(graphs, sdk, tmp_path) -> Path:
    return _qpc(graphs["tlm"], tmp_path / "qpc", batch_size=2, num_speculative_tokens=K, prompt_len=PL, ctx_len=CTX)


def test_speculative_target_gives_the_tokens_of_onnx_runtime(graphs, tlm_qpc):
    with QaicSession(tlm_qpc) as target:
        assert target.num_speculative_tokens == K and target.variant.speculative
        assert (target.batch_size, target.prompt_len, target.full_batch_size) == (2, PL, None)
        got = _speculate(target, graphs)
        runs = target._program.runs
    want = _speculate(ServingOrtSession(graphs["tlm"], batch_size=2, ctx_len=CTX, threads=1), graphs)
    assert got.token_ids == want.token_ids and got.stop_reasons == want.stop_reasons
    assert 0 < got.acceptance_rate < 1  # drafts both accepted and rejected: every path of the verify step ran
    # Prefill (specialization 0) keeps one logit per row, each verify step K+1 in the decode one
    # (1): both take (2, 4) inputs here (prompt_len = K+1), told apart by num_logits_to_keep.
    assert PL == K + 1
    assert [r["specialization"] for r in runs] == [0] * (len(runs) - got.steps) + [1] * got.steps
    assert len(runs) > got.steps > 0
    assert all(r["crossed"] == [] for r in runs)


def test_seeded_fault_a_misaligned_verify_window_is_caught(graphs, tlm_qpc, monkeypatch):
    """The equality above can fail: verify logits one column late change which drafts are kept."""
    real = QaicSession.run

    def late(self, *args, keep=None, **kwargs):
        out = real(self, *args, keep=keep, **kwargs)
        return np.roll(out, 1, axis=1) if keep and keep > 1 else out

    monkeypatch.setattr(QaicSession, "run", late)
    with QaicSession(tlm_qpc) as target:
        got = _speculate(target, graphs)
    assert got.token_ids != _speculate(ServingOrtSession(graphs["tlm"], batch_size=2, ctx_len=CTX, threads=1), graphs).token_ids


def test_speculative_inputs_are_checked(tlm_qpc):
    with QaicSession(tlm_qpc) as target:
        with pytest.raises(UsageError, match=r"keeps 1 or 4 logits per row in a step of input shape \(2, 4\) \(asked keep=2\)"):
            target.run(np.ones((2, K + 1), np.int64), np.tile(np.arange(K + 1), (2, 1)), keep=2)
        with pytest.raises(UsageError, match="batch_index given to a QPC without continuous batching"):
            target.run(np.ones((2, PL), np.int64), np.tile(np.arange(PL), (2, 1)), batch_index=[0, 1])
        assert target.run(np.ones((2, PL), np.int64), np.tile(np.arange(PL), (2, 1)), keep=1).shape == (2, 1, target.vocab_size)


def test_open_session_opens_serving_qpcs_from_their_manifest(graphs, sdk):
    """``qeff.compile`` records the serving sizes; ``qeff.open_session`` reads them back through
    the backends table, for Cloud AI as for ONNX Runtime."""
    qaic = qeff.open_session(qeff.compile(graphs["cb"], "qaic", full_batch_size=SLOTS, prompt_len=PL, ctx_len=CTX).path)
    ort = qeff.open_session(qeff.compile(graphs["cb"], "ort", full_batch_size=SLOTS, prompt_len=PL, ctx_len=CTX).path)
    assert isinstance(qaic, QaicSession) and isinstance(ort, ServingOrtSession)
    for session in (qaic, ort):
        assert (session.full_batch_size, session.prompt_len, session.ctx_len) == (SLOTS, PL, CTX)
    assert _cb(qaic).token_ids == _cb(ort).token_ids
    qaic.close()


def test_a_compute_context_ladder_qpc_switches_rungs_as_onnx_runtime_does(graphs, sdk, tmp_path, monkeypatch):
    """One prefill and one decode specialization per rung: each step runs in the smallest rung its
    positions fit, as ONNX Runtime's session picks it on the same graph, with the same tokens."""
    compile_dir = _qpc(graphs["cc"], tmp_path / "qpc", batch_size=2, prompt_len=PL, ctx_len=CTX, comp_ctx_lengths=(8, 16))
    prompts = random_prompts([7, 3], seed=5)
    ort = OrtSession(graphs["cc"], batch_size=2, ctx_len=CTX, prompt_len=PL, threads=1, comp_ctx_lengths=[8, 16])
    want = qeff.generate(ort, prompt_token_ids=prompts, generation_len=20, eos_token_id=[])
    with QaicSession(compile_dir) as session:
        assert session.ladder == (8, 16, CTX) and session.variant.comp_ctx
        got = qeff.generate(session, prompt_token_ids=prompts, generation_len=20, eos_token_id=[])
        runs = session._program.runs
    assert got.token_ids == want.token_ids and session.attended == ort.attended
    assert set(session.attended) == {8, 16, CTX}
    assert len({r["specialization"] for r in runs}) == 4  # prefill at rung 8; decode at 8, 16 and 32
    assert all(r["crossed"] == [] for r in runs)

    # Seeded fault: every step in the first rung's specialization (attending 8 slots) is caught.
    real = QaicSession._pick
    monkeypatch.setattr(QaicSession, "_pick", lambda self, shape, keep, rung=None: real(self, shape, keep, self.ladder[0]))
    with QaicSession(compile_dir) as session:
        assert qeff.generate(session, prompt_token_ids=prompts, generation_len=20, eos_token_id=[]).token_ids != want.token_ids
