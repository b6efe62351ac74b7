"""``qeff verify --precision`` and ``qeff infer --backend ort --mxfp6``, as users run them."""

from __future__ import annotations

import json

import pytest

from qeff.cli import main
from qeff.precision.commands import LADDER_KEYS


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "fp8"], "unknown precision tier 'fp8'; valid tiers: fp32, fp16, mxfp6, mxint8, mxfp6+mxint8"),
        (["--precision", "fp32,mxfp4"], "unknown precision tier 'mxfp4'; valid tiers: fp32, fp16"),
        (["--precision", "fp32", "--backend", "qaic"], "the qaic backend cannot run precision tier 'fp32'; it runs (native): fp16, mxfp6, mxint8, mxfp6+mxint8"),
        (["--precision", "fp16", "--backend", "torch"], "the torch backend cannot run precision tier 'fp16'; it runs (native): fp32"),
    ],
)
def test_bad_tiers_are_usage_errors_naming_the_valid_ones(args, message, capsys):
    code = main(["verify", "--model_name", "/nonexistent-model", *args])  # fails before the model is looked at
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_verify_precision_json_is_one_line_with_every_tier(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    code = main(["verify", "--model_name", str(tiny_model_dir), "--precision", "fp32,fp16,mxfp6,mxint8,mxfp6+mxint8", "--json",
                 "--rows", "2", "--window", "48", "--steps", "4", "--prompt", "Hello there|The sea", "--prompt_len", "8"])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line on stdout"
    record = json.loads(lines[0])
    assert list(record["tiers"]) == ["fp32", "fp16", "mxfp6", "mxint8", "mxfp6+mxint8"]
    for name, tier in record["tiers"].items():
        assert list(tier)[: len(LADDER_KEYS)] == list(LADDER_KEYS), name
        assert tier["tokens_total"] == 8 and tier["ppl_ref"] > 1
    fp32 = record["tiers"]["fp32"]
    assert fp32["passed"] and fp32["kld_max"] < 1e-9 and fp32["top1_agree"] == 1.0 and fp32["tokens_matched"] == 8
    for name in ("fp16", "mxfp6", "mxint8", "mxfp6+mxint8"):
        assert record["tiers"][name]["kld_mean"] > 10 * fp32["kld_mean"] + 1e-12, name  # every lower tier differs
    assert record["tiers"]["mxfp6"]["kld_mean"] > record["tiers"]["fp16"]["kld_mean"]
    assert "precision ladder vs hf-fp32" in captured.err and code == (0 if record["passed"] else 1)


def test_infer_ort_mxfp6_runs_the_emulated_tier_and_says_so(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    base = ["infer", "--json", "--no-stream", "--model_name", str(tiny_model_dir), "--prompt", "Hello there", "--ctx_len", "32",
            "--generation_len", "6", "--backend", "ort", "--no-verify"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--mxfp6"]) == 0
    captured = capsys.readouterr()
    emulated = json.loads(captured.out)
    assert "emulating Cloud AI's mxfp6 tier (MatMul weights in MXFP6 E2M3, activations in fp16)" in captured.err
    assert "/tier-mxfp6/" in emulated["artifact"] and "/tier-" not in plain["artifact"]
    assert main([*base, "--mxfp6", "--mxint8"]) == 0
    captured = capsys.readouterr()
    assert "mxfp6+mxint8 tier" in captured.err and "/tier-mxfp6_mxint8/" in json.loads(captured.out)["artifact"]


def test_verify_precision_keeps_tiers_unless_told_not_to(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Each emulated tier is a full copy of the weights: cached by default for the next run,
    removed once measured with --no-keep-tiers (the exported graph stays)."""
    home = tmp_path / "home"
    monkeypatch.setenv("QEFF_HOME", str(home))
    base = ["verify", "--model_name", str(tiny_model_dir), "--precision", "fp32,mxint8", "--rows", "1", "--window", "32",
            "--steps", "2", "--prompt", "Hello there", "--prompt_len", "8"]
    assert main([*base, "--no-keep-tiers"]) == 0
    assert not list(home.rglob("tier-*")) and list(home.rglob("model.onnx"))
    assert main(base) == 0
    assert [p.name for p in home.rglob("tier-*") if p.is_dir()] == ["tier-mxint8"]
    capsys.readouterr()


def test_a_full_disk_while_emulating_a_tier_names_its_size(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """ENOSPC while writing an emulated tier: one sentence with the bytes the tier needs (a copy of
    the exported graph's weights), exit 1, nothing half-written left as a tier."""
    import errno

    import onnx

    home = tmp_path / "home"
    monkeypatch.setenv("QEFF_HOME", str(home))
    assert main(["export", "--model_name", str(tiny_model_dir)]) == 0
    graph = next(home.rglob("model.onnx"))
    graph_bytes = sum(p.stat().st_size for p in graph.parent.glob("model.onnx*"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    capsys.readouterr()
    code = main(["verify", "--model_name", str(tiny_model_dir), "--precision", "mxint8", "--rows", "1", "--window", "32",
                 "--steps", "2", "--prompt", "Hello there", "--prompt_len", "8"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qeff:")]
    assert code == 1 and len(lines) == 1 and "DiskFullError" in lines[0] and "building tier-mxint8" in lines[0], lines
    number, unit = lines[0].split("it needs about ")[1].split(";")[0].split()
    needed = float(number) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    assert 0.9 < needed / graph_bytes < 1.1
    assert not [p for p in home.rglob("tier-*") if p.is_dir()]
