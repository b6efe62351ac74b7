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
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from qeff.atomic import human_bytes
from qeff.errors import UsageError

__all__ = [
    "check_positive",
    "check_sizes",
    "check_threads",
    "available_cpus",
    "available_memory",
    "memory_sources",
    "check_memory",
    "decode_argument",
    "read_text_file",
    "check_home",
]


def check_positive(flag: str, value: int | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{flag} must be a positive integer (got {value})")


def check_sizes(*, batch_size: int, prompt_len: int, ctx_len: int, generation_len: int | None = None,
                num_cores: int | None = None, steps: int | None = None) -> None:
    """The sizes of a run, before anything is loaded."""
    check_positive("--batch_size", batch_size)
    check_positive("--prompt_len", prompt_len)
    check_positive("--ctx_len", ctx_len)
    check_positive("--generation_len", generation_len, optional=True)
    check_positive("--num_cores", num_cores, optional=True)
    check_positive("--steps", steps, optional=True)
    if prompt_len > ctx_len:
        raise UsageError(f"--prompt_len {prompt_len} is larger than --ctx_len {ctx_len}; a prefill chunk must fit in the context")


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


def check_memory(shape, *, batch_size: int, ctx_len: int, copies: int = 1, available: int | None = None) -> int:
    """Refuse a run whose KV cache (``copies`` of it: verification holds PyTorch's and ONNX
    Runtime's at once) plus the weights cannot fit the available memory. Returns the estimate."""
    cache = shape.cache_bytes(batch_size, ctx_len)
    need = cache * copies + (shape.weight_bytes or 0)
    available = available if available is not None else available_memory()
    if available is not None and need > available:
        per_slot = shape.cache_bytes(1, 1)
        weights = f" plus {human_bytes(shape.weight_bytes)} of weights" if shape.weight_bytes else ""
        copies_text = f" × {copies} copies (verification holds two)" if copies > 1 else ""
        raise UsageError(
            f"--ctx_len {ctx_len:,} with --batch_size {batch_size} needs a {human_bytes(cache)} KV cache{copies_text}{weights} "
            f"({shape.num_layers} layers × 2 × {shape.num_kv_heads} KV heads × {shape.head_dim} head dim × 4 bytes = "
            f"{human_bytes(per_slot)} per token slot), but only {human_bytes(available)} of memory is available; "
            f"use a smaller --ctx_len or --batch_size"
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


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """A UTF-8 text file, or one sentence: it does not exist, is a directory, cannot be read, or
    which byte is not UTF-8."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a directory, not a file")
    if not p.exists():
        raise UsageError(f"{what} {str(path)!r} does not exist")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} {str(path)!r} cannot be read ({exc.strerror})") from None
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
