"""Arguments checked before any work: one sentence each, naming the flag and the value.

Issue 14 found each of these discovered late (after ~35 s of loading and verifying, or after
compiling) or not at all:

- sizes (``--batch_size``, ``--prompt_len``, ``--ctx_len``, ``--generation_len``, …) must be
  positive integers, and a prompt chunk cannot exceed the context;
- ``--threads`` must be at least 1; above the CPUs this process may use it is capped to them, with
  a warning (oversubscribed ONNX Runtime threads decoded 180× slower in the issue's probe);
- prompts must be UTF-8: a bad byte is reported with its exact offset (and the file's line);
- ``--home`` must be a directory (or creatable as one);
- the KV cache the run would allocate must fit the memory available, with the numbers.

Issue 19 added what a run must fit in: ``--generation_len``, ``--steps`` and
``--num_speculative_tokens`` within the context (:func:`check_fits`); every buffer the run
allocates, not only the KV cache, within memory (:func:`check_memory`); and a prompts file read
once with a bound (:func:`read_text_file`, :data:`MAX_TOKEN_BYTES`), so that a pipe works and an
endless file is refused instead of read until the kernel kills the process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from qeff.store.atomic import human_bytes
from qeff.errors import UsageError
from qeff.shape import Shape, check_positive

__all__ = [
    "check_positive",
    "check_sizes",
    "check_fits",
    "check_threads",
    "available_cpus",
    "available_memory",
    "memory_sources",
    "check_memory",
    "decode_argument",
    "read_text_file",
    "check_home",
    "MAX_TOKEN_BYTES",
    "prompt_byte_bound",
]


def check_sizes(*, batch_size: int, prompt_len: int, ctx_len: int, generation_len: int | None = None,
                num_cores: int | None = None, steps: int | None = None, num_speculative_tokens: int | None = None) -> Shape:
    """The sizes of a run, before anything is loaded, and its :class:`~qeff.shape.Shape`. What must
    fit in the context is checked here too (issue 19: ``--generation_len 10**12`` was a MemoryError
    after export, verification and compile; ``qeff verify --steps`` past the context ran the export
    first). The order of the checks is the order of the sentences a user has always seen."""
    check_positive("--batch_size", batch_size)
    check_positive("--prompt_len", prompt_len)
    check_positive("--ctx_len", ctx_len)
    check_positive("--generation_len", generation_len, optional=True)
    check_positive("--num_cores", num_cores, optional=True)
    check_positive("--steps", steps, optional=True)
    shape = Shape(batch_size=batch_size, prompt_len=prompt_len, ctx_len=ctx_len)  # a prefill chunk within the context
    check_fits("--generation_len", generation_len, ctx_len, "generated token")
    check_fits("--steps", steps, ctx_len, "compared step")
    check_fits("--num_speculative_tokens", num_speculative_tokens, ctx_len, "drafted token", extra=1)
    return shape


def check_fits(flag: str, value: int | None, ctx_len: int, what: str, *, extra: int = 0) -> None:
    """``value`` (+ ``extra``) cache slots must fit in ``ctx_len`` after a prompt of at least one
    token (a speculative step writes its K drafted tokens and the target's one more)."""
    most = ctx_len - 1 - extra
    if value is not None and value > most:
        plus = f" (plus {extra} more per step)" if extra else ""
        raise UsageError(
            f"{flag} {value:,} does not fit in --ctx_len {ctx_len:,}: the prompt and each {what}{plus} share the "
            f"context's slots, so at most {most:,} can follow a one-token prompt; use a larger --ctx_len or a smaller {flag}"
        )


def available_cpus() -> int:
    """Logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_threads(threads: int | None, *, warn=None) -> int | None:
    """``--threads`` as it will be used: None (the default) stays None; ≤ 0 is refused; more
    than the CPUs this process may use is capped to them, with one warning line."""
    if threads is None:
        return None
    if threads < 1:
        raise UsageError(f"--threads must be at least 1 (got {threads}); leave it out to use one thread per physical core")
    cpus = available_cpus()
    if threads > cpus:
        say = warn or (lambda m: print(m, file=sys.stderr, flush=True))
        say(f"[qeff] warning: --threads {threads} is more than the {cpus} CPU(s) this process may use; using {cpus} "
            f"(ONNX Runtime's threads would wait on each other: issue 14 measured decode 180× slower at --threads 1000)")
        return cpus
    return threads


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """Bytes the cgroup (a container's memory limit) still allows, when there is a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    try:
        return max(0, int(limit) - used)
    except ValueError:
        return None


def _user_limit() -> int | None:
    """``QEFF_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix): a budget the user sets for qeff's
    runs below what the machine has (a shared machine's share; ``make bench-scale`` uses it)."""
    text = os.environ.get("QEFF_MEMORY_LIMIT", "").strip()
    if not text:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        scale = units.get(text[-1].upper(), 1)
        value = float(text[:-1] if text[-1].upper() in units else text) * scale
        if value <= 0:
            raise ValueError
        return int(value)
    except ValueError:
        raise UsageError(f"QEFF_MEMORY_LIMIT={text!r} is not a size; write bytes or e.g. 8G") from None


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get: the smallest of MemAvailable, the cgroup's room
    and ``QEFF_MEMORY_LIMIT``."""
    found = [v for v in (_meminfo("MemAvailable"), _cgroup_room(), _user_limit()) if v is not None]
    return min(found) if found else None


def memory_sources() -> str:
    """Where :func:`available_memory`'s figure comes from, for a refusal's sentence."""
    parts = []
    mem = _meminfo("MemAvailable")
    if mem is not None:
        parts.append(f"MemAvailable {human_bytes(mem)}")
    room = _cgroup_room()
    parts.append(f"cgroup room {human_bytes(room)}" if room is not None else "no cgroup memory limit")
    user = _user_limit()
    if user is not None:
        parts.append(f"QEFF_MEMORY_LIMIT {human_bytes(user)}")
    return ", ".join(parts)


def check_memory(shape, *, batch_size: int, ctx_len: int, copies: int = 1, available: int | None = None,
                 prompt_len: int = 1) -> int:
    """Refuse a run whose buffers cannot fit the available memory: its KV cache and the buffers
    :meth:`qeff.intake.preflight.ModelShape.buffer_bytes` counts (logits, attention, activations: ``copies``
    of each, since verification holds PyTorch's and ONNX Runtime's at once), the generated token ids
    and the weights. Returns the estimate."""
    cache = shape.cache_bytes(batch_size, ctx_len)
    buffers = shape.buffer_bytes(batch_size, prompt_len, ctx_len)
    tokens = buffers.pop("token ids")
    need = (cache + sum(buffers.values())) * copies + tokens + (shape.weight_bytes or 0)
    available = available if available is not None else available_memory()
    if available is not None and need > available:
        per_slot = shape.cache_bytes(1, 1)
        weights = f" plus {human_bytes(shape.weight_bytes)} of weights" if shape.weight_bytes else ""
        copies_text = f" × {copies} copies (verification holds two)" if copies > 1 else ""
        others = [f"{human_bytes(n)} of {name}" for name, n in buffers.items() if n] + [f"{human_bytes(tokens)} of token ids"]
        logits = (f" (logits: [{batch_size}, {prompt_len}, {shape.vocab_size}] fp32)" if buffers["logits"] else "")
        raise UsageError(
            f"--ctx_len {ctx_len:,} with --batch_size {batch_size} and --prompt_len {prompt_len} needs "
            f"{human_bytes(need)}: a {human_bytes(cache)} KV cache{copies_text}{weights} "
            f"({shape.num_layers} layers × 2 × {shape.num_kv_heads} KV heads × {shape.head_dim} head dim × 4 bytes = "
            f"{human_bytes(per_slot)} per token slot), and {', '.join(others)}{logits}, but only "
            f"{human_bytes(available)} of memory is available; use a smaller --batch_size, --prompt_len or --ctx_len"
        )
    return need


def _bad_byte(data: bytes, exc: UnicodeDecodeError, what: str, *, lines: bool) -> UsageError:
    offset = exc.start
    where = f"byte offset {offset}"
    if lines:
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        where += f" (line {line}, column {column})"
    return UsageError(f"{what} is not valid UTF-8: byte 0x{data[offset]:02x} at {where}; save it as UTF-8")


def decode_argument(text: str | None, flag: str) -> str | None:
    """A command-line string as the user's bytes meant it. Python decodes ``argv`` with
    ``surrogateescape``, so a non-UTF-8 byte arrives as a lone surrogate that would fail (with a
    traceback) only when the tokenizer encodes it."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    data = os.fsencode(text)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad_byte(data, exc, flag, lines=False) from None


#: Bytes of text one token can stand for, at most, with a wide margin: the longest tokens of the
#: vocabularies qeff runs are runs of spaces, newlines or dashes (SmolLM2's: 81 bytes; GPT-2's and
#: Llama 3's: 128). So a prompt that fits ``ctx_len`` tokens has at most ``ctx_len × 256`` bytes, and
#: a longer one can be refused before it is tokenized (issue 19: a 200 MB prompt aborted the tokenizer).
MAX_TOKEN_BYTES = 256
#: Bytes a prompts file may hold in all (lines of short prompts; each line is also bounded by the
#: above): an endless file (``/dev/zero``, ``<(yes)``) is refused once it passes this, never read whole.
MAX_PROMPTS_FILE_BYTES = 256 * 2**20
_CHUNK = 2**20


def prompt_byte_bound(ctx_len: int) -> int:
    """The most bytes a prompt that fits in ``ctx_len`` tokens can have (see :data:`MAX_TOKEN_BYTES`)."""
    return ctx_len * MAX_TOKEN_BYTES


def read_text_file(path: str | os.PathLike, what: str, *, max_line_bytes: int | None = None,
                   max_bytes: int | None = None, line_hint: str = "") -> str:
    """A UTF-8 text file, or one sentence: it does not exist, is a directory, cannot be read, which
    byte is not UTF-8, or it passes a bound. The file is read once, in chunks, so that a pipe
    (``<(…)``, ``/dev/stdin``) works and an endless one (``/dev/zero``) stops at the bound: a line
    longer than ``max_line_bytes`` (``line_hint`` says why that is too long) or more than
    ``max_bytes`` in all."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a directory, not a file")
    if not p.exists():
        raise UsageError(f"{what} {str(path)!r} does not exist")
    chunks: list[bytes] = []
    total = 0
    line_start_line, line_bytes = 1, 0  # the current line's number and length so far
    try:
        with open(p, "rb") as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if max_line_bytes is not None:
                    pieces = chunk.split(b"\n")
                    for i, piece in enumerate(pieces):
                        line_bytes += len(piece)
                        if line_bytes > max_line_bytes:
                            raise UsageError(
                                f"{what} {str(path)!r}: line {line_start_line} is longer than {max_line_bytes:,} bytes"
                                f"{line_hint}; it was refused before being read whole"
                            )
                        if i < len(pieces) - 1:
                            line_start_line, line_bytes = line_start_line + 1, 0
                if max_bytes is not None and total > max_bytes:
                    raise UsageError(
                        f"{what} {str(path)!r} holds more than {human_bytes(max_bytes)} (an endless file?); "
                        f"it was refused before being read whole"
                    )
                chunks.append(chunk)
    except OSError as exc:
        raise UsageError(f"{what} {str(path)!r} cannot be read ({exc.strerror})") from None
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad_byte(data, exc, f"{what} {str(path)!r}", lines=True) from None


def check_home(home: str | os.PathLike | None) -> None:
    """``--home`` must be a directory or creatable as one. Writability is checked when something
    must be built (a read-only cache that already holds everything a run needs is fine)."""
    if home is None:
        return
    p = Path(home).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"--home {str(home)!r} is a file, not a directory; the artifact cache must be a directory")
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe != p and not probe.is_dir():
        raise UsageError(f"--home {str(home)!r} cannot be created: {probe} is a file, not a directory")
