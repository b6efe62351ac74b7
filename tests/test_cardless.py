"""Cardless runs (issue 11, item 5): `pytest --qeff-model ./checkpoint` (or a .gguf, or a cached hub
id) with no card builds one from the config; `--qeff-write-card` saves it as a card to commit."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

# Inner runs happen in this process (pytester): import the extension modules once, here.
import onnx  # noqa: F401  isort: skip
import onnxruntime  # noqa: F401  isort: skip
import qeff.exporter  # noqa: F401  isort: skip
import qeff  # noqa: F401  isort: skip
import transformers.models.llama.modeling_llama  # noqa: F401  isort: skip

from pytest_qeff import cardless
from pytest_qeff.cards import Card, default_cards_dir, load_card, load_cards
from qeff.intake.loading import embedded_gguf
from tests.model_files import write_config_dir

pytest_plugins = ("pytester",)

EXPERT_KEYS = ("num_local_experts", "num_experts")


def qeff_run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", *args)


def _experts(extra: dict) -> int | None:
    return next((extra[k] for k in EXPERT_KEYS if isinstance(extra.get(k), int)), None)


def same_features(card: Card) -> list[str]:
    """What the tiny tier lost of the real architecture's features (empty: nothing)."""
    real, tiny = card.config, card.tiny_config()
    lost = []
    if tiny.gqa_ratio != real.gqa_ratio:
        lost.append(f"GQA ratio {real.gqa_ratio} became {tiny.gqa_ratio}")
    if bool(real.sliding_window) != bool(tiny.sliding_window) or (tiny.sliding_window or 0) > 16:
        lost.append(f"sliding window {real.sliding_window} became {tiny.sliding_window} (must be set and <= 16)")
    if _experts(real.extra) and not (1 < (_experts(tiny.extra) or 0) <= 4):
        lost.append(f"{_experts(real.extra)} experts became {_experts(tiny.extra)}")
    per_token = real.extra.get("num_experts_per_tok")
    if per_token and not 1 <= tiny.extra.get("num_experts_per_tok", per_token) <= min(2, _experts(tiny.extra) or 2):
        lost.append("experts per token not shrunk within the tiny experts")
    if not 1 <= tiny.num_hidden_layers < real.num_hidden_layers:
        lost.append("not fewer layers")
    for key, value in real.extra.items():
        if isinstance(value, list) and len(value) == real.num_hidden_layers and len(tiny.extra.get(key, value)) != tiny.num_hidden_layers:
            lost.append(f"per-layer list {key} not cut to the tiny depth")
    return lost


def _supported_real_cards() -> list[Card]:
    supported = set(qeff.supported_model_types())
    return [c for c in load_cards(default_cards_dir()).values() if c.architecture in supported]


@pytest.mark.parametrize("card", _supported_real_cards(), ids=lambda c: c.id)
def test_a_card_built_from_each_shipped_config_keeps_the_features_and_runs(tmp_path, card):
    """Every supported architecture's real config (as its card transcribes it) written as a
    config.json, with no weights: the built card keeps the architecture's features, shrunk, and
    its tiny model builds and passes the transform (which checks every module it meets)."""
    path = write_config_dir(tmp_path / card.id, {"model_type": card.architecture, **card.config.hf_config()})
    built = cardless.build(str(path))
    assert built.architecture == card.architecture and built.weights.source == "local"
    assert built.config.num_hidden_layers == card.config.num_hidden_layers
    assert built.config.num_attention_heads == card.config.num_attention_heads
    assert same_features(built) == []
    model = qeff.from_config(built.architecture, built.tiny_config().hf_config(), seed=0)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    qeff.transform(model)


def test_the_feature_check_catches_a_tiny_tier_that_drops_a_feature(tmp_path):
    """Seeded fault: the same check fails when the tiny tier loses the window or the experts."""
    cards = load_cards(default_cards_dir())
    for source_id, fault in (("mistral-7b-instruct-v0.1", {"sliding_window": None}), ("mixtral-8x7b", {"extra": {}})):
        card = cards[source_id]
        path = write_config_dir(tmp_path / source_id, {"model_type": card.architecture, **card.config.hf_config()})
        built = cardless.build(str(path))
        broken = built.model_copy(update={"tiny": built.tiny.model_copy(update=fault)})
        assert same_features(broken), source_id


def test_toml_writer_round_trips_through_tomllib():
    data = {
        "id": "x", "f": 1e-05, "g": 100000.0, "big": 2**40, "s": 'quote " and \\ and\nnewline, ünïcode', "b": False,
        "ids": [1, 2], "names": ["a", "b"], "floats": [1.0, 0.5],
        "config": {"n": 1, "extra": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "layer_types": ["a", "b"]}},
        "cases": [{"batch_size": 1}, {"batch_size": 2}],
        "odd key": 3,
    }
    assert tomllib.loads(cardless.toml(data)) == data


@pytest.fixture(scope="module")
def checkpoint(module_tmp, smollm2_tokenizer):
    """A local checkpoint no card names: a tiny random Llama with SmolLM2's real tokenizer."""
    path = module_tmp("pr-model") / "my-new-model"
    config = dict(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=20,
                  bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id)
    qeff.from_config("mistral", config, seed=5).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_cardless_run_tiny_and_full_tier_then_the_written_card_runs_as_a_card(pytester, checkpoint):
    out = pytester.path / "new_cards"
    tiny = qeff_run(pytester, "--qeff-model", str(checkpoint), "--qeff-backend", "ort", "--qeff-write-card", str(out),
                    "--qeff-report", "tiny_report")
    assert tiny.ret == 0, tiny.stdout.str()
    tiny.stdout.fnmatch_lines(["*card my-new-model built from its model's config (local)*", "*wrote card */new_cards/my-new-model.toml*"])
    written = out / "my-new-model.toml"
    card = load_card(written)  # loads back through the normal loader and validates
    assert card.architecture == "mistral" and card.weights.path == str(checkpoint)
    assert card.config.sliding_window == 20 and card.tiny.sliding_window == 16
    assert card == cardless.build(str(checkpoint))

    results = json.loads((pytester.path / "tiny_report" / "results.json").read_text())
    assert results["run"]["cardless"] == ["my-new-model"] and "my-new-model" in results["cards"]
    assert {r["outcome"] for r in results["records"]} == {"passed"} and len(results["records"]) == 10

    full = qeff_run(pytester, "--qeff-model", str(checkpoint), "--qeff-backend", "ort", "--qeff-tier", "full",
                    "-m", "not qeff_benchmark", "--qeff-report", "full_report", "-q")
    assert full.ret == 0, full.stdout.str()
    records = json.loads((pytester.path / "full_report" / "results.json").read_text())["records"]
    transform = next(r for r in records if r["stage"] == "transform")
    assert transform["data"]["config_mismatches"] == [] and {r["outcome"] for r in records} == {"passed"}

    # The written card, committed into a cards directory, is an ordinary card.
    as_card = qeff_run(pytester, "--qeff-cards-dir", str(out), "--qeff-model", "my-new-model", "--qeff-backend", "ort",
                       "--collect-only", "-q")
    assert as_card.ret == 0
    assert sum("my-new-model-bs" in line for line in as_card.outlines) == 10


def test_cardless_gguf_and_hub_id(pytester, monkeypatch, checkpoint):
    gguf = qeff_run(pytester, "--qeff-model", str(embedded_gguf()), "--qeff-backend", "ort", "--collect-only")
    assert gguf.ret == 0, gguf.stdout.str()
    gguf.stdout.fnmatch_lines(["*card smollm2-135m-instruct.q4_1 built from its model's config (gguf)*"])

    import huggingface_hub.constants as hub

    cache = pytester.path / "hub"
    snapshot = cache / "models--acme--fresh-model" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in checkpoint.iterdir():
        (snapshot / f.name).symlink_to(f)
    (cache / "models--acme--fresh-model" / "refs").mkdir()
    (cache / "models--acme--fresh-model" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    hub_run = qeff_run(pytester, "--qeff-model", "acme/fresh-model", "--qeff-backend", "ort", "--collect-only")
    assert hub_run.ret == 0, hub_run.stdout.str()
    hub_run.stdout.fnmatch_lines(["*card fresh-model built from its model's config (hub)*"])
    # A repo id that is neither a card nor cached: the usual unknown-card error, with the closest cards.
    missing = qeff_run(pytester, "--qeff-model", "meta-llama/Llama-2-7b-chatt", "--collect-only")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["*no model card matches; closest: llama-2-7b-chat*"])


def test_unsupported_or_broken_models_are_usage_errors(pytester, tmp_path):
    neox = write_config_dir(tmp_path / "neox", {"model_type": "gpt_neox"})
    result = qeff_run(pytester, "--qeff-model", str(neox), "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "qeff has no transform for model_type 'gpt_neox'" in err and "nearest supported family is 'llama'" in err
    assert "Traceback" not in err
    missing = qeff_run(pytester, "--qeff-model", str(tmp_path / "nowhere"), "--collect-only")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["*--qeff-model */nowhere: *is neither a model directory nor a .gguf file*"])
    corrupt = write_config_dir(tmp_path / "corrupt", {"model_type": "llama"}, weights=b"\x05" * 40)
    broken = qeff_run(pytester, "--qeff-model", str(corrupt), "--collect-only")
    assert broken.ret == pytest.ExitCode.USAGE_ERROR
    broken.stderr.fnmatch_lines(["*model.safetensors is corrupt*"])
    nothing = qeff_run(pytester, "--qeff-model", "llama-2-7b", "--qeff-write-card", "--collect-only")
    assert nothing.ret == pytest.ExitCode.USAGE_ERROR
    nothing.stderr.fnmatch_lines(["*--qeff-write-card: no card was built from a model's config*"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 63, "head_dim": None}, "*hidden_size 63 is not divisible by num_attention_heads 4*"),
        ({"num_hidden_layers": -1}, "*num_hidden_layers must be a positive integer (got -1)*"),
        ({"vocab_size": 0}, "*vocab_size must be a positive integer (got 0)*"),
        ({"num_key_value_heads": 3}, "*num_attention_heads 4 is not a multiple of num_key_value_heads 3*"),
        ({"intermediate_size": 100}, "*model.safetensors holds * but the config builds it as * (from intermediate_size 100)*"),
    ],
    ids=["hidden-not-divisible", "negative-layers", "zero-vocab", "kv-heads", "weight-shape"],
)
def test_a_config_no_model_can_be_built_from_is_a_usage_error(pytester, checkpoint, tmp_path, changes, message):
    """Issue 19: the cardless run of such a config was an INTERNALERROR traceback with exit 3."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, **changes}))
    result = qeff_run(pytester, "--qeff-model", str(broken), "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stderr.str()
    result.stderr.fnmatch_lines([f"*--qeff-model {broken}: {message}"])
    assert "INTERNALERROR" not in result.stderr.str() + result.stdout.str() and "Traceback" not in result.stderr.str()


def test_a_vocab_smaller_than_the_tokenizer_is_a_usage_error(pytester, module_tmp, smollm2_tokenizer):
    path = module_tmp("small-vocab") / "small-vocab"
    config = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    qeff.from_config("llama", config, seed=5).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    result = qeff_run(pytester, "--qeff-model", str(path), "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*vocab_size 1000 is smaller than its tokenizer's 49152 token ids*"])


def test_rope_scaling_reaches_the_tiny_tier(tmp_path):
    """Llama 3 RoPE scaling is a table (cards hold tables since issue 11's item 2). The tiny tier
    keeps its type and factors and shrinks the original context, so tiny prompts cross the boundary
    where the scaling bites."""
    from pytest_qeff.cardless import _TINY_ORIGINAL_CONTEXT

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = dict(model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=131072, rope_scaling=scaling)
    built = cardless.build(str(write_config_dir(tmp_path / "llama31", config)))
    tiny = built.tiny_config().hf_config()
    kept = {k: v for k, v in tiny["rope_scaling"].items() if k in scaling and k != "original_max_position_embeddings"}
    assert kept == {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"}
    assert tiny["rope_scaling"]["original_max_position_embeddings"] == _TINY_ORIGINAL_CONTEXT < tiny["max_position_embeddings"]
    model = qeff.from_config("llama", tiny)
    assert model.config.rope_parameters["rope_type"] == "llama3"


def test_scaled_rope_is_shrunk_to_reach_the_scaled_regime_in_the_tiny_tier():
    """The shrink rule itself (independent of what the card schema holds): LongRoPE's per-frequency
    lists resampled to the tiny rotary half-dimension, first and last factors kept; the original
    context 16 tokens (the tiny prompts of 24 cross it); the context ratio kept."""
    from transformers import CONFIG_MAPPING

    long_factor = [1.0 + i for i in range(48)]
    table = {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": long_factor}
    values = dict(num_hidden_layers=32, hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=131072,
                  original_max_position_embeddings=4096, rope_scaling=table)
    cfg = CONFIG_MAPPING["phi3"].from_dict(values)
    real = {**{k: v for k, v in values.items() if k not in ("original_max_position_embeddings", "rope_scaling")},
            "extra": {"original_max_position_embeddings": 4096, "rope_scaling": table}}
    tiny = cardless._tiny(real, cfg)
    head_dim = tiny["hidden_size"] // tiny["num_attention_heads"]
    shrunk = tiny["extra"]["rope_scaling"]
    assert len(shrunk["long_factor"]) == len(shrunk["short_factor"]) == head_dim // 2
    assert shrunk["long_factor"][0] == 1.0 and shrunk["long_factor"][-1] == 48.0 and shrunk["type"] == "longrope"
    assert tiny["extra"]["original_max_position_embeddings"] == 16 < 24
    assert tiny["max_position_embeddings"] == 16 * 32  # 131072 / 4096 kept
    sizes = {k: v for k, v in tiny.items() if k not in ("extra", "seed")}
    model = qeff.from_config("phi3", {**{k: v for k, v in real.items() if k != "extra"}, **sizes, **tiny["extra"]})
    assert model.config.rope_parameters["rope_type"] == "longrope"
