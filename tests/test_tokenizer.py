"""qeff.intake.tokenizer.SavedTokenizer encodes and decodes exactly as transformers' AutoTokenizer does
on the same saved directory (what an export keeps beside its graph)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qeff.intake.tokenizer import SavedTokenizer, open_saved_tokenizer

TEXTS = [
    "The capital of France is",
    "  leading spaces, trailing  ",
    "Write a haiku about the sea.\nNew line\ttab",
    "naïve café — 東京 ☕ 🚀",
    "<|im_start|>user\nHi<|im_end|>",
    "don't won't I'm it's we've they're ( ) . , ! ?",
    "",
]


@pytest.fixture(scope="module")
def saved(smollm2_tokenizer, module_tmp):
    path = module_tmp("tokenizer")
    smollm2_tokenizer.save_pretrained(path)
    return path, AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_autotokenizer(saved, text):
    path, hf = saved
    ours = SavedTokenizer(path)
    for special in (True, False):
        assert ours(text, add_special_tokens=special)["input_ids"] == hf(text, add_special_tokens=special)["input_ids"]
    ids = hf(text)["input_ids"] + [hf.eos_token_id]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_token_ids_and_size(saved):
    path, hf = saved
    ours = SavedTokenizer(path)
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id)
    assert ours.eos_token_id is not None and len(ours) == len(hf)
    assert ours.get_vocab() == hf.get_vocab()  # speculative decoding compares draft and target vocabularies


def test_vocab_includes_added_tokens_as_transformers_does(saved, tmp_path):
    """A draft whose tokenizer only adds a token must not look like the target's (speculative decoding)."""
    path, hf = saved
    hf = AutoTokenizer.from_pretrained(str(path))
    hf.add_tokens(["<qeff-added>"])
    hf.save_pretrained(tmp_path)
    ours = SavedTokenizer(tmp_path)
    assert ours.get_vocab() == AutoTokenizer.from_pretrained(str(tmp_path)).get_vocab()
    assert "<qeff-added>" in ours.get_vocab() and ours.get_vocab() != SavedTokenizer(path).get_vocab()


@pytest.mark.parametrize("extra,cleaned", [
    ({"clean_up_tokenization_spaces": True}, False),  # transformers ignores it for a BPE model …
    ({"clean_up_tokenization_spaces": True, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True}, True),
])
def test_cleanup_of_tokenization_spaces_follows_transformers(saved, tmp_path, extra, cleaned):
    import json
    import shutil

    path, _ = saved
    for f in path.iterdir():
        shutil.copy2(f, tmp_path / f.name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **extra}))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = hf("I do n't know , really .")["input_ids"]
    assert SavedTokenizer(tmp_path).decode(ids) == hf.decode(ids)
    assert (" ," not in hf.decode(ids)) == cleaned  # … unless the config insists


def test_open_saved_tokenizer_needs_no_transformers_when_tokenizer_json_exists(saved, tmp_path):
    path, _ = saved
    assert isinstance(open_saved_tokenizer(path), SavedTokenizer)
    assert open_saved_tokenizer(tmp_path) is None
