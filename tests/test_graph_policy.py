"""One decision of which graph runs (issue 20): :meth:`qeff.pipeline.Pipeline.compile` with a
:class:`qeff.cpu_graph.CompileTarget`. ``qeff compile``, the Python API and the pytest plugin's
:class:`pytest_qeff.stages.Workspace` must get the same artifact for the same model and options,
and the fused graph's check against the portable graph is a stage of its own whose failure
deletes the graph it judged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qeff.store.artifacts import read_manifest
from qeff.cpu_graph import CompileTarget
from qeff.errors import VerificationError
from qeff.pipeline import Pipeline
from qeff.synthetic import LlamaShape, write_llama
from pytest_qeff.cards import Case
from tests.routes import cli_compile, plugin_compiled

SHAPE = LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=300, tied=False)
BS, PL, CL = 1, 8, 32
OPTIONS = {"batch_size": BS, "prompt_len": PL, "ctx_len": CL}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("graph-policy") / "ckpt", SHAPE, seed=3)


def _cli(home: Path, checkpoint: Path, capsys, *flags: str) -> Path:
    return cli_compile(home, checkpoint, capsys, Case(**OPTIONS), *flags)


def _plugin(home: Path, checkpoint: Path, backend: str) -> Path:
    return plugin_compiled(home, checkpoint, Case(**OPTIONS), backend)


def _three(home: Path, checkpoint: Path, capsys, graph: str) -> dict[str, tuple[Path, dict]]:
    cli = _cli(home, checkpoint, capsys, *(("--ort-graph", "portable") if graph == "portable" else ()))
    api = Pipeline.open(str(checkpoint), home=home).compile(CompileTarget("ort", graph="auto" if graph == "fused" else graph,
                                                                          options=OPTIONS)).path
    plugin = _plugin(home, checkpoint, "ort-fused" if graph == "fused" else "ort")
    return {who: (path, read_manifest(path)["inputs"]) for who, path in (("cli", cli), ("api", api), ("plugin", plugin))}


@pytest.mark.parametrize("graph", ["fused", "portable"])
def test_the_cli_the_api_and_the_plugin_get_one_artifact(checkpoint, tmp_path, capsys, graph):
    found = _three(tmp_path / "home", checkpoint, capsys, graph)
    paths = {who: path for who, (path, _) in found.items()}
    assert len(set(paths.values())) == 1, paths
    assert len({repr(inputs) for _, inputs in found.values()}) == 1
    name = paths["cli"].name
    assert name == (f"ort-fused_{BS}BS_{PL}PL_{CL}CL" if graph == "fused" else f"ort_{BS}BS_{PL}PL_{CL}CL")
    if graph == "portable":  # the backend-name form keeps compiling the portable graph
        assert Pipeline.open(str(checkpoint), home=tmp_path / "home").compile("ort", **OPTIONS).path == paths["cli"]


def test_a_plugin_that_picks_its_own_graph_is_caught(checkpoint, tmp_path, capsys, monkeypatch):
    """Seeded fault for the test above: a plugin deciding the graph itself (here: the portable
    graph for its fused stages) gets another artifact, and the comparison says so."""
    from pytest_qeff.stages import Workspace

    real = Workspace.target
    monkeypatch.setattr(Workspace, "target", lambda self, card, case, backend: real(self, card, case, "ort"))
    found = _three(tmp_path / "home", checkpoint, capsys, "fused")
    assert found["plugin"][0] != found["cli"][0] == found["api"][0]


def _corrupt_attention(monkeypatch) -> None:
    """The fused builder gets one attention output projection 10 % off (the portable graph is untouched)."""
    import qeff.compilers.ort_fused_weights as fused_weights

    real = fused_weights.from_safetensors

    def corrupted(*args, **kwargs):
        weights = real(*args, **kwargs)
        weights.layers[0].o = weights.layers[0].o * np.float32(1.1)
        return weights

    monkeypatch.setattr(fused_weights, "from_safetensors", corrupted)


def test_the_check_is_a_stage_the_caller_runs_and_its_result_is_kept(checkpoint, tmp_path):
    pipe = Pipeline.open(str(checkpoint), home=tmp_path / "home", progress=False)
    target = CompileTarget("ort", graph="fused", options=OPTIONS)
    built = pipe.compile(target, check=False)
    assert not list(built.path.glob("check-*")) and pipe.graph_checks == {}
    result = pipe.check_graph(built, target)
    assert result["passed"] and result["gated"] and result["tokens_matched"] == result["tokens_total"] > 0
    assert pipe.graph_checks[str(built.path)] == result
    (record,) = built.path.glob("check-*/manifest.json")
    assert read_manifest(record.parent)["outputs"]["check"] == result
    again = Pipeline.open(str(checkpoint), home=tmp_path / "home", progress=False)
    assert again.compile(target).path == built.path and again.graph_checks[str(built.path)] == result
    # The portable graph has no such stage.
    assert pipe.check_graph(pipe.compile("ort", **OPTIONS), target) is None


def test_a_fused_graph_that_fails_its_check_is_deleted_not_served(checkpoint, tmp_path, monkeypatch):
    _corrupt_attention(monkeypatch)
    pipe = Pipeline.open(str(checkpoint), home=tmp_path / "home", progress=False)
    target = CompileTarget("ort", graph="fused", options=OPTIONS)
    with pytest.raises(VerificationError, match="differs from the portable graph"):
        pipe.compile(target)
    assert not list(pipe.export_dir.glob("ort-fused*"))
    # Built without its check, the corrupted graph is found by the stage when the caller runs it.
    built = pipe.compile(target, check=False)
    with pytest.raises(VerificationError):
        pipe.check_graph(built, target)
    assert not built.path.exists()


def test_re_quantized_weights_are_measured_not_gated(checkpoint, tmp_path):
    pipe = Pipeline.open(str(checkpoint), home=tmp_path / "home", progress=False)
    target = CompileTarget("ort", graph="fused", weights="int8", options=OPTIONS)
    assert not target.exact
    built = pipe.compile(target)
    assert built.path.name == f"ort-fused-int8_{BS}BS_{PL}PL_{CL}CL"
    assert pipe.graph_checks[str(built.path)]["gated"] is False


def test_options_beside_a_target_are_refused(checkpoint, tmp_path):
    from qeff.errors import UsageError

    pipe = Pipeline.open(str(checkpoint), home=tmp_path / "home", progress=False)
    with pytest.raises(UsageError, match="ctx_len"):
        pipe.compile(CompileTarget("ort", options=OPTIONS), ctx_len=64)
