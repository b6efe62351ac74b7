"""qeff.metrics: values computed by hand, and seeded faults that those checks catch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qeff import metrics

# p = (1/2, 1/2), q = (3/4, 1/4):  KL(p‖q) = ½·ln(4/3);  KL(q‖p) = ¾·ln(3/2) + ¼·ln(1/2).
P_LOGITS = np.array([[0.0, 0.0]])
Q_LOGITS = np.array([[math.log(3.0), 0.0]])
KL_PQ = 0.5 * math.log(4 / 3)
KL_QP = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def test_kl_of_identical_distributions_is_zero():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 1000)).astype(np.float32) * 5
    assert np.all(metrics.kl_divergence(logits, logits) == 0.0)
    # invariant to a constant shift of the logits (same distribution)
    np.testing.assert_allclose(metrics.kl_divergence(logits, logits + 3.0), 0.0, atol=1e-12)


def test_kl_of_a_known_pair():
    assert metrics.kl_divergence(P_LOGITS, Q_LOGITS)[0] == pytest.approx(KL_PQ, rel=1e-12)
    assert metrics.kl_divergence(Q_LOGITS, P_LOGITS)[0] == pytest.approx(KL_QP, rel=1e-12)
    assert abs(KL_PQ - KL_QP) > 0.01  # the direction matters: the check below can see a swap


def test_nll_and_perplexity_by_hand():
    uniform = np.zeros((3, 4))
    assert metrics.nll(uniform, [0, 1, 3]) == pytest.approx([math.log(4)] * 3)
    assert metrics.perplexity(metrics.nll(uniform, [0, 1, 3])) == pytest.approx(4.0)
    peaked = np.array([[math.log(9.0), 0.0]])  # p(token 0) = 0.9
    assert metrics.nll(peaked, [0])[0] == pytest.approx(-math.log(0.9))


def test_top1_and_top5():
    ref = np.array([[9, 8, 7, 6, 5, 4, 3, 2], [0, 1, 2, 3, 4, 5, 6, 7]], dtype=np.float32)
    cand = np.array([[9, 8, 7, 6, 5, 4, 3, 2], [7, 6, 5, 4, 3, 2, 1, 0]], dtype=np.float32)
    assert metrics.top1_agreement(ref, cand).tolist() == [True, False]
    # row 1: reference top-5 = {7,6,5,4,3}, candidate's = {0,1,2,3,4}: overlap {3,4}
    assert metrics.topk_overlap(ref, cand).tolist() == [1.0, 0.4]


def test_summary_of_a_known_run():
    stats = metrics.DistributionStats()
    stats.add(np.vstack([P_LOGITS, P_LOGITS]), np.vstack([P_LOGITS, Q_LOGITS]), targets=[0, 1])
    s = stats.summary()
    assert s.positions == 2 and s.scored_tokens == 2
    assert s.kld_mean == pytest.approx(KL_PQ / 2)
    assert s.kld_max == pytest.approx(KL_PQ)
    assert s.kld_p99 == pytest.approx(0.99 * KL_PQ)  # linear interpolation between the 2 order statistics
    assert s.top1_agree == 1.0  # (0, 0) and (log 3, 0) both have token 0 first
    assert s.top5_overlap == 1.0  # a 2-token vocabulary: top-k is capped at 2
    assert s.ppl_ref == pytest.approx(2.0)  # uniform over 2 tokens
    assert s.ppl == pytest.approx(math.exp((math.log(2) - math.log(0.25)) / 2))


def test_unknown_targets_are_not_scored():
    stats = metrics.DistributionStats()
    stats.add(np.zeros((3, 4)), np.zeros((3, 4)), targets=[-1, 2, -1])
    s = stats.summary()
    assert s.positions == 3 and s.scored_tokens == 1 and s.ppl == pytest.approx(4.0)


def test_nan_candidate_poisons_every_summary():
    stats = metrics.DistributionStats()
    bad = np.array([[np.nan, 0.0]])
    stats.add(np.vstack([P_LOGITS, P_LOGITS]), np.vstack([P_LOGITS, bad]), targets=[0, 0])
    s = stats.summary()
    assert math.isnan(s.kld_mean) and math.isnan(s.kld_p99) and math.isnan(s.kld_max) and math.isnan(s.ppl)
    assert not (s.kld_mean <= 1.0)  # so a budget comparison fails


# -- seeded faults: each check above fails on a wrong implementation ---------------------------


def test_seeded_fault_kl_direction_swapped_is_caught(monkeypatch):
    original = metrics.kl_divergence
    monkeypatch.setattr(metrics, "kl_divergence", lambda ref, cand: original(cand, ref))
    stats = metrics.DistributionStats()
    stats.add(P_LOGITS, Q_LOGITS)
    assert stats.summary().kld_mean != pytest.approx(KL_PQ, rel=1e-6)


def test_seeded_fault_off_by_one_target_is_caught():
    # The text's next tokens, scored one position late, give a different perplexity.
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]))
    text = [0, 1, 2]
    right = metrics.perplexity(metrics.nll(logits, text))
    assert right == pytest.approx(math.exp(-(math.log(0.7) + math.log(0.8) + math.log(0.6)) / 3))
    shifted = metrics.perplexity(metrics.nll(logits[1:], text[:-1]))
    assert shifted != pytest.approx(right, rel=1e-3)
