"""Inputs too large for the run, refused before any work (issue 19, the bad-input half).

Each class: endless or over-long prompts files (read once, bounded by what ``--ctx_len`` tokens
can hold), prompts from a pipe (read once), sizes beyond what the context allows
(``--generation_len``, ``--steps``, ``--num_speculative_tokens``), and a memory preflight that counts
every buffer the run allocates (logits, attention, activations, token ids), not only the KV cache.
The endless-file cases run in a subprocess under a memory limit and a timeout: unbounded, they
would take the test process down with them.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from qeff.cli import main
from qeff.errors import UsageError
from tests.test_reliability_cli import home, infer, no_work, one_sentence  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def _limited(limit: int = 3 * GIB):
    def apply() -> None:  # in the child: an unbounded read dies of MemoryError here, not the machine
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _qeff(shell: str, tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """``qeff`` run by bash (for its pipes and ``<(…)``), under a 3 GiB address-space limit."""
    env = {**os.environ, "QEFF_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO), "QEFF": f"{sys.executable} -m qeff.cli"}
    return subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, timeout=timeout,
                          preexec_fn=_limited())


# -- prompts files: read once, bounded ------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("--prompts_txt_file_path /dev/zero", "prompts file '/dev/zero': line 1 is longer than 32,768 bytes, more than --ctx_len 128 tokens can hold"),
        ("--prompts_txt_file_path /dev/stdin < /dev/zero", "prompts file '/dev/stdin': line 1 is longer than 32,768 bytes"),
        ("--prompts_txt_file_path <(yes 'an endless prompt')", "holds more than 256.0 MiB (an endless file?)"),
    ],
    ids=["dev-zero", "stdin-without-newlines", "endless-lines"],
)
def test_an_endless_prompts_file_is_refused_at_its_bound(tiny_model_dir, tmp_path, source, message):
    result = _qeff(f"$QEFF infer --model_name {tiny_model_dir} --no-stream {source}", tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr and "MemoryError" not in result.stderr


@pytest.mark.parametrize("ctx_len", [16, 128])
def test_a_prompt_line_longer_than_the_context_can_hold_is_refused_unread(tiny_model_dir, home, tmp_path, capsys, no_work,
                                                                           monkeypatch, ctx_len):
    """The 200 MB one-line file of the issue, as a class: one line past ctx_len × 256 bytes."""
    bound = ctx_len * 256
    big = tmp_path / "one-line.txt"
    big.write_bytes(b"short prompt\n" + b"a" * (bound + 1) + b"\nlast\n")
    tokenized = []
    monkeypatch.setattr("qeff.inputs.check_prompt_lengths", lambda *a, **k: tokenized.append(a))
    line = one_sentence(capsys, infer(tiny_model_dir, "--ctx_len", str(ctx_len), "--prompt_len", "8",
                                      "--prompts_txt_file_path", str(big)), 2)
    assert f"line 2 is longer than {bound:,} bytes, more than --ctx_len {ctx_len} tokens can hold" in line, line
    assert not tokenized
    # Exactly at the bound the line is read (and then measured in tokens by the tokenizer).
    big.write_bytes(b"a" * bound + b"\n")
    from qeff.inputs import read_prompts

    assert read_prompts(None, str(big), ctx_len=ctx_len) == ["a" * bound]


def test_a_prompt_too_long_in_bytes_is_refused_before_it_is_tokenized():
    from qeff.inputs import check_prompt_lengths

    def tokenizer(text):
        raise AssertionError("the tokenizer saw a prompt that could not fit")

    with pytest.raises(UsageError, match=r"has 4,097 bytes, more than ctx_len=16 tokens can hold \(a token stands for at most 256 bytes"):
        check_prompt_lengths(tokenizer, ["b" * 4097], 16)
    with pytest.raises(UsageError, match="has 4,097 bytes"):  # --prompt's text, 2-byte characters counted as bytes
        check_prompt_lengths(tokenizer, ["é" * 2048 + "x"], 16)


def test_prompts_from_a_pipe_are_read_once(tiny_model_dir, home, capsys):
    """``<(…)`` and ``/dev/stdin`` are pipes: the argument check and the run used to read the file
    twice, and the second read found it empty ("holds no prompt")."""
    read, write = os.pipe()
    os.write(write, b"Hello there\nThe sea\n")
    os.close(write)
    try:
        code = main(["infer", "--model_name", str(tiny_model_dir), "--no-stream", "--no-verify", "--json", "--ctx_len", "32",
                     "--generation_len", "2", "--prompts_txt_file_path", f"/dev/fd/{read}"])
    finally:
        os.close(read)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["prompts"] == ["Hello there", "The sea"]


# -- sizes beyond what the context allows: refused before any work ---------------------------------


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("infer", ["--generation_len", str(10**12)], "--generation_len 1,000,000,000,000 does not fit in --ctx_len 128"),
        ("infer", ["--generation_len", "128"], "at most 127 can follow a one-token prompt"),
        ("infer", ["--ctx_len", "16", "--prompt_len", "8", "--generation_len", "16"], "--generation_len 16 does not fit in --ctx_len 16"),
        ("verify", ["--steps", str(10**9)], "--steps 1,000,000,000 does not fit in --ctx_len 128"),
        ("verify", ["--ctx_len", "16", "--prompt_len", "8", "--steps", "16"], "--steps 16 does not fit in --ctx_len 16"),
        ("infer", ["--draft_model_name", "{model}", "--num_speculative_tokens", "200"],
         "--num_speculative_tokens 200 does not fit in --ctx_len 128"),
        ("infer", ["--draft_model_name", "{model}", "--num_speculative_tokens", "127"], "at most 126 can follow a one-token prompt"),
    ],
    ids=["generation-len-1e12", "generation-len-ctx", "generation-len-small-ctx", "steps-1e9", "steps-ctx",
         "speculative-200", "speculative-ctx"],
)
def test_sizes_beyond_the_context_are_refused_before_any_work(tiny_model_dir, home, capsys, no_work, command, args, message):
    args = [a.format(model=tiny_model_dir) for a in args]
    line = one_sentence(capsys, main([command, "--model_name", str(tiny_model_dir), *args]), 2)
    assert message in line, line
    assert not home.exists() or not any(home.rglob("*"))


def test_generate_sizes_its_token_buffer_by_the_context(tiny_model_dir):
    """The library's own guard: a generation length past the cache is what the cache allows."""
    import qeff
    from qeff.generation import generate
    from qeff.runtime.torch import TorchSession
    from tests.tiny import tiny_model

    session = TorchSession(qeff.transform(tiny_model("llama")), batch_size=1, ctx_len=16)
    out = generate(session, prompt_token_ids=[[3, 4, 5]], prompt_len=8, generation_len=10**12, eos_token_id=[])
    assert len(out.token_ids[0]) == 16 - 3 + 1  # every free slot, and the token chosen at the last one


# -- the memory preflight counts every buffer ------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch_size", "100000"], "(logits: [100000, 32, 49152] fp32)"),
        (["--batch_size", "400", "--prompt_len", "128", "--ctx_len", "256"], "(logits: [400, 128, 49152] fp32)"),
        (["--full_batch_size", "3000", "--prompt_len", "128", "--ctx_len", "256"], "(logits: [3000, 128, 49152] fp32)"),
    ],
    ids=["batch-size", "prompt-len", "full-batch-size"],
)
def test_buffers_beyond_the_kv_cache_are_counted(tiny_model_dir, home, capsys, no_work, monkeypatch, args, message):
    """Each case's KV cache alone fits 16 GiB (the old preflight let it through); its logits do not."""
    from qeff.intake.loading import resolve
    from qeff.intake.preflight import model_shape

    monkeypatch.setattr("qeff.validation.available_memory", lambda: 16 * 2**30)
    shape = model_shape(resolve(str(tiny_model_dir)))
    flags = dict(zip(args[::2], map(int, args[1::2])))
    rows = flags.get("--batch_size") or flags["--full_batch_size"]
    assert 2 * shape.cache_bytes(rows, flags.get("--ctx_len", 128)) < 16 * 2**30
    line = one_sentence(capsys, infer(tiny_model_dir, *args), 2)
    assert message in line and "of memory is available; use a smaller --batch_size, --prompt_len or --ctx_len" in line, line


def test_the_buffer_arithmetic():
    from qeff.intake.preflight import ModelShape

    shape = ModelShape(2, 2, 16, vocab_size=100, hidden_size=32, num_heads=4, intermediate_size=64)
    assert shape.buffer_bytes(3, 5, 10) == {
        "logits": 4 * 3 * 5 * 100,  # [B, prompt_len, vocab] fp32
        "attention scores": 4 * 3 * 5 * 10 * (2 * 4 + 1),  # [B, heads, prompt_len, ctx] × 2 + the mask
        "activations": 4 * 3 * 5 * (32 + 2 * 64),  # [B, prompt_len, hidden + 2 × intermediate]
        "token ids": 8 * 3 * 10,  # [B, ctx] int64
    }
