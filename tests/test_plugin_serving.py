"""The ``serving`` conformance stage: collected for the cards that declare ``[serving]`` (one test
per feature), judged against HF eager, recorded as a typed ServingRecord the report shows — and
failing on a seeded fault that leaves the tokens of a tied-embedding tiny model unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Inner runs happen in this process (see tests/test_plugin.py): import extension modules first.
import onnx  # noqa: F401  isort: skip
import onnxruntime  # noqa: F401  isort: skip
import qeff  # noqa: F401  isort: skip
import qeff.exporter  # noqa: F401  isort: skip
import qeff.generation.continuous  # noqa: F401  isort: skip
import qeff.runtime.ort_serving  # noqa: F401  isort: skip
import qeff.generation.speculative  # noqa: F401  isort: skip
import transformers.models.llama.modeling_llama  # noqa: F401  isort: skip

from pytest_qeff import stages
from pytest_qeff.cards import default_cards_dir, load_card, load_cards
from pytest_qeff.collect import Target
from pytest_qeff.records import ServingRecord, StageRecord

pytest_plugins = ("pytester",)

FEATURES = ["continuous_batching", "prefix_caching", "sampling", "speculative", "prompt_lookup"]


def run_suite(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", *args)


def test_one_serving_test_per_declared_feature_and_none_elsewhere(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "--qeff-model", "smollm2-135m,llama-2-7b-chat", "-m", "qeff_serving", "--collect-only", "-q")
    assert result.ret == 0
    ids = [line.split("::")[1] for line in result.outlines if "::" in line]
    assert ids == [f"test_serving[smollm2-135m-bs1-pl32-cl128-{f}]" for f in FEATURES]
    none = run_suite(pytester, "--qeff-model", "llama-2-7b-chat", "--collect-only", "-q")
    assert not [line for line in none.outlines if "test_serving" in line or "NOTSET" in line]


def test_the_serving_stages_run_and_the_report_shows_them(pytester: pytest.Pytester, tmp_path: Path) -> None:
    report = tmp_path / "report"
    result = run_suite(pytester, "--qeff-model", "smollm2-135m", "-m", "qeff_serving", "--qeff-report", str(report))
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=5)
    records = [r for r in json.loads((report / "results.json").read_text())["records"] if r["stage"] == "serving"]
    assert sorted(r["feature"] for r in records) == sorted(FEATURES)
    for rec in records:
        data = StageRecord.from_dict(rec["data"])
        assert isinstance(data, ServingRecord) and data.feature == rec["feature"]
        assert data.logits_max_abs is not None and data.logits_max_abs < 1e-5
    html = (report / "cards" / "smollm2-135m.html").read_text()
    for title in ("continuous batching vs HF eager", "prefix caching vs HF eager", "sampling vs HF eager", "speculative vs HF eager",
                  "prompt lookup vs HF eager"):
        assert title in html
    assert "logits max-abs vs HF" in html and "self-draft tokens accepted" in html


@pytest.fixture
def workspace(tmp_path):
    return stages.Workspace(root=tmp_path / "ws", tier="tiny", device_group=(0,), baseline_dir=tmp_path / "b",
                            default_baseline_dir=tmp_path / "b")


def _target(feature: str) -> Target:
    card = load_cards(default_cards_dir())["smollm2-135m"]
    return Target(card, card.all_cases[0], "tiny", feature)


def test_seeded_fault_a_wrong_slot_fails_the_stage(workspace, monkeypatch):
    """Prefilling every prompt into the next slot: on smollm2's tied-embedding tiny tier, whose
    greedy tokens barely depend on the context, most tokens stay HF's; the logits do not."""
    from qeff.runtime.ort_serving import ServingOrtSession

    records: list[StageRecord] = []
    stages.serving(workspace, _target("continuous_batching"), records.append)  # the control passes
    assert records[0].logits_max_abs < 1e-5

    real = ServingOrtSession.run

    def wrong_slot(self, input_ids, position_ids, *, batch_index=None, keep=None):
        if batch_index is not None and len(input_ids) == 1:
            batch_index = (batch_index + 1) % self.full_batch_size
        return real(self, input_ids, position_ids, batch_index=batch_index, keep=keep)

    monkeypatch.setattr(ServingOrtSession, "run", wrong_slot)
    with pytest.raises(pytest.fail.Exception, match="logits differ from HF's"):
        stages.serving(workspace, _target("continuous_batching"), records.append)
    faulty = records[-1]
    assert faulty.logits_max_abs > 1e-3


def test_seeded_fault_unverified_lookup_drafts_fail_the_stage(workspace, monkeypatch):
    """prompt_lookup keeping every draft without the target's agreement, the drafts taken one token
    off (each id - 1: on this tied-embedding tier the text repeats one token, so honest lookup
    drafts are always right and skipping the check alone would change nothing): HF's verdict (its
    logits after the tokens produced) must catch it."""
    import qeff.generation.speculative as speculative
    from qeff.generation.ngram import NgramDrafter

    records: list[StageRecord] = []
    stages.serving(workspace, _target("prompt_lookup"), records.append)  # the control passes
    assert records[0].logits_max_abs < 1e-5 and records[0].figures["mean_accepted_tokens"] >= 1.0
    honest = NgramDrafter.propose
    monkeypatch.setattr(NgramDrafter, "propose", lambda self, tokens, k: [t - 1 if t else 1 for t in honest(self, tokens, k)])
    monkeypatch.setattr(speculative, "accepted_count", lambda proposal, choices: len(proposal) + 1)
    with pytest.raises(pytest.fail.Exception):
        stages.serving(workspace, _target("prompt_lookup"), records.append)


@pytest.mark.parametrize(
    "table, message",
    [
        ('features = ["continuous_batching", "continuous_batching"]', "is listed twice"),
        ('features = ["beam_search"]', "serving.features.0"),
        ("features = []", "serving.features"),
        ('features = ["sampling"]\nfull_batch_size = 0', "serving.full_batch_size"),
    ],
)
def test_bad_serving_tables_name_the_field(tmp_path, table, message):
    text = (default_cards_dir() / "smollm2-135m.toml").read_text()
    start = text.index("[serving]")
    end = text.index("\n[", start + 1)
    path = tmp_path / "smollm2-135m.toml"
    path.write_text(text[:start] + "[serving]\n" + table + "\n" + text[end:])
    with pytest.raises(pytest.UsageError, match=message):
        load_card(path)
