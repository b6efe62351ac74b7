"""--qeff-shard I/N and `python -m pytest_qeff.report merge` (issue 11, item 6): the union of the
shards equals the unsharded run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import onnx  # noqa: F401  isort: skip
import onnxruntime  # noqa: F401  isort: skip
import qeff.exporter  # noqa: F401  isort: skip
import qeff  # noqa: F401  isort: skip
import transformers.models.gemma.modeling_gemma  # noqa: F401  isort: skip
import transformers.models.gpt2.modeling_gpt2  # noqa: F401  isort: skip
import transformers.models.qwen2.modeling_qwen2  # noqa: F401  isort: skip

from pytest_qeff import shard
from pytest_qeff.cards import default_cards_dir, load_cards
from pytest_qeff.report.__main__ import main as report_main

pytest_plugins = ("pytester",)

CARDS = "gpt2,tiny-gemma,tiny-qwen2"
#: What makes two runs' records "the same": who the test is, how it ended, and the numbers it
#: measured that do not depend on time (timings, workers and artifact paths do).
STABLE_DATA = {"transform": ("comparison", "reference_tokens", "config_mismatches"), "export": ("comparison",),
               "generation": ("rows", "tokens_matched", "tokens_total"), "compile": ()}


def test_shards_are_disjoint_complete_and_balanced():
    ids = sorted(load_cards(default_cards_dir()))
    for count in range(1, 9):
        parts = [shard.Shard(i, count).take(ids) for i in range(1, count + 1)]
        assert sorted(x for part in parts for x in part) == ids
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard.Shard(2, 3).take(["a", "b", "c", "d", "e"]) == ["b", "e"]  # round-robin over sorted ids


@pytest.mark.parametrize("bad", ["3", "0/2", "3/2", "1/0", "a/b", "-1/2"])
def test_bad_shard_values_fail_at_parse_time(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        shard.parse(bad)
    assert shard.parse(" 2 / 4 ") == shard.Shard(2, 4)


def _run(pytester: pytest.Pytester, report: str, *args: str) -> dict:
    result = pytester.runpytest("-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", "--qeff-model", CARDS,
                                "--qeff-backend", "ort", "-m", "not qeff_benchmark", "--qeff-report", report, "-q", *args)
    assert result.ret == 0, result.stdout.str()
    return json.loads((pytester.path / report / "results.json").read_text())


def _stable(record: dict) -> tuple:
    keep = STABLE_DATA.get(record["stage"], ())
    return (record["nodeid"], record["card"], record["case"], record["tier"], record["stage"], record["backend"],
            record["outcome"], json.dumps({k: record["data"].get(k) for k in keep}, sort_keys=True))


def test_the_union_of_the_shards_equals_the_unsharded_run(pytester: pytest.Pytester, capsys):
    whole = _run(pytester, "whole")
    first = _run(pytester, "s1", "--qeff-shard", "1/2")
    second = _run(pytester, "s2", "--qeff-shard", "2/2")
    assert {r["card"] for r in first["records"]} == {"gpt2", "tiny-qwen2"}  # sorted ids, dealt round-robin
    assert {r["card"] for r in second["records"]} == {"tiny-gemma"}
    assert first["run"]["shard"] == "1/2"

    assert report_main(["merge", str(pytester.path / "s1"), str(pytester.path / "s2"), "--out", str(pytester.path / "merged")]) == 0
    assert f"merged 2 run(s), {len(whole['records'])} records, 3 cards" in capsys.readouterr().out
    merged = json.loads((pytester.path / "merged" / "results.json").read_text())
    assert [_stable(r) for r in merged["records"]] == [_stable(r) for r in whole["records"]]  # same records, same order
    assert merged["cards"] == whole["cards"]
    assert [m["shard"] for m in merged["run"]["merged"]] == ["1/2", "2/2"] and merged["run"]["shard"] is None
    assert (pytester.path / "merged" / "index.html").is_file()
    assert {p.stem for p in (pytester.path / "merged" / "cards").glob("*.html")} == {"gpt2", "tiny-gemma", "tiny-qwen2"}

    # Seeded faults: a shard given twice overlaps; a missing shard is named; a changed record differs.
    assert report_main(["merge", str(pytester.path / "s1"), str(pytester.path / "s1"), "--out", str(pytester.path / "x")]) == 2
    assert "the runs overlap" in capsys.readouterr().err
    assert report_main(["merge", str(pytester.path / "s1"), "--out", str(pytester.path / "x")]) == 2
    assert "shard(s) 2/2 missing" in capsys.readouterr().err
    assert report_main(["merge", str(pytester.path / "s1"), "--allow-missing-shards", "--out", str(pytester.path / "part")]) == 0
    part = json.loads((pytester.path / "part" / "results.json").read_text())
    assert part["run"]["missing_shards"] == ["2/2"]
    assert [_stable(r) for r in part["records"]] != [_stable(r) for r in whole["records"]]
    assert report_main(["merge", str(pytester.path / "whole"), str(pytester.path / "s1"), "--out", str(pytester.path / "x")]) == 2
    assert "the runs overlap" in capsys.readouterr().err


def test_an_empty_shard_passes_and_says_so(pytester: pytest.Pytester):
    result = pytester.runpytest("-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", "--qeff-model", CARDS,
                                "--qeff-shard", "5/5")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*qeff: shard 5/5 of the 3 selected card(s): none*", "*shard 5/5 holds no card (3 selected card(s) over 5 shards)*"])
    bad = pytester.runpytest("-p", "pytest_qeff.plugin", "--qeff-model", CARDS, "--qeff-shard", "2/1")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*argument --qeff-shard: '2/1': I must be between 1 and N*"])


def test_merge_refuses_runs_of_different_tiers(tmp_path: Path, capsys):
    from pytest_qeff import results

    for name, tier in (("a", "tiny"), ("b", "full")):
        results.write(tmp_path / name / "results.json", {"schema": results.SCHEMA, "version": results.VERSION,
                                                          "run": {"tier": tier}, "cards": {}, "records": []})
    assert report_main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")]) == 2
    assert "different tiers" in capsys.readouterr().err
