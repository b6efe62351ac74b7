"""--qeff-changed-since: which cards a change selects, in a small repository made for the test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

CARDS = Path(__file__).resolve().parent.parent / "model_cards"

# A qeff-shaped package: shared code, two architecture files, and a helper only Llama imports.
SOURCES = {
    "qeff/__init__.py": "from qeff.verification import verify\n",
    "qeff/verification.py": "from qeff.transforms import transform\n",
    "qeff/transforms/__init__.py": "from qeff.transforms.model import transform\n",
    "qeff/transforms/model.py": "from qeff.transforms.registry import get_spec\n\ndef transform(m):\n    return get_spec(m)\n",
    "qeff/transforms/registry.py": "def register(spec):\n    return spec\n\ndef get_spec(m):\n    return m\n",
    "qeff/transforms/llama.py": (
        "from qeff.transforms.registry import ArchSpec, register\nfrom . import _rope\n\n"
        'LLAMA = register(ArchSpec(name="llama", model_types=("llama",)))\n'
    ),
    "qeff/transforms/_rope.py": "def rotate(x):\n    return x\n",
    "qeff/transforms/mistral.py": (
        "from qeff.transforms.registry import ArchSpec, register\n\n"
        'MISTRAL = register(ArchSpec(name="mistral", model_types=("mistral",)))\n'
    ),
    "README.md": "# fake\n",
}
CARD_IDS = ("llama-2-7b-chat", "llama-3-8b", "mistral-7b-instruct-v0.1")


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(pytester: pytest.Pytester) -> Path:
    for rel, text in SOURCES.items():
        (pytester.path / rel).parent.mkdir(parents=True, exist_ok=True)
        (pytester.path / rel).write_text(text)
    (pytester.path / "model_cards").mkdir()
    for cid in CARD_IDS:
        (pytester.path / "model_cards" / f"{cid}.toml").write_text((CARDS / f"{cid}.toml").read_text())
    git(pytester.path, "init", "-q", "-b", "main")
    git(pytester.path, "add", "-A")
    git(pytester.path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    return pytester.path


def selected(pytester: pytest.Pytester, *extra: str) -> tuple[set[str], pytest.RunResult]:
    result = pytester.runpytest(
        "-p", "pytest_qeff.plugin", "-p", "no:cacheprovider", "--qeff-cards-dir", "model_cards",
        "--qeff-changed-since", "main", "--collect-only", "-q", *extra,
    )
    cards = {line.split("[")[1].rsplit("-bs", 1)[0] for line in result.outlines if "test_transform" in line}
    return cards, result


@pytest.mark.parametrize(
    ("change", "cards"),
    [
        ("model_cards/llama-3-8b.toml", {"llama-3-8b"}),  # a card file → that card
        ("qeff/transforms/mistral.py", {"mistral-7b-instruct-v0.1"}),  # an architecture file → its cards
        ("qeff/transforms/_rope.py", {"llama-2-7b-chat", "llama-3-8b"}),  # imported only by llama.py
        ("qeff/verification.py", set(CARD_IDS)),  # shared code → every card
        ("qeff/transforms/registry.py", set(CARD_IDS)),  # imported by the shared model.py too
        ("qeff/transforms/gpt2.py", set(CARD_IDS)),  # a new file nothing imports (yet): assume shared
    ],
)
def test_changes_select_cards(pytester: pytest.Pytester, repo: Path, change: str, cards: set[str]) -> None:
    path = repo / change
    path.write_text((path.read_text() if path.exists() else "") + "\n# changed\n")
    found, result = selected(pytester)
    assert result.ret == 0
    assert found == cards


def test_committed_changes_count_and_intersect_with_qeff_model(pytester: pytest.Pytester, repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / "qeff/transforms/_rope.py").write_text("def rotate(x):\n    return -x\n")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "rope")
    found, _ = selected(pytester, "--qeff-model", "llama-3-*")
    assert found == {"llama-3-8b"}
    result = pytester.runpytest("-p", "pytest_qeff.plugin", "--qeff-cards-dir", "model_cards", "--qeff-changed-since", "main", "--collect-only")
    result.stdout.fnmatch_lines([
        "--qeff-changed-since main: 1 changed file(s) select 2 card(s)",
        "  llama-2-7b-chat: qeff/transforms/_rope.py changed (llama architecture)",
    ])


def test_no_affected_card_is_a_pass(pytester: pytest.Pytester, repo: Path) -> None:
    (repo / "README.md").write_text("# docs only\n")
    found, result = selected(pytester)
    assert found == set() and result.ret == 0
    run = pytester.runpytest("-p", "pytest_qeff.plugin", "--qeff-cards-dir", "model_cards", "--qeff-changed-since", "main")
    assert run.ret == 0
    run.stdout.fnmatch_lines(["no model card is affected by the changes since main"])


def test_unknown_ref_is_a_usage_error(pytester: pytest.Pytester, repo: Path) -> None:
    _, result = selected(pytester, "--qeff-changed-since", "no-such-branch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --qeff-changed-since: `git merge-base no-such-branch HEAD` in * failed: *"])
