"""The precision ladder on a tiny model: fp32 ~exact, every lower tier measurably worse, budgets bite."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

import qeff
from qeff.precision import ladder as ladder_mod
from qeff.precision.emulate import TIER_DIR_PREFIX
from qeff.precision.ladder import Budget, Ladder, run_ladder

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
TIERS = "fp32,fp16,mxfp6,mxint8,mxfp6+mxint8"


@pytest.fixture(scope="module")
def setup(module_tmp):
    model = qeff.from_config("llama", CONFIG, seed=0)
    out = module_tmp("tiny-ladder")
    qeff.export(qeff.transform(model), out, model_id="tiny")
    rng = np.random.default_rng(0)
    corpus = rng.integers(3, 256, 4 * 48).tolist()
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 9)]
    return model, out / "model.onnx", corpus, prompts


def _run(setup, tiers=TIERS, **kw) -> Ladder:
    model, onnx_path, corpus, prompts = setup
    return run_ladder(model, onnx_path, tiers, corpus_ids=corpus, prompt_token_ids=prompts, rows=4, window=48, steps=6,
                      prompt_len=8, progress=False, **kw)


@pytest.fixture(scope="module")
def ladder(setup) -> Ladder:
    return _run(setup)


def test_fp32_is_exact_and_every_lower_tier_differs(ladder):
    fp32 = ladder["fp32"]
    assert fp32.kld_max < 1e-9 and fp32.top1_agree == 1.0 and fp32.top5_overlap == 1.0
    assert fp32.tokens_matched == fp32.tokens_total == 12
    assert math.isclose(fp32.ppl, fp32.ppl_ref, rel_tol=1e-6)
    assert fp32.positions == 4 * 48
    for name in ("fp16", "mxfp6", "mxint8", "mxfp6+mxint8"):
        tier = ladder[name]
        assert tier.kld_mean > 100 * fp32.kld_mean and tier.kld_mean > 1e-10, name
        assert tier.ppl_ref == fp32.ppl_ref  # one reference for every tier
    assert ladder["mxfp6"].kld_mean > ladder["fp16"].kld_mean
    assert ladder["mxfp6+mxint8"].kld_mean >= ladder["mxfp6"].kld_mean * 0.9
    assert ladder.passed, ladder.describe()  # the default budgets hold for this model


def test_json_record_round_trips(ladder):
    record = ladder.to_dict()
    assert list(record["tiers"]) == TIERS.split(",")
    assert record["corpus_tokens"] == 192 and record["rows"] == 4 and record["window"] == 48
    again = Ladder.from_dict(record)
    assert again.to_dict()["tiers"] == record["tiers"]


def test_budgets_fail_with_a_reason():
    result = ladder_mod.TierResult(tier="mxfp6", kld_mean=0.2, kld_p99=1.0, kld_max=2.0, top1_agree=0.8, top5_overlap=0.9,
                                   ppl_ref=10.0, ppl=12.0, tokens_matched=5, tokens_total=8, tokens_ambiguous=0, positions=100)
    failures = Budget(kld_mean=0.1, kld_p99=2.0, top1_agree=0.9, ppl_delta=0.1).check(result)
    assert len(failures) == 3
    assert "KLD mean 0.2 > budget 0.1" in failures[0] and "top-1 agreement 0.8000 < budget 0.9000" in failures[1]
    assert "+20.00%" in failures[2]
    nan = ladder_mod.TierResult(tier="fp16", kld_mean=float("nan"), kld_p99=float("nan"), kld_max=float("nan"), top1_agree=0.0,
                                top5_overlap=0.0, ppl_ref=10.0, ppl=float("nan"), tokens_matched=0, tokens_total=8,
                                tokens_ambiguous=0, positions=100)
    assert len(Budget(1, 1, 0.0, 1).check(nan)) == 3  # NaN never passes (top-1 0.0 >= 0.0 does)


def test_seeded_fault_reference_off_by_one_position_fails_fp32(setup, monkeypatch):
    original = ladder_mod.reference_logits

    def shifted(model, windows, out):
        original(model, windows, out)
        out[:, 1:] = out[:, :-1].copy()  # the reference one position late

    monkeypatch.setattr(ladder_mod, "reference_logits", shifted)
    broken = _run(setup, tiers="fp32")
    assert not broken.passed and broken["fp32"].kld_mean > 1e-3


def test_usage_errors(setup):
    model, onnx_path, corpus, prompts = setup
    with pytest.raises(qeff.UsageError, match="the corpus has 192 tokens; 8 windows of 48 need 384"):
        run_ladder(model, onnx_path, "fp32", corpus_ids=corpus, rows=8, window=48, progress=False)
    with pytest.raises(qeff.UsageError, match="unknown precision tier 'int4'"):
        run_ladder(model, onnx_path, "fp32,int4", corpus_ids=corpus, rows=4, window=48, progress=False)


def test_keep_tiers_false_leaves_no_tier_artifacts(tmp_path):
    """A one-off ladder removes each emulated tier (a full copy of the weights, twice) once it is
    measured, and measures the same numbers; the default keeps them as a cache."""
    model = qeff.from_config("llama", CONFIG, seed=0)
    qeff.export(qeff.transform(model), tmp_path, model_id="tiny")
    rng = np.random.default_rng(0)
    corpus = rng.integers(3, 256, 2 * 48).tolist()

    def run(**kw):
        return run_ladder(model, tmp_path / "model.onnx", "fp32,mxint8", corpus_ids=corpus, rows=2, window=48,
                          progress=False, **kw)

    kept = run()
    tier_dirs = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(TIER_DIR_PREFIX))
    assert tier_dirs == ["tier-mxint8"]
    shutil.rmtree(tmp_path / "tier-mxint8")
    frugal = run(keep_tiers=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TIER_DIR_PREFIX)]
    assert (tmp_path / "model.onnx").is_file()  # the exported graph (the fp32 tier) is never removed
    assert frugal["mxint8"].kld_mean == kept["mxint8"].kld_mean > 0

