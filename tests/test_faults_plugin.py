"""The mutation suite through the plugin: every seeded fault (``tests/faults.py``) fails the
conformance suite's transform stage (HF vs transformed PyTorch) and its export stage (ONNX Runtime,
judged against HF through the transformed PyTorch it matches), the messages name the measures, and
``results.json`` carries the first divergence.

The inner pytest runs in this process (pytester), so the monkeypatch applies to it; each run has
its own directory, so no artifact built by the good code is reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# Inner runs happen in this process, and pytester forgets the modules they import afterwards;
# extension modules cannot be imported twice (the second import aborts the process), so import
# here first everything a transform + export run loads: `import qeff` alone is lazy.
import onnx  # noqa: F401  isort: skip
import onnx.shape_inference  # noqa: F401  isort: skip
import onnxruntime  # noqa: F401  isort: skip
import qeff.divergence  # noqa: F401  isort: skip
import qeff.exporter  # noqa: F401  isort: skip
import qeff.pipeline  # noqa: F401  isort: skip
import qeff.runtime.ort  # noqa: F401  isort: skip
import qeff.verification  # noqa: F401  isort: skip
import transformers.models.llama.modeling_llama  # noqa: F401  isort: skip

from pytest_qeff.cards import load_card
from tests.faults import FAULTS, Fault

pytest_plugins = ("pytester",)

CARDS = Path(__file__).resolve().parent.parent / "model_cards"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cards(pytester: pytest.Pytester, fault: Fault) -> Path:
    """The fault's card, with the edits that make it expose the fault (e.g. a shape where pads wrap)."""
    cards = pytester.mkdir("cards")
    text = (CARDS / f"{fault.card}.toml").read_text()
    for old, new in fault.card_edits.items():
        assert old in text, f"{fault.card}.toml has no {old!r}"
        text = text.replace(old, new, 1)
    (cards / f"{fault.card}.toml").write_text(text)
    return cards


@pytest.mark.parametrize("fault", list(FAULTS.values()), ids=list(FAULTS))
def test_fault_fails_the_transform_and_export_stages(fault: Fault, pytester: pytest.Pytester, monkeypatch):
    fault.inject(monkeypatch)
    cards = _cards(pytester, fault)
    result = pytester.runpytest(
        "-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", "--qeff-cards-dir", str(cards), "--qeff-model", fault.card,
        "--qeff-backend", "ort", "-m", "qeff_transform or qeff_export", "-rf",
    )
    transform_fails = fault.comparison == "hf_vs_pytorch"
    serving = load_card(cards / f"{fault.card}.toml").serving  # one more deselected test per declared serving feature
    deselected = 3 + (len(serving.features) if serving else 0)
    result.assert_outcomes(failed=2 if transform_fails else 1, passed=0 if transform_fails else 1, deselected=deselected)
    records = {r["stage"]: r for r in json.loads((pytester.path / "qeff_report" / "results.json").read_text())["records"]}
    where = "after the last decoder layer" if fault.layer is None else f"layer {fault.layer} of 2"

    if transform_fails:
        transform = records["transform"]
        assert transform["outcome"] == "failed"
        assert "HF vs transformed PyTorch: " in transform["message"], transform["message"]
        for measure in fault.measures:
            assert measure in transform["message"], transform["message"]
        assert "first divergence at step " in transform["message"] and where in transform["message"]
        divergence = transform["data"]["comparison"]["first_divergence"]
        assert divergence["layer"] == fault.layer

    export = records["export"]
    assert export["outcome"] == "failed"
    message = export["message"]
    for measure in fault.measures:
        assert measure in message, message
    assert where in message, message
    if transform_fails:
        # The graph carries the fault as traced: ORT matches the transformed PyTorch (which alone
        # passed this stage before it was judged against HF), and that model is not HF's.
        assert export["data"]["comparison"]["passed"] is not fault.ort_parts_too, message
        assert "HF vs the transformed PyTorch that ONNX Runtime matches: " in message
        assert export["data"]["hf_vs_pytorch"]["first_divergence"]["layer"] == fault.layer
    else:
        assert "transformed PyTorch vs ONNX Runtime: " in message
        assert export["data"]["comparison"]["first_divergence"]["layer"] == fault.layer
        assert export["data"].get("hf_vs_pytorch") is None
    page = (pytester.path / "qeff_report" / "cards" / f"{fault.card}.html").read_text()
    assert "First divergence · " in page and where in page  # the HTML card page says where it parts
