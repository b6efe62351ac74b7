"""The model cards shipped in model_cards/."""

from __future__ import annotations

import pytest

from pytest_qeff.cards import default_cards_dir, load_cards, select

REQUIRED = {
    "smollm2-135m", "llama-2-7b-chat", "llama-2-13b-chat", "llama-2-70b-chat", "llama-3-8b", "llama-3-70b",
    "codellama-7b", "codellama-13b", "codellama-34b", "mistral-7b-instruct-v0.1", "codegen25-7b-mono", "xgen-7b-8k-base",
    "gpt2", "mpt-7b", "mixtral-8x7b", "falcon-40b", "starcoder2-15b", "phi-3-mini-128k-instruct", "gpt-j-6b",
    "jais-13b-chat", "chatglm2-6b", "baichuan2-7b-chat",
}
#: Cards whose modeling code is in their hub repository, not in transformers (issue 5).
REMOTE_CODE = {"jais-13b-chat", "chatglm2-6b", "baichuan2-7b-chat"}


@pytest.fixture(scope="module")
def cards():
    return load_cards(default_cards_dir())


def test_every_required_card_is_shipped_and_valid(cards) -> None:
    assert REQUIRED <= set(cards)
    assert list(cards) == sorted(cards)


def _unsupported_reason(card) -> str | None:
    """Why a card's architecture is not supported: its known failure of the transform stage, for
    every tier, case and backend (so every run of the card says it)."""
    kf = next((k for k in card.known_failures if k.stage == "transform" and (k.tier, k.case, k.backend) == (None, None, None)), None)
    return kf.reason if kf else None


def test_every_supported_architecture_has_a_card(cards) -> None:
    from qeff.transforms import supported_model_types

    covered = {c.architecture for c in cards.values()}
    missing = sorted(set(supported_model_types()) - covered)
    assert not missing, f"architectures the transform supports without a model card: {missing}"


def test_every_card_architecture_is_supported_or_the_card_says_why(cards) -> None:
    from qeff.transforms import supported_model_types

    supported = set(supported_model_types())
    for card in cards.values():
        if card.architecture in supported:
            assert _unsupported_reason(card) is None, f"{card.id}: claims its supported architecture fails the transform"
        else:
            reason = _unsupported_reason(card)
            assert reason and card.architecture in reason, (
                f"{card.id}: architecture {card.architecture!r} is not supported by the transform and the card does not "
                f"say why (a [[known_failures]] stage = \"transform\" entry naming it)"
            )
    assert {c.id for c in cards.values() if c.architecture not in supported} == REMOTE_CODE


def test_remote_code_cards_are_marked(cards) -> None:
    assert {c.id for c in cards.values() if c.weights.trust_remote_code} == REMOTE_CODE
    assert {c.weights.repo for c in cards.values() if c.id in REMOTE_CODE} == {
        "core42/jais-13b-chat", "THUDM/chatglm2-6b", "baichuan-inc/Baichuan2-7B-Chat",
    }


def test_tiny_only_cards_name_no_weights(cards) -> None:
    tiny_only = {c.id for c in cards.values() if c.weights.source == "none"}
    assert tiny_only == {c for c in cards if c.startswith("tiny-")}
    assert {cards[c].architecture for c in tiny_only} == {
        "codegen", "falcon", "gemma", "gemma2", "gpt_bigcode", "granite", "olmo2", "phi", "qwen2",
    }


def test_tiny_configs_build_small_models_with_the_real_attention_layout(cards) -> None:
    import qeff

    for card in cards.values():
        if card.weights.trust_remote_code:  # its config class is in the hub repository
            continue
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
    assert cards["mixtral-8x7b"].config.extra["num_local_experts"] == 8
    assert cards["falcon-40b"].config.extra["num_kv_heads"] == 8 and cards["falcon-40b"].config.extra["new_decoder_architecture"]
    assert cards["starcoder2-15b"].config.sliding_window == 4096
    assert cards["phi-3-mini-128k-instruct"].config.max_position_embeddings == 131072
    assert cards["gpt-j-6b"].config.extra["rotary_dim"] == 64


def test_weights_schema_for_tiny_only_and_remote_code() -> None:
    from pydantic import ValidationError

    from pytest_qeff.cards import Weights

    assert Weights(source="none").repo is None
    with pytest.raises(ValidationError, match='source = "hub" needs repo'):
        Weights(source="hub")
    with pytest.raises(ValidationError, match='trust_remote_code = true needs source = "hub"'):
        Weights(source="none", trust_remote_code=True)


def test_selection_by_glob_all_and_commas(cards) -> None:
    assert [c.id for c in select(cards, ["codellama-*"])] == ["codellama-13b", "codellama-34b", "codellama-7b"]
    assert [c.id for c in select(cards, ["llama-3-8b,smollm2-135m"])] == ["llama-3-8b", "smollm2-135m"]
    assert len(select(cards, ["all"])) == len(cards)
    with pytest.raises(pytest.UsageError, match=r"--qeff-model codellama: no model card matches; closest: codellama-13b"):
        select(cards, ["codellama"])


def test_full_tier_config_check_compares_only_keys_the_architecture_has(cards):
    """GPT-2's config has no num_key_value_heads / intermediate_size / rms_norm_eps: the card's
    schema records equivalents, which must not read as mismatches; a real difference must."""
    from transformers import GPT2Config

    from pytest_qeff.stages import _config_mismatches

    card = cards["gpt2"]
    real = GPT2Config(n_embd=card.config.hidden_size, n_layer=card.config.num_hidden_layers, n_head=card.config.num_attention_heads,
                      n_positions=card.config.max_position_embeddings, vocab_size=card.config.vocab_size,
                      bos_token_id=card.config.bos_token_id, eos_token_id=card.config.eos_token_id,
                      tie_word_embeddings=card.config.tie_word_embeddings)
    assert _config_mismatches(card, real) == []
    real.n_layer += 1
    assert _config_mismatches(card, real) == [
        f"config.num_hidden_layers is {card.config.num_hidden_layers} in the card but {card.config.num_hidden_layers + 1} in the loaded model"
    ]
