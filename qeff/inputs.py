"""User inputs the CLI reconciles: device groups, prompts, and prompts versus batch size.

Prompts and batch size (the rule users of the seed product know):

- ``--prompt "a|b|c"`` splits on ``|``; ``--prompts_txt_file_path F`` reads one prompt per
  non-empty line. Both may be given (file prompts come after).
- Fewer prompts than ``--batch_size``: the prompts are repeated, in order, to fill the batch
  (every row does real work, so batch throughput is measured honestly); only the distinct prompts'
  outputs are printed.
- More prompts than ``--batch_size``: they run in successive batches of ``batch_size``; the last
  batch is filled by repeating its prompts. Every prompt's output is printed once.

The speed figures (``new_tokens``, tokens/s) count every row the backend computed, filler rows
included: that is the work the hardware did at that batch size.
"""

from __future__ import annotations

import re

from qeff.errors import UsageError

__all__ = ["parse_device_group", "read_prompts", "batches", "check_prompt_lengths"]


_DEVICE_GROUP = re.compile(r"^\d+(?:\s*,\s*\d+|\s+\d+)*$")


def parse_device_group(text: str | None) -> list[int] | None:
    """``"[0,1]"``, ``"0,1"``, ``"0 1"`` or ``"3"`` → ``[0, 1]`` / ``[3]``; None/empty → None.

    The one parser of device groups: the CLI's ``--device_group`` and the plugin's
    ``--device-group`` both use it."""
    if text is None:
        return None
    body = text.strip()
    if not body:
        return None
    if body.startswith("[") != body.endswith("]"):
        raise UsageError(f"malformed device group {text!r}: unbalanced brackets; write it like [0,1] or 0,1")
    body = body.strip("[]").strip()
    if not _DEVICE_GROUP.match(body):
        raise UsageError(
            f"malformed device group {text!r}: expected device ids (non-negative integers) separated by commas, "
            f"like 0 or 0,1 or [0,1]"
        )
    ids = [int(p) for p in re.split(r"[,\s]+", body)]
    if len(set(ids)) != len(ids):
        raise UsageError(f"malformed device group {text!r}: device {sorted({i for i in ids if ids.count(i) > 1})[0]} appears twice in one group")
    return ids


def read_prompts(prompt: str | None, prompts_file: str | None, *, ctx_len: int | None = None) -> list[str]:
    """The prompts of ``--prompt`` and ``--prompts_txt_file_path``. The file is read once (a pipe
    works) and bounded: each line by what ``ctx_len`` tokens can hold
    (:func:`qeff.validation.prompt_byte_bound`), the whole by
    :data:`qeff.validation.MAX_PROMPTS_FILE_BYTES`, so an endless file is refused, not read into
    memory until the kernel kills the process (issue 19: 22 GB from ``/dev/zero``)."""
    from qeff.validation import MAX_PROMPTS_FILE_BYTES, MAX_TOKEN_BYTES, decode_argument, prompt_byte_bound, read_text_file

    prompts: list[str] = []
    prompt = decode_argument(prompt, "--prompt")
    if prompt is not None:
        prompts += prompt.split("|")
        if any(not p.strip() for p in prompts):
            raise UsageError(f"--prompt {prompt!r} holds an empty prompt (check for a stray '|')")
    if prompts_file is not None:
        line_bound = prompt_byte_bound(ctx_len) if ctx_len else None
        hint = (f", more than --ctx_len {ctx_len} tokens can hold (a token stands for at most {MAX_TOKEN_BYTES} bytes of "
                f"text); use a larger --ctx_len or a shorter prompt") if ctx_len else ""
        text = read_text_file(prompts_file, "prompts file", max_line_bytes=line_bound,
                              max_bytes=max(MAX_PROMPTS_FILE_BYTES, line_bound or 0), line_hint=hint)
        lines = [line.rstrip("\r\n") for line in text.splitlines()]
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise UsageError(f"prompts file {prompts_file!r} holds no prompt (one prompt per non-empty line)")
        prompts += from_file
    return prompts


def batches(prompts: list[str], batch_size: int) -> list[tuple[list[str], int]]:
    """Split into batches of exactly ``batch_size`` rows; returns (rows, number of real prompts)."""
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1 (got {batch_size})")
    if not prompts:
        raise UsageError("no prompts given")
    out = []
    for start in range(0, len(prompts), batch_size):
        real = prompts[start : start + batch_size]
        rows = [real[i % len(real)] for i in range(batch_size)]
        out.append((rows, len(real)))
    return out


def check_prompt_lengths(tokenizer, prompts: list[str], ctx_len: int) -> None:
    """Every prompt must leave room in the cache to generate (checked with the tokenizer alone,
    before any model is loaded or exported). A prompt of more bytes than ``ctx_len`` tokens can hold
    is refused before it is tokenized: a 200 MB prompt aborted the tokenizer (issue 19)."""
    from qeff.validation import MAX_TOKEN_BYTES, prompt_byte_bound

    for p in prompts:
        size = len(p.encode("utf-8", "surrogatepass"))
        if size > prompt_byte_bound(ctx_len):
            raise UsageError(
                f"prompt {p[:40]!r}… has {size:,} bytes, more than ctx_len={ctx_len} tokens can hold (a token stands for at "
                f"most {MAX_TOKEN_BYTES} bytes of text); use a larger --ctx_len or a shorter prompt"
            )
        n = len(tokenizer(p)["input_ids"])
        if n >= ctx_len:
            raise UsageError(
                f"prompt {p[:40]!r}{'…' if len(p) > 40 else ''} has {n} tokens, more than ctx_len={ctx_len} "
                f"can hold with room to generate; use a larger --ctx_len or a shorter prompt"
            )
