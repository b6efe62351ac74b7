"""The model cards shipped in model_cards/."""

from __future__ import annotations

import pytest

from pytest_qeff.cards import default_cards_dir, load_cards, select

REQUIRED = {
    "smollm2-135m", "llama-2-7b-chat", "llama-2-13b-chat", "llama-2-70b-chat", "llama-3-8b", "llama-3-70b",
    "codellama-7b", "codellama-13b", "codellama-34b", "mistral-7b-instruct-v0.1", "codegen25-7b-mono", "xgen-7b-8k-base",
    "gpt2", "mpt-7b", "mixtral-8x7b", "falcon-40b", "starcoder2-15b", "phi-3-mini-128k-instruct", "gpt-j-6b",
    "jais-13b-chat", "chatglm2-6b", "baichuan2-7b-chat",
    # issue 11: the seed's base models
    "llama-2-7b", "jais-13b", "baichuan2-7b-base", "codegen-2b-mono", "gpt2-xl",
}
#: Cards whose modeling code is in their hub repository, not in transformers (issue 5).
REMOTE_CODE = {"jais-13b-chat", "chatglm2-6b", "baichuan2-7b-chat", "jais-13b", "baichuan2-7b-base"}


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
        "core42/jais-13b-chat", "THUDM/chatglm2-6b", "baichuan-inc/Baichuan2-7B-Chat", "core42/jais-13b",
        "baichuan-inc/Baichuan2-7B-Base",
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


#: Every Hugging Face model the seed README (qefficient-readme-2024.md) names, by the repo it links
#: to (Baichuan2-7B-Base is named without a link), and the names it calls them by.
SEED_MODELS = {
    "openai-community/gpt2": "GPT2", "meta-llama/Meta-Llama-3-8B": "Llama-3-8b",
    "meta-llama/Meta-Llama-3-70B": "Llama-3-70b", "meta-llama/Llama-2-70b-chat-hf": "Llama-2-70b-chat-hf",
    "meta-llama/Llama-2-7b-chat-hf": "Llama-2-7b-chat-hf", "meta-llama/Llama-2-13b-chat-hf": "Llama-2-13b-chat-hf",
    "codellama/CodeLlama-7b-hf": "CodeLlama-7b-hf", "codellama/CodeLlama-13b-hf": "CodeLlama-13b-hf",
    "codellama/CodeLlama-34b-hf": "CodeLlama-34b-hf", "Salesforce/codegen25-7b-mono_P": "codegen25-7b-mono_P",
    "Salesforce/xgen-7b-8k-base": "xgen-7b-8k-base", "mosaicml/mpt-7b": "MPT-7b",
    "mistralai/Mistral-7B-Instruct-v0.1": "Mistral-7B-Instruct-v0.1", "mistralai/Mixtral-8x7B-v0.1": "Mixtral-8x7B-v0.1",
    "tiiuae/falcon-40b": "Falcon-40b", "bigcode/starcoder2-15b": "Starcoder2-15b",
    "microsoft/Phi-3-mini-128k-instruct": "Phi-3", "core42/jais-13b": "Jais-13b", "EleutherAI/gpt-j-6b": "GPT-J-6B",
    "THUDM/chatglm2-6b": "Chatglm2-6b", "baichuan-inc/Baichuan2-7B-Base": "Baichuan2-7B-Base",
    "Salesforce/codegen-2B-mono": "codegen-2B-mono", "openai-community/gpt2-xl": "gpt2-xl",
    # the design's command: pytest --qeff-model llama-2-7b --device-group 0,1
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
}


def test_every_seed_model_has_a_card_found_by_repo_and_by_its_seed_name(cards) -> None:
    for repo, seed_name in SEED_MODELS.items():
        by_repo = select(cards, [repo])
        assert len(by_repo) == 1 and by_repo[0].weights.repo == repo, repo
        assert select(cards, [seed_name]) == by_repo, seed_name
        assert select(cards, [repo.upper()]) == by_repo  # case-insensitive
    assert select(cards, ["llama-2-7b"])[0].weights.repo == "meta-llama/Llama-2-7b-hf"


def test_base_cards_carry_their_published_configs(cards) -> None:
    base, chat = cards["llama-2-7b"].config, cards["llama-2-7b-chat"].config
    assert base == chat  # Llama 2 7B and its chat tune share one architecture
    assert cards["jais-13b"].config == cards["jais-13b-chat"].config
    assert cards["baichuan2-7b-base"].config == cards["baichuan2-7b-chat"].config
    codegen = cards["codegen-2b-mono"].config
    assert (codegen.num_hidden_layers, codegen.hidden_size, codegen.num_attention_heads, codegen.extra["rotary_dim"]) == (32, 2560, 32, 64)
    xl = cards["gpt2-xl"].config
    assert (xl.num_hidden_layers, xl.hidden_size, xl.num_attention_heads) == (48, 1600, 25)


def test_lookup_by_alias_repo_and_glob_over_repos(cards) -> None:
    assert [c.id for c in select(cards, ["LLAMA-2-7B-CHAT-HF"])] == ["llama-2-7b-chat"]
    assert [c.id for c in select(cards, ["Llama-2-7B"])] == ["llama-2-7b"]
    assert {c.id for c in select(cards, ["codellama/*"])} == {"codellama-7b", "codellama-13b", "codellama-34b"}
    assert {c.id for c in select(cards, ["*/Llama-2-7b*"])} == {"llama-2-7b", "llama-2-7b-chat"}
    with pytest.raises(pytest.UsageError, match=r"--qeff-model meta-llama/Llama-2-7b: no model card matches; closest: llama-2-7b"):
        select(cards, ["meta-llama/Llama-2-7b"])


def test_an_alias_may_name_only_one_card(tmp_path) -> None:
    src = default_cards_dir()
    for name in ("llama-2-7b", "llama-2-7b-chat"):
        (tmp_path / f"{name}.toml").write_text((src / f"{name}.toml").read_text())
    text = (tmp_path / "llama-2-7b.toml").read_text().replace('aliases = ["Llama-2-7b-hf"]', 'aliases = ["LLAMA-2-7B-CHAT"]')
    (tmp_path / "llama-2-7b.toml").write_text(text)
    with pytest.raises(pytest.UsageError, match=r"llama-2-7b.toml: aliases: 'LLAMA-2-7B-CHAT' already names card 'llama-2-7b-chat'"):
        load_cards(tmp_path)
    (tmp_path / "llama-2-7b.toml").write_text(text.replace('"LLAMA-2-7B-CHAT"', '"bad alias"'))
    with pytest.raises(pytest.UsageError, match=r"aliases\[0\]: String should match pattern"):
        load_cards(tmp_path)


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


# --- issue 11: the new families' cards, RoPE scaling tables and float lists ---------------------------

#: One card per family added in issue 11, plus the RoPE-scaled Llama 3.x cards.
FAMILY_CARDS = {
    "qwen3-0.6b": "qwen3", "qwen3-30b-a3b": "qwen3_moe", "gemma3-270m": "gemma3_text",
    "granite-3.0-1b-a400m-instruct": "granitemoe", "olmoe-1b-7b-0924": "olmoe", "smollm3-3b-base": "smollm3",
    "gpt-oss-20b": "gpt_oss", "llama-3.1-8b-instruct": "llama", "llama-3.2-1b": "llama", "llama-3.2-3b": "llama",
}


def test_family_cards_are_shipped(cards) -> None:
    assert {cid: cards[cid].architecture for cid in FAMILY_CARDS if cid in cards} == FAMILY_CARDS


def test_rope_scaling_tables_carry_the_published_values(cards) -> None:
    for cid, factor in (("llama-3.1-8b-instruct", 8.0), ("llama-3.2-1b", 32.0), ("llama-3.2-3b", 32.0)):
        scaling = cards[cid].config.extra["rope_scaling"]
        assert scaling == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}, cid
    phi3 = cards["phi-3-mini-128k-instruct"].config
    longrope = phi3.extra["rope_scaling"]
    assert longrope["type"] == "longrope" and phi3.extra["original_max_position_embeddings"] == 4096
    # One factor per rotated frequency pair: head_dim 96 / 2.
    head_dim = phi3.hidden_size // phi3.num_attention_heads
    assert len(longrope["long_factor"]) == len(longrope["short_factor"]) == head_dim // 2 == 48
    assert all(isinstance(f, float) for f in longrope["long_factor"] + longrope["short_factor"])
    assert longrope["long_factor"][0] == 1.0700000524520874 and longrope["long_factor"][-1] == 64.76000213623047
    assert longrope["short_factor"][0] == 1.1 and longrope["short_factor"][-1] == 3.049999999999997
    gemma = cards["gemma3-270m"].config.extra
    assert gemma["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert gemma["layer_types"].count("full_attention") == 3 and len(gemma["layer_types"]) == 18


def test_tiny_tiers_run_past_the_scaled_rope_boundary(cards) -> None:
    """A scaling that only acts beyond original_max_position_embeddings is exercised only when the
    tiny tier's sequences go past it."""
    for cid in ("llama-3.1-8b-instruct", "llama-3.2-1b", "llama-3.2-3b", "phi-3-mini-128k-instruct", "gpt-oss-20b"):
        card = cards[cid]
        extra = card.tiny_config().extra
        original = extra["rope_scaling"].get("original_max_position_embeddings") or extra["original_max_position_embeddings"]
        longest = max(card.prompts.tiny_lengths) + card.prompts.generation_len
        assert longest > original, cid
        assert extra["rope_scaling"] != card.config.extra["rope_scaling"], cid  # shrunk for the tiny model


def test_tiny_rope_scaling_reaches_the_model(cards) -> None:
    import qeff

    for cid, rope_type in (("llama-3.2-1b", "llama3"), ("phi-3-mini-128k-instruct", "longrope"), ("gpt-oss-20b", "yarn")):
        card = cards[cid]
        model = qeff.from_config(card.architecture, card.tiny_config().hf_config(), seed=card.tiny.seed)
        assert model.config.rope_parameters["rope_type"] == rope_type, cid


def test_config_tables_and_lists_are_compared_key_by_key() -> None:
    from pytest_qeff.cards import config_value_matches

    card = {"type": "longrope", "long_factor": [1.07, 64.76], "short_factor": [1.1, 3.05]}
    loaded = {**card, "rope_theta": 10000.0, "rope_type": "longrope", "long_factor": [1.0700000524520874, 64.76]}
    assert config_value_matches(card, loaded)  # extra keys transformers adds; float32 rounding
    assert not config_value_matches(card, {**loaded, "long_factor": [1.07, 64.0]})  # a changed factor
    assert not config_value_matches(card, {**loaded, "long_factor": [1.07]})  # a shorter list
    assert not config_value_matches(card, {k: v for k, v in loaded.items() if k != "short_factor"})  # a missing key
    assert not config_value_matches({"rope_type": "llama3"}, None)


def test_full_tier_config_check_sees_a_wrong_rope_table(cards) -> None:
    """The full tier's config check compares the card's rope_scaling with the loaded model's."""
    import qeff
    from pytest_qeff.stages import _config_mismatches

    card = cards["llama-3.2-1b"]
    small = {**card.config.hf_config(), "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 64,
             "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 256}
    config = qeff.from_config("llama", small).config
    problems = _config_mismatches(card, config)
    assert not [p for p in problems if "rope" in p], problems
    config.rope_parameters = {**config.rope_parameters, "factor": 8.0}
    assert any(p.startswith("config.rope_scaling is") for p in _config_mismatches(card, config))
