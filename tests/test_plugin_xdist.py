"""Under pytest-xdist: one card per worker, one merged results.json, one device group per worker."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ("pytester",)


def test_two_workers_write_one_merged_results_file(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        "-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", "-n", "2",
        "--qeff-model", "llama-3-8b", "--qeff-model", "codellama-34b", "--qeff-backend", "ort",
        "--device-group", "0", "--device-group", "[1]", "-m", "not qeff_benchmark",
    )
    result.assert_outcomes(passed=8)  # xdist does not report deselected tests
    files = list(pytester.path.rglob("results.json"))
    assert files == [pytester.path / "qeff_report" / "results.json"]
    data = json.loads(files[0].read_text())
    records = data["records"]
    assert len(records) == 8 and {r["outcome"] for r in records} == {"passed"}
    workers = {card: {r["worker"] for r in records if r["card"] == card} for card in ("llama-3-8b", "codellama-34b")}
    # --dist loadgroup is implied: each card's stages stay on one worker, and the two cards split.
    assert all(len(w) == 1 for w in workers.values()) and workers["llama-3-8b"] != workers["codellama-34b"]
    for rec in records:
        assert rec["data"]["device_group"] == [int(rec["worker"][2:])]  # gwN owns the N-th group
    # Within a worker the exported graph is built once and reused by the later stages.
    compile_rec = next(r for r in records if r["stage"] == "compile")
    assert f"/{compile_rec['worker']}/" in compile_rec["data"]["artifact"]["path"]  # a directory per worker
    result.stdout.fnmatch_lines(["codellama-34b*4/4*", "llama-3-8b*4/4*", "report: *qeff_report/index.html*"])


def test_more_workers_than_device_groups_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        "-p", "pytest_qeff.plugin", "-n", "3", "--qeff-model", "llama-3-8b", "--device-group", "0", "--device-group", "1",
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*3 pytest-xdist workers but only 2 device groups*"])
