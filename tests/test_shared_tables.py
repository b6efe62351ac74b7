"""One copy of the tensors outside the decoder layers in layer-streamed verification (issue 18).

The untouched HF reference and the transformed candidate are two module trees built from the weight
files (:mod:`qeff.offload`); what lies outside their layers — the vocabulary table above all, 1 GB
in float32 for a 1B — is read once and held by both (:class:`qeff.offload.SharedTables`), and ONNX
Runtime's per-layer check takes the table from that tensor when the exported bytes are the same
(:meth:`qeff.layer_check.Partition.session`). Here:

- the pair shares the tables and computes bit for bit what two private copies compute, and the
  per-layer ONNX Runtime comparison is the same with and without the shared initializers;
- a write into the shared tables (seeded, one ULP of one element: the comparisons cannot see it,
  both sides read the same tensor) fails the verification with ``WeightsChangedError``;
- an export whose table differs from PyTorch's by one row is read from its file and fails the
  check at the embedding; with the byte comparison removed (seeded) it would pass;
- in a child process, streamed verification with ONNX Runtime per layer holds less than 1.45× the
  fp32 weights (RSS, anonymous and file pages, above a warmed-up baseline) on a shape whose table
  is most of its bytes; each copy the old code kept (a second tree's table, ONNX Runtime's own)
  takes it over that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import qeff.layer_check
from qeff.errors import WeightsChangedError
from qeff.layer_check import Partition, check_layers
from qeff.offload import offloaded_pair
from qeff.runtime.torch import TorchSession
from qeff.synthetic import LlamaShape, write_llama
from qeff.verification import hf_trace, session_trace
from tests.rss_sampler import SAMPLER

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

TINY = LlamaShape(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=128, vocab=49152, tied=True)
PROMPTS = [[1, 400, 7000, 9, 11, 3, 40, 2, 77, 5, 12], [4, 2, 8, 900, 31]]
TABLE = "model.model.embed_tokens.weight"  # the table's name in the exported graph (the wrapper's)


def _pipe(tmp_path, home: str = "home"):
    from qeff.memory import Mode
    from qeff.pipeline import Pipeline

    ckpt = tmp_path / "ckpt"
    if not ckpt.exists():
        write_llama(ckpt, TINY, seed=0)
    pipe = Pipeline.open(str(ckpt), home=tmp_path / home, progress=False)
    pipe.verify_mode = Mode(command="verify", streamed=True, verify_layers=True, ort_layers=True)
    return pipe


def _seen_partitions(monkeypatch) -> list[Partition]:
    """Every Partition check_layers makes, kept for the test to read what its sessions shared."""
    made: list[Partition] = []
    partition = qeff.layer_check.partition

    def keep(path):
        made.append(partition(path))
        return made[-1]

    monkeypatch.setattr(qeff.layer_check, "partition", keep)
    return made


def test_the_pair_shares_one_copy_of_the_tables_and_computes_the_same(tmp_path):
    ckpt = write_llama(tmp_path / "ckpt", TINY, seed=0)
    hf, qmodel = offloaded_pair(ckpt)
    table = hf.model.embed_tokens.weight
    assert qmodel.model.model.embed_tokens.weight is table and hf.lm_head.weight is table
    assert hf.model.norm.weight is qmodel.model.model.norm.weight
    assert hf.offload.tables is qmodel.offload.tables and hf.offload.tables.nbytes == table.numel() * 4 + 64 * 4
    apart_hf, apart_q = offloaded_pair(ckpt, share_tables=False)
    assert apart_q.model.model.embed_tokens.weight.data_ptr() != apart_hf.model.embed_tokens.weight.data_ptr()
    ref, tokens = hf_trace(hf, PROMPTS, 4)
    ref2, tokens2 = hf_trace(apart_hf, PROMPTS, 4)
    assert tokens == tokens2 and all(np.array_equal(a, b) for a, b in zip(ref.logits, ref2.logits))
    got = session_trace(TorchSession(qmodel, batch_size=2, ctx_len=32), "pytorch", PROMPTS, tokens, 8)
    got2 = session_trace(TorchSession(apart_q, batch_size=2, ctx_len=32), "pytorch", PROMPTS, tokens, 8)
    assert all(np.array_equal(a, b) for a, b in zip(got.logits, got2.logits))
    hf.offload.tables.check()  # nothing wrote into them


def test_onnx_runtime_per_layer_gives_the_same_verdict_with_the_shared_table(tmp_path, monkeypatch):
    pipe = _pipe(tmp_path)
    pipe.export()
    hf, qmodel = pipe.offloaded
    ref, tokens = hf_trace(hf, PROMPTS, 4)
    made = _seen_partitions(monkeypatch)
    shared = check_layers(pipe.onnx_path, qmodel, PROMPTS, tokens, prompt_len=8, ctx_len=32)
    assert made[-1].shared == [TABLE, TABLE]  # the prefix's Gather and the tied head's Gemm
    monkeypatch.setattr(qeff.layer_check, "resident_tensors", lambda qmodel: {})  # as before: read from the file
    from_file = check_layers(pipe.onnx_path, qmodel, PROMPTS, tokens, prompt_len=8, ctx_len=32)
    assert made[-1].shared == []
    assert shared.passed and shared.to_dict() == from_file.to_dict()
    hf.offload.tables.check()


def _one_ulp_into_the_table(monkeypatch):
    """Seeded: building the candidate writes one ULP into one element of the shared table, before
    the reference runs — the reference and the candidate then both compute with the changed table."""
    import qeff.offload

    build = qeff.offload.offloaded_transformed

    def faulty(*args, **kwargs):
        qmodel = build(*args, **kwargs)
        table = qmodel.model.model.embed_tokens.weight.data
        table[7, 0] = torch.nextafter(table[7, 0], torch.tensor(float("inf")))
        return qmodel

    monkeypatch.setattr(qeff.offload, "offloaded_transformed", faulty)


def test_a_write_into_the_shared_tables_fails_the_verification(tmp_path, monkeypatch):
    _one_ulp_into_the_table(monkeypatch)
    pipe = _pipe(tmp_path)
    # The comparisons alone cannot see it: both sides read the one written tensor.
    report = pipe.verify(PROMPTS, prompt_len=8, ctx_len=32, steps=4, check_tables=False)
    assert report.passed, report.describe()
    with pytest.raises(WeightsChangedError, match="model.embed_tokens.weight"):
        pipe.verify_cached(PROMPTS, prompt_len=8, ctx_len=32, steps=4)
    with pytest.raises(WeightsChangedError):
        pipe.verify(PROMPTS, prompt_len=8, ctx_len=32, steps=4)


def _drift_table_row(onnx_path: Path, row: int) -> None:
    """Scale one row of the exported table in place in the external data file (PyTorch is right)."""
    part = qeff.layer_check.partition(onnx_path)
    tensor = next(t for t in part.model.graph.initializer if t.name == TABLE)
    info = {e.key: e.value for e in tensor.external_data}
    hidden = tensor.dims[1]
    with open(onnx_path.parent / info["location"], "r+b") as f:
        f.seek(int(info.get("offset", 0)) + row * hidden * 4)
        values = np.frombuffer(f.read(hidden * 4), np.float32) * 1.5
        f.seek(int(info.get("offset", 0)) + row * hidden * 4)
        f.write(values.astype(np.float32).tobytes())


def _drifted_check(tmp_path, monkeypatch):
    pipe = _pipe(tmp_path)
    pipe.export()
    onnx_path = tmp_path / "drifted" / "model.onnx"
    onnx_path.parent.mkdir()
    for f in Path(pipe.onnx_path).parent.iterdir():
        if f.name.startswith("model.onnx"):
            onnx_path.with_name(f.name).write_bytes(f.read_bytes())
    _drift_table_row(onnx_path, PROMPTS[0][1])  # a token of the first prompt
    hf, qmodel = pipe.offloaded
    _, tokens = hf_trace(hf, PROMPTS, 4)
    made = _seen_partitions(monkeypatch)
    return check_layers(onnx_path, qmodel, PROMPTS, tokens, prompt_len=8, ctx_len=32), made


def test_an_exported_table_that_differs_is_read_from_its_file_and_fails(tmp_path, monkeypatch):
    comparison, made = _drifted_check(tmp_path, monkeypatch)
    assert made[-1].shared == [] and made[-1].matches == {TABLE: False}
    assert not comparison.passed and any(f.startswith("embedding") for f in comparison.failures), comparison.failures


def test_without_the_byte_comparison_a_drifted_table_would_pass(tmp_path, monkeypatch):
    """Seeded: the sessions take PyTorch's tensor without comparing the stored bytes — ONNX Runtime
    then computes on PyTorch's table, not the exported one, and the drift goes unseen. The byte
    comparison is what keeps the shared route's verdict the exported graph's."""
    monkeypatch.setattr(Partition, "stored_equal", lambda self, name, array: True)
    comparison, made = _drifted_check(tmp_path, monkeypatch)
    assert made[-1].shared == [TABLE, TABLE]
    assert comparison.passed


# --- peak memory -----------------------------------------------------------------------------------

_CHILD = SAMPLER + textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch, onnxruntime, transformers.models.llama.modeling_llama
    import qeff.offload, qeff.layer_check, qeff.verification
    torch.set_num_threads(1)
    ckpt, onnx_path, mode, warm_ckpt, warm_onnx = sys.argv[1:6]
    if mode in ("unshared", "ort-from-file"):  # seeded: ONNX Runtime reads its own copy of the table
        qeff.layer_check.resident_tensors = lambda qmodel: {}
    share = mode not in ("unshared", "private-tables")  # seeded: each tree reads its own tables
    # Warm-up on a tiny model: the library pages this run touches are resident before the baseline.
    wh, wq = qeff.offload.offloaded_pair(warm_ckpt)
    _, wt = qeff.verification.hf_trace(wh, [[1, 2, 3]], 2)
    qeff.layer_check.check_layers(warm_onnx, wq, [[1, 2, 3]], wt, prompt_len=8, ctx_len=32)
    del wh, wq
    # Anonymous and file pages: ONNX Runtime maps an initializer it reads from the data file.
    base = start_sampling(fields=("RssAnon:", "RssFile:"))
    hf, qmodel = qeff.offload.offloaded_pair(Path(ckpt), share_tables=share)
    prompts = [[1, 5, 7, 9, 11, 3, 40, 2], [4, 2, 8]]
    _, tokens = qeff.verification.hf_trace(hf, prompts, 4)
    comparison = qeff.layer_check.check_layers(onnx_path, qmodel, prompts, tokens, prompt_len=8, ctx_len=32)
    hf.offload.tables.check()
    time.sleep(0.01)
    print(json.dumps({"base": base, "peak": max(top[0], rss()), "comparison": comparison.to_dict()}))
""")


def _measure(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_streamed_verification_holds_the_table_once(tmp_path):
    """2 layers of 1024 wide and SmolLM2's 49152-row tied table: 0.27 GB in fp32, of which the
    table is 0.20 GB (0.74 W) and a layer 35 MB. Measured above the baseline: 1.17 W with the table
    shared; 1.80 W with a private copy for each tree, 1.76 W with ONNX Runtime reading its own."""
    from qeff.pipeline import Pipeline

    shape = LlamaShape(hidden=1024, layers=2, heads=16, kv_heads=4, intermediate=2048, vocab=49152, tied=True)
    paths = []
    for name, s in (("ckpt", shape), ("warm", TINY)):
        write_llama(tmp_path / name, s, seed=0)
        pipe = Pipeline.open(str(tmp_path / name), home=tmp_path / f"home-{name}", progress=False)
        pipe.export()
        paths += [str(tmp_path / name), str(pipe.onnx_path)]
    fp32 = 4 * shape.parameters
    runs = {mode: _measure([paths[0], paths[1], mode, paths[2], paths[3]])
            for mode in ("shared", "private-tables", "ort-from-file")}
    ratio = {mode: (r["peak"] - r["base"]) / fp32 for mode, r in runs.items()}
    assert runs["shared"]["comparison"] == runs["private-tables"]["comparison"] == runs["ort-from-file"]["comparison"]
    assert runs["shared"]["comparison"]["passed"]
    # One table is 0.74 W: each extra copy moves the peak by about that much.
    assert ratio["shared"] < 1.45, f"streamed verification held {ratio['shared']:.2f}x the fp32 weights"
    assert ratio["private-tables"] > 1.45, f"a second copy of the tables measured only {ratio['private-tables']:.2f}x"
    assert ratio["ort-from-file"] > 1.45, f"ONNX Runtime's own table measured only {ratio['ort-from-file']:.2f}x"
