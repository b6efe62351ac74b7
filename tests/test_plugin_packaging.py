"""The wheel ships the cards and templates and registers the plugin; installed, it runs anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(module_tmp: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of the sources (the build writes build/ and *.egg-info)."""
    src = module_tmp("src")
    for name in ("pyproject.toml", "README.md", "qeff", "pytest_qeff", "model_cards", "templates"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.exists():
            shutil.copy(path, src / name)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("qeff\n")
    out = module_tmp("dist")
    # Build with this environment's setuptools when it is recent enough (fast, offline); else let
    # pip fetch the pyproject's build requirements into an isolated environment.
    isolation = ["--no-build-isolation"] if _has_build_backend() else []
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out), str(src)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (found,) = out.glob("qeff-*.whl")
    return found


def _has_build_backend() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("setuptools").split(".")[0]) >= 69 and bool(version("wheel"))
    except PackageNotFoundError:
        return False


def test_wheel_holds_cards_templates_and_entry_point(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    cards = {f"pytest_qeff/model_cards/{p.name}" for p in (ROOT / "model_cards").glob("*.toml")}
    templates = {f"pytest_qeff/templates/{p.name}" for p in (ROOT / "templates").iterdir() if p.suffix in (".j2", ".css")}
    assert len(cards) >= 12 and cards <= names
    assert {"pytest_qeff/templates/index.html.j2", "pytest_qeff/templates/card.html.j2", "pytest_qeff/templates/style.css"} <= templates <= names
    assert "pytest_qeff/suite/test_conformance.py" in names
    assert "[pytest11]\npytest_qeff.plugin = pytest_qeff.plugin" in entry_points


def test_installed_plugin_runs_from_any_directory_and_tolerates_p(pytester: pytest.Pytester, wheel: Path, tmp_path: Path) -> None:
    """Unpack the wheel as an installation would (site directory + dist-info), then run pytest
    from an unrelated directory: the entry point loads the plugin, ``-p pytest_qeff.plugin`` does
    not register it twice, and the shipped cards are found."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    pytester.makeini("[pytest]\n")  # an unrelated project: its own rootdir, no testpaths
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(site)}
    for extra in ((), ("-p", "pytest_qeff.plugin")):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", *extra, "--qeff-model", "smollm2-135m", "--collect-only", "-q", "-p", "no:cacheprovider"],
            cwd=pytester.path, env=env, capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "test_transform_matches_hf[smollm2-135m-bs1-pl32-cl128]" in result.stdout
