"""The installed environment is the lock (issue 17): `make test` on a clean machine must run on
exactly the packages CI ran on, so a library release published overnight cannot change a verdict.

``qeff.compat`` reads the lock; these tests hold the running environment to it, and check that the
comparisons notice a difference (a lock edited to another version, a package the lock lacks).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qeff import compat

REPO = Path(__file__).resolve().parents[1]


def test_the_environment_is_the_lock():
    problems = compat.lock_mismatches()
    assert not problems, (
        "the installed packages differ from requirements/lock.txt (run `make install` to reinstall from "
        "the lock, or `make lock` to regenerate it): " + "; ".join(problems)
    )


def test_the_shipped_lock_is_the_repository_lock():
    assert compat.LOCK_PATH.read_bytes() == (REPO / "requirements" / "lock.txt").read_bytes()
    locked = compat.locked_versions()
    assert set(compat.ARTIFACT_LIBRARIES) <= set(locked), sorted(locked)


def _edited_lock(tmp_path: Path, name: str, new_version: str) -> Path:
    lines = []
    for line in compat.LOCK_PATH.read_text().splitlines():
        if line.startswith(f"{name}=="):
            line = f"{name}=={new_version}  # edited by the test"
        lines.append(line)
    path = tmp_path / "lock.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_different_version_is_named(tmp_path):
    lock = _edited_lock(tmp_path, "transformers", "5.0.0")
    problems = compat.lock_mismatches(lock)
    installed = compat.installed_version("transformers")
    assert problems == [f"transformers: locked 5.0.0, installed {installed}"]
    assert compat.untested_libraries(lock) == [("transformers", installed, "5.0.0")]
    warning = compat.untested_warning(lock)
    assert warning.startswith(f"warning: transformers {installed} (tested: 5.0.0)") and "make test-compat" in warning


def test_a_package_missing_from_the_lock_is_named(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("".join(line + "\n" for line in compat.LOCK_PATH.read_text().splitlines() if not line.startswith("tqdm==")))
    assert [p for p in compat.lock_mismatches(lock) if p.startswith("tqdm")] == [
        f"tqdm: installed {compat.installed_version('tqdm')}, not in the lock"
    ]


def test_a_local_build_label_is_the_same_release(tmp_path):
    # The lock says torch==2.13.0+cpu; an installed 2.13.0+cpu (or 2.13.0) is the tested release.
    lock = _edited_lock(tmp_path, "torch", compat.installed_version("torch").split("+")[0])
    assert compat.untested_libraries(lock) == []


def test_no_lock_shipped_means_no_warning(tmp_path):
    assert compat.untested_warning(tmp_path / "absent.txt") is None


@pytest.mark.parametrize(
    ("version", "per_query_head"),
    [("5.0.0", True), ("5.24.0", True), ("5.25.0", False), ("5.26.1", False), ("6.0.0.dev0", False)],
)
def test_falcon_rule_by_version(version, per_query_head):
    assert compat.falcon_cache_per_query_head(version) is per_query_head


def test_falcon_rule_matches_the_installed_source():
    """The version boundary checked against the code it describes: transformers up to 5.24 splits
    Falcon's heads in ``_split_heads`` (broadcasting the key/value groups); 5.25 removed it."""
    from transformers.models.falcon.modeling_falcon import FalconAttention

    assert compat.falcon_cache_per_query_head() is hasattr(FalconAttention, "_split_heads")


@pytest.mark.parametrize("command", ["doctor", "check"])
def test_check_and_doctor_warn_in_one_line(command, tmp_path, monkeypatch, capsys, tiny_model_dir):
    from qeff.cli import main

    args = ["doctor", "--home", str(tmp_path / "home")] if command == "doctor" else ["check", "-m", str(tiny_model_dir)]
    main(args)
    assert "tested:" not in capsys.readouterr().err  # the installed libraries are the lock's

    monkeypatch.setattr(compat, "LOCK_PATH", _edited_lock(tmp_path, "onnxruntime", "1.20.0"))
    main(args)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "tested:" in line]
    assert warnings == [
        f"qeff: warning: onnxruntime {compat.installed_version('onnxruntime')} (tested: 1.20.0) — outside the versions "
        "qeff's lock was tested with; `make test-compat` runs the conformance suite on them"
    ]
