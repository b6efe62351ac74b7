"""The shipped corpus: where it came from is said in its header, and it is long enough."""

from __future__ import annotations

from qeff import data


def test_header_names_sources_and_licences():
    header = data.corpus_header()
    for fact in ("Alice's Adventures in Wonderland", "public domain", "brotli-1.2.1.tar.gz", "alice29.txt",
                 "sha256 7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0", "sqlite3.h",
                 "libsqlite3-dev 3.40.1-2+deb12u2"):
        assert fact in header, fact
    text = data.corpus_text()
    assert not any(line.startswith("# qeff corpus") for line in text.split("\n"))


def test_prose_and_code_parts(smollm2_tokenizer):
    text = data.corpus_text()
    prose, code = text.split(data.CODE_MARKER)
    assert prose.lstrip().startswith("ALICE'S ADVENTURES IN WONDERLAND")
    assert "Down the Rabbit-Hole" in prose and "The Pool of Tears" in prose
    assert "SQLITE_API int sqlite3_exec(" in code and "May you do good and not evil." in code
    n_prose = len(smollm2_tokenizer(prose, add_special_tokens=False)["input_ids"])
    n_code = len(smollm2_tokenizer(code, add_special_tokens=False)["input_ids"])
    assert n_prose >= 4000 and 300 <= n_code < n_prose  # measured: 6,098 and 1,343
    ids = data.corpus_token_ids(smollm2_tokenizer)
    assert len(ids) >= 4000 + 300
    assert data.corpus_token_ids(smollm2_tokenizer, max_tokens=100) == ids[:100]
