"""The model cards shipped in model_cards/."""

from __future__ import annotations

import pytest

from pytest_qeff.cards import default_cards_dir, load_cards, select

REQUIRED = {
    "smollm2-135m", "llama-2-7b-chat", "llama-2-13b-chat", "llama-2-70b-chat", "llama-3-8b", "llama-3-70b",
    "codellama-7b", "codellama-13b", "codellama-34b", "mistral-7b-instruct-v0.1", "codegen25-7b-mono", "xgen-7b-8k-base",
}


@pytest.fixture(scope="module")
def cards():
    return load_cards(default_cards_dir())


def test_every_required_card_is_shipped_and_valid(cards) -> None:
    assert REQUIRED <= set(cards)
    assert list(cards) == sorted(cards)


def test_architectures_are_supported_by_the_transform(cards) -> None:
    from qeff.transforms import supported_model_types

    assert {c.architecture for c in cards.values()} <= set(supported_model_types())


def test_tiny_configs_build_small_models_with_the_real_attention_layout(cards) -> None:
    import qeff

    for card in cards.values():
        tiny, real = card.tiny_config(), card.config
        model = qeff.from_config(card.architecture, tiny.hf_config(), seed=card.tiny.seed)
        assert sum(p.numel() for p in model.parameters()) < 500_000, card.id
        assert tiny.gqa_ratio == real.gqa_ratio
        assert model.config.num_hidden_layers == tiny.num_hidden_layers < real.num_hidden_layers


def test_real_configs_are_the_published_ones(cards) -> None:
    assert cards["llama-3-8b"].config.num_key_value_heads == 8
    assert cards["llama-3-8b"].config.rope_theta == 500000.0
    assert cards["llama-2-70b-chat"].config.num_attention_heads == 64
    assert cards["codellama-7b"].config.vocab_size == 32016
    assert cards["mistral-7b-instruct-v0.1"].config.sliding_window == 4096
    assert cards["smollm2-135m"].weights.source == "gguf"


def test_selection_by_glob_all_and_commas(cards) -> None:
    assert [c.id for c in select(cards, ["codellama-*"])] == ["codellama-13b", "codellama-34b", "codellama-7b"]
    assert [c.id for c in select(cards, ["llama-3-8b,smollm2-135m"])] == ["llama-3-8b", "smollm2-135m"]
    assert len(select(cards, ["all"])) == len(cards)
    with pytest.raises(pytest.UsageError, match=r"--qeff-model codellama: no model card matches; closest: codellama-13b"):
        select(cards, ["codellama"])
