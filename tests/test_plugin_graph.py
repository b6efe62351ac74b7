"""The suite's graph axis (``--qeff-graph``, issue 20): ONNX Runtime's fused CPU graph — what
``qeff infer --backend ort`` runs — certified beside the portable graph, each judged against HF
eager with its own verdict and benchmark, and both shown on the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Inner runs happen in this process (see tests/test_plugin.py): import the extension modules once.
import onnx  # noqa: F401  isort: skip
import onnxruntime  # noqa: F401  isort: skip
import qeff  # noqa: F401  isort: skip
import qeff.exporter  # noqa: F401  isort: skip
import qeff.pipeline  # noqa: F401  isort: skip
import qeff.verification  # noqa: F401  isort: skip
import qeff.compilers.ort_fused_weights  # noqa: F401  isort: skip
import qeff.cpu_graph  # noqa: F401  isort: skip
import tokenizers  # noqa: F401  isort: skip
import transformers.models.llama.modeling_llama  # noqa: F401  isort: skip
import transformers.models.mistral.modeling_mistral  # noqa: F401  isort: skip

pytest_plugins = ("pytester",)

STAGED = ("test_compile", "test_greedy_generation", "test_benchmark")


def qeff_run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", *args)


def _ids(result: pytest.RunResult) -> list[str]:
    return [line.split("::")[1] for line in result.outlines if "::" in line]


def test_the_graph_axis_selects_what_is_collected(pytester: pytest.Pytester) -> None:
    case = "llama-3-8b-bs1-pl32-cl128"
    every = _ids(qeff_run(pytester, "--qeff-model", "llama-3-8b", "--qeff-graph", "all", "--collect-only", "-q"))
    for test in STAGED:
        assert [i for i in every if i.startswith(f"{test}[{case}-")] == [f"{test}[{case}-{b}]" for b in ("ort", "ort-fused", "qaic")]
    assert f"test_ort_matches_pytorch[{case}]" in every  # graph-free stages run once
    fused = _ids(qeff_run(pytester, "--qeff-model", "llama-3-8b", "--qeff-graph", "fused", "--collect-only", "-q"))
    assert {i.split("[")[0] for i in fused if "-ort-fused]" in i} == set(STAGED)
    assert not [i for i in fused if i.endswith("-ort]") or i.endswith("-qaic]")]
    marked = _ids(qeff_run(pytester, "--qeff-model", "llama-3-8b", "--qeff-graph", "all", "-m", "qeff_fused", "--collect-only", "-q"))
    assert marked and all(i.endswith("-ort-fused]") for i in marked)
    ort = _ids(qeff_run(pytester, "--qeff-model", "llama-3-8b", "--qeff-graph", "all", "-m", "qeff_ort and qeff_benchmark",
                        "--collect-only", "-q"))
    assert ort == [f"test_benchmark[{case}-ort]", f"test_benchmark[{case}-ort-fused]"]


def test_a_fused_graph_on_cloud_ai_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = qeff_run(pytester, "--qeff-model", "llama-3-8b", "--qeff-backend", "qaic", "--qeff-graph", "fused", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--qeff-graph fused: the fused graph is ONNX Runtime's*Cloud AI 100 runs the portable graph*"])


def _records(pytester: pytest.Pytester) -> list[dict]:
    return json.loads((pytester.path / "out" / "results.json").read_text())["records"]


def test_the_fused_graph_gets_its_own_verdicts_speed_and_report(pytester: pytest.Pytester) -> None:
    result = qeff_run(pytester, "--qeff-model", "llama-3-8b", "--qeff-backend", "ort", "--qeff-graph", "all",
                      "-k", "bs1-pl32", "--qeff-report", "out", "--benchmark-disable")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["card*vs baseline*per graph",
                                 "llama-3-8b*8/8*ort 3/3 *tok/s · ort-fused 3/3 *tok/s"])
    fused = [r for r in _records(pytester) if r.get("graph") == "fused"]
    assert [(r["stage"], r["backend"]) for r in fused] == [(s, "ort-fused") for s in ("compile", "generation", "benchmark")]
    compiled, generated, bench = (r["data"] for r in fused)
    assert compiled["artifact"]["name"].startswith("ort-fused_1BS_32PL_128CL")
    verdict = compiled["hf_vs_graph"]  # against the untouched HF model, never the portable graph
    assert verdict["reference"] == "hf" and verdict["candidate"] == "ort-fused" and verdict["passed"]
    assert verdict["tokens_matched"] == verdict["tokens_total"] > 0
    assert compiled["graph_check"]["passed"] and compiled["graph_check"]["reference"] == "portable ONNX graph"
    assert generated["tokens_matched"] == generated["tokens_total"] > 0
    assert bench["figures"]["decode_tok_s"] > 0 and bench["baseline"]["file"].endswith("ort-fused/llama-3-8b.json")
    assert "--qeff-graph fused" in bench["baseline"]["command"]
    index = (pytester.path / "out" / "index.html").read_text()
    assert "per graph" in index and "ort-fused 3/3" in index
    page = (pytester.path / "out" / "cards" / "llama-3-8b.html").read_text()
    assert 'data-stage="compile" data-backend="ort-fused"' in page and "matches HF eager" in page
    assert 'data-stage="benchmark" data-backend="ort-fused"' in page and 'data-stage="benchmark" data-backend="ort"' in page


FAULT = '''
import numpy as np
import qeff.compilers.ort_fused_weights as fused_weights
import qeff.cpu_graph as cpu_graph

GUARD = {guard!r}
_real = {{"from_hf": fused_weights.from_hf, "check": cpu_graph.check_against_portable}}


def _corrupted(*args, **kwargs):
    weights = _real["from_hf"](*args, **kwargs)
    weights.layers[0].o = weights.layers[0].o * np.float32(1.1)  # attention's output projection, 10 % off
    return weights


def _blind(*args, **kwargs):  # a build check that misses the fault: measures, never fails
    return _real["check"](*args, **dict(kwargs, gate=False))


def pytest_configure(config):
    fused_weights.from_hf = _corrupted
    if not GUARD:
        cpu_graph.check_against_portable = _blind


def pytest_unconfigure(config):
    fused_weights.from_hf = _real["from_hf"]
    cpu_graph.check_against_portable = _real["check"]
'''


@pytest.mark.parametrize("guard", [False, True], ids=["build-check-blind", "build-check-on"])
def test_a_fused_graph_with_wrong_attention_fails_while_the_portable_passes(pytester: pytest.Pytester, guard: bool) -> None:
    """Seeded fault: the fused builder scales one attention projection. With the build's check
    against the portable graph blinded, the suite's own verdict against HF must still fail it;
    with the check on, the fused compile fails there first. The portable graph passes either way."""
    pytester.makepyfile(seeded_fault=FAULT.format(guard=guard))
    pytester.syspathinsert()
    result = qeff_run(pytester, "-p", "seeded_fault", "--qeff-model", "llama-3-8b", "--qeff-backend", "ort", "--qeff-graph", "all",
                      "-k", "bs1-pl32 and not benchmark", "--qeff-report", "out")
    outcomes = {(r["stage"], r["backend"]): r["outcome"] for r in _records(pytester) if r["backend"]}
    assert outcomes[("compile", "ort")] == outcomes[("generation", "ort")] == "passed"
    assert outcomes[("compile", "ort-fused")] == "failed"
    message = next(r["message"] for r in _records(pytester) if r["stage"] == "compile" and r["backend"] == "ort-fused")
    if guard:
        assert "differs from the portable graph" in result.stdout.str()
    else:
        assert "HF vs the fused ONNX Runtime graph" in message and "logits" in message
        assert outcomes[("generation", "ort-fused")] == "failed"
