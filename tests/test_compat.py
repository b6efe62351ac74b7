"""The compatibility run (issue 17): per card, its verdict under the locked and the tried library
releases, and which cards break. The comparison reads results.json files only, so most tests write
the records themselves; one runs the whole driver on a tiny card in this venv (nothing installed).
"""

from __future__ import annotations

import json
import sys

import pytest

from pytest_qeff import compat


def _results(versions: dict[str, str], outcomes: dict[str, list[tuple[str, str]]]) -> dict:
    """A results.json of cards whose stage tests had ``outcomes`` [(stage, outcome), ...]."""
    records = [
        {"nodeid": f"suite::{card}-{stage}-{i}", "card": card, "case": "default", "tier": "tiny", "stage": stage,
         "backend": "ort" if stage == "generate" else None, "outcome": outcome, "duration_s": 0.1,
         "message": f"{stage} went wrong\nsecond line" if outcome in ("failed", "error") else "", "data": {}}
        for card, stages in outcomes.items() for i, (stage, outcome) in enumerate(stages)
    ]
    return {
        "schema": "qeff-results", "version": 2,
        "environment": {"versions": {"torch": "2.13.0+cpu", **versions}},
        "run": {"exit_status": 0},
        "cards": {card: {"architecture": card.split("-")[0]} for card in outcomes},
        "records": records,
    }


LOCKED = {"transformers": "5.25.0", "onnx": "1.23.2", "onnxruntime": "1.32.0"}
TRIED = {"transformers": "5.0.0", "onnx": "1.23.2", "onnxruntime": "1.32.0"}


def test_a_card_fails_on_any_failed_errored_or_xpassed_stage():
    verdicts = compat.card_verdicts(_results(LOCKED, {
        "llama-a": [("transform", "passed"), ("export", "passed"), ("compile", "skipped")],
        "falcon-b": [("transform", "passed"), ("export", "error")],
        "gpt2-c": [("transform", "xpassed")],
        "mpt-d": [("compile", "skipped")],
        "phi-e": [("transform", "xfailed"), ("generate", "failed")],
    }))
    assert {c: v.outcome for c, v in verdicts.items()} == {
        "llama-a": "passed", "falcon-b": "failed", "gpt2-c": "failed", "mpt-d": "skipped", "phi-e": "failed",
    }
    assert verdicts["falcon-b"].failed_stages == ("export",)
    assert verdicts["phi-e"].failed_stages == ("generate[ort]",)
    assert verdicts["falcon-b"].first_failure == "export went wrong"
    assert verdicts["llama-a"].describe() == "passed 2, 1 skipped"


def test_compare_names_the_cards_and_families_that_break():
    locked = compat.Run.from_results("locked", _results(LOCKED, {
        "falcon-7b": [("transform", "passed")], "llama-x": [("transform", "passed")],
        "gpt2-y": [("transform", "failed")], "mpt-z": [("transform", "passed")],
    }), "locked")
    tried = compat.Run.from_results("tried", _results(TRIED, {
        "falcon-7b": [("transform", "failed")], "llama-x": [("transform", "passed")],
        "gpt2-y": [("transform", "passed")],  # mpt-z is absent: it breaks too (never ran)
    }), "tried", "every other package held at the lock")
    comparison = compat.compare([locked, tried], {"falcon-7b": "falcon", "mpt-z": "mpt"})
    assert [r.card for r in comparison.broken] == ["falcon-7b", "mpt-z"]
    assert [r.card for r in comparison.rows if r.fixed] == ["gpt2-y"]
    lines = compat.table(comparison)
    assert lines[0] == "run 1 (locked): torch 2.13.0+cpu, transformers 5.25.0, onnx 1.23.2, onnxruntime 1.32.0"
    assert lines[1].startswith("run 2 (tried): torch 2.13.0+cpu, transformers 5.0.0") and "held at the lock" in lines[1]
    assert lines[-1] == ("2 card(s) pass locked and fail under the tried releases: falcon-7b, mpt-z "
                         "(families: falcon, mpt)")
    assert json.loads(json.dumps(comparison.to_dict()))["broken"] == ["falcon-7b", "mpt-z"]


def test_no_break_when_the_tried_run_agrees():
    same = _results(LOCKED, {"llama-x": [("transform", "passed")], "gpt2-y": [("export", "failed")]})
    comparison = compat.compare([compat.Run.from_results("locked", same, "locked"), compat.Run.from_results("tried", same, "tried")])
    assert comparison.broken == [] and compat.table(comparison)[-1].startswith("no card")


def test_the_page_states_every_runs_versions_and_verdicts(tmp_path):
    locked = compat.Run.from_results("locked", _results(LOCKED, {"falcon-7b": [("transform", "passed")]}), "locked")
    tried = compat.Run.from_results("tried", _results(TRIED, {"falcon-7b": [("transform", "failed")]}), "tried", "<b>x</b>")
    index = compat.render(compat.compare([locked, tried]), tmp_path)
    html = index.read_text()
    assert "5.25.0" in html and "5.0.0" in html and "2.13.0+cpu" in html
    assert 'data-card="falcon-7b"' in html and "FAILED transform" in html and "breaks" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html  # escaped
    assert json.loads((tmp_path / "compat.json").read_text())["runs"][1]["versions"]["transformers"] == "5.0.0"


def test_a_venv_of_its_own_is_required(tmp_path, capsys):
    code = compat.main(["--venv", sys.prefix, "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.startswith("qeff compat: --venv ")


@pytest.mark.xdist_group("compat-e2e")
def test_the_driver_runs_both_suites_and_writes_the_report(tmp_path, capsys):
    """Both runs in this venv (--no-install), on one tiny card: the mechanism end to end."""
    code = compat.main(["--no-install", "--venv", sys.prefix, "--models", "tiny-qwen2", "--jobs", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "compat.json").read_text())
    assert [c["card"] for c in data["cards"]] == ["tiny-qwen2"]
    assert [v["outcome"] for v in data["cards"][0]["verdicts"]] == ["passed", "passed"]
    assert data["runs"][0]["versions"]["transformers"] == compat_installed("transformers")
    assert (tmp_path / "locked" / "index.html").is_file() and (tmp_path / "tried" / "index.html").is_file()
    assert "no card that passes locked fails under the tried releases" in out


def compat_installed(name: str) -> str:
    from qeff.compat import installed_version

    return installed_version(name)


def test_report_pages_say_when_a_library_is_not_the_locked_release():
    from pytest_qeff.report.views import _environment

    env = {"versions": {"transformers": "5.0.0", "onnx": "1.23.2", "torch": "2.13.0+cpu"},
           "locked": {"transformers": "5.25.0", "onnx": "1.23.2", "torch": "2.13.0+cpu"}}
    pairs = {p.label: p.value for p in _environment({"environment": env})}
    assert pairs["transformers"] == "5.0.0 (not the locked 5.25.0)"
    assert pairs["onnx"] == "1.23.2" and pairs["torch"] == "2.13.0+cpu"


def test_a_benchmark_below_its_baseline_is_slower_not_broken():
    """A timed stage moves with the machine's load (a compatibility run beside a busy CI once read a
    -92 % decode as a break): it is reported apart, and only a wrong answer breaks a card."""
    locked = compat.Run.from_results("locked", _results(LOCKED, {
        "llama-x": [("transform", "passed"), ("benchmark", "passed")],
        "gpt2-y": [("transform", "passed"), ("benchmark", "passed")],
    }), "locked")
    tried = compat.Run.from_results("tried", _results(TRIED, {
        "llama-x": [("transform", "passed"), ("benchmark", "failed")],
        "gpt2-y": [("transform", "failed"), ("benchmark", "failed")],
    }), "tried")
    comparison = compat.compare([locked, tried])
    rows = {r.card: r for r in comparison.rows}
    assert not rows["llama-x"].breaks and rows["llama-x"].slower
    assert rows["gpt2-y"].breaks and rows["gpt2-y"].verdicts[1].failed_stages == ("transform",)
    assert rows["llama-x"].verdicts[1].describe() == "passed 1; slower: benchmark"
    lines = compat.table(comparison)
    assert lines[-1].startswith("1 card(s) pass locked and fail") and "llama-x" in lines[-2]
