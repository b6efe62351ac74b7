"""The fused CPU graph built from a safetensors checkpoint's files (issue 18, item 4):
:func:`qeff.compilers.ort_fused_weights.from_safetensors` reads one tensor at a time and never
loads the model, yet must write the same graph and data bytes as the graph built from the
model ``from_pretrained(dtype=float32)`` loads (the untouched reference of the weights' values).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from qeff.compilers import ort_fused_weights as fw
from qeff.compilers.ort_fused import FUSED_GRAPH, write_fused_graph
from qeff.errors import NotStreamableError
from qeff.quant.blocks import rtn_quantize
from qeff.synthetic import LlamaShape, write_llama
from qeff.weights import SafetensorsWeights

CTX = 48
TIED = LlamaShape(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=160, vocab=300, tied=True)
UNTIED = LlamaShape(hidden=64, layers=3, heads=4, kv_heads=4, intermediate=128, vocab=260, tied=False)


def _loaded(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _build(decoder, out: Path) -> dict[str, str]:
    out.mkdir(parents=True)
    write_fused_graph(decoder, out)
    return _digests(out)


@pytest.fixture(scope="module")
def checkpoints(module_tmp):
    root = module_tmp("fused-stream")
    out = {"tied": write_llama(root / "tied", TIED, seed=3, tokenizer=False),
           "untied": write_llama(root / "untied", UNTIED, seed=4, tokenizer=False)}
    # qwen2: q/k/v biases; saved by transformers itself (float32 safetensors).
    from tests.test_ort_fused import fused_model

    fused_model("qwen2").save_pretrained(root / "qwen2")
    out["qwen2"] = root / "qwen2"
    return out


@pytest.mark.parametrize("weights", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("name", ["tied", "untied", "qwen2"])
def test_from_files_is_byte_identical_to_the_loaded_model(checkpoints, tmp_path, name, weights):
    path = checkpoints[name]
    block = 16 if name == "qwen2" else 32  # its hidden size, 112, is not a multiple of 32
    reference = _build(fw.from_hf(_loaded(path), CTX, weights=weights, block_size=block), tmp_path / "hf")
    streamed = _build(fw.from_safetensors(path, CTX, weights=weights, block_size=block), tmp_path / "files")
    assert set(reference) == {FUSED_GRAPH, FUSED_GRAPH + ".data"}
    assert streamed == reference


def _swap_layers(monkeypatch, a: str, b: str) -> None:
    """A seeded fault: the reader hands back one tensor under another's name."""
    get = SafetensorsWeights.get
    monkeypatch.setattr(SafetensorsWeights, "get", lambda self, n: get(self, {a: b, b: a}.get(n, n)))


@pytest.mark.parametrize("fault", ["layer", "head"])
def test_a_swapped_weight_breaks_byte_identity(checkpoints, tmp_path, monkeypatch, fault):
    path = checkpoints["untied"]
    reference = _build(fw.from_hf(_loaded(path), CTX, weights="int4"), tmp_path / "hf")
    if fault == "layer":
        _swap_layers(monkeypatch, "model.layers.1.mlp.gate_proj.weight", "model.layers.2.mlp.gate_proj.weight")
    else:  # the untied head read as the embedding
        get = SafetensorsWeights.get
        monkeypatch.setattr(SafetensorsWeights, "get", lambda self, n: get(self, "model.embed_tokens.weight" if n == "lm_head.weight" else n))
    streamed = _build(fw.from_safetensors(path, CTX, weights="int4"), tmp_path / "files")
    assert streamed[FUSED_GRAPH + ".data"] != reference[FUSED_GRAPH + ".data"]


def test_a_wrong_rotary_base_breaks_byte_identity(checkpoints, tmp_path):
    """The rotary tables come from the config, as from_pretrained reads it."""
    from transformers import AutoConfig

    path = checkpoints["tied"]
    reference = _build(fw.from_hf(_loaded(path), CTX, weights="int8"), tmp_path / "hf")
    config = AutoConfig.from_pretrained(str(path))
    config.rope_parameters = {**config.rope_parameters, "rope_theta": config.rope_parameters["rope_theta"] * 2}
    streamed = _build(fw.from_safetensors(path, CTX, weights="int8", config=config), tmp_path / "files")
    assert streamed[FUSED_GRAPH + ".data"] != reference[FUSED_GRAPH + ".data"]


def test_the_model_is_never_loaded_and_layers_are_read_one_at_a_time(checkpoints, tmp_path, monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("from_safetensors loaded the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    reads: list[str] = []
    get = SafetensorsWeights.get
    live: list[int] = []

    def counting(self, name):
        reads.append(name)
        return get(self, name)

    monkeypatch.setattr(SafetensorsWeights, "get", counting)
    decoder = fw.from_safetensors(checkpoints["tied"], CTX, weights="int4")
    assert not any(".layers." in n for n in reads)  # nothing of a layer read before the builder asks
    make = decoder.layers._make

    def tracked(i):
        live.append(len(decoder.layers._recent))
        return make(i)

    decoder.layers._make = tracked
    write_fused_graph(decoder, tmp_path)
    assert max(live) <= 2  # never more than two layers resident while a third is built
    per_tensor = [n for n in reads if n.endswith("q_proj.weight")]
    assert len(per_tensor) == TIED.layers  # each layer read once


def test_chunked_quantization_is_the_whole_matrix_quantization(monkeypatch):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 64)).astype(np.float32)
    monkeypatch.setattr(fw, "_QUANT_CHUNK_BYTES", 5 * 64 * 4)  # 5 rows at a time, a ragged last chunk
    for bits, name in ((8, "int8"), (4, "int4")):
        whole, chunked = rtn_quantize(w, bits, 32), fw._quantizer(name, 32)(w)
        assert np.array_equal(whole.codes, chunked.codes) and np.array_equal(whole.scales, chunked.scales)
        assert np.array_equal(whole.zero_points, chunked.zero_points) and whole.source == chunked.source
    monkeypatch.setattr(fw, "rtn_quantize", lambda w, b, s: rtn_quantize(w * 1.001, b, s))  # seeded fault
    assert not np.array_equal(rtn_quantize(w, 4, 32).scales, fw._quantizer("int4", 32)(w).scales)


def test_a_checkpoint_without_the_names_is_not_streamable(checkpoints, tmp_path):
    import json
    import shutil

    path = tmp_path / "renamed"
    shutil.copytree(checkpoints["untied"], path)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = UNTIED.layers + 1  # a layer the files do not hold
    (path / "config.json").write_text(json.dumps(config))
    assert "model.layers.3." in (fw.streamable_reason(path) or "")
    with pytest.raises(NotStreamableError, match="model.layers.3"):
        fw.from_safetensors(path, CTX, weights="int4")


# -- qeff infer on a safetensors directory ------------------------------------------------------

SMALL = LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=49152, tied=True)
INFER = ["--weights", "int4", "--no-verify", "--prompt", "My name is", "--generation_len", "4", "--json"]


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """A SmolLM2-tokenizer checkpoint, a fresh cache, and no model load allowed anywhere."""
    import transformers

    import qeff.intake.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QEFF_SKIP_MEMORY_CHECK", raising=False)
    monkeypatch.delenv("QEFF_MEMORY_LIMIT", raising=False)
    monkeypatch.setattr(qeff.intake.loading, "load_source", no_load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    return write_llama(tmp_path / "ckpt", SMALL, seed=5)


def _json(out: str) -> dict:
    import json

    return json.loads(out.strip().splitlines()[-1])


def test_infer_with_int4_builds_from_the_files_and_never_loads_the_model(cli_env, capsys):
    from qeff.cli import main

    assert main(["infer", "-m", str(cli_env), *INFER]) == 0, capsys.readouterr().err
    record = _json(capsys.readouterr().out)
    assert [s["name"] for s in record["stages"]] == ["export", "fused-build", "fused-check", "run"]
    assert record["fused_check"]["ran"] is True and record["fused_check"]["tokens_total"] > 0
    assert "ort-fused-int4" in record["artifact"]


def test_the_guard_trips_when_the_build_takes_the_loaded_model(cli_env, capsys, monkeypatch):
    """The seeded fault for the test above: routed to from_hf, the run must load, and the trap fires."""
    from qeff.cli import main

    monkeypatch.setattr("qeff.cpu_graph.weights_files", lambda pipe, weights: None)
    assert main(["infer", "-m", str(cli_env), *INFER]) == 1
    assert "the model was loaded" in capsys.readouterr().err


def test_a_check_that_cannot_fit_is_said_not_skipped_silently(cli_env, capsys, monkeypatch):
    from qeff.store.artifacts import read_manifest
    from qeff.cli import main

    monkeypatch.setattr("qeff.validation.available_memory", lambda: 64 * 2**20)
    assert main(["infer", "-m", str(cli_env), *INFER, "--skip-memory-check"]) == 0
    captured = capsys.readouterr()
    record = _json(captured.out)
    lines = [x for x in captured.err.splitlines() if "not checked against the portable graph" in x]
    assert len(lines) == 1 and "64.0 MiB is available" in lines[0]
    assert record["fused_check"] == {"ran": False, "reason": lines[0].split("portable graph: ", 1)[1]}
    assert "fused-check" not in [s["name"] for s in record["stages"]]
    manifest = read_manifest(Path(record["artifact"]))
    assert manifest["inputs"]["checked"] is False and manifest["outputs"]["check"]["ran"] is False
