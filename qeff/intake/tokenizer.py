"""A saved tokenizer, opened with the ``tokenizers`` library alone.

Every export saves its tokenizer beside the graph (``tokenizer.json`` + ``tokenizer_config.json``).
Opening it through ``transformers.AutoTokenizer`` imports transformers and torch — seconds of a
cached ``qeff infer`` that needs neither. :class:`SavedTokenizer` reads the same ``tokenizer.json``
with the Rust library transformers itself wraps, and offers the part of the HF tokenizer API qeff
uses (``tok(text)["input_ids"]``, ``decode``, ``eos_token_id``, …). ``tests/test_tokenizer.py``
checks it encodes and decodes exactly as ``AutoTokenizer`` does on the saved directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["SavedTokenizer", "open_saved_tokenizer"]

# transformers' clean_up_tokenization replacements, applied when the config asks for them.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...}
        return value.get("content")
    return value


class SavedTokenizer:
    """The tokenizer saved in ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        self._tok = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        config_path = self.directory / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        # transformers 5 ignores the cleanup for BPE models (it would eat spaces before punctuation)
        # unless the config insists; follow the same rule.
        is_bpe = type(self._tok.model).__name__ == "BPE"
        insist = self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
        self.clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False)) and (not is_bpe or insist)
        for role in ("bos", "eos", "pad", "unk"):
            text = _token_text(self.config.get(f"{role}_token"))
            setattr(self, f"{role}_token", text)
            setattr(self, f"{role}_token_id", self._tok.token_to_id(text) if text else None)

    def __call__(self, text: str, add_special_tokens: bool = True, **unused) -> dict:
        if unused.get("return_tensors"):
            raise TypeError("SavedTokenizer returns lists only; use transformers' tokenizer for tensors")
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False, **unused) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        return text

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """token → id, added tokens included (as transformers' ``get_vocab``)."""
        return self._tok.get_vocab(with_added_tokens=True)

    def save_pretrained(self, directory: str | Path) -> None:
        for f in self.directory.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges")):
                shutil.copy2(f, Path(directory) / f.name)


def open_saved_tokenizer(directory: str | Path):
    """The tokenizer saved in ``directory``: a :class:`SavedTokenizer` when ``tokenizer.json`` is
    there (no transformers import), else ``AutoTokenizer``; None when nothing is saved there."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return SavedTokenizer(directory)
    if (directory / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))
    return None
