"""The two routes to a compiled artifact that tests compare: the CLI's ``qeff compile`` and the
pytest plugin's compile stage (``Workspace.compiled``), on one checkpoint and one qeff home."""

from __future__ import annotations

from pathlib import Path

from pytest_qeff.cards import Case, default_cards_dir, load_cards
from pytest_qeff.stages import Workspace
from qeff.pipeline import Pipeline


def cli_compile(home: Path, checkpoint: Path, capsys, case: Case, *flags: str) -> Path:
    """``qeff compile --backend ort`` of ``checkpoint`` at ``case``'s shape; the artifact it printed."""
    from qeff.cli import main

    argv = ["compile", "-m", str(checkpoint), "--home", str(home), "--backend", "ort", "--batch_size",
            str(case.batch_size), "--prompt_len", str(case.prompt_len), "--ctx_len", str(case.ctx_len), *flags]
    assert main(argv) == 0, capsys.readouterr().err
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def plugin_compiled(home: Path, checkpoint: Path, case: Case, backend: str, card_id: str = "llama-3-8b") -> Path:
    """The plugin's compile stage (a full-tier workspace) on a pipeline of the same model and home."""
    card = load_cards(default_cards_dir())[card_id]
    ws = Workspace(root=home, tier="full", device_group=(0,), baseline_dir=home, default_baseline_dir=home)
    ws._pipelines[card.id] = Pipeline.open(str(checkpoint), home=home, progress=False)
    return ws.compiled(card, case, backend).path
