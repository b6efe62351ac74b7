"""Cards whose modeling code ships in their hub repository (``[weights] trust_remote_code``).

Jais, ChatGLM2 and Baichuan2 are not in transformers: their ``config.json`` names Python files of
the hub repository (``auto_map``) that transformers imports only under ``trust_remote_code=True``.
That is running someone else's code, so the plugin does it only when the user opts in with
``--qeff-trust-remote-code`` *and* the code is already in the local Hugging Face cache (tests never
download). Otherwise every stage of such a card skips, saying which of the two is missing.

Nothing in this module, nor elsewhere in the plugin, passes ``trust_remote_code=True`` to a loader
unless ``trusted`` is true: :func:`skip_reason` is asked first, and the loaders refuse again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pytest_qeff.cards import Card

__all__ = ["UNTRUSTED", "skip_reason", "code_files", "tiny_model", "full_model"]

UNTRUSTED = "ships its modeling code in its hub repository (trust_remote_code); pass --qeff-trust-remote-code to run it"


def code_files(repo: str, revision: str) -> list[Path] | None:
    """``config.json`` and every Python file its ``auto_map`` names, from the local HF cache; None
    when any of them is missing there."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo, "config.json", revision=revision)
    if not isinstance(config, str):
        return None
    refs: list[str] = []
    for value in json.loads(Path(config).read_text(encoding="utf-8")).get("auto_map", {}).values():
        refs += [v for v in (value if isinstance(value, list) else [value]) if v]
    # "modeling_jais.JAISLMHeadModel", or "other/repo--modeling_x.Cls" for code in another repository.
    modules = sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs if "--" not in ref})
    if not modules:
        return None
    found = [try_to_load_from_cache(repo, m, revision=revision) for m in modules]
    if not all(isinstance(f, str) for f in found):
        return None
    return [Path(config), *(Path(f) for f in found)]


def skip_reason(card: Card, trusted: bool) -> str | None:
    """Why this card's stages cannot run here, or None (also None for every ordinary card)."""
    w = card.weights
    if not w.trust_remote_code:
        return None
    if not trusted:
        return f"{card.id}: {UNTRUSTED}"
    if code_files(w.repo, w.revision) is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        return (
            f"{card.id}: --qeff-trust-remote-code is given, but the modeling code of {w.repo} (revision {w.revision}) "
            f"is not in the Hugging Face cache ({HF_HUB_CACHE}): looked for config.json and the Python files its "
            f"auto_map names; fetch them with `hf download {w.repo} --revision {w.revision}` (tests never download)"
        )
    return None


def _refuse_untrusted(card: Card, trusted: bool) -> None:
    if not (trusted and card.weights.trust_remote_code):
        raise RuntimeError(f"{card.id}: remote code may only run for a trust_remote_code card under --qeff-trust-remote-code")


def tiny_model(card: Card, config: dict[str, Any], seed: int, trusted: bool):
    """The repository's own config class with the tiny overrides, seeded random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    _refuse_untrusted(card, trusted)
    w = card.weights
    cfg = AutoConfig.from_pretrained(w.repo, revision=w.revision, trust_remote_code=True, local_files_only=True, **config)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True, dtype=torch.float32)
    return model.eval()


def full_model(card: Card, trusted: bool):
    """``(model, tokenizer)`` of the real weights, from the local cache only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _refuse_untrusted(card, trusted)
    w = card.weights
    common = {"revision": w.revision, "trust_remote_code": True, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(w.repo, **common)
    model = AutoModelForCausalLM.from_pretrained(w.repo, dtype=torch.float32, attn_implementation="eager", **common)
    return model.eval(), tokenizer
