"""Cards whose modeling code ships in their hub repository: gated by --qeff-trust-remote-code,
never executed otherwise (issue 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import onnxruntime  # noqa: F401  isort: skip  (see tests/test_plugin.py: extension modules load once)
import qeff  # noqa: F401  isort: skip
import transformers  # isort: skip
import transformers.models.llama.modeling_llama  # noqa: F401  isort: skip

from pytest_qeff.remote import UNTRUSTED

pytest_plugins = ("pytester",)

REMOTE = "jais-13b-chat,chatglm2-6b,baichuan2-7b-chat"


def qeff(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", "--qeff-backend", "ort", "-rs", *args)


@pytest.fixture
def loader_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """Every call of the Hugging Face loaders, with its keyword arguments. ``from_config`` (the tiny
    tier) still builds the model; the ``from_pretrained`` loaders stop there (tests never download)."""
    calls: list[tuple[str, dict]] = []

    def recording(name: str, original=None):
        def fake(*args, **kwargs):
            calls.append((name, kwargs))
            if original is None:
                raise RuntimeError(f"{name} recorded, not run")
            return original(*args, **kwargs)

        return staticmethod(fake)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recording("AutoConfig.from_pretrained"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording("AutoTokenizer.from_pretrained"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording("AutoModelForCausalLM.from_pretrained"))
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_config",
        recording("AutoModelForCausalLM.from_config", transformers.AutoModelForCausalLM.from_config),
    )
    return calls


def _hub_cache(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, repo: str | None = None) -> Path:
    """A Hugging Face cache for this test only (read when the stage asks, in this process); with
    ``repo``, it holds that repository's config.json and the modeling files its auto_map names."""
    import huggingface_hub.constants

    cache = pytester.mkdir("hub-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    if repo:
        snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
        auto_map = {"AutoConfig": "configuration_jais.JAISConfig", "AutoModelForCausalLM": "modeling_jais.JAISLMHeadModel"}
        (snapshot / "config.json").write_text(json.dumps({"model_type": "jais", "auto_map": auto_map}))
        for module in ("configuration_jais.py", "modeling_jais.py"):
            (snapshot / module).write_text("raise RuntimeError('remote code executed')\n")
    return cache


@pytest.mark.parametrize("tier", ["tiny", "full"])
def test_without_the_option_remote_code_cards_skip_and_no_loader_trusts_remote_code(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, loader_calls: list, tier: str
) -> None:
    # The code is even in the cache: only the option may open the gate.
    _hub_cache(pytester, monkeypatch, "core42/jais-13b-chat")
    result = qeff(pytester, "--qeff-model", f"{REMOTE},llama-3-8b", "--qeff-tier", tier, "-m", "qeff_transform or qeff_export")
    ran = 2 if tier == "tiny" else 0  # llama-3-8b: the tiny tier runs; the full tier finds no weights
    result.assert_outcomes(passed=ran, skipped=8 - ran)
    for card in ("jais-13b-chat", "chatglm2-6b", "baichuan2-7b-chat"):
        result.stdout.fnmatch_lines([f"SKIPPED [[]2[]] *: {card}: {UNTRUSTED}"])
    assert UNTRUSTED == "ships its modeling code in its hub repository (trust_remote_code); pass --qeff-trust-remote-code to run it"
    if tier == "tiny":  # the recorder saw the loads that did happen
        assert [name for name, _ in loader_calls] == ["AutoModelForCausalLM.from_config"]
    assert [(name, kw) for name, kw in loader_calls if kw.get("trust_remote_code")] == []


def test_with_the_option_but_no_code_in_the_cache_the_skip_says_where_it_looked(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, loader_calls: list
) -> None:
    cache = _hub_cache(pytester, monkeypatch)
    result = qeff(pytester, "--qeff-model", "chatglm2-6b", "--qeff-trust-remote-code")
    result.assert_outcomes(skipped=5)
    result.stdout.fnmatch_lines([
        f"SKIPPED [[]5[]] *chatglm2-6b: --qeff-trust-remote-code is given, but the modeling code of THUDM/chatglm2-6b "
        f"(revision main) is not in the Hugging Face cache ({cache}): looked for config.json and the Python files its "
        "auto_map names; fetch them with `hf download THUDM/chatglm2-6b --revision main` (tests never download)",
    ])
    assert loader_calls == []


def test_with_the_option_and_the_code_cached_the_loader_is_asked_to_trust_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, loader_calls: list
) -> None:
    """The opted-in path reaches the loader with trust_remote_code=True, offline; the transform
    does not support jais, so every stage is the card's strict known failure."""
    _hub_cache(pytester, monkeypatch, "core42/jais-13b-chat")
    result = qeff(pytester, "--qeff-model", "jais-13b-chat", "--qeff-trust-remote-code")
    result.assert_outcomes(xfailed=5)
    assert loader_calls and all(name == "AutoConfig.from_pretrained" for name, _ in loader_calls)
    assert loader_calls[0][1]["trust_remote_code"] is True and loader_calls[0][1]["local_files_only"] is True


def test_help_says_the_option_executes_hub_code(pytester: pytest.Pytester) -> None:
    out = " ".join(pytester.runpytest("-p", "pytest_qeff.plugin", "--help").stdout.str().split())
    assert "--qeff-trust-remote-code run the cards marked [weights] trust_remote_code" in out
    assert "this executes Python code from the model's hub repository" in out


def test_tiny_only_card_full_tier_skips_with_a_reason(pytester: pytest.Pytester) -> None:
    result = qeff(pytester, "--qeff-model", "tiny-gemma2", "--qeff-tier", "full", "-m", "qeff_transform")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(['SKIPPED*tiny-gemma2: a tiny-tier-only card ([[]weights[]] source = "none"): it names no real weights*'])
