"""``qeff.divergence``: where two traces part (step, row, layer), on synthetic traces and on real
graphs. The seeded faults that must be located live in ``test_faults*.py``; that each architecture's
layers are found alike in HF, PyTorch and ONNX Runtime is checked in ``test_architectures.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qeff
import qeff.verification as verification
from qeff.divergence import FirstDivergence, OrtStepper, ReplayLayers, TorchStepper, describe, first_parting, locate
from qeff.verification import Tolerances, Trace
from tests.arch_configs import TINY
from tests.faults import tiny_arch

torch.set_num_threads(1)

TOL = Tolerances()


def _trace(rows: int = 2, steps: int = 4, vocab: int = 8, prompt: int = 5, layers: int = 2, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    logits = [rng.normal(size=(steps, vocab)).astype(np.float32) for _ in range(rows)]
    cache = [[rng.normal(size=(2, prompt + steps - 1, 4)).astype(np.float32) for _ in range(2 * layers)] for _ in range(rows)]
    return Trace("ref", logits, cache)


def _copy(trace: Trace, name: str = "cand") -> Trace:
    return Trace(name, [a.copy() for a in trace.logits], [[c.copy() for c in row] for row in trace.cache])


def test_identical_traces_do_not_part():
    ref = _trace()
    assert first_parting(ref, _copy(ref), TOL, [5, 5]) is None


def test_steps_come_before_rows():
    ref = _trace()
    cand = _copy(ref)
    cand.logits[0][3, 1] += 0.5  # row 0, step 3
    cand.logits[1][2, 4] += 0.5  # row 1, step 2: earlier
    assert first_parting(ref, cand, TOL, [5, 5])[:3] == (2, 1, "logits max-abs")


def test_small_differences_everywhere_part_by_mse():
    ref = _trace()
    cand = _copy(ref)
    cand.logits[1][0] += 5e-4  # within max-abs 1e-3, MSE 2.5e-7 > 1e-8
    step, row, measure, value, bound, layer = first_parting(ref, cand, TOL, [5, 5])
    assert (step, row, measure, bound, layer) == (0, 1, "logits MSE", TOL.logits_mse, None)
    assert value == pytest.approx(2.5e-7, rel=1e-3)


def test_a_flipped_greedy_token_parts_unless_it_is_a_near_tie():
    ref = _trace(rows=1)
    ref.logits[0][1, :] = 0.0
    ref.logits[0][1, 2], ref.logits[0][1, 5] = 1.0, 0.9985  # top-2 margin 1.5e-3 >= 1e-3
    cand = _copy(ref)
    cand.logits[0][1, 2], cand.logits[0][1, 5] = 0.9992, 0.9993  # flipped within max-abs
    loose = Tolerances(logits_mse=1.0)
    assert first_parting(ref, cand, loose, [5])[:3] == (1, 0, "greedy token (reference top-2 margin)")
    assert first_parting(ref, cand, Tolerances(logits_mse=1.0, ambiguity_margin=2e-3), [5]) is None  # a near tie


def test_cache_only_difference_names_the_step_that_wrote_the_slot_and_its_layer():
    ref = _trace(prompt=5)
    cand = _copy(ref)
    cand.cache[0][3][1, 7, 2] += 0.01  # past_value.1, slot 7 = prompt of 5 + decode step 3's token
    assert first_parting(ref, cand, TOL, [5, 5]) == (3, 0, "cache max-abs (slot 7 of past_value.1)", pytest.approx(0.01, rel=1e-3), 1e-3, 1)
    found = locate(ref, cand, TOL, ref_layers=None, cand_layers=None, prompt_lengths=[5, 5])
    assert (found.step, found.row, found.layer, found.positions) == (3, 0, 1, [7])
    assert found.where == "layer 1 of 2 (its cache)" and not found.note


def test_a_sliding_window_reference_cache_is_compared_at_its_last_slots():
    ref = _trace(prompt=5)
    cand = _copy(ref)
    ref.cache[1] = [c[:, -4:, :] for c in ref.cache[1]]  # HF keeps the last 4 slots of 8
    cand.cache[1][0][0, 6, 0] += 0.01  # slot 6 = step 2
    assert first_parting(ref, cand, TOL, [5, 5])[:3] == (2, 1, "cache max-abs (slot 6 of past_key.0)")


def test_a_cache_with_other_heads_parts_by_its_shape():
    ref = _trace()
    cand = _copy(ref)
    cand.cache[0][2] = np.repeat(cand.cache[0][2], 2, axis=0)  # (4, slots, D): numpy would broadcast it
    assert first_parting(ref, cand, TOL, [5, 5])[:3] == (0, 0, "cache shape (past_key.1 heads)")
    cand_compare = verification.compare(ref, cand, TOL)
    assert cand_compare.failures == [
        "cache shape: 1 cache tensor(s) differ in layout (first: past_key.1 holds (heads, head_dim) (4, 4), the reference (2, 4))"
    ]


class _Probe:
    def __init__(self, layers, fail: bool = False):
        self.layers, self.fail, self.num_layers, self.closed = layers, fail, len(layers), False

    def hidden(self, row, step):
        if self.fail:
            raise RuntimeError("the debug graph could not be built")
        return self.layers

    def close(self):
        self.closed = True


def test_locate_names_the_first_layer_over_tolerance_relative_to_each_token():
    ref = _trace()
    cand = _copy(ref)
    cand.logits[0][0, 0] += 1.0
    # Token 0 has a massive activation (1e4); a difference of 0.01 on token 1 (scale 1) must still count.
    a = [np.array([[1e4, 1.0], [1.0, 1.0]]), np.array([[1e4, 1.0], [1.0, 1.0]]), np.array([[1e4, 1.0], [1.0, 1.0]])]
    b = [a[0].copy(), a[1] + np.array([[0.0, 0.0], [0.0, 0.01]]), a[2] + 0.5]
    ref_probe, cand_probe = _Probe(a), _Probe(b)
    found = locate(ref, cand, TOL, ref_layers=lambda: ref_probe, cand_layers=lambda: cand_probe, prompt_lengths=[5, 5])
    assert (found.step, found.row, found.layer, found.num_layers) == (0, 0, 1, 2)
    assert [round(e["relative"], 6) for e in found.layers] == [0.0, 0.01, 0.5]
    assert found.where == "layer 1 of 2 (layers.1)"
    assert ref_probe.closed and cand_probe.closed
    assert "layer 1 of 2 (layers.1), its output differs by max-abs 0.01 (0.01 of its scale)" in describe(found.to_dict())
    assert FirstDivergence.from_dict(found.to_dict()) == found


def test_no_layer_over_tolerance_points_after_the_last_layer():
    ref = _trace()
    cand = _copy(ref)
    cand.logits[1][0, 0] += 1.0
    same = [np.ones((5, 3)), np.ones((5, 3))]
    found = locate(ref, cand, TOL, ref_layers=lambda: _Probe(same), cand_layers=lambda: _Probe(same), prompt_lengths=[5, 5])
    assert found.layer is None and found.where.startswith("after the last decoder layer")
    assert found.positions == [0, 1, 2, 3, 4]


def test_a_probe_that_fails_leaves_a_note_never_an_exception():
    ref = _trace()
    cand = _copy(ref)
    cand.logits[0][0, 0] += 1.0
    found = locate(ref, cand, TOL, ref_layers=lambda: _Probe([]), cand_layers=lambda: _Probe([], fail=True), prompt_lengths=[5, 5])
    assert found.layer is None and found.note == "could not compare the layers: RuntimeError: the debug graph could not be built"
    missing = locate(ref, cand, TOL, ref_layers=lambda: _Probe([]), cand_layers=None, prompt_lengths=[5, 5])
    assert missing.note == "per-layer outputs are not available from this backend"
    assert "(per-layer outputs are not available from this backend)" in describe(missing.to_dict())


def test_a_passing_verification_never_looks_for_a_divergence(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("locate ran on a passing comparison")

    monkeypatch.setattr(verification, "locate", boom)
    arch = tiny_arch("llama-3-8b")
    model = qeff.from_config(arch.model_type, arch.config, seed=0)
    report = qeff.verify(model, prompt_token_ids=[[5, 6, 7, 8, 9, 10], [11, 12]], prompt_len=4, ctx_len=16, steps=3)
    assert report.passed and report.comparisons[0].first_divergence is None
    assert report.comparisons[0].to_dict()["first_divergence"] is None


@pytest.mark.parametrize("arch_id", ["gpt2", "tiny-codegen", "tiny-falcon-sequential", "mpt-7b"])
def test_layers_of_an_ort_optimized_graph(arch_id, tmp_path):
    """The compiled ``ort`` artifact (what the plugin's sessions run) is fused: some nodes lose
    their scope, and a layer's MatMul output then also leaves its scope. The layer outputs found
    must still be the hidden states."""
    arch = TINY[arch_id]
    qmodel = qeff.transform(qeff.from_config(arch.model_type, arch.config, seed=0))
    exported = qeff.export(qmodel, tmp_path / "export")
    built = qeff.compile(exported.path, backend="ort", batch_size=2, prompt_len=8, ctx_len=32, threads=1)
    stepper = OrtStepper(built.path / "model.opt.onnx", threads=1)
    prompts, fed = [list(range(3, 14)), [20, 21, 22, 23, 24]], [[30, 31, 32], [40, 41, 42]]
    shape = dict(batch_size=2, prompt_len=8, ctx_len=32)
    for row, step in ((0, 0), (1, 2)):
        want = ReplayLayers(TorchStepper(qmodel), prompts, fed, **shape).hidden(row, step)
        got = ReplayLayers(stepper, prompts, fed, **shape).hidden(row, step)
        for a, b in zip(want, got):
            assert float((np.abs(a - b).max(axis=-1) / np.abs(a).max(axis=-1)).max()) < 1e-5
