"""A word tokenizer for tiny local checkpoints: the CLI needs a tokenizer beside the weights,
and SmolLM2's 49,152-token vocabulary made every tiny export and tokenizer load seconds slower."""

from __future__ import annotations

__all__ = ["WORDS", "word_tokenizer"]

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = (
    "the a an of to in on at by for with from and or but is was are were be been it its this that these those "
    "there here he she they we you i my your his her their our capital france paris city country land sea sky "
    "once upon time far away lived king queen child house tree river mountain day night sun moon star "
    "one two three four five six seven eight nine ten hello world good new old big small long short "
    "first last next open close read write run go come see look say tell ask make take give find know think "
    ", . ! ? ' : ;"
).split()


def word_tokenizer(vocab_size: int = 128):
    """A fast HF tokenizer: lower case, whitespace/punctuation split, one id per known word,
    ``<unk>`` otherwise (ids 0-3 are ``<pad> <s> </s> <unk>``), ``vocab_size`` ids in all (unused
    ones fill up to the model's vocabulary)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    assert len(vocab) <= vocab_size, len(vocab)
    for filler in range(vocab_size - len(vocab)):  # unused ids up to the model's vocabulary size
        vocab[f"<extra_{filler}>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
