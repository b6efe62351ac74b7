"""``qeff compile --backend qaic --dry-run`` on a safetensors directory (issue 18, item 7): the
streamed export, then the Cloud AI compiler's files, and nothing on the way loads the model or the
graph's weight data.

- the files (command line, specializations, custom IO, the device-group partition, the script, the
  manifest) are those the in-memory route writes for a model that fits;
- a child process's peak anonymous memory above its imports stays a fraction of the model's fp32
  bytes, and a seeded fault (the compile step reading the graph with its external data, as
  ``onnx.load`` does by default) breaks that bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qeff.synthetic import LlamaShape, write_llama
from tests.rss_sampler import SAMPLER

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--backend", "qaic", "--dry-run", "--device_group", "[0,1]", "--mxfp6", "--mos", "2"]
QPC_DIR = "qpc_16cores_1BS_32PL_128CL_2MOS_2devices_mxfp6"
#: The compile directory's files; the last two name the export directory (compared with it replaced).
FILES = ["specializations.json", "custom_io.yaml", "mdp_ts_2.json", "compile.sh", "compile.json"]


def _cli(argv: list[str]) -> int:
    from qeff.cli import main

    return main(argv)


def test_dry_run_writes_the_in_memory_routes_files(tmp_path, monkeypatch, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    import qeff.intake.loading
    from qeff.intake.loading import resolve
    from qeff.pipeline import Pipeline

    ckpt = write_llama(tmp_path / "ckpt", LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                                                    vocab=49152, tied=False))

    def no_load(*args, **kwargs):
        raise AssertionError("the dry run of a safetensors directory must not load the model")

    with monkeypatch.context() as patch:
        patch.setattr(qeff.intake.loading, "load_source", no_load)
        assert _cli(["compile", "-m", str(ckpt), "--home", str(tmp_path / "streamed"), *FLAGS]) == 0
    assert "qaic-exec" in capsys.readouterr().out
    (streamed,) = (tmp_path / "streamed").glob(f"*/export-*/{QPC_DIR}")

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager").eval()
    source = resolve(str(ckpt))
    pipe = Pipeline(str(ckpt), source=source, model=model, identity=source.identity(), home=tmp_path / "memory",
                    progress=False)
    result = pipe.compile("qaic", dry_run=True, batch_size=1, prompt_len=32, ctx_len=128, num_cores=16, num_devices=2,
                          mxfp6=True, mos=2)
    memory = result.out_dir
    assert memory.name == streamed.name
    # One export directory name: the same identity; the homes differ.
    assert streamed.parent.name == memory.parent.name
    for name in FILES:
        a = (streamed / name).read_text().replace(str(tmp_path / "streamed"), "HOME")
        b = (memory / name).read_text().replace(str(tmp_path / "memory"), "HOME")
        assert a == b, name
    spec = json.loads((streamed / "specializations.json").read_text())["specializations"]
    assert [s["seq_len"] for s in spec] == ["32", "1"]
    assert "-mxfp6-matmul" in (streamed / "compile.sh").read_text() and "-mos=2" in (streamed / "compile.sh").read_text()
    assert not (streamed / "qpcs").exists()  # a dry run builds no QPC


# --- peak memory ---------------------------------------------------------------------------------

_CHILD = SAMPLER + textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import torch, onnx, transformers  # every import before the baseline: the ratio is the command's own memory
    import transformers.models.llama.modeling_llama
    import torch.onnx._internal.torchscript_exporter.utils
    import qeff.cli, qeff.exporter, qeff.pipeline, qeff.weights, qeff.compilers, qeff.compilers.qaic
    torch.set_num_threads(1)
    ckpt, home, fault = sys.argv[1], sys.argv[2], sys.argv[3]
    if fault == "load-data":  # seeded: the compile step reads the graph with its weight data
        names = qeff.compilers.qaic.retained_state_names
        def loading_names(path):
            graph = onnx.load(str(path))
            try:
                return names(path)
            finally:
                del graph
        qeff.compilers.qaic.retained_state_names = loading_names
    base = start_sampling()  # anonymous memory (tests/rss_sampler.py)
    code = qeff.cli.main(["compile", "-m", ckpt, "--home", home, *sys.argv[4:]])
    time.sleep(0.01)
    print(json.dumps({"code": code, "base": base, "peak": max(top[0], rss())}))
""")

#: ~221M parameters (885 MB in fp32), untied (SmolLM2 tokenizer: 49152 rows): large enough that a copy of the weights dwarfs the
#: streamed export's fixed cost (~0.25 GB), small enough for a test.
MEMORY_SHAPE = LlamaShape(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=4096, vocab=49152, tied=False)
BOUND = 0.85


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("qaic-mem") / "ckpt"
    write_llama(path, MEMORY_SHAPE, seed=0)
    return path, 4 * MEMORY_SHAPE.parameters


def _peak_ratio(ckpt: Path, home: Path, fp32_bytes: int, fault: str = "none") -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt), str(home), fault, *FLAGS], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["code"] == 0, proc.stderr[-2000:]
    assert list(home.glob(f"*/export-*/{QPC_DIR}/compile.sh")), "the dry run wrote no compile directory"
    return (record["peak"] - record["base"]) / fp32_bytes


def test_dry_run_peak_memory_is_a_fraction_of_the_weights(big_ckpt, tmp_path):
    """No copy of the weights, ever: the export streams them from the files, and the compile step
    reads the graph's structure only (``load_external_data=False``). Any full fp32 copy alone would
    make the ratio at least 1."""
    ckpt, fp32 = big_ckpt
    ratio = _peak_ratio(ckpt, tmp_path / "home", fp32)
    print(f"qaic dry run: peak {ratio:.2f}x the fp32 weights above the imports")
    assert ratio < BOUND, f"the qaic dry run peaked at {ratio:.2f}x the fp32 weights above the baseline"


def test_seeded_fault_reading_the_graph_data_breaks_the_bound(big_ckpt, tmp_path):
    """The guard of the test above: the compile step loading the graph with its external data (the
    fp32 weights, once) is seen above the bound."""
    ckpt, fp32 = big_ckpt
    ratio = _peak_ratio(ckpt, tmp_path / "home", fp32, fault="load-data")
    print(f"qaic dry run reading the graph data (seeded): peak {ratio:.2f}x")
    assert ratio >= BOUND, f"a compile step that loads the weight data peaked at only {ratio:.2f}x"
