"""Data shipped with qeff: a real text corpus (``corpus.txt``) for perplexity and teacher-forced
precision metrics. Its header names where every part came from and under which licence."""

from __future__ import annotations

from importlib import resources

__all__ = ["corpus_header", "corpus_text", "corpus_token_ids", "CODE_MARKER"]

CORPUS = "corpus.txt"
HEADER_END = "# ---"
#: The line that separates the prose from the code in the corpus.
CODE_MARKER = "/* ---- code ---- */"


def _raw() -> str:
    return resources.files(__name__).joinpath(CORPUS).read_text(encoding="utf-8")


def _split() -> tuple[str, str]:
    raw = _raw()
    lines = raw.split("\n")
    end = lines.index(HEADER_END)
    return "\n".join(lines[: end + 1]), "\n".join(lines[end + 1 :])


def corpus_header() -> str:
    """The corpus file's header: its sources and licences."""
    return _split()[0]


def corpus_text() -> str:
    """The corpus without its header: English prose, a blank line, :data:`CODE_MARKER`, C code."""
    return _split()[1]


def corpus_token_ids(tokenizer, max_tokens: int | None = None) -> list[int]:
    """The corpus tokenized (no special tokens added), cut to ``max_tokens``."""
    ids = list(tokenizer(corpus_text(), add_special_tokens=False)["input_ids"])
    return ids[:max_tokens] if max_tokens is not None else ids
