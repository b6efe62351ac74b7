"""The ``qeff`` command line, used as users use it (tiny local model with the real tokenizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qeff.cli import main
from qeff.inputs import batches, parse_device_group, read_prompts

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "QEFF_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "qeff.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def infer_json(capsys, *args: str) -> tuple[dict, str]:
    code = main(["infer", "--json", "--no-stream", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line on stdout"
    return json.loads(lines[0]), captured.err


def test_infer_json_then_reuse_then_rebuild_on_change(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    args = ["--model_name", str(tiny_model_dir), "--prompt", "Hello there|The sea", "--batch_size", "2",
            "--prompt_len", "8", "--ctx_len", "64", "--generation_len", "12", "--backend", "ort"]
    first, err = infer_json(capsys, *args)
    for key in ("ttft_s", "decode_tok_s", "total_tok_s", "e2e_s", "new_tokens", "token_ids", "text", "load_s", "peak_rss_mb"):
        assert key in first, key
    assert first["new_tokens"] == sum(len(t) for t in first["token_ids"]) and len(first["text"]) == 2
    assert first["reused"] == {"export": False, "compile": False}
    assert first["verify"]["pytorch_vs_ort"]["passed"] and first["verify"]["hf_vs_pytorch"]["passed"]
    assert "built export" in err and "ort-fused_2BS_8PL_64CL" in err and "fused graph vs portable graph" in err
    # Each stage's peak RSS and wall time (issue 18), in the order they ran, with the preflight's estimate.
    # The export streams from the safetensors files first; verification then loads the model.
    assert [st["name"] for st in first["stages"]] == ["export", "load", "transform", "reference", "verify",
                                                      "fused-build", "fused-check", "run"]
    assert all(st["peak_rss"] > 0 and st["estimate"] for st in first["stages"])
    second, err = infer_json(capsys, *args)
    assert second["reused"] == {"export": True, "compile": True}
    assert [st["name"] for st in second["stages"]] == ["run"]  # every other stage was cached
    assert "reused cached export" in err and "saved" in err and "(cached)" in err
    assert second["token_ids"] == first["token_ids"]
    third, err = infer_json(capsys, *args[:-4], "--ctx_len", "96", "--generation_len", "12", "--backend", "ort")
    assert third["reused"] == {"export": True, "compile": False} and "ort-fused_2BS_8PL_96CL" in third["artifact"]


def test_new_weights_build_a_new_export(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import shutil

    import qeff

    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    args = ["--model_name", str(copy), "--prompt", "Hi", "--ctx_len", "32", "--generation_len", "4", "--backend", "ort", "--no-verify"]
    first, _ = infer_json(capsys, *args)
    model = qeff.from_config("llama", json.loads((copy / "config.json").read_text()), seed=99)
    model.save_pretrained(copy)
    second, _ = infer_json(capsys, *args)
    assert second["reused"]["export"] is False
    assert Path(first["artifact"]).parent != Path(second["artifact"]).parent


def test_more_prompts_than_batch_size_run_in_batches(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n\ntwo\nthree\n")
    out, _ = infer_json(capsys, "--model-name", str(tiny_model_dir), "--prompts_txt_file_path", str(prompts),
                        "--batch-size", "2", "--ctx-len", "32", "--generation-len", "5", "--backend", "ort", "--no-verify")
    assert out["prompts"] == ["one", "two", "three"] and out["batches"] == 2 and len(out["token_ids"]) == 3
    # The figures count every row computed, the repeated filler row of the last batch included.
    assert [len(t) for t in out["token_ids"]] == [5, 5, 5] and out["new_tokens"] == 20


def test_streaming_prints_text_and_figures(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    code = main(["infer", "-m", str(tiny_model_dir), "--prompt", "Once upon", "--ctx_len", "32", "--generation_len", "6", "--no-verify"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Once upon" in out and "time to first token" in out and "tokens/s" in out and "end to end" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model_name", "no-such-org/no-such-model"], "unknown model 'no-such-org/no-such-model'"),
        (["--prompt", "x " * 200, "--ctx_len", "64"], "tokens, more than ctx_len=64"),
        (["--device_group", "[0,x]"], "malformed device group '[0,x]'"),
        (["--device_group", "[0,1"], "unbalanced brackets"),
        (["--backend", "qaic"], "no Cloud AI 100 compiler found"),
        (["--prompt", "a||b"], "holds an empty prompt"),
    ],
)
def test_usage_errors_are_one_sentence_exit_2(tiny_model_dir, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    base = ["infer", "--model_name", str(tiny_model_dir), "--no-verify", "--generation_len", "2"]
    code = main(base + args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert errors == [err.strip().splitlines()[-1]] and errors[0].startswith("qeff: error: ")


def test_empty_prompt_file_and_no_traceback_in_a_real_process(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = run_cli("infer", "--model_name", str(tiny_model_dir), "--prompts_txt_file_path", str(empty), home=tmp_path / "home")
    assert result.returncode == 2
    assert "holds no prompt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("graph,model_file", [("fused", "model.fused.onnx"), ("portable", "model.opt.onnx")])
def test_corrupt_cached_artifact_is_rebuilt(tiny_model_dir, tmp_path, capsys, monkeypatch, graph, model_file):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    args = ["--model_name", str(tiny_model_dir), "--prompt", "Hi", "--ctx_len", "32", "--generation_len", "4", "--backend", "ort",
            "--no-verify", "--ort-graph", graph]
    first, _ = infer_json(capsys, *args)
    artifact = Path(first["artifact"])
    (artifact / model_file).write_bytes(b"\x00garbage")
    second, err = infer_json(capsys, *args)
    # Caught by the integrity check before ONNX Runtime ever opens it (issue 14), and said in one line.
    assert f"failed its integrity check ({model_file}: " in err and "truncated" in err
    assert second["reused"] == {"export": True, "compile": False} and model_file in second["repaired"]["compile"]
    assert second["token_ids"] == first["token_ids"]


def test_execute_runs_a_compiled_artifact(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    first, _ = infer_json(capsys, "--model_name", str(tiny_model_dir), "--prompt", "Hi", "--ctx_len", "32", "--generation_len", "4", "--no-verify")
    code = main(["execute", "--qpc_path", first["artifact"], "--prompt", "Hi", "--generation_len", "4", "--json", "--no-stream"])
    out = json.loads(capsys.readouterr().out.strip())
    assert code == 0 and out["token_ids"] == first["token_ids"]


def test_ignore_eos_generates_the_full_length(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    args = ["--model_name", str(tiny_model_dir), "--prompt", "Hi", "--ctx_len", "32", "--generation_len", "8", "--no-verify"]
    free, _ = infer_json(capsys, *args)
    # Make the row's 3rd generated token the model's EOS: without the flag it stops there.
    import qeff.generation.engine

    monkeypatch.setattr(qeff.generation.engine, "eos_ids", lambda *a, **k: {free["token_ids"][0][2]})
    stopped, _ = infer_json(capsys, *args)
    first = free["token_ids"][0].index(free["token_ids"][0][2])
    assert stopped["token_ids"][0] == free["token_ids"][0][: first + 1] and len(stopped["token_ids"][0]) < 8
    ignored, _ = infer_json(capsys, *args, "--ignore_eos")
    assert ignored["token_ids"] == free["token_ids"] and ignored["new_tokens"] == 8


def test_compile_qaic_dry_run_prints_the_command(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    code = main(["compile", "--model_name", str(tiny_model_dir), "--backend", "qaic", "--dry-run", "--device_group", "[0,1]",
                 "--mxfp6", "--num_cores", "14", "--ctx_len", "256"])
    out = capsys.readouterr().out
    assert code == 0
    assert "qpc_14cores_1BS_32PL_256CL_2devices_mxfp6" in out
    assert "-retained-state" in out and "-mdp-load-partition-config=mdp_ts_2.json" in out and "-aic-num-cores=14" in out


def test_list_shows_the_cache(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))
    infer_json(capsys, "--model_name", str(tiny_model_dir), "--prompt", "Hi", "--ctx_len", "32", "--generation_len", "2", "--no-verify")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "export-" in out and "ort-fused_1BS_32PL_32CL" in out and "MiB" in out


def test_seed_module_aliases(tiny_model_dir, tmp_path):
    env = {**os.environ, "QEFF_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "qeff.cloud.infer", "--model_name", str(tiny_model_dir), "--batch_size", "1", "--prompt_len", "8",
         "--ctx_len", "32", "--num_cores", "16", "--device_group", "[0]", "--prompt", "My name is", "--mxfp6", "--mos", "1",
         "--aic_enable_depth_first", "--generation_len", "3", "--json", "--no-verify"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["new_tokens"] == 3
    help_text = subprocess.run([sys.executable, "-m", "qeff.cloud.execute", "--help"], capture_output=True, text=True, env=env)
    assert help_text.returncode == 0 and "--qpc_path" in help_text.stdout


def test_device_group_spellings():
    assert parse_device_group("[0,1]") == parse_device_group("0,1") == parse_device_group(" [0, 1] ") == [0, 1]
    assert parse_device_group("3") == [3] and parse_device_group(None) is None
    for bad in ("[0,1", "a,b", "[]", "0,0", "-1"):
        with pytest.raises(Exception):
            parse_device_group(bad)


def test_prompt_batching_rule():
    assert read_prompts("a|b|c", None) == ["a", "b", "c"]
    assert batches(["a"], 3) == [(["a", "a", "a"], 1)]
    assert batches(["a", "b", "c"], 2) == [(["a", "b"], 2), (["c", "c"], 1)]


def test_a_prompt_too_long_fails_before_the_model_is_exported(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QEFF_HOME", str(tmp_path / "home"))

    def no_export(*args, **kwargs):
        raise AssertionError("the export started before the prompt was checked")

    monkeypatch.setattr("qeff.exporter.export", no_export)
    code = main(["infer", "--model_name", str(tiny_model_dir), "--prompt", "x " * 200, "--ctx_len", "64", "--no-verify"])
    assert code == 2 and "tokens, more than ctx_len=64" in capsys.readouterr().err
    assert not list((tmp_path / "home").rglob("model.onnx"))
