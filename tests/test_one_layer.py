"""One-layer models, the ones users build for bring-up tests (issue 19).

Every family's tiny configuration with ``num_hidden_layers = 1`` runs the chain HF eager →
transformed PyTorch → ONNX (export) → ONNX Runtime, and its greedy tokens must be HF
``generate``'s; a model card whose tiny tier has one layer runs through the plugin.

The export used to fail for every family at one layer ("expected 2 cache tensors, got 3"): the
TorchScript exporter fills the forward's parameters after the positional inputs with their defaults
(``_decide_input_format``), and with exactly four inputs the first keyword parameter after
``*past`` was appended to the cache tensors as None.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

# Inner runs happen in this process (pytester): import the extension modules once, here.
import onnx  # noqa: F401  isort: skip
import onnxruntime  # noqa: F401  isort: skip
import qeff.exporter  # noqa: F401  isort: skip
import qeff.pipeline  # noqa: F401  isort: skip
import qeff.verification  # noqa: F401  isort: skip
import tokenizers  # noqa: F401  isort: skip
import transformers.models.llama.modeling_llama  # noqa: F401  isort: skip

from tests.arch_configs import TINY, TinyArch
from tests.arch_harness import CTX_LEN, GEN_LEN, PROMPT_LEN, PROMPTS, build
from qeff.exporter import export
from qeff.generation import generate
from qeff.runtime.ort import OrtSession

pytest_plugins = ("pytester",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CARDS = Path(__file__).resolve().parent.parent / "model_cards"


def one_layer(case: TinyArch) -> TinyArch:
    """``case`` with one decoder layer; per-layer lists (``layer_types``, …) keep their first entry."""
    layers = case.config["num_hidden_layers"]
    config = {k: (v[:1] if isinstance(v, list) and len(v) == layers else v) for k, v in case.config.items()}
    config["num_hidden_layers"] = 1
    return replace(case, config=config)


@pytest.mark.parametrize("case_id", sorted(TINY))
def test_one_layer_exports_and_generates_like_hf(case_id, tmp_path):
    case = one_layer(TINY[case_id])
    if case.known_failure:
        pytest.xfail(case.known_failure)
    built = build(case)
    assert built.qmodel.shape.num_layers == 1
    onnx_path = export(built.qmodel, tmp_path).path
    assert [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input] == [
        "input_ids", "position_ids", "past_key.0", "past_value.0"]
    expected = [ref.tokens for ref in built.reference]
    session = OrtSession(onnx_path, batch_size=len(PROMPTS), ctx_len=CTX_LEN, threads=1)
    out = generate(session, prompt_token_ids=PROMPTS, prompt_len=PROMPT_LEN, generation_len=GEN_LEN, eos_token_id=[])
    for row, (got, want) in enumerate(zip(out.token_ids, expected)):
        assert got == want, f"{case_id} at one layer: row {row} differs from HF generate"


def test_a_card_whose_tiny_tier_has_one_layer_runs_in_the_plugin(pytester: pytest.Pytester) -> None:
    cards = pytester.mkdir("cards")
    text = (CARDS / "smollm2-135m.toml").read_text()
    assert "[tiny]\nnum_hidden_layers = 2\n" in text
    (cards / "smollm2-135m.toml").write_text(text.replace("[tiny]\nnum_hidden_layers = 2\n", "[tiny]\nnum_hidden_layers = 1\n"))
    result = pytester.runpytest("-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", "--qeff-cards-dir", str(cards),
                                "--qeff-model", "smollm2-135m", "--qeff-backend", "ort", "--qeff-tier", "tiny",
                                "-k", "bs1 and (transform or ort_matches or greedy)")
    result.assert_outcomes(passed=3)
