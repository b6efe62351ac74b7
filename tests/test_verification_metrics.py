"""Distribution metrics beside MSE/max-abs in every Comparison (qeff.verification.compare)."""

from __future__ import annotations

import numpy as np
import pytest

import qeff
from qeff.verification import Tolerances, Trace, compare
from tests.tiny import random_prompts, tiny_model


def _trace(name, logits):
    return Trace(name, [logits], [[np.zeros((1, logits.shape[0], 4), np.float32)]])


def test_identical_traces_have_zero_kl():
    logits = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32)
    c = compare(_trace("a", logits), _trace("b", logits.copy()), Tolerances())
    assert c.kld_mean == c.kld_max == 0.0 and c.top1_agree == 1.0 and c.top5_overlap == 1.0
    assert c.ppl is None and c.ppl_ref is None  # no text: no perplexity
    assert {"kld_mean", "kld_p99", "kld_max", "top1_agree", "top5_overlap", "ppl_ref", "ppl"} <= set(c.to_dict())


@pytest.mark.parametrize("fault", ["scaled", "swapped_top2"])
def test_seeded_faults_show_in_the_distribution_metrics(fault):
    logits = np.random.default_rng(1).standard_normal((6, 50)).astype(np.float32) * 3
    bad = logits * 1.5 if fault == "scaled" else logits.copy()
    if fault == "swapped_top2":
        for row in bad:
            i, j = np.argsort(row)[-2:]
            row[i], row[j] = row[j], row[i]
    c = compare(_trace("a", logits), _trace("b", bad), Tolerances())
    assert c.kld_mean > 1e-3 and c.kld_max >= c.kld_p99 >= 0
    if fault == "swapped_top2":
        assert c.top1_agree == 0.0 and c.top5_overlap == 1.0


def test_real_verification_reports_near_zero_kl():
    model = tiny_model("llama")
    report = qeff.verify(model, prompt_token_ids=random_prompts([5, 9]), prompt_len=4, ctx_len=32, steps=6)
    c = report.comparisons[0]
    assert 0.0 <= c.kld_max < 1e-9 and c.top1_agree == 1.0
