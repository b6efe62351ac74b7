"""The HTML report: a view of results.json, escaped, without JavaScript, and readable in a browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pytest_qeff import results
from pytest_qeff.records import (
    BenchmarkRecord,
    ExportRecord,
    GenerationRecord,
    GenerationRow,
    ModelFacts,
    OnnxFacts,
    StageRecord,
    TransformRecord,
)
from pytest_qeff.report import render
from qeff.verification import Comparison

EVIL = "<script>alert('x')</script> & \"quotes\""


def _comparison(reference: str, candidate: str, mse: float) -> Comparison:
    return Comparison(
        reference=reference, candidate=candidate, steps=4, logits_mse=mse, logits_max_abs=2e-7,
        prefill_logits_max_abs=2e-7, decode_logits_max_abs=1e-7, cache_mse=1e-16, cache_max_abs=1e-7,
        tokens_matched=4, tokens_total=4, ambiguous=0, mismatches=[], failures=[],
        tolerances={"logits_mse": 1e-12, "logits_max_abs": 1e-5, "cache_mse": 1e-12, "cache_max_abs": 1e-5, "ambiguity_margin": 1e-3},
    )


def sample_results() -> dict:
    base = {"prompts": [[1, 2, 3]], "prompt_texts": [EVIL], "batch_size": 1, "prompt_len": 32, "ctx_len": 128, "device_group": [0]}
    card = {"id": "good-card", "name": "Good <b>Card</b>", "architecture": "llama", "description": EVIL,
            "weights": {"source": "hub", "repo": "org/good", "revision": "main"}, "config": {"num_hidden_layers": 32},
            "tiny": {"num_hidden_layers": 2}, "compile": {"batch_size": 1}, "tolerances": {"tiny": {"logits_mse": 1e-12}},
            "prompts": {"text": [EVIL]}, "benchmark": {"repeats": 5},
            "known_failures": [{"stage": "compile", "backend": "qaic", "reason": "waiting for <the> SDK"}]}
    model = ModelFacts(num_layers=2, num_kv_heads=2, head_dim=16, vocab_size=256, parameters=1000)

    def rec(stage: str, outcome: str, data: StageRecord | None, backend: str | None = None, card_id: str = "good-card",
            message: str = "") -> dict:
        bk = f"-{backend}" if backend else ""
        return {"nodeid": f"test_conformance.py::test_{stage}[{card_id}-bs1-pl32-cl128{bk}]", "card": card_id,
                "case": "bs1-pl32-cl128", "tier": "tiny", "stage": stage, "backend": backend, "worker": "gw0",
                "outcome": outcome, "duration_s": 0.5, "message": message, "data": data.to_dict() if data else {}}

    records = [
        rec("transform", "passed", TransformRecord(**base, comparison=_comparison("hf", "pytorch", 3e-16), reference_tokens=[[5, 6, 7, 8]], model=model)),
        rec("export", "passed", ExportRecord(**base, comparison=_comparison("pytorch", "ort", 1e-15),
                                             onnx=OnnxFacts(path="/x/model.onnx", bytes=1000, reused=False, build_s=0.3, fp16_clipped_values=1))),
        rec("generation", "failed", GenerationRecord(**base, tokens_matched=2, tokens_total=4, stats={}, rows=[
            GenerationRow(row=0, reference=[5, 6, 7, 8], generated=[5, 6, 9, 9], first_divergence=2, margin=0.5, ambiguous=False,
                          reference_text=EVIL, generated_text="<i>out</i>")]),
            backend="ort", message="row 0 diverges at step 2"),
        rec("benchmark", "passed", BenchmarkRecord(
            **base, figures={"decode_tok_s": 900.0, "total_tok_s": 850.0, "ttft_s": 0.002}, runs=[], generation_len=64, repeats=5,
            threads=1, probe=None, update_baseline=False,
            baseline={"file": "/b/ort/good-card.json", "key": "tiny/bs1-pl32-cl128", "found": True, "allowed": -0.8,
                      "command": "pytest --qeff-update-baseline", "regressions": [],
                      "baseline": {"decode_tok_s": 1000.0, "total_tok_s": 900.0, "ttft_s": 0.0025},
                      "changes": {"decode_tok_s": -0.1, "total_tok_s": -0.056, "ttft_s": 0.25}}), backend="ort"),
        rec("compile", "skipped", None, backend="qaic", message="qaic: Cloud AI 100 SDK not found"),
        rec("transform", "passed", TransformRecord(**base, comparison=_comparison("hf", "pytorch", 5e-16), reference_tokens=[[1]], model=model),
            card_id="other-card"),
    ]
    other = {**card, "id": "other-card", "name": "Other", "architecture": "mistral", "known_failures": []}
    return {"schema": results.SCHEMA, "version": results.VERSION, "created": "2030-01-01T00:00:00+00:00",
            "environment": {"machine": "box", "cores": 2, "versions": {"qeff": "0.1.0"}, "commit": "abc123def4567890", "dirty": False},
            "run": {"tier": "tiny", "backends": ["ort", "qaic"], "device_groups": [[0]], "models": ["all"], "args": ["--qeff-model", "all"]},
            "cards": {"good-card": card, "other-card": other}, "records": records}


@pytest.fixture
def report(tmp_path: Path) -> Path:
    render(sample_results(), tmp_path / "report")
    return tmp_path / "report"


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> _Dom:
    dom = _Dom()
    dom.feed(html)
    return dom


def test_index_has_one_row_per_card(report: Path) -> None:
    dom = parse((report / "index.html").read_text())
    rows = [a["data-card"] for t, a in dom.tags if t == "tr" and "data-card" in a]
    assert rows == ["good-card", "other-card"]
    assert ("a", {"href": "cards/good-card.html"}) in dom.tags
    assert (report / "style.css").is_file() and (report / "cards" / "other-card.html").is_file()
    cells = [" ".join(c.split()) for c in dom.text if c.strip()]
    good = cells[cells.index("good-card"):cells.index("mistral (1 card)")]  # up to the next architecture's heading
    assert good == ["good-card", "Good <b>Card</b>", "3/5 (1 failed, 1 skipped)", "1e-15 / 1e-12", "2/4", "900.0", "-10%"]


def test_index_groups_cards_by_architecture(report: Path) -> None:
    from pytest_qeff.report.views import index_view

    results = sample_results()
    results["cards"]["third-card"] = {**results["cards"]["good-card"], "id": "third-card", "name": "Third"}
    results["records"].append({**results["records"][-1], "card": "third-card"})
    view = index_view(results)
    assert [(g.architecture, g.title, [r.id for r in g.rows]) for g in view.groups] == [
        ("llama", "llama (2 cards, 1 failing)", ["good-card", "third-card"]),
        ("mistral", "mistral (1 card)", ["other-card"]),
    ]
    dom = parse((report / "index.html").read_text())  # the sample: one llama card, one mistral card
    order = [a.get("data-architecture") or a["data-card"] for t, a in dom.tags if "data-architecture" in a or "data-card" in a]
    assert order == ["llama", "good-card", "mistral", "other-card"]
    assert "mistral (1 card)" in [c.strip() for c in dom.text]


def test_every_prompt_and_output_is_escaped_and_there_is_no_javascript(report: Path) -> None:
    for page in [report / "index.html", *sorted((report / "cards").glob("*.html"))]:
        html = page.read_text()
        dom = parse(html)
        assert not [t for t, _ in dom.tags if t == "script"], page
        assert not [a for _, attrs in dom.tags for a in attrs if a.startswith("on")], page
        assert "javascript:" not in html.lower()
    card = (report / "cards" / "good-card.html").read_text()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &#34;quotes&#34;" in card
    assert "&lt;i&gt;out&lt;/i&gt;" in card and "Good &lt;b&gt;Card&lt;/b&gt;" in card


def test_card_page_shows_stages_against_tolerances_token_diff_and_chart(report: Path) -> None:
    dom = parse((report / "cards" / "good-card.html").read_text())
    stages = [(a["data-stage"], a["data-backend"]) for t, a in dom.tags if t == "article"]
    assert stages == [("transform", ""), ("export", ""), ("generation", "ort"), ("benchmark", "ort"), ("compile", "qaic")]
    text = " ".join(" ".join(dom.text).split())
    assert "logits MSE 3e-16 ≤ 1e-12 ok" in text
    cells = [a["class"] for t, a in dom.tags if t == "td" and a.get("class") in ("same", "diff", "after")]
    assert cells.count("diff") == 3 and "first difference at step 2" in text  # step number, HF and ort rows
    assert [t for t, _ in dom.tags].count("rect") == 6  # three figures, now and baseline
    assert "decode tokens/s 900 tok/s -10% vs baseline (allowed -80%)" in text
    assert "qaic: Cloud AI 100 SDK not found" in text and "waiting for <the> SDK" in text
    assert "abc123def456" in text  # environment: the commit


def test_render_cli_rerenders_any_results_file(tmp_path: Path) -> None:
    source = tmp_path / "results.json"
    source.write_text(json.dumps(sample_results()))
    out = tmp_path / "again"
    done = subprocess.run([sys.executable, "-m", "pytest_qeff.report", "render", str(source), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / "index.html")
    assert (out / "cards" / "good-card.html").is_file() and json.loads((out / "results.json").read_text())["version"] == results.VERSION


def test_render_cli_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"schema": results.SCHEMA, "version": 99}))
    done = subprocess.run([sys.executable, "-m", "pytest_qeff.report", "render", str(bad), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {bad}: results version 99; this pytest_qeff reads version {results.VERSION}"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed here (Debian: apt-get install chromium)")
def test_report_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    """The pages load in a real browser and show the rows (the DOM after parsing and layout)."""

    def dom_of(page: Path) -> str:
        done = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    index = parse(dom_of(report / "index.html"))
    assert [a["data-card"] for t, a in index.tags if t == "tr" and "data-card" in a] == ["good-card", "other-card"]
    assert ("link", {"rel": "stylesheet", "href": "style.css"}) in index.tags
    card = dom_of(report / "cards" / "good-card.html")
    dom = parse(card)
    assert not [t for t, _ in dom.tags if t == "script"]  # the evil prompt stayed text
    assert EVIL in " ".join(dom.text)
    assert len([a for t, a in dom.tags if t == "article"]) == 5 and [t for t, _ in dom.tags].count("rect") == 6


def test_a_failed_comparison_shows_where_it_parts(tmp_path: Path) -> None:
    """The card page names the first step, row and layer of a failed comparison, with every
    layer's difference (qeff.divergence); the export stage also shows a failed HF vs PyTorch."""
    from qeff.divergence import FirstDivergence

    data = sample_results()
    export = next(r for r in data["records"] if r["stage"] == "export")
    divergence = FirstDivergence(
        step=0, row=1, measure="logits max-abs", value=0.3, bound=1e-5, num_layers=2, layer=1, where="layer 1 of 2 (layers.1)",
        positions=[0, 1, 2], layers=[{"layer": 0, "max_abs": 1e-7, "scale": 4.0, "relative": 2e-8},
                                     {"layer": 1, "max_abs": 0.25, "scale": 5.0, "relative": 0.05}],
    )
    failed = _comparison("hf", "pytorch", 1e-3)
    failed.failures, failed.first_divergence = ["logits MSE 0.001 > tolerance 1e-12"], divergence
    record = ExportRecord.from_dict(export["data"])
    record.hf_vs_pytorch = failed
    export["data"], export["outcome"] = record.to_dict(), "failed"
    render(data, tmp_path / "report")
    html = (tmp_path / "report" / "cards" / "good-card.html").read_text()
    dom = parse(html)
    text = " ".join(" ".join(dom.text).split())
    assert "First divergence · hf vs pytorch" in text
    assert ("first divergence at step 0 (prefill), row 1: logits max-abs 0.3 > 1e-05; layer 1 of 2 (layers.1), "
            "its output differs by max-abs 0.25 (0.05 of its scale)") in text
    block = html[html.index('<div class="divergence">') : html.index("</div>", html.index('<div class="divergence">'))]
    rows = [a["class"] for t, a in parse(block).tags if t == "tr" and a.get("class")]
    assert rows == ["ok", "bad"]  # layer 0 within tolerance, layer 1 where it parts
    assert "First divergence · pytorch vs ort" not in text  # that comparison passed: nothing to locate


def test_chart_shows_the_probe_scaled_baseline_the_verdict_used() -> None:
    from pytest_qeff.report.views import _chart

    def chart(speed):
        against = {"found": True, "baseline": {"decode_tok_s": 1000.0, "total_tok_s": 800.0, "ttft_s": 0.004}, "changes": {}, "regressions": []}
        if speed is not None:
            against["machine_speed"] = speed
        stage = BenchmarkRecord(prompts=[[1]], prompt_texts=["x"], batch_size=1, prompt_len=32, ctx_len=128, device_group=[0],
                                figures={"decode_tok_s": 500.0, "total_tok_s": 400.0, "ttft_s": 0.008}, runs=[], generation_len=8,
                                repeats=3, threads=1, probe=2.0, baseline=against, update_baseline=False)
        return {b.label: b.value for b in _chart(stage).bars}, _chart(stage).title

    raw, _ = chart(None)
    assert raw["decode tokens/s (baseline)"].replace(",", "").startswith("1000"), raw
    scaled, title = chart(0.5)  # this run's machine was half as fast as the baseline run's
    assert scaled["decode tokens/s (baseline × 0.50 machine speed)"].startswith("500"), scaled  # 1000 x 0.5
    assert scaled["time to first token (baseline × 0.50 machine speed)"].startswith("8"), scaled  # 4 ms / 0.5
    assert "scaled to this machine's speed (probe: 50% of the baseline run's)" in title
