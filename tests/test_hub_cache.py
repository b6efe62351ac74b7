"""Hub repo ids found in the local Hugging Face cache (issue 18, item 7): :func:`qeff.synthetic.hub_cache`
lays a checkpoint out as ``models--org--name/{blobs,refs,snapshots}`` without copying it, the real
hub-loading code reads it offline, and :class:`qeff.pipeline.Pipeline` streams the export of a
cached repo from its snapshot directory as it does a local directory (the model is never loaded).
"""

from __future__ import annotations

import os

import pytest
import torch

import qeff.intake.loading
from qeff.intake.loading import files_dir, load_source, resolve
from qeff.pipeline import Pipeline
from qeff.synthetic import LlamaShape, hub_cache, write_llama

REPO_ID = "acme/tiny-llama"
#: SmolLM2's tokenizer has 49152 ids: the vocabulary holds them all.
SHAPE = LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=49152, tied=False)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """(checkpoint dir, cache dir, snapshot dir) of a small synthetic Llama laid out as REPO_ID."""
    root = tmp_path_factory.mktemp("hub")
    ckpt = write_llama(root / "ckpt", SHAPE, seed=0)
    snapshot = hub_cache(ckpt, REPO_ID, root / "cache")
    return ckpt, root / "cache", snapshot


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_cache_holds_links_not_copies(cached):
    ckpt, cache, snapshot = cached
    weights = snapshot / "model.safetensors"
    assert weights.is_symlink() and not os.path.isabs(os.readlink(weights))  # as the hub writes them
    blob = weights.resolve()
    assert blob.parent.name == "blobs" and os.path.samefile(blob, ckpt / "model.safetensors")  # a hard link
    assert (cache / "models--acme--tiny-llama" / "refs" / "main").read_text() == snapshot.name
    assert hub_cache(ckpt, REPO_ID, cache) == snapshot  # the same files: the same snapshot, nothing rewritten


def test_huggingface_hub_reads_the_layout(cached, offline):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    ckpt, cache, snapshot = cached
    assert try_to_load_from_cache(REPO_ID, "model.safetensors", cache_dir=cache) == str(snapshot / "model.safetensors")
    (repo,) = [r for r in scan_cache_dir(cache).repos if r.repo_id == REPO_ID]
    assert {rev.commit_hash for rev in repo.revisions} == {snapshot.name}
    assert {f.file_name for rev in repo.revisions for f in rev.files} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_a_cached_repo_resolves_to_its_snapshot(cached, offline):
    _, cache, snapshot = cached
    source = resolve(REPO_ID, cache_dir=str(cache))
    assert source.kind == "hub" and source.repo_id == REPO_ID
    assert files_dir(source, cache_dir=str(cache)) == snapshot
    # The content identity of a hub source stays what it was: the repo and revision, no file digest.
    assert source.identity() == {"name": REPO_ID, "kind": "hub", "repo_id": REPO_ID, "revision": "main"}
    assert files_dir(resolve(REPO_ID, cache_dir=str(cache)), cache_dir=str(cache / "elsewhere")) is None


def test_a_snapshot_missing_a_shard_is_not_streamed(tmp_path, offline):
    ckpt = write_llama(tmp_path / "ckpt", SHAPE, seed=0, tokenizer=False)
    (ckpt / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}')
    hub_cache(ckpt, REPO_ID, tmp_path / "cache")
    assert files_dir(resolve(REPO_ID, cache_dir=str(tmp_path / "cache")), cache_dir=str(tmp_path / "cache")) is None


def test_hub_loading_reads_the_same_weights_as_the_directory(cached, offline):
    ckpt, cache, _ = cached
    hub, hub_tok = load_source(resolve(REPO_ID, cache_dir=str(cache)), cache_dir=str(cache))
    local, local_tok = load_source(resolve(str(ckpt)))
    a, b = hub.state_dict(), local.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert hub_tok("My name is")["input_ids"] == local_tok("My name is")["input_ids"]


def test_a_cached_hub_repo_is_exported_without_loading_the_model(cached, offline, tmp_path, monkeypatch):
    ckpt, cache, _ = cached

    def no_load(*args, **kwargs):
        raise AssertionError("the streamed export of a cached hub repo must not load the model")

    local = Pipeline.open(str(ckpt), home=tmp_path / "local", progress=False).export()
    monkeypatch.setattr(qeff.intake.loading, "load_source", no_load)
    pipe = Pipeline.open(REPO_ID, cache_dir=str(cache), home=tmp_path / "hub", progress=False)
    built = pipe.export()
    assert (built.path / "model.onnx.data").read_bytes() == (local.path / "model.onnx.data").read_bytes()
    assert _graph(built.path) == _graph(local.path)  # the graph; the metadata names the model as typed
    assert _facts(built.manifest) == _facts(local.manifest)  # weight digest, config, parameter count
    assert pipe.tokenizer("My name is")["input_ids"] == local_tokens(ckpt)


def _facts(manifest: dict) -> dict:
    """The export's outputs less what names the model as typed (the path or repo id in the config
    and the graph's metadata, whose length the byte count includes)."""
    out = {k: v for k, v in manifest["outputs"].items() if k != "onnx_bytes"}
    out["config"] = {k: v for k, v in out["config"].items() if k != "_name_or_path"}
    return out


def _graph(export_dir) -> bytes:
    import onnx

    return onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph.SerializeToString()


def local_tokens(ckpt) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))("My name is")["input_ids"]


def test_seeded_fault_a_hub_repo_not_found_on_disk_loads_the_model(cached, offline, tmp_path, monkeypatch):
    """The guard of the test above: were the snapshot not found (the pre-issue-18 rule, local
    directories only), the export would load the model — and the trap says so."""
    _, cache, _ = cached
    monkeypatch.setattr(qeff.intake.loading, "files_dir", lambda source, **kw: source.path if source.kind == "local" else None)

    def no_load(*args, **kwargs):
        raise AssertionError("loaded")

    monkeypatch.setattr(qeff.intake.loading, "load_source", no_load)
    with pytest.raises(AssertionError, match="loaded"):
        Pipeline.open(REPO_ID, cache_dir=str(cache), home=tmp_path / "hub", progress=False).export()
