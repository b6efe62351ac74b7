"""The plugin's full tier from a Hugging Face–style cache (issue 18, item 7): ``python -m pytest
--qeff-model CARD --qeff-tier full --device-group 0,1`` in a child process, offline, the card's
weights a hub repo id laid out by :func:`qeff.synthetic.hub_cache` from a synthetic checkpoint.

- a model that fits: every ONNX Runtime stage passes against HF (the model is loaded lazily, once
  a stage needs it), the qaic stages skip without the SDK, and compile's dry run wrote the
  compiler's files over the two-device group;
- a model that does not fit (``QEFF_MEMORY_LIMIT`` below what loading it costs, above what the
  streamed export costs): the model is never loaded — a trap on the loader would fail a stage —
  the export is streamed from the cache, the stages that need the whole model skip with the
  memory preflight's sentence, and the child's anonymous memory stays a fraction of the fp32 weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qeff.synthetic import LlamaShape, hub_cache, write_llama
from tests.rss_sampler import SAMPLER

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "acme/llama-under-test"

#: SmolLM2's tokenizer (49152 ids) comes with write_llama, so the vocabulary holds them all.
SMALL = LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=49152, tied=False)
#: 221M parameters, 0.88 GB in fp32: loading it is priced at ~2.4 GB, its streamed export ~1.4 GB.
LARGE = LlamaShape(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=4096, vocab=49152, tied=False)
LIMIT = "2G"

_CARD = """\
id = "{id}"
name = "Synthetic Llama from a hub cache"
architecture = "llama"
description = "A seeded random Llama checkpoint laid out as a hub repo in a local cache (tests only)."

[weights]
source = "hub"
repo = "{repo}"
revision = "main"

[config]
num_hidden_layers = {layers}
hidden_size = {hidden}
intermediate_size = {intermediate}
num_attention_heads = {heads}
num_key_value_heads = {kv_heads}
vocab_size = {vocab}
max_position_embeddings = 8192
rope_theta = 500000.0
rms_norm_eps = 1e-05
tie_word_embeddings = false
bos_token_id = 1
eos_token_id = 2

[tiny]
num_hidden_layers = 2
hidden_size = 64
intermediate_size = 128
num_attention_heads = {tiny_heads}
num_key_value_heads = 2
vocab_size = 256

[compile]
batch_size = 1
prompt_len = 16
ctx_len = 64
mxfp6 = true
mos = 2

[prompts]
text = ["My name is"]
tiny_lengths = [9]
generation_len = 4

[benchmark]
generation_len = 8
warmup = 0
repeats = 1
threads = 1
"""

_CHILD = SAMPLER + textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import torch, onnx, onnxruntime, transformers, pytest  # before the baseline
    import transformers.models.llama.modeling_llama
    import torch.onnx._internal.torchscript_exporter.utils
    import qeff.cli, qeff.exporter, qeff.pipeline, qeff.weights, qeff.verification, qeff.intake.loading
    import pytest_qeff.plugin, pytest_qeff.stages
    out, trap = Path(sys.argv[1]), sys.argv[2] == "trap"
    if trap:  # the model must never be loaded whole: a stage that tries fails
        def refuse(*args, **kwargs):
            raise AssertionError("the model was loaded whole")
        qeff.intake.loading.load_source = refuse
    base = start_sampling(0.005)  # anonymous memory (tests/rss_sampler.py)
    code = pytest.main(sys.argv[3:])
    out.write_text(json.dumps({"code": int(code), "base": base, "peak": max(top[0], rss())}))
""")


def _card_id(shape: LlamaShape) -> str:
    return f"hub-llama-{shape.hidden}"


def _setup(root: Path, shape: LlamaShape) -> tuple[Path, Path]:
    """(cards dir, HF cache) for ``shape``."""
    ckpt = write_llama(root / "ckpt", shape, seed=0)
    hub_cache(ckpt, REPO_ID, root / "hub")
    cards = root / "cards"
    cards.mkdir()
    card_id = _card_id(shape)
    (cards / f"{card_id}.toml").write_text(_CARD.format(
        id=card_id, repo=REPO_ID, tiny_heads=2 * shape.heads // shape.kv_heads, **{
            k: getattr(shape, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")}))
    return cards, root / "hub"


def _run(root: Path, shape: LlamaShape, *, env: dict[str, str], trap: bool, extra: tuple[str, ...] = ()) -> tuple[dict, dict[tuple, dict]]:
    cards, hub = _setup(root, shape)
    argv = ["-p", "no:cacheprovider", "--qeff-cards-dir", str(cards), "--qeff-model", _card_id(shape), "--qeff-tier",
            "full", "--device-group", "0,1", "--qeff-report", str(root / "report"), "-q", "-rs", *extra]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(hub),
                "HF_HUB_OFFLINE": "1", "QEFF_HOME": str(root / "home"), **env}
    full_env.pop("QEFF_SKIP_MEMORY_CHECK", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root / "rss.json"), "trap" if trap else "none", *argv],
                          capture_output=True, text=True, env=full_env, cwd=root, timeout=1200)
    assert (root / "rss.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rss = json.loads((root / "rss.json").read_text())
    records = json.loads((root / "report" / "results.json").read_text())["records"]
    by = {(r["stage"], r["backend"]): r for r in records}
    assert rss["code"] in (0, 1), proc.stdout[-3000:]
    return rss | {"stdout": proc.stdout}, by


def test_full_tier_from_a_hub_cache_runs_every_stage(tmp_path):
    rss, by = _run(tmp_path, SMALL, env={}, trap=False)
    outcomes = {key: r["outcome"] for key, r in by.items()}
    assert outcomes == {
        ("transform", None): "passed", ("export", None): "passed",
        ("compile", "ort"): "passed", ("generation", "ort"): "passed", ("benchmark", "ort"): "passed",
        ("compile", "qaic"): "skipped", ("generation", "qaic"): "skipped", ("benchmark", "qaic"): "skipped",
    }, rss["stdout"][-3000:]
    assert rss["code"] == 0
    transform = by[("transform", None)]["data"]
    assert transform["config_mismatches"] == [] and transform["model"]["parameters"] == SMALL.parameters
    # compile's dry run over the device group: the compiler's files, no QPC.
    assert "dry run: the compiler's files are in" in by[("compile", "qaic")]["message"]
    (qpc,) = (tmp_path / "home").rglob("qpc_16cores_1BS_16PL_64CL_2MOS_2devices_mxfp6")
    assert {p.name for p in qpc.iterdir()} >= {"specializations.json", "custom_io.yaml", "mdp_ts_2.json", "compile.sh"}
    assert "-mxfp6-matmul" in (qpc / "compile.sh").read_text() and not (qpc / "qpcs").exists()


def test_full_tier_certifies_the_fused_graph_beside_the_portable_one(tmp_path):
    """--qeff-graph all on real (synthetic) weights from a hub cache: the fused graph, built from
    the weight files, gets its own compile verdict against HF eager, generation and benchmark."""
    rss, by = _run(tmp_path, SMALL, env={}, trap=False, extra=("--qeff-backend", "ort", "--qeff-graph", "all"))
    outcomes = {key: r["outcome"] for key, r in by.items()}
    assert outcomes == {
        ("transform", None): "passed", ("export", None): "passed",
        ("compile", "ort"): "passed", ("generation", "ort"): "passed", ("benchmark", "ort"): "passed",
        ("compile", "ort-fused"): "passed", ("generation", "ort-fused"): "passed", ("benchmark", "ort-fused"): "passed",
    }, rss["stdout"][-3000:]
    fused = by[("compile", "ort-fused")]["data"]
    assert fused["hf_vs_graph"]["reference"] == "hf" and fused["hf_vs_graph"]["passed"]
    assert fused["artifact"]["name"] == "ort-fused_1BS_16PL_64CL" and fused["graph_check"]["passed"]
    assert "ort 3/3" in rss["stdout"] and "ort-fused 3/3" in rss["stdout"]


def test_full_tier_of_a_model_that_does_not_fit_never_loads_it(tmp_path):
    rss, by = _run(tmp_path, LARGE, env={"QEFF_MEMORY_LIMIT": LIMIT}, trap=True)
    outcomes = {key: r["outcome"] for key, r in by.items()}
    # HF vs transformed PyTorch may run once verification streams layer by layer (Pipeline.verify
    # chooses, and the preflight prices it), and so may the export stage's check of the graph one
    # decoder layer at a time (since the reference and the candidate share the vocabulary tables it
    # fits 2 GB); every stage that runs the whole portable graph in ONNX Runtime (~3.1x the weights
    # for its optimiser) cannot fit 2 GB and skips.
    assert outcomes.pop(("transform", None)) in ("skipped", "passed"), rss["stdout"][-3000:]
    export = outcomes.pop(("export", None))
    assert export in ("skipped", "passed"), rss["stdout"][-3000:]
    assert outcomes == {key: "skipped" for key in outcomes} and len(outcomes) == 6, rss["stdout"][-3000:]
    if export == "passed":  # then it is the per-layer check, and it found nothing wrong
        comparison = by[("export", None)]["data"]["comparison"]
        assert comparison["candidate"] == "ort" and comparison["failures"] == [] and comparison["tokens_total"] > 0
    for key in (("transform", None), ("export", None), ("compile", "ort"), ("generation", "ort"), ("benchmark", "ort")):
        if by[key]["outcome"] == "passed":
            continue
        message = by[key]["message"]
        assert "cannot run in the memory available here" in message and "would need about" in message, (key, message)
        assert "QEFF_MEMORY_LIMIT" in message or "2.0 GiB" in message, message
    # The export ran, streamed from the cache (the loader is a trap), and the dry run used it.
    assert export == "passed" or "exported graph" in by[("export", None)]["message"]
    assert list((tmp_path / "home").rglob("export-*/model.onnx.data"))
    assert "dry run: the compiler's files are in" in by[("compile", "qaic")]["message"]
    fp32 = 4 * LARGE.parameters
    ratio = (rss["peak"] - rss["base"]) / fp32
    print(f"full tier, {LIMIT} budget: peak {ratio:.2f}x the fp32 weights above the imports")
    if export == "passed":  # the per-layer check ran: the next test's bound (tables, a few layers)
        assert rss["peak"] - rss["base"] < _per_layer_bound(), f"the full tier peaked at {ratio:.2f}x the fp32 weights"
    else:
        assert ratio < 0.85, f"the full tier peaked at {ratio:.2f}x the fp32 weights: something held them"


def _per_layer_bound() -> float:
    """What a full tier checking ONNX Runtime one decoder layer at a time may hold above its imports:
    both vocabulary tables twice (PyTorch's copy and ONNX Runtime's own copy of the untied head, which
    the export stores transposed), four decoder layers and 300 MB; the layers held whole would pass it."""
    table = 4 * LARGE.vocab * LARGE.hidden
    layer = (4 * LARGE.parameters - 2 * table) / LARGE.layers
    return 2 * 2 * table + 4 * layer + 300e6


def test_full_tier_checks_onnx_runtime_layer_by_layer_when_the_whole_graph_does_not_fit(tmp_path):
    """A budget that holds the layer-streamed verification (asked for: QEFF_STREAMED_VERIFY=1) but
    not ONNX Runtime's session over the whole portable graph: the transform stage verifies layer
    by layer and the export stage checks the exported graph one decoder layer's sub-graph at a
    time (qeff.layer_check) instead of skipping; the model is never loaded (the loader is a trap)."""
    rss, by = _run(tmp_path, LARGE, env={"QEFF_MEMORY_LIMIT": "2.6G", "QEFF_STREAMED_VERIFY": "1"}, trap=True)
    outcomes = {key: r["outcome"] for key, r in by.items()}
    assert outcomes[("transform", None)] == "passed" and outcomes[("export", None)] == "passed", rss["stdout"][-3000:]
    assert {outcomes[("compile", "ort")], outcomes[("generation", "ort")], outcomes[("benchmark", "ort")]} == {"skipped"}
    comparison = by[("export", None)]["data"]["comparison"]
    assert comparison["failures"] == [] and comparison["tokens_total"] > 0
    assert comparison["reference"] == "pytorch" and comparison["candidate"] == "ort"
    # This shape's two vocabulary tables are 46 % of its weights (a 7B's: 4 %).
    table = 4 * LARGE.vocab * LARGE.hidden
    held = rss["peak"] - rss["base"]
    print(f"full tier, per-layer ONNX Runtime: peak {held / 2**30:.2f} GiB above the imports "
          f"({held / (4 * LARGE.parameters):.2f}x the fp32 weights; tables {2 * table / 2**30:.2f} GiB)")
    assert held < _per_layer_bound(), f"the full tier held {held / 2**30:.2f} GiB: more than a layer at a time"


def test_facts_from_the_files_equal_the_loaded_models(tmp_path, monkeypatch):
    """What the full tier records while the model is not in memory (config.json and the weight
    headers) is what it records from the loaded model."""
    from pytest_qeff.cards import load_cards
    from pytest_qeff.stages import Workspace
    from qeff.pipeline import Pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cards, hub = _setup(tmp_path, SMALL)
    card = load_cards(cards)[_card_id(SMALL)]
    ws = Workspace(root=tmp_path / "ws", tier="full", device_group=(0, 1), baseline_dir=tmp_path, default_baseline_dir=tmp_path)
    pipe = Pipeline.open(REPO_ID, cache_dir=str(hub), home=tmp_path / "ws", progress=False)
    ws._pipelines[card.id] = pipe
    config, facts = ws.facts(card)
    assert not pipe.model_loaded
    _ = pipe.model
    loaded_config, loaded_facts = ws.facts(card)
    assert facts == loaded_facts and facts.parameters == SMALL.parameters
    # The same config but for what loading sets (the dtype it loaded in, the name it was given).
    drop = ("dtype", "_name_or_path")
    assert ({k: v for k, v in config.to_dict().items() if k not in drop}
            == {k: v for k, v in loaded_config.to_dict().items() if k not in drop})
