"""benchmarks/bench_7b_chain.py's staging: a synthetic checkpoint becomes one that the card's full
tier and ``qeff compile`` accept, without copying its weights (the 7B run depends on it: a
checkpoint written before write_llama cut its tokenizer has SmolLM2's 49152 ids against Llama 2's
32000 rows, and the writer's RoPE theta is Llama 3's)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from qeff.intake.configs import read_config
from qeff.intake.consistency import check_tokenizer, tokenizer_id_count
from qeff.errors import UsageError
from qeff.intake.loading import resolve
from qeff.synthetic import LlamaShape, write_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_7b_chain import stage_checkpoint  # noqa: E402

#: Llama 2's vocabulary (32000 rows) at a small width.
SHAPE = LlamaShape(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=32000, tied=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint as write_llama wrote them before it cut the tokenizer: SmolLM2's 49152 ids."""
    from qeff.intake.loading import DEFAULT_MODEL, load_tokenizer

    path = write_llama(tmp_path_factory.mktemp("bench") / "ckpt", SHAPE, seed=0)
    load_tokenizer(resolve(DEFAULT_MODEL)).save_pretrained(str(path))
    return path


def _card_config(**changes) -> dict:
    from pytest_qeff.cards import load_cards

    card = load_cards(Path(__file__).resolve().parents[1] / "pytest_qeff" / "model_cards")["llama-2-7b"]
    config = {**card.config.hf_config(), **{k: getattr(SHAPE, v) for k, v in (
        ("num_hidden_layers", "layers"), ("hidden_size", "hidden"), ("intermediate_size", "intermediate"),
        ("num_attention_heads", "heads"), ("num_key_value_heads", "kv_heads"), ("vocab_size", "vocab"))}}
    return {**config, **changes}


def test_staging_makes_a_checkpoint_qeff_accepts(ckpt, tmp_path):
    with pytest.raises(UsageError, match="smaller than its tokenizer"):  # the checkpoint as written is refused
        check_tokenizer(read_config(resolve(str(ckpt))))
    notes = stage_checkpoint(ckpt, tmp_path / "staged", _card_config())
    staged = tmp_path / "staged"
    check_tokenizer(read_config(resolve(str(staged))))  # accepted
    assert tokenizer_id_count(staged) <= SHAPE.vocab
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(staged))("The capital of France is")["input_ids"]
    assert ids and max(ids) < SHAPE.vocab  # the card's prompt still tokenizes
    assert os.path.samefile(staged / "model.safetensors", ckpt / "model.safetensors")  # linked, not copied
    config = read_config(resolve(str(staged))).values
    assert config["rope_theta"] == 10000.0 and config["max_position_embeddings"] == 4096  # Llama 2's, from the card
    assert any(n.startswith("config.rope_theta") for n in notes) and any(n.startswith("tokenizer:") for n in notes)
    assert (ckpt / "config.json").read_text() != (staged / "config.json").read_text()  # the source is left as it was


def test_staging_refuses_weights_of_another_shape(ckpt, tmp_path):
    with pytest.raises(SystemExit, match="config.hidden_size is 64 but the card says 4096"):
        stage_checkpoint(ckpt, tmp_path / "staged", _card_config(hidden_size=4096))
