"""The benchmark stage against a committed baseline, and --qeff-update-baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import onnx  # noqa: F401  isort: skip  (`import qeff` is lazy: onnx's extension must not be imported twice)
import onnxruntime  # noqa: F401  isort: skip  (see test_plugin.py: imported before inner runs)
import qeff  # noqa: F401  isort: skip
import transformers.models.llama.modeling_llama  # noqa: F401  isort: skip

pytest_plugins = ("pytester",)

CARD = "llama-3-8b"


def bench(pytester: pytest.Pytester, baselines: Path, *args: str) -> pytest.RunResult:
    return pytester.runpytest(
        "-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", "--qeff-model", CARD, "--qeff-backend", "ort",
        "-m", "qeff_benchmark", "--qeff-baseline", str(baselines), *args,
    )


def write_baseline(path: Path, **figures: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": "qeff-baseline/1", "card": CARD, "backend": "ort", "environment": {},
                                "cases": {"tiny/bs1-pl32-cl128": figures}}))


def test_regression_fails_readably_and_update_rewrites_the_baseline(pytester: pytest.Pytester) -> None:
    baselines = pytester.mkdir("published")
    path = baselines / "ort" / f"{CARD}.json"
    # A machine no one has for the throughputs; the time to first token is left slower than any run
    # (its noise floor is judged with fixed numbers in the test below: a measured prefill of a tiny
    # model is ~1 ms idle but tens of ms on a loaded machine, so it cannot be pinned here).
    write_baseline(path, decode_tok_s=1e9, total_tok_s=1e9, ttft_s=1e3)

    slow = bench(pytester, baselines)
    slow.assert_outcomes(failed=1)
    out = " ".join(slow.stdout.str().split())
    assert "decode tokens/s regressed:" in out and "now vs 1000000000.0 tok/s in the baseline" in out
    assert f"{path} [tiny/bs1-pl32-cl128]" in out
    assert "the card allows -80%" in out
    assert f"update the baseline: pytest --qeff-model {CARD} --qeff-tier tiny --qeff-backend ort -m qeff_benchmark " \
           f"--qeff-baseline {baselines} --qeff-update-baseline" in out
    assert "time to first token regressed:" not in out
    assert "Traceback" not in out
    record = json.loads((pytester.path / "qeff_report" / "results.json").read_text())["records"][0]
    judged = record["data"]["baseline"]
    assert any(r.startswith("decode tokens/s regressed") for r in judged["regressions"]), judged
    assert judged["changes"]["ttft_s"] > 0 and "ttft_s" not in judged.get("within_noise", []), judged

    updated = bench(pytester, baselines, "--qeff-update-baseline")
    updated.assert_outcomes(passed=1)
    updated.stdout.fnmatch_lines([f"baseline updated: {path}"])
    data = json.loads(path.read_text())
    entry = data["cases"]["tiny/bs1-pl32-cl128"]
    assert data["schema"] == "qeff-baseline/1" and data["environment"]["cores"]
    assert 1 < entry["decode_tok_s"] < 1e6 and entry["repeats"] == 11 and entry["threads"] == 1

    # Against its own numbers the same machine passes (the tiny tier allows an 80 % slowdown).
    again = bench(pytester, baselines)
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines([f"{CARD}*1/1*[+-]*%"])


def test_missing_baseline_passes_and_says_how_to_record_one(pytester: pytest.Pytester) -> None:
    baselines = pytester.mkdir("empty")
    result = bench(pytester, baselines)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"{CARD}*1/1*no baseline"])
    record = json.loads((pytester.path / "qeff_report" / "results.json").read_text())["records"][0]
    assert record["data"]["baseline"]["note"].startswith(f"no baseline for tiny/bs1-pl32-cl128 in {baselines}/ort/{CARD}.json")


def test_corrupt_baseline_fails_the_benchmark_with_its_path(pytester: pytest.Pytester) -> None:
    baselines = pytester.mkdir("published")
    (baselines / "ort").mkdir()
    (baselines / "ort" / f"{CARD}.json").write_text("{not json")
    result = bench(pytester, baselines)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*baseline {baselines}/ort/{CARD}.json is not valid JSON*"])


def test_check_scales_the_baseline_by_the_machine_speed_probe(tmp_path: Path) -> None:
    """Half the probe speed expects half the tokens/s (and twice the TTFT): not a regression;
    half the tokens/s at the baseline's machine speed is one, and the message says how it scaled."""
    from pytest_qeff import baseline

    path = tmp_path / "ort" / "card.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema": baseline.SCHEMA, "cases": {"tiny/c": {
        "decode_tok_s": 100.0, "total_tok_s": 90.0, "ttft_s": 0.010, "probe": 1000.0}}}))
    loaded = {"decode_tok_s": 50.0, "total_tok_s": 45.0, "ttft_s": 0.020}
    out = baseline.check(path, "tiny/c", loaded, 0.25, "CMD", probe=500.0)
    assert out["regressions"] == [] and out["machine_speed"] == 0.5
    assert all(abs(c) < 1e-9 for c in out["changes"].values())
    slow = baseline.check(path, "tiny/c", loaded, 0.25, "CMD", probe=1000.0)
    assert len(slow["regressions"]) == 3 and "-50% speed" in slow["regressions"][0]
    halved = baseline.check(path, "tiny/c", {"decode_tok_s": 30.0, "total_tok_s": 45.0, "ttft_s": 0.020}, 0.25, "CMD", probe=500.0)
    assert len(halved["regressions"]) == 1
    assert "after scaling the baseline by this machine's speed (50% of the baseline run's)" in halved["regressions"][0]
    unscaled = baseline.check(path, "tiny/c", loaded, 0.25, "CMD")  # no probe this run: plain comparison
    assert "machine_speed" not in unscaled and len(unscaled["regressions"]) == 3


def test_slowdowns_shorter_than_the_noise_floor_are_reported_not_failed(tmp_path: Path) -> None:
    """CI's failure, reproduced: the probe said its machine ran 8.05x the baseline's, yet a 0.57 ms
    prefill stayed 0.57 ms (-84% "speed"). A sub-2 ms difference over the whole phase is scheduler
    noise: reported, flagged, not failed. The same relative slowdown over a longer phase still fails."""
    from pytest_qeff import baseline

    path = tmp_path / "ort" / "card.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema": baseline.SCHEMA, "cases": {
        "tiny/c": {"decode_tok_s": 1300.0, "total_tok_s": 1200.0, "ttft_s": 0.000756, "probe": 100.0,
                   "generation_len": 16, "batch_size": 1},
        "full/c": {"decode_tok_s": 40.0, "total_tok_s": 35.0, "ttft_s": 0.100, "probe": 100.0,
                   "generation_len": 128, "batch_size": 1}}}))
    ci = baseline.check(path, "tiny/c", {"decode_tok_s": 10000.0, "total_tok_s": 9000.0, "ttft_s": 0.000574}, 0.8, "CMD",
                        probe=805.0)
    assert ci["regressions"] == [] and ci["within_noise"] == ["ttft_s"]
    assert ci["changes"]["ttft_s"] < -0.8  # the change is still reported
    # Ten times slower decode on the tiny case: 15 tokens now take 11.5 ms instead of 1.4 ms, above the floor.
    slow = baseline.check(path, "tiny/c", {"decode_tok_s": 1300.0, "total_tok_s": 9000.0, "ttft_s": 0.0001}, 0.8, "CMD",
                          probe=805.0)
    assert len(slow["regressions"]) == 1 and slow["regressions"][0].startswith("decode tokens/s regressed")
    full = baseline.check(path, "full/c", {"decode_tok_s": 10.0, "total_tok_s": 35.0, "ttft_s": 0.1}, 0.5, "CMD", probe=100.0)
    assert len(full["regressions"]) == 1 and "within_noise" not in full


def test_update_merges_into_the_cases_already_there(pytester: pytest.Pytester) -> None:
    """Issue 14: an update rewrote a 3-case baseline with only the 1 case of its run."""
    baselines = pytester.mkdir("published")
    path = baselines / "ort" / f"{CARD}.json"
    path.parent.mkdir(parents=True)
    others = {"tiny/other-a": {"decode_tok_s": 1.0}, "tiny/other-b": {"decode_tok_s": 2.0}, "full/bs1-pl32-cl128": {"decode_tok_s": 3.0}}
    path.write_text(json.dumps({"schema": "qeff-baseline/1", "card": CARD, "backend": "ort", "environment": {}, "cases": others}))
    result = bench(pytester, baselines, "--qeff-update-baseline")
    result.assert_outcomes(passed=1)
    cases = json.loads(path.read_text())["cases"]
    assert sorted(cases) == sorted([*others, "tiny/bs1-pl32-cl128"]) and cases["tiny/other-a"] == {"decode_tok_s": 1.0}
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no lock or temporary file left in the repository


def test_an_unreadable_baseline_is_moved_aside_with_a_message_not_replaced(pytester: pytest.Pytester) -> None:
    baselines = pytester.mkdir("published")
    path = baselines / "ort" / f"{CARD}.json"
    path.parent.mkdir(parents=True)
    corrupt = '{"schema": "qeff-baseline/1", "cases": {"tiny/a": {}, "tiny/b": {}, "tiny/c": {' + "\n"
    path.write_text(corrupt)
    result = bench(pytester, baselines, "--qeff-update-baseline")
    result.assert_outcomes(passed=1)
    aside = sorted(path.parent.glob(f"{CARD}.unreadable-*.json"))
    assert len(aside) == 1 and aside[0].read_text() == corrupt  # every byte kept
    out = " ".join(result.stdout.str().split())
    assert f"baseline {path} was unreadable (is not valid JSON" in out and f"moved it aside to {aside[0]}" in out
    assert list(json.loads(path.read_text())["cases"]) == ["tiny/bs1-pl32-cl128"]
