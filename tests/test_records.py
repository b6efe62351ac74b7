"""Stage records and verification reports are typed and round-trip through JSON (issue 9).

What crosses a process or file boundary — a stage record from an xdist worker into results.json, a
verification report in a cache manifest — is rebuilt by ``from_dict`` into the same object, and
readers dispatch on the record's type, never on which keys a dict happens to have.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qeff.meter import Measurement
from pytest_qeff.records import (
    KINDS,
    ArtifactFacts,
    BenchmarkRecord,
    CompileRecord,
    ExportRecord,
    GenerationRecord,
    GenerationRow,
    ModelFacts,
    OnnxFacts,
    PrecisionRecord,
    ServingCheck,
    ServingRecord,
    StageRecord,
    TransformRecord,
)
from qeff.precision.ladder import TierResult
from qeff.verification import Comparison, Tolerances, Trace, VerifyReport, compare

pytest_plugins = ("pytester",)

BASE = dict(prompts=[[5, 6, 7], [8]], prompt_texts=["a", None], batch_size=2, prompt_len=4, ctx_len=32, device_group=[0, 1])


def _comparison() -> Comparison:
    rng = np.random.default_rng(0)
    ref = Trace("hf", [rng.normal(size=(3, 11)).astype(np.float32)], [[rng.normal(size=(2, 4, 8)).astype(np.float32)]])
    cand = Trace("pytorch", [ref.logits[0] + 1e-3], [[ref.cache[0][0] * 1.001]])
    return compare(ref, cand, Tolerances(logits_max_abs=1e-4))  # fails: it carries failures and mismatches


def _one_of_each() -> list[StageRecord]:
    comp = _comparison()
    return [
        TransformRecord(**BASE, comparison=comp, reference_tokens=[[1, 2], [3, 4]], model=ModelFacts(2, 2, 16, 256, 12345),
                        config_mismatches=["config.x is 1 in the card but 2 in the loaded model"]),
        ExportRecord(**BASE, comparison=comp, onnx=OnnxFacts("/x/model.onnx", 1024, True, 0.25, None),
                     resources=[Measurement("export", peak_rss=3 * 2**30, wall_s=1.5, rss_before=2**30, estimate=4 * 2**30)]),
        CompileRecord(**BASE, artifact=ArtifactFacts("/x/ort_1BS", "ort_1BS", False, 1.5, 99), compile_options={"mxfp6": True, "mos": 1},
                      session={"batch_size": 2, "ctx_len": 32, "num_layers": 2}),
        GenerationRecord(**BASE, rows=[GenerationRow(0, [1, 2, 3], [1, 2, 4], 2, 0.5, False, "ab", None)], tokens_matched=2,
                         tokens_total=3, stats={"ttft_s": 0.01, "decode_tok_s": 100.0}),
        BenchmarkRecord(**BASE, figures={"decode_tok_s": 1000.5, "total_tok_s": 900.0, "ttft_s": 0.002}, runs=[{"ttft_s": 0.002}],
                        generation_len=64, repeats=11, threads=None, probe=123.4,
                        baseline={"found": False, "changes": {}, "regressions": [], "note": "no baseline"}, update_baseline=True),
        PrecisionRecord(**BASE, tier_name="mxfp6", corpus="random tokens", corpus_tokens=128, rows=2, window=64, steps=16,
                        tiers=["fp32", "mxfp6"],
                        result=TierResult("mxfp6", 0.04, 0.2, 0.5, 0.85, 0.87, 23.8, None, 100, 128, 2, 128,
                                          budget={"kld_mean": 0.1}, failures=["top-1 agreement 0.85 < budget 0.9"],
                                          emulation={"mxfp6_weights": 211}, seconds=3.5)),
        ServingRecord(**BASE, feature="continuous_batching", checks=[ServingCheck("logits max-abs vs HF", "3e-07", "<= 1e-05", True)],
                      rows=[GenerationRow(0, [1, 2], [1, 2], None, None, False, None, None)], logits_max_abs=3e-7,
                      figures={"slot_occupancy": 0.8}, settings={"full_batch_size": 2, "arrival_steps": [0, 3]}),
    ]


def test_every_kind_is_covered():
    assert {type(r) for r in _one_of_each()} == set(KINDS.values())


@pytest.mark.parametrize("record", _one_of_each(), ids=lambda r: r.KIND)
def test_stage_records_round_trip_through_json(record: StageRecord):
    data = json.loads(json.dumps(record.to_dict()))
    assert data["kind"] == record.KIND
    again = StageRecord.from_dict(data)
    assert type(again) is type(record) and again == record
    assert json.loads(json.dumps(again.to_dict())) == data


def test_verify_report_round_trips():
    comp = _comparison()
    report = VerifyReport([comp], [[5, 6, 7]], [[1, 2, 3]], prompt_len=4, ctx_len=32, steps=3)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["comparisons"][0]["name"] == "hf_vs_pytorch"
    again = VerifyReport.from_dict(data)
    assert again == report and not again.passed and again["hf_vs_pytorch"].failures == comp.failures


def test_a_broken_record_is_refused_not_guessed():
    """Seeded faults: an unknown kind, a missing field, a wrongly typed value."""
    data = _one_of_each()[0].to_dict()
    with pytest.raises(ValueError, match="kind 'transfrom'"):
        StageRecord.from_dict({**data, "kind": "transfrom"})
    with pytest.raises(ValueError, match="required field 'comparison' is missing"):
        StageRecord.from_dict({k: v for k, v in data.items() if k != "comparison"})
    with pytest.raises(TypeError, match="expected an integer"):
        StageRecord.from_dict({**data, "batch_size": "2"})


def test_records_of_a_real_run_round_trip(pytester: pytest.Pytester):
    """Every record a plugin run writes into results.json reads back as its typed record."""
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    result = pytester.runpytest_inprocess("--qeff-model", "tiny-qwen2", "--qeff-backend", "ort", "--qeff-precision", "fp32",
                                          "--qeff-report", "out", "-q")
    result.assert_outcomes(passed=6)
    data = json.loads((pytester.path / "out" / "results.json").read_text())
    kinds = []
    for rec in data["records"]:
        typed = StageRecord.from_dict(rec["data"])
        assert typed.to_dict() == rec["data"]
        kinds.append(typed.KIND)
    # tiny-qwen2 declares no [serving]: tests/test_plugin_serving.py reads a real run's serving records back.
    assert sorted(kinds) == sorted(set(KINDS) - {"serving"})
    # Each chain stage a test ran, with its peak RSS and wall time (issue 18): the export test built the graph.
    measured = {m["name"]: m for rec in data["records"] for m in rec["data"].get("resources", [])}
    assert measured["export"]["peak_rss"] >= measured["export"]["rss_before"] > 0
