"""``--comp_ctx_lengths`` as users use it (a tiny local model with SmolLM2's real tokenizer): the
ladder's run gives the plain portable graph's tokens (plain and continuous batching), it is a
different artifact, and a bad ladder is one sentence and exit 2 before any work."""

from __future__ import annotations

import json

import pytest

from qeff.cli import main

BASE = ["--prompt_len", "8", "--ctx_len", "64", "--generation_len", "30", "--backend", "ort", "--no-verify", "--ignore_eos"]
PROMPTS = "Hello there|Once upon a time, in a land far away"


@pytest.fixture(scope="module")
def tiny_model_dir(module_tmp, smollm2_tokenizer):
    from tests.serving_helpers import serving_checkpoint

    return serving_checkpoint(module_tmp("ladder-model"), smollm2_tokenizer)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def infer(capsys, model, *args: str) -> dict:
    code = main(["infer", "--json", "--no-stream", "--model_name", str(model), *BASE, *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def test_the_ladder_gives_the_plain_graphs_tokens(tiny_model_dir, home, capsys):
    plain = infer(capsys, tiny_model_dir, "--prompt", PROMPTS, "--batch_size", "2", "--ort-graph", "portable",
                  "--comp_ctx_lengths", "off")
    ladder = infer(capsys, tiny_model_dir, "--prompt", PROMPTS, "--batch_size", "2", "--ort-graph", "portable",
                   "--comp_ctx_lengths", "16,32")
    assert ladder["token_ids"] == plain["token_ids"] and ladder["text"] == plain["text"]
    assert all(len(t) == 30 for t in ladder["token_ids"])  # the long row passes 16 and 32
    assert ladder["artifact"] != plain["artifact"]  # another export: its manifest holds the variant
    # --json says which ladder ran, and which rungs the steps used (the long row climbs past 32).
    assert plain["comp_ctx_lengths"] is None and plain["attended_lengths"] == []
    assert ladder["comp_ctx_lengths"] == [16, 32, 64]
    assert ladder["attended_lengths"] == [16, 32, 64]
    exports = {p.parent.parent.name for p in home.rglob("model.opt.onnx")}
    assert len(exports) == 2


def test_the_ladder_with_continuous_batching(tiny_model_dir, home, capsys):
    plain = infer(capsys, tiny_model_dir, "--prompt", PROMPTS, "--ort-graph", "portable", "--comp_ctx_lengths", "off")
    cb = infer(capsys, tiny_model_dir, "--prompt", PROMPTS, "--full_batch_size", "2", "--comp_ctx_lengths", "16")
    assert cb["token_ids"] == plain["token_ids"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--comp_ctx_lengths", "32,16"], "strictly increasing"),
        (["--comp_ctx_lengths", "128"], "goes past ctx_len=64"),
        (["--comp_ctx_lengths", "a,b"], "comma-separated whole numbers"),
        (["--comp_ctx_lengths", "16", "--ort-graph", "fused"], "applies to the portable graph"),
        (["--comp_ctx_lengths", "16", "--backend", "qaic"], None),  # the SDK check or the ladder refusal: one sentence
    ],
)
def test_bad_ladders_are_one_sentence(args, words, tiny_model_dir, home, capsys):
    code = main(["infer", "--model_name", str(tiny_model_dir), *BASE, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 or (words is None and code != 0), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    if words:
        assert words in err
    assert not home.exists()  # nothing was made
