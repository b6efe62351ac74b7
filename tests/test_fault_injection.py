"""Fault injection (issue 14): the cache never serves bad bytes, a killed build is never trusted,
concurrent builders build once and readers never see a wrong answer, and concurrent writers of a
report or a baseline never tear a file nor lose an entry.

The reference for "no wrong output" is a clean run in a separate cache (same model, same
arguments); every faulted run must either produce exactly the reference tokens and say which file
it found bad and rebuilt, or fail with one sentence. The number of faults injected is printed
(``-s``) and asserted, so the suite cannot silently shrink.

Issue 19's cases (user files that look like qeff's leftovers, source weights replaced in place with
the mtime restored, an edited tokenizer under `qeff execute`, an export replaced by a file, a
300-byte model path) are classes of ``tests/test_store_faults.py``, which reuses this module's
micro model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from qeff.cli import main
from qeff.store.doctor import clean, scan

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
ARGS = ["--prompt", "Hello there", "--ctx_len", "48", "--prompt_len", "8", "--generation_len", "6", "--no-stream", "--json"]


@pytest.fixture(scope="module")
def micro_model_dir(module_tmp) -> Path:
    """A tiny random Llama with a 296-token byte-level BPE tokenizer trained here (no download):
    its export is ~0.3 MB, so every fault below costs a rebuild of well under a second of work."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import qeff
    from tests.tiny import TINY_CONFIGS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Hello there, the capital of France is Paris. The sea is blue."] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    path = module_tmp("micro-llama")
    model_type, config = TINY_CONFIGS["llama"]
    config = dict(config, vocab_size=len(fast), eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id)
    qeff.from_config(model_type, config, seed=4).save_pretrained(path)
    fast.save_pretrained(path)
    return path


# -- the four faults ---------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _overwrite_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + 8, len(data))):
        data[i] ^= 0xFF
    with open(path, "r+b") as f:  # in place: same inode, same size, new bytes
        f.write(bytes(data))


def _delete(path: Path) -> None:
    path.unlink()


class _Unreadable:
    """chmod 000 — and, since root reads it anyway, the OS's refusal simulated at the boundary
    (Python's ``open`` of that inode raises PermissionError) for the duration of the next run."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __call__(self, path: Path) -> None:
        path.chmod(0)
        if os.geteuid() != 0:
            return
        import builtins

        import io

        inode, real_open = path.stat().st_ino, builtins.open

        def refusing_open(file, *args, **kwargs):
            try:
                if isinstance(file, (str, os.PathLike)) and os.stat(file).st_ino == inode:
                    raise PermissionError(13, "Permission denied", str(file))
            except FileNotFoundError:
                pass
            return real_open(file, *args, **kwargs)

        self.monkeypatch.setattr(builtins, "open", refusing_open)
        self.monkeypatch.setattr(io, "open", refusing_open)  # pathlib's read_text opens through io.open


FAULTS = ("truncate", "same-size overwrite", "delete", "unreadable")


def _inject(fault: str, path: Path, monkeypatch) -> None:
    {"truncate": _truncate, "same-size overwrite": _overwrite_same_size, "delete": _delete,
     "unreadable": _Unreadable(monkeypatch)}[fault](path)


def _infer(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(["infer", *args])
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1]) if code == 0 else None
    return code, result, out.err


def _files(directory: Path) -> list[str]:
    from qeff.store.artifacts import read_manifest

    return sorted([*read_manifest(directory)["files"], "manifest.json"])


def _corrupt_every_file(model_dir, tmp_path, capsys, monkeypatch, kinds: dict[str, str], extra: list[str]) -> int:
    """For every file of every artifact kind in ``kinds`` (kind → how to find its directory), each
    fault in turn: inject, rerun, check. Returns the number of faults injected."""
    home = tmp_path / "home"
    reference_home = tmp_path / "reference"
    args = ["--model_name", str(model_dir), *ARGS, *extra]
    code, reference, err = _infer(capsys, "--home", str(reference_home), *args)
    assert code == 0, err
    code, first, err = _infer(capsys, "--home", str(home), *args)
    assert code == 0 and first["token_ids"] == reference["token_ids"], err
    export = Path(first["artifact"]).parent
    directories = {"export": export, "ort": Path(first["artifact"]), "verify": next((p for p in export.glob("verify-*") if p.is_dir()), None)}
    injected, failures = 0, []
    files = {kind: _files(directories[kind]) for kind in kinds}  # listed up front: the loop must not depend on repairs
    for kind in kinds:
        directory = directories[kind]
        for rel in files[kind]:
            for fault in FAULTS:
                victim = directory / rel
                if not victim.is_file():
                    failures.append(f"{kind}/{rel}: {fault}: still missing after an earlier fault (never repaired)")
                    continue
                with monkeypatch.context() as m:
                    _inject(fault, victim, m)
                    injected += 1
                    code, result, err = _infer(capsys, "--home", str(home), *args)
                case = f"{kind}/{rel}: {fault}"
                if code != 0:
                    failures.append(f"{case}: exit {code}: {err.strip().splitlines()[-1:]}")
                elif result["token_ids"] != reference["token_ids"]:
                    failures.append(f"{case}: WRONG OUTPUT {result['token_ids']} != {reference['token_ids']}")
                elif f"failed its integrity check ({rel}" not in err and f"failed its integrity check (its manifest" not in err:
                    failures.append(f"{case}: not reported as a repair: {err!r}")
                try:
                    state = scan(home, full=True)
                except OSError as exc:
                    failures.append(f"{case}: the cache cannot even be scanned afterwards: {exc}")
                    continue
                if state.damaged or state.stale:
                    failures.append(f"{case}: cache not healthy afterwards: {[a.problem for a in state.damaged]} {state.stale}")
    assert not failures, "\n".join(failures)
    return injected


@pytest.mark.parametrize("graph", ["fused", "portable"])
def test_corrupting_every_file_of_the_export_and_ort_artifacts(micro_model_dir, tmp_path, capsys, monkeypatch, graph):
    """The default ORT artifact is the fused CPU graph (model.fused.onnx + .data); the portable one
    (model.opt.onnx + .data) is what --ort-graph portable and uncovered architectures run."""
    kinds = {"export": "", "ort": ""} if graph == "fused" else {"ort": ""}
    injected = _corrupt_every_file(micro_model_dir, tmp_path, capsys, monkeypatch, kinds, ["--no-verify", "--ort-graph", graph])
    # export: model.onnx, model.onnx.data, tokenizer.json, tokenizer_config.json, manifest.json;
    # ort: model.{fused,opt}.onnx, its .data, manifest.json — 8 (or 3) files × 4 faults
    print(f"\n[fault injection] {'export + ' if 'export' in kinds else ''}ort ({graph}) artifacts: {injected} faults injected, "
          f"each detected and repaired")
    assert injected == (32 if graph == "fused" else 12)


def test_corrupting_the_verify_artifact(micro_model_dir, tmp_path, capsys, monkeypatch):
    injected = _corrupt_every_file(micro_model_dir, tmp_path, capsys, monkeypatch, {"verify": ""}, ["--verify"])
    print(f"\n[fault injection] verify artifact: {injected} faults injected, each detected and repaired")
    assert injected == 4


def test_corrupting_every_file_of_a_qaic_artifact(micro_model_dir, tmp_path, capsys, monkeypatch):
    """The Cloud AI compile directory through the fake compiler: every file, every fault, rebuilt
    to the same QPC bytes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_qh", REPO / "tests" / "fakes" / "qaic_helpers.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    helpers.install_fake_compiler(tmp_path / "bin", "qaic-exec")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    home = tmp_path / "home"
    args = ["compile", "--model_name", str(micro_model_dir), "--backend", "qaic", "--ctx_len", "64", "--home", str(home)]
    assert main(args) == 0
    qpc = Path(capsys.readouterr().out.strip().splitlines()[-1])
    def program() -> dict:  # the fake QPC names the build directory it ran in (a temporary one): not compared
        return {k: v for k, v in json.loads((qpc / "qpcs" / "programqpc.bin").read_text()).items() if k != "cwd"}

    want = program()
    injected, failures = 0, []
    for rel in _files(qpc):
        for fault in FAULTS:
            with monkeypatch.context() as m:
                _inject(fault, qpc / rel, m)
                injected += 1
                code = main(args)
            err = capsys.readouterr().err
            if code != 0:
                failures.append(f"{rel}: {fault}: exit {code}: {err}")
            elif "failed its integrity check (" not in err:
                failures.append(f"{rel}: {fault}: not reported: {err!r}")
            elif program() != want:
                failures.append(f"{rel}: {fault}: the rebuilt QPC differs")
    assert not failures, "\n".join(failures)
    print(f"\n[fault injection] qaic artifact: {injected} faults injected over {len(_files(qpc))} files, each detected and repaired")
    assert injected == 4 * len(_files(qpc)) >= 4 * 6


@pytest.mark.parametrize("graph", ["portable", "fused"])
def test_zeroed_weights_of_the_same_size_are_never_served(micro_model_dir, tmp_path, capsys, graph):
    """Issue 14, item 1: overwriting a cached model.opt.onnx.data in place, same size, gave exit 0,
    all-zero token ids and "verify … ok (cached)". The fused CPU graph's weights likewise."""
    from qeff.store.artifacts import read_manifest

    home = tmp_path / "home"
    args = ["--model_name", str(micro_model_dir), "--home", str(home), *ARGS, "--verify", "--ort-graph", graph]
    code, first, err = _infer(capsys, *args)
    artifact = Path(first["artifact"])
    assert artifact.name.startswith("ort-fused_" if graph == "fused" else "ort_")
    name = max(read_manifest(artifact)["files"], key=lambda rel: (artifact / rel).stat().st_size)  # the weights
    assert name == ("model.fused.onnx.data" if graph == "fused" else "model.opt.onnx.data")
    data = artifact / name
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.write(b"\0" * size)
    code, second, err = _infer(capsys, *args)
    assert code == 0 and second["token_ids"] == first["token_ids"]
    assert f"{name}: its content differs from the manifest's digest" in err
    assert second["reused"]["compile"] is False and second["repaired"]["compile"].startswith(name)


def test_a_truncated_export_then_a_new_ctx_len_rebuilds_the_export(micro_model_dir, tmp_path, capsys):
    """Issue 14, item 2: a traceback on every run, forever."""
    home = tmp_path / "home"
    args = ["--model_name", str(micro_model_dir), "--home", str(home), *ARGS, "--no-verify"]
    code, first, err = _infer(capsys, *args)
    data = Path(first["artifact"]).parent / "model.onnx.data"
    _truncate(data)
    code, second, err = _infer(capsys, *args[:-9], "--prompt", "Hello there", "--ctx_len", "40", "--prompt_len", "8",
                               "--generation_len", "6", "--no-stream", "--json", "--no-verify")
    assert code == 0 and "model.onnx.data: " in err and "(truncated)" in err
    assert second["reused"] == {"export": False, "compile": False}


# -- SIGKILL at random points ------------------------------------------------------------------


def _spawn_infer(model: Path, home: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qeff.cli", "infer", "--model_name", str(model), "--home", str(home), *ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _reference(capsys, model: Path, home: Path, *extra: str) -> dict:
    """A clean run in its own cache, in this process (no interpreter start to pay for)."""
    code, result, err = _infer(capsys, "--model_name", str(model), "--home", str(home), *ARGS, *extra)
    assert code == 0, err
    return result


def test_sigkill_at_random_points_then_rerun(micro_model_dir, tmp_path, capsys):
    rng = random.Random(14)
    want = _reference(capsys, micro_model_dir, tmp_path / "reference", "--verify")["token_ids"]
    home = tmp_path / "home"
    kills = []
    for i in range(5):
        proc = _spawn_infer(micro_model_dir, home, "--verify", *(["--force"] if i == 3 else []))
        started = threading.Event()
        lines: list[str] = []

        def read(p=proc, ev=started, sink=lines):
            for line in p.stderr:
                sink.append(line)
                ev.set()  # the first progress line: imports are done, work has begun

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        started.wait(120)
        delay = rng.uniform(0.0, 4.0)
        time.sleep(delay)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join(5)
        proc.stdout.close()
        proc.stderr.close()
        leftovers = sorted(x.kind for x in scan(home, check=False).leftovers if x.kind != "lock")
        kills.append((round(delay, 2), "finished first" if finished else (lines[-1].strip()[:60] if lines else "?"), leftovers))
        # Whatever the kill left, nothing in the cache may pass for a good artifact unless it is one.
        for art in scan(home).artifacts:
            assert art.ok, f"after kill {i}: {art.path} {art.problem}"
    print("\n[fault injection] SIGKILL after (s, last line, leftovers):", *kills, sep="\n  ")
    final = _spawn_infer(micro_model_dir, home, "--verify")
    out, err = final.communicate(timeout=600)
    assert final.returncode == 0, err
    assert json.loads(out)["token_ids"] == want
    assert any(leftover for _, _, leftover in kills), "no kill landed inside a build: the test proves nothing"
    state = scan(home, full=True)
    assert not state.damaged and not [x for x in state.stale if x.kind != "lock"], state.stale
    clean(home)
    assert scan(home).healthy


# -- concurrent builders and readers -----------------------------------------------------------


def test_concurrent_builders_build_once_and_agree(micro_model_dir, tmp_path, capsys):
    want = _reference(capsys, micro_model_dir, tmp_path / "reference", "--verify")["token_ids"]
    home = tmp_path / "home"
    procs = [_spawn_infer(micro_model_dir, home, "--verify") for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in results]
    assert all(json.loads(o)["token_ids"] == want for o, _ in results)
    errs = "".join(e for _, e in results)
    assert errs.count("[qeff] built export") == 1 and errs.count("[qeff] built ort artifact") == 1
    assert not scan(home, full=True).damaged


_READER = textwrap.dedent(
    """
    import io, json, sys, contextlib
    from qeff.cli import main
    artifact, rounds = sys.argv[1], int(sys.argv[2])
    for _ in range(rounds):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["execute", "--qpc_path", artifact, "--prompt", "Hello there", "--generation_len", "6",
                         "--no-stream", "--json"])
        print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue()}), flush=True)
    """
)


def test_readers_during_forced_rebuilds_never_see_a_wrong_answer(micro_model_dir, tmp_path, capsys):
    home = tmp_path / "home"
    result = _reference(capsys, micro_model_dir, home, "--no-verify")
    want, artifact = result["token_ids"], result["artifact"]
    script = tmp_path / "reader.py"
    script.write_text(_READER)
    readers = [subprocess.Popen([sys.executable, str(script), artifact, "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=ENV) for _ in range(2)]
    builders = [_spawn_infer(micro_model_dir, home, "--no-verify", "--force") for _ in range(2)]
    for b in builders:
        out, err = b.communicate(timeout=600)
        assert b.returncode == 0, err
        assert json.loads(out)["token_ids"] == want
    ok = reported = 0
    for r in readers:
        out, err = r.communicate(timeout=600)
        assert r.returncode == 0, err
        for line in out.splitlines():
            run = json.loads(line)
            if run["code"] == 0:
                assert json.loads(run["out"].strip().splitlines()[-1])["token_ids"] == want, "a reader got a wrong answer"
                ok += 1
            else:
                assert "Traceback" not in run["err"] and run["err"].strip().startswith("qeff: "), run["err"]
                reported += 1
    print(f"\n[fault injection] 2 readers × 8 runs during 2 forced rebuilds: {ok} correct, {reported} reported, 0 wrong")
    assert ok + reported == 16 and ok > 0
    assert not scan(home, full=True).damaged


# -- concurrent writers of results.json and of a baseline ----------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pytest_qeff import baseline, results
    from pytest_qeff.records import BenchmarkRecord
    kind, target, k, n, go = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    while not go.exists():  # start together: the writes must overlap to test anything
        pass
    for i in range(n):
        if kind == "results":
            results.write(target, {"schema": "qeff-results", "version": 1, "writer": k, "i": i, "records": [{"x": "y" * 500}] * 50})
        else:
            data = BenchmarkRecord(prompts=[[1]], prompt_texts=[None], batch_size=1, prompt_len=8, ctx_len=32,
                                   device_group=[], figures={"decode_tok_s": 100.0 + k, "total_tok_s": 90.0, "ttft_s": 0.01},
                                   runs=[], generation_len=8, repeats=1, threads=1, probe=None, baseline={},
                                   update_baseline=True).to_dict()
            rec = {"stage": "benchmark", "backend": "ort", "card": "card", "tier": "tiny", "case": f"w{k}-{i}", "data": data}
            baseline.update(target, [rec], {"writer": k})
    """
)


def _writers(tmp_path: Path, kind: str, target: Path, count: int, rounds: int) -> list[subprocess.Popen]:
    script, go, ready = tmp_path / "writer.py", tmp_path / "go", tmp_path / "ready"
    script.write_text(_WRITER)
    procs = [subprocess.Popen([sys.executable, "-c", f"import pytest_qeff.baseline, pytest_qeff.results; "
                               f"open({str(ready)!r} + '{k}', 'w').close(); exec(open({str(script)!r}).read())",
                               kind, str(target), str(k), str(rounds), str(go)], env=ENV, stderr=subprocess.PIPE, text=True)
             for k in range(count)]
    deadline = time.time() + 300
    while sum(1 for k in range(count) if Path(f"{ready}{k}").exists()) < count and time.time() < deadline:
        time.sleep(0.05)  # every writer has imported everything
    go.write_text("")
    return procs


def _read_while(procs: list[subprocess.Popen], path: Path, before: str = "") -> tuple[int, list[str]]:
    """Read ``path`` in a loop while ``procs`` run; every read must parse (``before``: the content
    the file had before they started, which need not)."""
    reads, torn = 0, []
    while any(p.poll() is None for p in procs):
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        reads += 1
        time.sleep(0.0005)  # leave the writers some CPU on a 2-core machine
        if text == before:
            continue
        try:
            json.loads(text)
        except ValueError:
            torn.append(text[-60:])
    return reads, torn


def test_concurrent_results_writers_and_a_reader(tmp_path):
    target = tmp_path / "report" / "results.json"
    procs = _writers(tmp_path, "results", target, 4, 40)
    reads, torn = _read_while(procs, target)
    errors = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert not torn and reads > 0
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]  # no temporary left
    print(f"\n[fault injection] 4 writers × 40 results.json writes, {reads} concurrent reads: 0 torn")


def test_concurrent_baseline_updates_lose_nothing(tmp_path):
    from pytest_qeff.baseline import path_for, read

    directory = tmp_path / "published"
    path = path_for(directory, "ort", "card")
    path.parent.mkdir(parents=True)
    path.write_text("{ this is not json")  # an unreadable baseline: moved aside, never lost
    corrupt = path.read_bytes()
    procs = _writers(tmp_path, "baseline", directory, 4, 25)
    reads, torn = _read_while(procs, path, before=corrupt.decode())
    errors = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert not torn
    cases = read(path)["cases"]
    assert sorted(cases) == sorted(f"tiny/w{k}-{i}" for k in range(4) for i in range(25))  # 100 entries, none lost
    asides = list(path.parent.glob("card.unreadable-*.json"))
    assert len(asides) == 1 and asides[0].read_bytes() == corrupt
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["card.json", asides[0].name])  # no lock, no temporary
    print(f"\n[fault injection] 4 sessions × 25 baseline updates over a corrupt file: 100/100 entries kept, "
          f"the corrupt file moved aside intact, {reads} concurrent reads: 0 torn")
