"""The plugin seen from the command line: collection, options and the mistakes users make."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

# Inner runs happen in this process, and pytester forgets the modules they import afterwards;
# extension modules (numpy, onnxruntime) cannot be imported twice, so import them here first.
import onnx  # noqa: F401  isort: skip  (its protobuf extension aborts the process when imported a second time)
import onnxruntime  # noqa: F401  isort: skip
import qeff  # noqa: F401  isort: skip
# `import qeff` is lazy: load what its stages import (torch, tokenizers, …) here too.
import qeff.exporter  # noqa: F401  isort: skip
import qeff.pipeline  # noqa: F401  isort: skip
import qeff.verification  # noqa: F401  isort: skip
import tokenizers  # noqa: F401  isort: skip
import transformers.models.llama.modeling_llama  # noqa: F401  isort: skip
import transformers.models.mistral.modeling_mistral  # noqa: F401  isort: skip
from pytest_qeff.cards import load_cards  # noqa: E402  isort: skip  (after the extension modules above)

pytest_plugins = ("pytester",)

CARDS = Path(__file__).resolve().parent.parent / "model_cards"


def qeff(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", *args)


def test_collection_ids_for_given_cards(pytester: pytest.Pytester) -> None:
    result = qeff(pytester, "--qeff-model", "llama-2-7b-chat", "--collect-only", "-q")
    assert result.ret == 0
    ids = [line.split("::")[1] for line in result.outlines if "::" in line]
    cases = ["llama-2-7b-chat-bs1-pl32-cl128", "llama-2-7b-chat-bs2-pl16-cl64"]
    expected = [f"test_transform_matches_hf[{c}]" for c in cases] + [f"test_ort_matches_pytorch[{c}]" for c in cases]
    for test in ("test_compile", "test_greedy_generation", "test_benchmark"):
        expected += [f"{test}[{c}-{b}]" for c in cases for b in ("ort", "qaic")]
    assert ids == expected


def test_globs_all_and_backend_select_cards(pytester: pytest.Pytester) -> None:
    result = qeff(pytester, "--qeff-model", "llama-3-*", "--qeff-backend", "ort", "--collect-only", "-q")
    assert result.ret == 0
    cards = {line.split("[")[1].rsplit("-bs", 1)[0] for line in result.outlines if "::" in line}
    assert cards == {"llama-3-8b", "llama-3-70b"}
    assert not [line for line in result.outlines if "qaic" in line]
    everything = qeff(pytester, "--qeff-model", "all", "--collect-only", "-q")
    # Every card's first case (bs1-pl32-cl128 unless the card lists its own, like gemma3-270m's 1024 slots).
    first_cases = {f"{cid}-{card.all_cases[0].id}" for cid, card in load_cards(CARDS).items()}
    assert first_cases <= {
        line.split("[")[1].split("]")[0] for line in everything.outlines if "test_transform" in line
    }


def test_markers_select_stages(pytester: pytest.Pytester) -> None:
    result = qeff(pytester, "--qeff-model", "llama-3-8b", "-m", "qeff_benchmark and qeff_ort", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*test_conformance.py::test_benchmark[[]llama-3-8b-bs1-pl32-cl128-ort[]]", "", "1/8 tests collected*"])


def test_unknown_model_is_a_usage_error_naming_the_closest_cards(pytester: pytest.Pytester) -> None:
    result = qeff(pytester, "--qeff-model", "llama-2-7b-chta", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --qeff-model llama-2-7b-chta: no model card matches; closest: llama-2-7b-chat*"])
    assert "Traceback" not in result.stderr.str()


def test_the_design_command_works_literally(pytester: pytest.Pytester) -> None:
    """DESIGN.md's command, as written: `pytest --qeff-model llama-2-7b --device-group 0,1` (issue 11)."""
    result = qeff(pytester, "--qeff-model", "llama-2-7b", "--device-group", "0,1", "-q", "--qeff-report", "report")
    assert result.ret == 0, result.stdout.str()
    records = json.loads((pytester.path / "report" / "results.json").read_text())["records"]
    assert {r["card"] for r in records} == {"llama-2-7b"} and len(records) == 16
    outcomes = {(r["stage"], r["backend"], r["outcome"]) for r in records}
    for stage in ("transform", "export"):
        assert (stage, None, "passed") in outcomes
    for stage in ("compile", "generation", "benchmark"):
        assert (stage, "ort", "passed") in outcomes and (stage, "qaic", "skipped") in outcomes
    # The same card by its HF repo id and its alias, in any case.
    for name in ("meta-llama/Llama-2-7b-hf", "LLAMA-2-7B-HF"):
        listed = qeff(pytester, "--qeff-model", name, "--collect-only", "-q")
        assert {line.split("[")[1].rsplit("-bs", 1)[0] for line in listed.outlines if "::" in line} == {"llama-2-7b"}


def test_suite_without_cards_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = qeff(pytester, "--pyargs", "pytest_qeff.suite", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: the qeff conformance suite needs cards: add --qeff-model*"])


def _card_dir(pytester: pytest.Pytester, name: str = "llama-3-8b", **replace: str) -> Path:
    cards = pytester.mkdir("cards")
    text = (CARDS / f"{name}.toml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    (cards / f"{name}.toml").write_text(text)
    return cards


def test_bad_card_is_a_usage_error_naming_file_and_field(pytester: pytest.Pytester) -> None:
    cards = _card_dir(pytester, **{"hidden_size = 64": "hiden_size = 64", "num_hidden_layers = 32": 'num_hidden_layers = "many"'})
    result = qeff(pytester, "--qeff-cards-dir", str(cards), "--qeff-model", "all", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "llama-3-8b.toml" in err
    assert "config.num_hidden_layers: Input should be a valid integer" in err
    assert "tiny.hiden_size: unknown key (did you mean 'hidden_size'?)" in err
    assert "Traceback" not in err


def test_card_keeping_no_gqa_ratio_is_refused(pytester: pytest.Pytester) -> None:
    cards = _card_dir(pytester, **{"num_key_value_heads = 1": "num_key_value_heads = 4"})
    result = qeff(pytester, "--qeff-cards-dir", str(cards), "--qeff-model", "all", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*llama-3-8b.toml: tiny: num_attention_heads / num_key_value_heads is 4/4 but the real model's is 32/8*"])


def test_bad_toml_is_a_usage_error(pytester: pytest.Pytester) -> None:
    cards = pytester.mkdir("cards")
    (cards / "broken.toml").write_text("id = \n")
    result = qeff(pytester, "--qeff-cards-dir", str(cards), "--qeff-model", "all")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*broken.toml: not valid TOML*"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device-group", "0,x"], "*--device-group: malformed device group '0,x': expected device ids (non-negative integers) separated by commas, like 0 or 0,1 or [[]0,1]*"),
        (["--device-group", "0,0"], "*device 0 appears twice in one group*"),
        (["--device-group", "0,1", "--device-group", "[1,2]"], "*device 1 is in two groups (0,1 and 1,2)*"),
        (["--device-group", "0", "--device-group", "1"], "*2 device groups given but the tests run in one process: add -n 2*"),
    ],
)
def test_device_group_mistakes(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    result = qeff(pytester, "--qeff-model", "llama-3-8b", *args, "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_device_groups_in_header(pytester: pytest.Pytester) -> None:
    result = qeff(pytester, "--qeff-model", "llama-3-8b", "--device-group", "[0,1]", "--collect-only")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["qeff: 1 card(s), tier tiny, backends ort+qaic, device groups 0,1, cards from *"])


def test_help_documents_options_with_defaults(pytester: pytest.Pytester) -> None:
    result = qeff(pytester, "--help")
    out = result.stdout.str()
    for option in ("--qeff-model=NAME", "--device-group=IDS", "--qeff-backend", "--qeff-tier", "--qeff-report=DIR",
                   "--qeff-baseline=DIR", "--qeff-update-baseline", "--qeff-cards-dir=DIR", "--qeff-changed-since=REF"):
        assert option in out
    assert "Default: ./qeff_report." in " ".join(out.split())


def test_known_failure_is_strict_xfail(pytester: pytest.Pytester) -> None:
    cards = _card_dir(
        pytester,
        **{"[prompts]": '[tolerances.tiny]\nlogits_mse = 1e-30\nlogits_max_abs = 1e-30\ncache_mse = 1\ncache_max_abs = 1\n\n'
           '[[known_failures]]\nstage = "export"\nreason = "tolerance set below float32 noise on purpose"\n\n'
           '[[known_failures]]\nstage = "compile"\nbackend = "ort"\nreason = "claims a failure that does not happen"\n\n[prompts]'},
    )
    result = qeff(pytester, "--qeff-cards-dir", str(cards), "--qeff-model", "all", "--qeff-backend", "ort",
                  "-m", "qeff_export or qeff_compile", "-rfxX")
    result.assert_outcomes(xfailed=1, failed=1, deselected=3)
    result.stdout.fnmatch_lines(["*test_compile[[]llama-3-8b-bs1-pl32-cl128-ort[]]*", "[[]XPASS(strict)[]] claims a failure that does not happen"])
    result.stdout.fnmatch_lines(["XFAIL*test_ort_matches_pytorch*tolerance set below float32 noise on purpose"])
    records = json.loads((pytester.path / "qeff_report" / "results.json").read_text())["records"]
    assert {r["stage"]: r["outcome"] for r in records} == {"export": "xfailed", "compile": "xpassed"}


def test_a_run_writes_results_report_and_terminal_table(pytester: pytest.Pytester) -> None:
    result = qeff(pytester, "--qeff-model", "llama-3-8b", "--qeff-report", "out", "-rs")
    result.assert_outcomes(passed=5, skipped=3)
    result.stdout.fnmatch_lines([
        "*= qeff =*",
        "card*stages passed*worst MSE / tol*tokens*decode tok/s*vs baseline",
        "llama-3-8b*5/8 (3 skipped)*e-1* / 1e-12*16/16*no baseline",
        f"report: {pytester.path / 'out' / 'index.html'}*",
        "SKIPPED*qaic: Cloud AI 100 SDK not found: no qaic-compile or qaic-exec on PATH or in /opt/qti-aic/exec/; "
        "the qaicrt Python module is not importable*",
    ])
    data = json.loads((pytester.path / "out" / "results.json").read_text())
    assert data["schema"] == "qeff-results" and data["version"] == 2
    assert set(data["environment"]) >= {"machine", "cores", "versions", "backends", "commit"}
    assert [r["stage"] for r in data["records"] if r["backend"] != "qaic"] == ["transform", "export", "compile", "generation", "benchmark"]
    export = next(r for r in data["records"] if r["stage"] == "export")
    assert export["data"]["comparison"]["logits_max_abs"] < 1e-5
    assert (pytester.path / "out" / "cards" / "llama-3-8b.html").is_file()


def test_full_tier_without_the_weights_skips_with_a_reason(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # An empty cache, whatever this machine holds (read when the stage asks, in this process).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(pytester.mkdir("empty-hub-cache")))
    result = qeff(pytester, "--qeff-model", "llama-3-8b", "--qeff-tier", "full", "--qeff-backend", "ort", "-rs")
    result.assert_outcomes(skipped=5)
    result.stdout.fnmatch_lines([
        "SKIPPED [[]5[]] *llama-3-8b: the full tier needs the real weights of meta-llama/Meta-Llama-3-8B (revision main), "
        "which are not in the Hugging Face cache (*empty-hub-cache); fetch them with `hf download meta-llama/Meta-Llama-3-8B --revision main` "
        "(tests never download), or run the tiny tier",
    ])


def test_with_an_sdk_the_qaic_compile_stage_runs_the_compiler(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a compiler on PATH (here a fake that fails like a real one), the qaic compile stage
    really runs it with the card's options, and its failure is readable."""
    bin_dir = pytester.mkdir("bin")
    fake = bin_dir / "qaic-exec"
    fake.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args.txt\"\necho 'error: unsupported op Foo' >&2\nexit 3\n")
    fake.chmod(0o755)
    (bin_dir / "qaicrt.py").write_text("")  # the fake boundary: a runtime module that imports
    monkeypatch.setenv("PATH", f"{bin_dir}:{shutil.os.environ['PATH']}")
    monkeypatch.syspath_prepend(str(bin_dir))
    result = qeff(pytester, "--qeff-model", "llama-3-8b", "--qeff-backend", "qaic", "-m", "qeff_compile")
    result.assert_outcomes(failed=1, deselected=4)
    result.stdout.fnmatch_lines(["*CompileError*qaic-exec failed with exit code 3*unsupported op Foo*"])
    args = (bin_dir / "args.txt").read_text()
    assert "-retained-state" in args and "-aic-num-cores=" in args and "-convert-to-fp16" in args


def test_benchmark_stage_runs_through_pytest_benchmark_when_it_is_active(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # pytest-benchmark times the card's repeats (rounds) and stores them; qeff's per-phase medians
    # ride along in extra_info. It switches itself off in an xdist worker (this test may run in
    # one): the inner run is not one.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    result = qeff(pytester, "--qeff-model", "llama-3-8b", "-m", "qeff_benchmark and qeff_ort", "--benchmark-json", "bench.json")
    result.assert_outcomes(passed=1)
    data = json.loads((pytester.path / "bench.json").read_text())
    (bench,) = data["benchmarks"]
    card = __import__("tomllib").loads((CARDS / "llama-3-8b.toml").read_text())
    repeats = card.get("benchmark", {}).get("repeats")
    if repeats is not None:
        assert bench["stats"]["rounds"] == repeats
    assert bench["extra_info"]["decode_tok_s"] > 0 and bench["extra_info"]["probe"] > 0 and bench["extra_info"]["backend"] == "ort"
    assert bench["stats"]["rounds"] >= 3


def test_benchmark_stage_times_alone_when_pytest_benchmark_is_off(pytester: pytest.Pytester) -> None:
    result = qeff(pytester, "--qeff-model", "llama-3-8b", "-m", "qeff_benchmark and qeff_ort", "--benchmark-disable", "--qeff-report", "out")
    result.assert_outcomes(passed=1)
    data = json.loads((pytester.path / "out" / "results.json").read_text())
    (bench,) = [r for r in data["records"] if r["stage"] == "benchmark"]
    assert bench["data"]["figures"]["decode_tok_s"] > 0 and len(bench["data"]["runs"]) == bench["data"]["repeats"]
