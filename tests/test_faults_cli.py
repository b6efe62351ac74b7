"""The mutation suite through the command line: every seeded fault (``tests/faults.py``) makes
``qeff verify`` and ``qeff infer --verify`` exit 1, naming the measures that caught it and where
the traces part.

``qeff.cli.main`` runs in this process so the monkeypatch applies; each run gets a fresh
``--home``, so no artifact built by the good code is reused. The models are the tiny seeded
architectures saved as local checkpoints with a 128-word tokenizer (``tests/word_tokenizer.py``;
SmolLM2's 49,152-token one made each run ~5 s slower), one per architecture for the session.
"""

from __future__ import annotations

import pytest
import torch

import qeff
from qeff.cli import main
from tests.arch_configs import TINY
from tests.faults import FAULTS, Fault
from tests.word_tokenizer import word_tokenizer

#: Two prompts of 5 and 13 tokens, chunked by 8: padding inside a chunk, a row with no token in the
#: second chunk, and a window of 4 run past.
PROMPTS = "The capital of France is|Once upon a time, in a land far away, there lived"
#: 40 tokens: with chunks of 32 and 48 slots, the second chunk's pad slots wrap onto valid ones.
LONG_PROMPT = " ".join(["one two three four five six seven eight nine ten"] * 4)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """arch id -> a local HF checkpoint: tiny random weights and a tokenizer of the same vocabulary."""
    made: dict = {}
    tokenizer = word_tokenizer()

    def make(arch_id: str):
        if arch_id not in made:
            arch = TINY[arch_id]
            assert arch.config["vocab_size"] == len(tokenizer)
            path = tmp_path_factory.mktemp(f"ckpt-{arch_id}")
            qeff.from_config(arch.model_type, arch.config, seed=3).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[arch_id] = path
        return made[arch_id]

    return make


def _shape(fault: Fault) -> list[str]:
    if fault.geometry == "wrap":
        return ["--prompt", LONG_PROMPT, "--prompt_len", "32", "--ctx_len", "48"]
    return ["--prompt", PROMPTS, "--prompt_len", "8", "--ctx_len", "32"]


def _expected_lines(fault: Fault) -> list[str]:
    reference, candidate = fault.comparison.split("_vs_")
    return [f"{reference} vs {candidate}", *fault.measures, "first divergence at step "]


@pytest.mark.parametrize("fault", list(FAULTS.values()), ids=list(FAULTS))
def test_qeff_verify_exits_1_naming_measure_and_layer(fault: Fault, checkpoint, tmp_path, capsys, monkeypatch):
    model_dir = checkpoint(fault.arch)
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
    model_dir = checkpoint(fault.arch)
    fault.inject(monkeypatch)
    batch = "1" if fault.geometry == "wrap" else "2"
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
