"""The serving flags of ``qeff infer`` / ``compile`` / ``execute``, used as users use them (a tiny
local model with SmolLM2's real tokenizer): per-prompt ``token_ids`` and ``text`` in input order,
equal to the plain greedy run; bad input is one sentence and exit 2."""

from __future__ import annotations

import json
import shutil

import pytest

from qeff.cli import main

BASE = ["--prompt_len", "8", "--ctx_len", "64", "--generation_len", "10", "--backend", "ort", "--no-verify"]
PROMPTS = "Hello there|The sea is|Hello there, friend|Once upon a time, in a land far away|A B C"


def infer(capsys, model, *args: str) -> dict:
    code = main(["infer", "--json", "--no-stream", "--model_name", str(model), *BASE, *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_model_dir(module_tmp, smollm2_tokenizer):
    """A local checkpoint: a tiny random Llama whose tokens depend on its context (untied
    embeddings, see tests/serving_helpers.py) with SmolLM2's real tokenizer."""
    from tests.serving_helpers import serving_checkpoint

    return serving_checkpoint(module_tmp("serving-model"), smollm2_tokenizer)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_continuous_batching_returns_every_prompt_in_input_order(tiny_model_dir, home, capsys):
    plain = infer(capsys, tiny_model_dir, "--prompt", PROMPTS)
    cb = infer(capsys, tiny_model_dir, "--prompt", PROMPTS, "--full_batch_size", "2")
    assert cb["token_ids"] == plain["token_ids"] and cb["text"] == plain["text"]
    assert cb["prompts"] == PROMPTS.split("|") and len(cb["token_ids"]) == 5
    assert cb["full_batch_size"] == 2 and sorted(set(cb["slots"])) == [0, 1]
    assert cb["artifact"].endswith("ort_1BS_8PL_64CL_2FBS")
    hit = infer(capsys, tiny_model_dir, "--prompt", PROMPTS, "--full_batch_size", "2", "--prefix_caching")
    assert hit["token_ids"] == plain["token_ids"]
    assert sum(hit["prefix_hit_tokens"]) > 0  # "Hello there, friend" starts like a finished prompt


def test_speculative_decoding_with_the_model_as_its_own_draft(tiny_model_dir, home, capsys):
    plain = infer(capsys, tiny_model_dir, "--prompt", PROMPTS, "--batch_size", "2")
    spec = infer(capsys, tiny_model_dir, "--prompt", PROMPTS, "--batch_size", "2", "--draft_model_name", str(tiny_model_dir),
                 "--num_speculative_tokens", "4")
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    assert spec["mean_accepted_tokens"] == 5.0 and spec["num_speculative_tokens"] == 4
    assert spec["artifact"].endswith("ort_2BS_8PL_64CL_4NST")


def test_sampling_is_reproducible_and_independent_of_batching(tiny_model_dir, home, capsys):
    flags = ["--prompt", PROMPTS, "--temperature", "0.9", "--top_k", "50", "--top_p", "0.95", "--repetition_penalty", "1.1"]
    one = infer(capsys, tiny_model_dir, *flags, "--seed", "5")
    again = infer(capsys, tiny_model_dir, *flags, "--seed", "5", "--batch_size", "3")
    slots = infer(capsys, tiny_model_dir, *flags, "--seed", "5", "--full_batch_size", "2")
    other = infer(capsys, tiny_model_dir, *flags, "--seed", "6")
    greedy = infer(capsys, tiny_model_dir, "--prompt", PROMPTS)
    assert one["token_ids"] == again["token_ids"] == slots["token_ids"]
    assert one["token_ids"] != other["token_ids"] and one["token_ids"] != greedy["token_ids"]
    assert one["sampling"] == {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1, "seed": 5}


def test_execute_runs_a_continuous_batching_artifact(tiny_model_dir, home, capsys):
    cb = infer(capsys, tiny_model_dir, "--prompt", PROMPTS, "--full_batch_size", "3")
    code = main(["execute", "--qpc_path", cb["artifact"], "--prompt", PROMPTS, "--generation_len", "10", "--json", "--no-stream"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["token_ids"] == cb["token_ids"]


def test_qaic_compile_dry_run_writes_continuous_batching_specializations(tiny_model_dir, home, capsys):
    code = main(["compile", "--model_name", str(tiny_model_dir), "--backend", "qaic", "--dry_run", "--full_batch_size", "4",
                 "--prompt_len", "16", "--ctx_len", "128"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out_dir = next(home.rglob("qpc_16cores_1BS_16PL_128CL_4FBS_1devices_fp16"))
    spec = json.loads((out_dir / "specializations.json").read_text())["specializations"]
    assert spec == [
        {"batch_size": "1", "seq_len": "16", "ctx_len": "128", "full_batch_size": "4"},
        {"batch_size": "4", "seq_len": "1", "ctx_len": "128", "full_batch_size": "4"},
    ]


@pytest.fixture
def other_tokenizer_dir(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    import qeff

    path = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.add_tokens(["<not-in-the-target>"])
    tok.save_pretrained(str(path))
    # A consistent draft: its embedding holds its tokenizer's new id (a vocab_size smaller than the
    # tokenizer's ids is refused on its own, issue 19).
    config = {**json.loads((path / "config.json").read_text()), "vocab_size": len(tok)}
    qeff.from_config("llama", {k: v for k, v in config.items() if k not in ("model_type", "architectures")}, seed=4).save_pretrained(path)
    return path


COPY = "A B C D E F G A B C D E F G A B C|one two three four one two three four one two"


@pytest.mark.parametrize("graph", ["fused", "portable"])
def test_prompt_lookup_gives_the_plain_tokens(tiny_model_dir, home, capsys, graph):
    plain = infer(capsys, tiny_model_dir, "--prompt", COPY, "--batch_size", "2", "--ort-graph", graph, "--generation_len", "24")
    look = infer(capsys, tiny_model_dir, "--prompt", COPY, "--batch_size", "2", "--ort-graph", graph, "--generation_len", "24",
                 "--prompt_lookup", "4")
    assert look["token_ids"] == plain["token_ids"] and look["text"] == plain["text"]
    assert look["prompt_lookup"] == 4 and look["num_speculative_tokens"] == 4 and look["prompt_lookup_ngram"] == 3
    assert look["draft_model_name"] == "prompt lookup" and 1.0 <= look["mean_accepted_tokens"] <= 5.0
    assert look["verify_steps"] >= 1 and "decode_tok_s" in look
    # The fused CPU graph verifies K+1 positions itself; the portable graph needs its num_logits_to_keep variant.
    assert look["artifact"].endswith("4NST") == (graph == "portable"), look["artifact"]


def test_execute_runs_prompt_lookup_on_an_artifact_that_verifies_several_positions(tiny_model_dir, home, capsys):
    """``qeff execute --prompt_lookup`` on the artifacts ``qeff infer`` built: the fused graph and the portable
    graph's speculative variant give the plain tokens; the plain portable graph (one position's logits per
    step) is refused in one sentence."""
    common = ["--prompt", COPY, "--batch_size", "2", "--generation_len", "24"]
    artifacts = {}
    for graph in ("fused", "portable"):
        plain = infer(capsys, tiny_model_dir, *common, "--ort-graph", graph)
        look = infer(capsys, tiny_model_dir, *common, "--ort-graph", graph, "--prompt_lookup", "4")
        artifacts[graph] = (plain, look)
    run_args = ["--prompt", COPY, "--generation_len", "24", "--json", "--no-stream", "--prompt_lookup", "4"]
    for graph, (plain, look) in artifacts.items():
        code = main(["execute", "--qpc_path", look["artifact"], *run_args])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        ran = json.loads(captured.out.strip().splitlines()[-1])
        assert ran["token_ids"] == plain["token_ids"], graph
        assert ran["prompt_lookup"] == 4 and ran["verify_steps"] >= 1 and ran["mean_accepted_tokens"] > 1.0
    code = main(["execute", "--qpc_path", artifacts["portable"][0]["artifact"], *run_args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("qeff: error:")]
    assert len(lines) == 1 and "cannot verify drafted tokens" in lines[0], err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--full_batch_size", "0"], "--full_batch_size must be at least 1"),
        (["--full_batch_size", "2", "--batch_size", "2"], "--full_batch_size and --batch_size exclude each other"),
        (["--top_p", "0"], r"--top_p must be in (0, 1]"),
        (["--top_p", "1.01"], r"--top_p must be in (0, 1]"),
        (["--temperature", "-0.5"], "--temperature must be 0 (greedy) or positive"),
        (["--num_speculative_tokens", "2"], "needs --draft_model_name"),
        (["--draft_model_name", "{other}"], "does not share the tokenizer"),
        (["--prefix_caching"], "add --full_batch_size"),
        (["--draft_model_name", "{self}", "--temperature", "0.7"], "greedy only"),
        (["--full_batch_size", "2", "--backend", "qaic"], None),
        (["--prompt_lookup", "0"], "--prompt_lookup must be at least 1"),
        (["--prompt_lookup", "2", "--prompt_lookup_ngram", "0"], "--prompt_lookup_ngram must be at least 1"),
        (["--prompt_lookup", "2", "--draft_model_name", "{self}"], "drafts from the text itself"),
        (["--prompt_lookup", "2", "--full_batch_size", "2"], "cannot be combined"),
        (["--prompt_lookup", "2", "--temperature", "0.7"], "greedy only"),
        (["--prompt_lookup", "2", "--mxfp6"], "ort backend's fp32/int8/int4 graphs"),
        (["--prompt_lookup", "63"], "--prompt_lookup 63 does not fit in --ctx_len 64"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(tiny_model_dir, other_tokenizer_dir, home, capsys, args, message):
    args = [a.replace("{other}", str(other_tokenizer_dir)).replace("{self}", str(tiny_model_dir)) for a in args]
    code = main(["infer", "--model_name", str(tiny_model_dir), "--prompt", "Hi", *BASE[:-3], "--no-verify", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("qeff: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    if message:
        assert message in lines[0], lines[0]
    assert not list(home.rglob("model.onnx")), "a usage error must be raised before any export"
