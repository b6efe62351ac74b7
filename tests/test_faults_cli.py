"""The mutation suite through the command line: every seeded fault (``tests/faults.py``) makes
``qeff verify`` and ``qeff infer --verify`` exit 1, naming the measures that caught it and where
the traces part.

``qeff.cli.main`` runs in this process so the monkeypatch applies; each run gets a fresh
``--home``, so no artifact built by the good code is reused. The models are the cards' tiny tiers
saved as local checkpoints with a word tokenizer (``tests/word_tokenizer.py``; SmolLM2's
49,152-token one made each run ~5 s slower), one per card for the session.
"""

from __future__ import annotations

import pytest

import qeff
from qeff.cli import main
from tests.faults import FAULT_GEOMETRY, FAULTS, Fault, tiny_arch
from tests.word_tokenizer import word_tokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(module_tmp):
    """card id -> a local HF checkpoint: the card's tiny tier (random weights) and a word tokenizer
    of the same vocabulary size."""
    made: dict = {}

    def make(card_id: str):
        if card_id not in made:
            arch = tiny_arch(card_id)
            path = module_tmp(f"ckpt-{card_id}")
            qeff.from_config(arch.model_type, arch.config, seed=3).save_pretrained(path)
            word_tokenizer(arch.config["vocab_size"]).save_pretrained(path)
            made[card_id] = path
        return made[card_id]

    return make


def _shape(fault: Fault) -> list[str]:
    g = FAULT_GEOMETRY[fault.geometry]
    return ["--prompt", g["text"], "--prompt_len", str(g["prompt_len"]), "--ctx_len", str(g["ctx_len"])]


def _expected_lines(fault: Fault) -> list[str]:
    reference, candidate = fault.comparison.split("_vs_")
    return [f"{reference} vs {candidate}", *fault.measures, "first divergence at step "]


@pytest.mark.parametrize("fault", list(FAULTS.values()), ids=list(FAULTS))
def test_qeff_verify_exits_1_naming_measure_and_layer(fault: Fault, checkpoint, tmp_path, capsys, monkeypatch):
    model_dir = checkpoint(fault.card)
    fault.inject(monkeypatch)
    code = main(["verify", "--model_name", str(model_dir), "--home", str(tmp_path / "home"), *_shape(fault), "--steps", "4"])
    out = capsys.readouterr().out
    assert code == 1, out
    reference, candidate = fault.comparison.split("_vs_")
    assert f"{reference} vs {candidate}: FAILED" in out, out
    for measure in fault.measures:
        assert f"  - {measure}" in out or (measure == "greedy token" and "greedy token(s) differ" in out), out
    where = "after the last decoder layer" if fault.layer is None else f"layer {fault.layer} of 2"
    assert "first divergence at step " in out and where in out, out


@pytest.mark.parametrize("fault", list(FAULTS.values()), ids=list(FAULTS))
def test_qeff_infer_verify_stops_before_compiling(fault: Fault, checkpoint, tmp_path, capsys, monkeypatch):
    model_dir = checkpoint(fault.card)
    fault.inject(monkeypatch)
    batch = str(len(FAULT_GEOMETRY[fault.geometry]["lengths"]))
    code = main(["infer", "--model_name", str(model_dir), "--home", str(tmp_path / "home"), "--backend", "ort", "--verify",
                 "--no-stream", "--batch_size", batch, "--generation_len", "4", *_shape(fault)])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("qeff: QEffError: verification failed: "), captured.err
    for expected in _expected_lines(fault):
        assert expected in error, error
    where = "after the last decoder layer" if fault.layer is None else f"layer {fault.layer} of 2"
    assert where in error
    assert not list((tmp_path / "home").rglob("ort_*")), "a failed verification must stop before compiling"
