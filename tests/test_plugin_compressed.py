"""The graph axis's compressed weights (issue 20, item 2): the fused CPU graph with the weights
``qeff infer --backend ort --weights native|int8|int4 [--int8-activations]`` builds, certified by
the plugin against HF fp32 on the untouched model within the card's ``[cpu_weights]`` budget,
benchmarked, and shown beside the portable and fused-fp32 graphs. The plugin builds the very
artifact the CLI builds, and seeded faults in the quantized weights (or in the verdict itself)
turn the verdict red."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Inner runs happen in this process (see tests/test_plugin.py): import the extension modules once.
import onnx  # noqa: F401  isort: skip
import onnxruntime  # noqa: F401  isort: skip
import qeff  # noqa: F401  isort: skip
import qeff.exporter  # noqa: F401  isort: skip
import qeff.pipeline  # noqa: F401  isort: skip
import qeff.verification  # noqa: F401  isort: skip
import qeff.compilers.ort_fused_weights  # noqa: F401  isort: skip
import qeff.cpu_graph  # noqa: F401  isort: skip
import tokenizers  # noqa: F401  isort: skip
import transformers.models.llama.modeling_llama  # noqa: F401  isort: skip

from pytest_qeff.cards import default_cards_dir, load_cards
from pytest_qeff.collect import COMPRESSED, split_backend, weight_mode
from qeff.store.artifacts import read_manifest
from qeff.synthetic import LlamaShape, write_llama
from pytest_qeff.cards import Case
from tests.routes import cli_compile, plugin_compiled

pytest_plugins = ("pytester",)

CARD = "smollm2-135m"  # budgets compressed weights in its tiny tier (and its GGUF's full tier)
CASE = f"{CARD}-bs1-pl32-cl128"


def qeff_run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", *args)


def _ids(result: pytest.RunResult) -> list[str]:
    return [line.split("::")[1] for line in result.outlines if "::" in line]


def _records(pytester: pytest.Pytester) -> list[dict]:
    return json.loads((pytester.path / "out" / "results.json").read_text())["records"]


# --- selection -------------------------------------------------------------------------------------


def test_backend_values_of_the_compressed_modes() -> None:
    assert COMPRESSED == ("ort-fused-native", "ort-fused-int8", "ort-fused-int4", "ort-fused-int8-a8")
    assert [split_backend(b) for b in COMPRESSED] == [("ort", "fused")] * 4
    assert [weight_mode(b) for b in (*COMPRESSED, "ort-fused", "ort", "qaic", None)] == \
        ["native", "int8", "int4", "int8-a8", None, None, None, None]


def test_compressed_graphs_are_selected_by_the_graph_axis(pytester: pytest.Pytester) -> None:
    alone = _ids(qeff_run(pytester, "--qeff-model", CARD, "--qeff-graph", "compressed", "--collect-only", "-q"))
    staged = [i for i in alone if "-ort" in i]
    assert staged == [f"{test}[{CASE}-{b}]" for test in ("test_compile", "test_benchmark") for b in COMPRESSED]
    assert not [i for i in alone if i.startswith("test_greedy_generation")]  # budgets judge them, not greedy equality
    every = _ids(qeff_run(pytester, "--qeff-model", CARD, "--qeff-graph", "all", "--collect-only", "-q"))
    assert [i for i in every if i.startswith(f"test_compile[{CASE}-")] == \
        [f"test_compile[{CASE}-{b}]" for b in ("ort", "ort-fused", *COMPRESSED, "qaic")]
    marked = _ids(qeff_run(pytester, "--qeff-model", CARD, "--qeff-graph", "all", "-m", "qeff_compressed", "--collect-only", "-q"))
    assert set(marked) == set(staged)
    fused = _ids(qeff_run(pytester, "--qeff-model", CARD, "--qeff-graph", "all", "-m", "qeff_fused", "--collect-only", "-q"))
    assert fused and all(i.endswith("-ort-fused]") for i in fused)  # qeff_fused stays the fp32 fused graph


def test_a_card_without_budgets_gets_no_compressed_tests(pytester: pytest.Pytester) -> None:
    ids = _ids(qeff_run(pytester, "--qeff-model", "llama-3-8b", "--qeff-graph", "compressed", "--collect-only", "-q"))
    assert ids and not [i for i in ids if "ort-fused" in i]


def test_compressed_graphs_on_cloud_ai_are_a_usage_error(pytester: pytest.Pytester) -> None:
    result = qeff_run(pytester, "--qeff-model", CARD, "--qeff-backend", "qaic", "--qeff-graph", "compressed", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--qeff-graph compressed: the fused graph is ONNX Runtime's*"])


# --- the card's budgets ------------------------------------------------------------------------------


def _card_with(tmp_path: Path, card: str, extra: str) -> Path:
    text = (default_cards_dir() / f"{card}.toml").read_text()
    (tmp_path / f"{card}.toml").write_text(text + "\n" + extra)
    return tmp_path


BUDGET = "kld_mean = 1e-3\nkld_p99 = 1e-2\ntop1_agree = 0.9\nppl_delta = 0.01\n"


@pytest.mark.parametrize("card, section, error", [
    ("smollm2-135m", "[cpu_weights.tiny.native]", "tiny.native: the tiny tier's seeded random weights are no GGUF"),
    ("llama-3-8b", "[cpu_weights.full.native]", "`native` re-encodes a GGUF's own blocks, and this card's [weights] source is 'hub'"),
    ("llama-3-8b", "[cpu_weights.tiny.int3]", "int3"),
])
def test_budgets_that_cannot_apply_are_refused(tmp_path: Path, card: str, section: str, error: str) -> None:
    text = (default_cards_dir() / f"{card}.toml").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("[cpu_weights.tiny.native]"))
    (tmp_path / f"{card}.toml").write_text(text + "\n\n" + section + "\n" + BUDGET)
    with pytest.raises(pytest.UsageError, match="cpu_weights") as exc:
        load_cards(tmp_path)
    assert error in str(exc.value)


def test_shipped_budgets_are_measured_and_cover_the_gguf_card() -> None:
    cards = load_cards(default_cards_dir())
    smol = cards[CARD].cpu_weights
    assert set(smol.tiny) == {"int8", "int4", "int8-a8"} and set(smol.full) == {"native", "int8", "int4", "int8-a8"}
    budgeted = [c for c in cards.values() if c.cpu_weights.tiny or c.cpu_weights.full]
    assert all(c.architecture in ("llama", "mistral", "qwen2") for c in budgeted)  # what the fused graph covers
    text = (default_cards_dir() / f"{CARD}.toml").read_text()
    assert text.count("# measured KLD mean") == len(smol.tiny) + len(smol.full)  # each budget says what it was set from
    for tier in (smol.tiny, smol.full):  # int4 costs more than int8: the budgets keep that order
        assert tier["int4"].kld_mean > tier["int8"].kld_mean


def test_every_card_the_fused_graph_covers_budgets_its_tiny_tier() -> None:
    """What a user can build for a card is certified for it: every card whose tiny shape the fused
    graph covers (qeff.compilers.ort_fused.unsupported_reason, the rule the stages skip by) budgets
    the three re-quantized modes in its tiny tier, each written beside what it was measured at
    (benchmarks/cpu_weight_budgets.py). llama-3-8b is kept without, the example of a card with none."""
    from types import SimpleNamespace

    from qeff.compilers.ort_fused import unsupported_reason

    cards = load_cards(default_cards_dir())
    covered = [c for c in cards.values() if c.id != "llama-3-8b" and unsupported_reason(
        SimpleNamespace(**{"model_type": c.architecture, **c.tiny_config().hf_config()})) is None]
    assert len(covered) >= 10
    missing = [c.id for c in covered if set(c.cpu_weights.tiny) != {"int8", "int4", "int8-a8"}]
    assert missing == []
    for card in covered:
        text = (default_cards_dir() / f"{card.id}.toml").read_text()
        assert text.count("# measured KLD mean") == len(card.cpu_weights.tiny) + len(card.cpu_weights.full), card.id
        assert card.cpu_weights.tiny["int4"].kld_mean > card.cpu_weights.tiny["int8"].kld_mean, card.id


# --- one artifact: the CLI's -------------------------------------------------------------------------

SHAPE = LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=300, tied=False)
BS, PL, CL = 1, 8, 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("compressed") / "ckpt", SHAPE, seed=5)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """One qeff home for the module: one export, each mode's artifact beside it."""
    return tmp_path_factory.mktemp("compressed-home")


def _cli(home: Path, checkpoint: Path, capsys, *flags: str) -> Path:
    return cli_compile(home, checkpoint, capsys, Case(batch_size=BS, prompt_len=PL, ctx_len=CL), *flags)


def _plugin(home: Path, checkpoint: Path, backend: str) -> Path:
    return plugin_compiled(home, checkpoint, Case(batch_size=BS, prompt_len=PL, ctx_len=CL), backend)


FLAGS = {"int8": ("--weights", "int8"), "int4": ("--weights", "int4"), "int8-a8": ("--weights", "int8", "--int8-activations")}


@pytest.mark.parametrize("mode", list(FLAGS))
def test_the_plugin_builds_the_clis_artifact_for_each_mode(checkpoint, home, capsys, mode):
    cli = _cli(home, checkpoint, capsys, *FLAGS[mode])
    plugin = _plugin(home, checkpoint, f"ort-fused-{mode}")
    assert plugin == cli and read_manifest(plugin)["inputs"] == read_manifest(cli)["inputs"]
    inputs = read_manifest(cli)["inputs"]
    assert inputs["weights"] == FLAGS[mode][1] and inputs["graph"] == "fused"
    assert cli.name == f"ort-fused-{mode}_{BS}BS_{PL}PL_{CL}CL"  # not the fp32 fused graph's ort-fused_1BS_8PL_32CL


def test_a_plugin_that_drops_the_weights_mode_is_caught(checkpoint, home, capsys, monkeypatch):
    """Seeded fault for the test above: a plugin building fp32 weights for a compressed stage."""
    from pytest_qeff.stages import Workspace

    real = Workspace.target
    monkeypatch.setattr(Workspace, "target", lambda self, card, case, backend: real(self, card, case, "ort-fused"))
    cli = _cli(home, checkpoint, capsys, *FLAGS["int4"])
    assert _plugin(home, checkpoint, "ort-fused-int4") != cli


# --- the verdict, the benchmark, the report -----------------------------------------------------------


def test_a_compressed_graph_gets_its_budget_verdict_speed_and_report(pytester: pytest.Pytester) -> None:
    result = qeff_run(pytester, "--qeff-model", CARD, "--qeff-backend", "ort", "--qeff-graph", "compressed",
                      "-k", "int4 or native", "--qeff-report", "out", "--benchmark-disable")
    result.assert_outcomes(passed=2, skipped=2)
    records = {(r["stage"], r["backend"]): r for r in _records(pytester) if r["backend"]}
    native = records[("compile", "ort-fused-native")]
    assert native["outcome"] == "skipped" and "native weights apply to a GGUF's own blocks" in native["message"]
    compiled = records[("compile", "ort-fused-int4")]
    assert compiled["graph"] == "fused" and compiled["weights"] == "int4"
    data = compiled["data"]
    assert data["weights"] == "int4" and data["hf_vs_graph"] is None  # judged by the budget, against HF fp32
    verdict = data["budget"]
    assert verdict["result"]["tier"] == "int4" and verdict["result"]["failures"] == [] and verdict["logits_max_abs"] > 0
    assert verdict["result"]["positions"] == verdict["rows"] * verdict["window"] == 128
    assert verdict["result"]["emulation"]["artifact"] == data["artifact"]["name"] != "ort-fused_1BS_32PL_128CL"
    assert data["graph_check"]["gated"] is False  # the build's own check only measures re-quantized weights
    bench = records[("benchmark", "ort-fused-int4")]["data"]
    assert bench["figures"]["decode_tok_s"] > 0 and bench["baseline"]["file"].endswith("ort-fused-int4/smollm2-135m.json")
    assert "--qeff-graph compressed -k ort-fused-int4" in bench["baseline"]["command"]
    result.stdout.fnmatch_lines(["*ort-fused-int4 2/2 *tok/s*"])
    page = (pytester.path / "out" / "cards" / f"{CARD}.html").read_text()
    assert 'data-stage="compile" data-backend="ort-fused-int4"' in page and "with int4 weights" in page
    assert 'data-stage="benchmark" data-backend="ort-fused-int4"' in page and "KL divergence mean" in page


# --- seeded faults: each turns the verdict red --------------------------------------------------------

FAULT = '''
import numpy as np
import qeff.compilers.ort_fused_weights as fused_weights
import pytest_qeff.stages as stages
from qeff.quant.blocks import NBitsWeight

KIND = {kind!r}
_real = {{"rtn": fused_weights.rtn_quantize, "reference": stages._reference}}


def _faulty(w, bits, block_size=32, **kwargs):
    q = _real["rtn"](w, bits, block_size, **kwargs)
    if bits != 4:
        return q
    if KIND == "scale":  # every int4 block's scale 30 % too large
        return NBitsWeight(q.bits, q.block_size, q.codes, (q.scales * np.float32(1.3)).astype(np.float32), q.zero_points,
                           q.offsets, q.source)
    # "block": the per-block scales and zero points read at half the block size (tiled, not repeated)
    tile = lambda a: None if a is None else np.tile(a, (1, 2))
    return NBitsWeight(q.bits, q.block_size // 2, q.codes, tile(q.scales), tile(q.zero_points), tile(q.offsets), q.source)


def pytest_configure(config):
    if KIND == "self":  # the verdict's reference is the candidate graph itself
        stages._reference = stages._teacher_forced
    else:
        fused_weights.rtn_quantize = _faulty


def pytest_unconfigure(config):
    fused_weights.rtn_quantize = _real["rtn"]
    stages._reference = _real["reference"]
'''


@pytest.mark.parametrize("kind, says", [
    ("scale", "outside the card's budget: KLD mean"),
    ("block", "outside the card's budget: KLD mean"),
    ("self", "compared the candidate with itself"),
])
def test_a_seeded_fault_turns_the_int4_verdict_red(pytester: pytest.Pytester, kind: str, says: str) -> None:
    """A corrupted int4 scale, a wrong block size (the fused graph's own build check only measures
    re-quantized weights, so both get past the build), and a verdict comparing the candidate with
    itself: the int4 compile stage fails each time; the fp32 fused graph is untouched and passes."""
    pytester.makepyfile(seeded_fault=FAULT.format(kind=kind))
    pytester.syspathinsert()
    qeff_run(pytester, "-p", "seeded_fault", "--qeff-model", CARD, "--qeff-backend", "ort", "--qeff-graph", "all",
             "-k", "test_compile and not int8 and not native", "--qeff-report", "out")
    records = {r["backend"]: r for r in _records(pytester) if r["stage"] == "compile"}
    assert records["ort-fused"]["outcome"] == "passed"
    assert records["ort-fused-int4"]["outcome"] == "failed", records["ort-fused-int4"].get("message")
    assert says in records["ort-fused-int4"]["message"]
