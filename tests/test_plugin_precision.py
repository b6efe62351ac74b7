"""``--qeff-precision``: one test per tier per card, budgets from the card, the ladder in results.json and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import onnx  # noqa: F401  isort: skip  (see tests/test_plugin.py: imported once, before pytester's inner runs)
import onnxruntime  # noqa: F401  isort: skip
import qeff  # noqa: F401  isort: skip
import transformers.models.llama.modeling_llama  # noqa: F401  isort: skip

pytest_plugins = ("pytester",)

CARDS = Path(__file__).resolve().parent.parent / "model_cards"


def qeff_run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", *args)


def _card_dir(pytester: pytest.Pytester, name: str = "llama-3-8b", extra: str = "") -> Path:
    cards = pytester.mkdir("cards")
    (cards / f"{name}.toml").write_text((CARDS / f"{name}.toml").read_text() + extra)
    return cards


def test_precision_tests_are_collected_per_tier_on_the_first_case(pytester: pytest.Pytester) -> None:
    result = qeff_run(pytester, "--qeff-model", "llama-2-7b-chat", "--qeff-precision", "fp32,mxfp6+mxint8,mxint8+mxfp6",
                      "-m", "qeff_precision", "--collect-only", "-q")
    assert result.ret == 0
    ids = [line.split("::")[1] for line in result.outlines if "::" in line]
    assert ids == ["test_precision_tier[llama-2-7b-chat-bs1-pl32-cl128-fp32]",
                   "test_precision_tier[llama-2-7b-chat-bs1-pl32-cl128-mxfp6+mxint8]"]  # second case and duplicate dropped
    plain = qeff_run(pytester, "--qeff-model", "llama-2-7b-chat", "--collect-only", "-q")
    assert not [line for line in plain.outlines if "precision" in line]  # off without the option


def test_unknown_tier_is_a_usage_error_naming_the_valid_ones(pytester: pytest.Pytester) -> None:
    result = qeff_run(pytester, "--qeff-model", "llama-3-8b", "--qeff-precision", "fp32,fp8", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--qeff-precision: unknown precision tier 'fp8'; valid tiers: fp32, fp16, mxfp6, mxint8, mxfp6+mxint8*"])


def test_card_budget_for_an_unknown_tier_is_refused(pytester: pytest.Pytester) -> None:
    cards = _card_dir(pytester, extra="\n[precision.budgets.mxfp4]\nkld_mean = 1\nkld_p99 = 1\ntop1_agree = 0.5\nppl_delta = 1\n")
    result = qeff_run(pytester, "--qeff-cards-dir", str(cards), "--qeff-model", "all", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*llama-3-8b.toml: precision: *unknown precision tier 'mxfp4'*"])


def test_ladder_runs_records_and_renders_and_a_card_budget_bites(pytester: pytest.Pytester) -> None:
    # The card's own budget for mxint8 is far below what MXINT8 costs: that tier must fail, with the numbers.
    cards = _card_dir(pytester, extra="\n[precision.budgets.mxint8]\nkld_mean = 1e-15\nkld_p99 = 1\ntop1_agree = 0.5\nppl_delta = 1\n")
    result = qeff_run(pytester, "--qeff-cards-dir", str(cards), "--qeff-model", "all", "--qeff-precision", "fp32,fp16,mxint8",
                      "-m", "qeff_precision", "--qeff-report", "out")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*llama-3-8b-bs1-pl32-cl128 precision mxint8 vs HF fp32: KLD mean * > budget 1e-15*"])
    data = json.loads((pytester.path / "out" / "results.json").read_text())
    records = {r["precision"]: r for r in data["records"] if r["stage"] == "precision"}
    assert set(records) == {"fp32", "fp16", "mxint8"}
    fp32 = records["fp32"]["data"]
    assert fp32["kind"] == "precision" and fp32["tiers"] == ["fp32", "fp16", "mxint8"] and fp32["corpus"] == "random tokens"
    assert fp32["result"]["kld_max"] < 1e-9 and fp32["result"]["tokens_matched"] == fp32["result"]["tokens_total"]
    assert records["fp16"]["data"]["result"]["kld_mean"] > fp32["result"]["kld_mean"]
    assert records["mxint8"]["outcome"] == "failed" and records["mxint8"]["data"]["result"]["budget"]["kld_mean"] == 1e-15
    page = (pytester.path / "out" / "cards" / "llama-3-8b.html").read_text()
    assert "Precision ladder" in page and page.index(">fp32<") < page.index(">fp16<") < page.index(">mxint8<")
    assert "KL divergence mean per tier" in page and "<svg" in page
