"""qeff.compilers.qaic without the SDK: golden command lines and files for a grid of options, compiler
discovery, and the success and failure paths through a fake compiler put first on PATH.

Regenerate the golden files (then read the diff!) with ``QEFF_UPDATE_GOLDEN=1 pytest tests/test_qaic_compile.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from qeff.compilers import qaic
from qeff import sdk
from qeff.compilers.qaic import QaicCompileOptions, compile, qpc_dir_name
from qeff.sdk import require_compiler as find_compiler
from qeff.errors import ArtifactError, BackendUnavailableError, CompileError, UsageError

GOLDEN = Path(__file__).parent / "golden" / "qaic"
UPDATE = os.environ.get("QEFF_UPDATE_GOLDEN") == "1"

# case id → (compiler name, options, the directory name users know)
GRID = {
    "defaults_fp16_1dev": ("qaic-exec", QaicCompileOptions(), "qpc_16cores_1BS_32PL_128CL_1devices_fp16"),
    "mxfp6_2dev": (
        "qaic-exec",
        QaicCompileOptions(mxfp6=True, num_devices=2),
        "qpc_16cores_1BS_32PL_128CL_2devices_mxfp6",
    ),
    "bs4_pl64_cl1024_mxfp6_mxint8_mos2_df_4dev": (
        "qaic-exec",
        QaicCompileOptions(
            batch_size=4, prompt_len=64, ctx_len=1024, num_cores=14, num_devices=4,
            mxfp6=True, mxint8=True, mos=2, aic_enable_depth_first=True,
        ),
        "qpc_14cores_4BS_64PL_1024CL_2MOS_4devices_mxfp6_mxint8",
    ),
    "bs2_pl1_cl256_mxint8": (
        "qaic-exec",
        QaicCompileOptions(batch_size=2, prompt_len=1, ctx_len=256, mxint8=True),
        "qpc_16cores_2BS_1PL_256CL_1devices_fp16_mxint8",
    ),
    "qaic_compile_df_extra": (
        "qaic-compile",
        QaicCompileOptions(
            prompt_len=128, ctx_len=2048, num_cores=8, mos=-1, aic_enable_depth_first=True,
            extra_options=("-stats-level=70", "-aic-perf-metrics"),
        ),
        "qpc_8cores_1BS_128PL_2048CL_1devices_fp16",
    ),
}


def _load_helpers():
    import importlib.util

    path = Path(__file__).parent / "fakes" / "qaic_helpers.py"
    spec = importlib.util.spec_from_file_location("_qeff_test_qaic_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


H = _load_helpers()


@pytest.fixture(scope="module")
def onnx_path(module_tmp) -> Path:
    return H.tiny_retained_onnx(module_tmp("onnx") / "model.onnx")


@pytest.fixture
def fake_path(tmp_path, monkeypatch) -> Path:
    """PATH holds only a directory with the fake ``qaic-exec``; the SDK directory is empty."""
    bin_dir = tmp_path / "bin"
    H.install_fake_compiler(bin_dir, "qaic-exec")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(sdk, "EXEC_DIR", tmp_path / "no-sdk")
    return bin_dir


def _rendered(out_dir: Path, onnx_path: Path, compiler: str) -> dict[str, str]:
    """Every file of the compile directory plus the command, with machine paths as placeholders."""

    def norm(text: str) -> str:
        return text.replace(str(onnx_path), "{onnx}").replace(compiler, "{compiler}")

    files = {p.name: norm(p.read_text()) for p in sorted(out_dir.iterdir()) if p.name != "compile.json"}
    return files


@pytest.mark.parametrize("case", sorted(GRID))
def test_golden_files(case, onnx_path, tmp_path):
    name, options, dir_name = GRID[case]
    compiler = f"/opt/qti-aic/exec/{name}"
    out = tmp_path / qpc_dir_name(options)
    result = compile(onnx_path, out, options, dry_run=True, compiler=compiler)

    assert qpc_dir_name(options) == dir_name
    rendered = _rendered(out, onnx_path, compiler)
    rendered["command.txt"] = "\n".join(a.replace(str(onnx_path), "{onnx}").replace(compiler, "{compiler}") for a in result.command) + "\n"
    rendered["dir_name.txt"] = dir_name + "\n"
    golden_dir = GOLDEN / case
    if UPDATE:
        golden_dir.mkdir(parents=True, exist_ok=True)
        for old in golden_dir.iterdir():
            old.unlink()
        for fname, text in rendered.items():
            (golden_dir / fname).write_text(text)
    expected = {p.name: p.read_text() for p in sorted(golden_dir.iterdir())}
    assert sorted(rendered) == sorted(expected), "the compile directory holds other files than the golden set"
    for fname in expected:
        assert rendered[fname] == expected[fname], f"{case}/{fname} differs from the golden file"
    assert not result.qpc_dir.exists(), "a dry run must not produce a QPC"


def test_golden_facts_hold():
    """The golden files say what the documented formats say (guards against a blind golden update)."""
    for case, (name, options, _) in GRID.items():
        d = GOLDEN / case
        command = (d / "command.txt").read_text().split()
        assert command[:2] == ["{compiler}", "-m={onnx}"]
        hw = options.aic_hw_version or ("ai100" if name == "qaic-compile" else "2.0")
        for flag in ("-aic-hw", f"-aic-hw-version={hw}", "-convert-to-fp16", "-retained-state", "-compile-only",
                     f"-aic-num-cores={options.num_cores}", "-network-specialization-config=specializations.json",
                     "-custom-IO-list-file=custom_io.yaml", "-aic-binary-dir=qpcs"):
            assert flag in command, (case, flag)
        assert ("-mxfp6-matmul" in command) == options.mxfp6
        assert ("-aic-enable-depth-first" in command) == options.aic_enable_depth_first
        assert any(a.startswith("-mos=") for a in command) == (options.mos is not None)
        spec = json.loads((d / "specializations.json").read_text())["specializations"]
        want = [{"batch_size": str(options.batch_size), "seq_len": str(options.prompt_len), "ctx_len": str(options.ctx_len)}]
        if options.prompt_len != 1:
            want.append({"batch_size": str(options.batch_size), "seq_len": "1", "ctx_len": str(options.ctx_len)})
        assert spec == want
        precision = "mxint8" if options.mxint8 else "float16"
        entries = (d / "custom_io.yaml").read_text().count(f"   Precision: {precision}\n")
        assert entries == 8  # 2 layers × (key, value) × (input, output)
        mdp = d / f"mdp_ts_{options.num_devices}.json"
        if options.num_devices > 1:
            cfg = json.loads(mdp.read_text())
            devices = list(range(options.num_devices))
            assert cfg == {
                "connections": [{"devices": devices, "type": "p2p"}],
                "partitions": [{"name": "Partition0", "devices": [{"deviceId": i, "numCores": options.num_cores} for i in devices]}],
            }
            assert f"-mdp-load-partition-config={mdp.name}" in command
        else:
            assert not mdp.exists() and not any("-mdp-load-partition-config" in a for a in command)


def test_custom_io_is_the_yaml_the_sdk_reads():
    yaml = pytest.importorskip("yaml")
    entries = yaml.safe_load((GOLDEN / "mxfp6_2dev" / "custom_io.yaml").read_text())
    assert entries[:2] == [{"IOName": "past_key.0", "Precision": "float16"}, {"IOName": "past_value.0", "Precision": "float16"}]
    assert [e["IOName"] for e in entries[4:6]] == ["past_key.0_RetainedState", "past_value.0_RetainedState"]


@pytest.mark.parametrize("case", sorted(GRID))
def test_fake_compiler_accepts_every_grid_case(case, onnx_path, tmp_path, monkeypatch):
    """The fake compiler parses each file as the SDK documents it; the QPC lands in qpcs/."""
    name, options, _ = GRID[case]
    bin_dir = tmp_path / "bin"
    H.install_fake_compiler(bin_dir, name)
    monkeypatch.setenv("PATH", str(bin_dir))
    result = compile(onnx_path, tmp_path / "out", options)
    program = json.loads((result.qpc_dir / "programqpc.bin").read_text())
    assert result.qpc_dir == tmp_path / "out" / "qpcs"
    assert program["compiler"] == name
    assert program["cwd"] == str(tmp_path / "out")  # relative file paths resolve there
    assert program["argv"] == result.command[1:]
    assert program["num_devices"] == options.num_devices
    assert len(program["specializations"]) == (1 if options.prompt_len == 1 else 2)
    assert set(program["custom_io"].values()) == {"mxint8" if options.mxint8 else "float16"}
    assert "fake compile of model.onnx" in (tmp_path / "out" / "compile.log").read_text()


def test_manifest(onnx_path, tmp_path):
    options = QaicCompileOptions(mxfp6=True, num_devices=2)
    result = compile(onnx_path, tmp_path / "c", options, dry_run=True, compiler="/opt/qti-aic/exec/qaic-exec")
    manifest = json.loads((tmp_path / "c" / "compile.json").read_text())
    assert manifest == result.manifest
    assert manifest["backend"] == "qaic"
    assert manifest["dir_name"] == "qpc_16cores_1BS_32PL_128CL_2devices_mxfp6"
    assert manifest["options"] == {**options.to_dict(), "aic_hw_version": "2.0"}
    assert manifest["compiler"] == {"name": "qaic-exec", "path": "/opt/qti-aic/exec/qaic-exec"}
    assert manifest["onnx_path"] == str(onnx_path)
    assert manifest["files"] == {"specializations": "specializations.json", "custom_io": "custom_io.yaml",
                                 "mdp_ts_config": "mdp_ts_2.json", "qpc_dir": "qpcs"}
    assert str(tmp_path) not in json.dumps(manifest), "the manifest must not pin the directory it was built in"
    assert result.shell_command() == f"cd {shlex.quote(str(tmp_path / 'c'))} && {shlex.join(result.command)}"


# -- discovery ------------------------------------------------------------------------------


def test_find_compiler_prefers_qaic_compile_on_path(tmp_path):
    H.install_fake_compiler(tmp_path / "a", "qaic-exec")
    newer = H.install_fake_compiler(tmp_path / "b", "qaic-compile")
    path = os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])
    assert find_compiler(search_path=path, exec_dir=tmp_path / "none") == newer


def test_find_compiler_falls_back_to_the_sdk_dir(tmp_path):
    sdk = H.install_fake_compiler(tmp_path / "exec", "qaic-exec")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "qaic-compile").write_text("not executable")
    assert find_compiler(search_path=str(tmp_path / "bin"), exec_dir=tmp_path / "exec") == sdk


def test_no_compiler_names_where_it_looked(tmp_path):
    with pytest.raises(BackendUnavailableError) as err:
        find_compiler(search_path=str(tmp_path), exec_dir=tmp_path / "opt-exec")
    message = str(err.value)
    assert "qaic-compile" in message and "qaic-exec" in message and "PATH" in message
    assert str(tmp_path / "opt-exec") in message


def test_compile_without_sdk_raises_but_dry_run_works(onnx_path, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sdk, "EXEC_DIR", tmp_path / "no-sdk")
    with pytest.raises(BackendUnavailableError, match="no-sdk"):
        compile(onnx_path, tmp_path / "real", QaicCompileOptions())
    result = compile(onnx_path, tmp_path / "dry", QaicCompileOptions(), dry_run=True)
    assert result.command[0] == str(tmp_path / "no-sdk" / "qaic-exec")
    assert "-aic-hw-version=2.0" in result.command
    assert (tmp_path / "dry" / "compile.sh").is_file() and not result.qpc_dir.exists()


def test_default_hw_version_follows_the_compiler(onnx_path, tmp_path):
    run = lambda name, **kw: compile(onnx_path, tmp_path / name, QaicCompileOptions(**kw), dry_run=True,  # noqa: E731
                                     compiler=f"/x/{name}").command
    assert "-aic-hw-version=ai100" in run("qaic-compile")
    assert "-aic-hw-version=2.0" in run("qaic-exec")
    assert "-aic-hw-version=2.0" in compile(onnx_path, tmp_path / "o", QaicCompileOptions(aic_hw_version="2.0"),
                                            dry_run=True, compiler="/x/qaic-compile").command


# -- running the (fake) compiler --------------------------------------------------------------


def test_success_replaces_a_stale_qpc(onnx_path, tmp_path, fake_path):
    stale = tmp_path / "out" / "qpcs"
    stale.mkdir(parents=True)
    (stale / "leftover.bin").write_text("old")
    result = compile(onnx_path, tmp_path / "out", QaicCompileOptions())
    assert result.command[0] == str(fake_path / "qaic-exec")
    assert (result.qpc_dir / "programqpc.bin").is_file()
    assert not (stale / "leftover.bin").exists()


def test_failure_carries_command_exit_code_and_stderr(onnx_path, tmp_path, fake_path, monkeypatch):
    monkeypatch.setenv("FAKE_QAIC_FAIL", "Compiling network...\nERROR: Unsupported op 'Foo' in node /model/foo")
    monkeypatch.setenv("FAKE_QAIC_EXIT", "3")
    with pytest.raises(CompileError) as err:
        compile(onnx_path, tmp_path / "out", QaicCompileOptions(mxfp6=True))
    e = err.value
    assert e.returncode == 3
    assert "Unsupported op 'Foo'" in e.stderr
    assert e.command[0] == str(fake_path / "qaic-exec") and "-mxfp6-matmul" in e.command
    message = str(e)
    assert "\n" not in message
    assert "exit code 3" in message and "Unsupported op 'Foo'" in message and "compile.log" in message
    assert "Unsupported op" in (tmp_path / "out" / "compile.log").read_text()


def test_exit_zero_without_qpc_is_a_compile_error(onnx_path, tmp_path, fake_path, monkeypatch):
    monkeypatch.setenv("FAKE_QAIC_NO_QPC", "1")
    with pytest.raises(CompileError, match="wrote no qpcs/programqpc.bin") as err:
        compile(onnx_path, tmp_path / "out", QaicCompileOptions())
    assert err.value.returncode == 0


def test_dry_run_script_compiles_by_hand(onnx_path, tmp_path, fake_path):
    result = compile(onnx_path, tmp_path / "out", QaicCompileOptions(num_devices=2), dry_run=True)
    moved = tmp_path / "cache" / "renamed"  # as the artifact cache renames a finished temp dir
    moved.parent.mkdir()
    result.out_dir.rename(moved)
    env = {**os.environ, "PATH": os.pathsep.join([str(fake_path), "/usr/bin", "/bin"])}
    subprocess.run(["/bin/sh", str(moved / "compile.sh")], check=True, cwd=tmp_path, capture_output=True, env=env)
    program = json.loads((moved / "qpcs" / "programqpc.bin").read_text())
    assert program["cwd"] == str(moved) and program["num_devices"] == 2


# -- options and inputs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt_len": 256, "ctx_len": 128}, "prompt_len=256 is larger than ctx_len=128"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"num_devices": True}, "num_devices must be a positive integer"),
        ({"extra_options": ("-mos=2",)}, "use mos= instead"),
        ({"extra_options": ("-aic-num-cores=4",)}, "use num_cores= instead"),
        ({"extra_options": ("stats-level=70",)}, "must be one flag starting with '-'"),
        ({"extra_options": ("-retained-state",)}, "drop it: qeff always passes it"),
    ],
)
def test_bad_options_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        QaicCompileOptions(**kwargs)


def test_mos_minus_one_means_unset():
    assert QaicCompileOptions(mos=-1).mos is None
    assert QaicCompileOptions(mos=-1) == QaicCompileOptions()


def test_missing_or_foreign_onnx_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        compile(tmp_path / "nope.onnx", tmp_path / "out", dry_run=True, compiler="/x/qaic-exec")
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])), str(plain))
    with pytest.raises(ArtifactError, match="not a retained-state graph"):
        compile(plain, tmp_path / "out", dry_run=True, compiler="/x/qaic-exec")


def test_recompiling_into_a_directory_drops_files_of_the_earlier_options(onnx_path, tmp_path):
    out = tmp_path / "out"
    compile(onnx_path, out, QaicCompileOptions(num_devices=4), dry_run=True, compiler="/x/qaic-exec")
    compile(onnx_path, out, QaicCompileOptions(), dry_run=True, compiler="/x/qaic-exec")
    assert not list(out.glob("mdp_ts_*.json"))
