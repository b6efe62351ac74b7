"""``--qeff-changed-since REF``: the cards a change affects, for pull-request gating.

The changed files are ``git diff --name-only $(git merge-base REF HEAD)`` (commits and uncommitted
edits) plus untracked files. Each file maps to cards by the first rule that matches:

    <cards dir>/<id>.toml                  that card (its card changed)
    reports/published/<backend>/<id>.json  that card (its benchmark baseline changed)
    qeff/**.py, an architecture file       the cards of the model types it registers
    qeff/**.py, imported only by           the cards of those architectures
      architecture files (a helper)
    qeff/**.py, anything else              every card (shared code)
    pytest_qeff/** except the report,      every card (the tests themselves changed)
      pyproject.toml, conftest.py
    anything else (docs, templates,        no card
      the report, tests/, .ci/)

An architecture file is a module that calls ``register(ArchSpec(..., model_types=(...)))``; which
module imports which is read from the source with :mod:`ast`, nothing is imported, so the answer
depends only on the files.
"""

from __future__ import annotations

import ast
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from pytest_qeff.cards import Card

__all__ = ["Selection", "ModuleGraph", "changed_files", "module_graph", "select_changed", "git_root"]

_EVERYTHING = ("pyproject.toml", "setup.cfg", "setup.py", "conftest.py")
_REPORT_ONLY = ("pytest_qeff/report/",)


@dataclass
class Selection:
    ref: str
    files: list[str]
    cards: dict[str, list[str]] = field(default_factory=dict)  # card id → why

    def describe(self) -> list[str]:
        head = f"--qeff-changed-since {self.ref}: {len(self.files)} changed file(s) select {len(self.cards)} card(s)"
        return [head] + [f"  {cid}: {'; '.join(why)}" for cid, why in sorted(self.cards.items())]


@dataclass
class ModuleGraph:
    """``imports[m]``: the package's modules that ``m`` imports; ``registers[m]``: model types."""

    imports: dict[str, set[str]] = field(default_factory=dict)
    registers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # repo-relative path → module

    def importers(self, module: str) -> set[str]:
        return {m for m, deps in self.imports.items() if module in deps}

    def architectures_of(self, module: str) -> tuple[str, ...] | None:
        """Model types a change to ``module`` is confined to, or None when it is shared."""
        if module in self.registers:
            return self.registers[module]
        found: set[str] = set()
        seen = {module}
        todo = [module]
        while todo:
            importers = self.importers(todo.pop())
            if not importers:
                return None  # reached a module nothing imports: an entry point, so shared
            for imp in importers - seen:
                seen.add(imp)
                if imp in self.registers:
                    found.update(self.registers[imp])
                else:
                    todo.append(imp)
        return tuple(sorted(found)) or None


def git_root(path: Path) -> Path:
    return Path(_git(path, "rev-parse", "--show-toplevel"))


def _git(cwd: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise pytest.UsageError(f"--qeff-changed-since needs git: {exc}") from None
    if out.returncode != 0:
        err = out.stderr.strip().splitlines()
        raise pytest.UsageError(f"--qeff-changed-since: `git {' '.join(args)}` in {cwd} failed: {err[-1] if err else out.returncode}")
    return out.stdout.strip()


def changed_files(repo: Path, ref: str) -> list[str]:
    base = _git(repo, "merge-base", ref, "HEAD")
    files = set(_git(repo, "diff", "--name-only", "--no-renames", base).splitlines())
    files |= set(_git(repo, "ls-files", "--others", "--exclude-standard").splitlines())
    return sorted(f for f in files if f)


def _module_name(rel: PurePosixPath) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _registered_types(tree: ast.Module) -> tuple[str, ...]:
    """Literal ``model_types=(...)`` of ``register(ArchSpec(...))`` calls."""
    types: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "ArchSpec":
            for kw in node.keywords:
                if kw.arg == "model_types" and isinstance(kw.value, (ast.Tuple, ast.List)):
                    types += [e.value for e in kw.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return tuple(sorted(set(types)))


def module_graph(repo: Path, package: str = "qeff") -> ModuleGraph:
    graph = ModuleGraph()
    root = repo / package
    if not root.is_dir():
        return graph
    sources = {}
    for path in sorted(root.rglob("*.py")):
        rel = PurePosixPath(path.relative_to(repo).as_posix())
        module = _module_name(rel)
        graph.files[str(rel)] = module
        sources[module] = (path, rel.name == "__init__.py")
    known = set(sources)
    for module, (path, is_pkg) in sources.items():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError):
            graph.imports[module] = set()  # unparsable: nothing known, so treated as shared
            continue
        deps: set[str] = set()
        for node in ast.walk(tree):
            names: Iterable[str] = ()
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                # `import qeff.transforms.cache` also runs qeff and qeff.transforms: depend on each prefix
                parts = name.split(".")
                deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
        deps.discard(module)
        graph.imports[module] = deps
        registered = _registered_types(tree)
        if registered:
            graph.registers[module] = registered
    return graph


def select_changed(files: Iterable[str], cards: dict[str, Card], cards_dir: str, graph: ModuleGraph, ref: str) -> Selection:
    """Map changed files (repo-relative, ``/``-separated) to cards; see the module doc."""
    files = sorted(files)
    sel = Selection(ref=ref, files=files)
    by_arch: dict[str, list[str]] = {}
    for card in cards.values():
        by_arch.setdefault(card.architecture, []).append(card.id)

    def add(card_ids: Iterable[str], why: str) -> None:
        for cid in card_ids:
            sel.cards.setdefault(cid, []).append(why)

    cards_prefix = cards_dir.rstrip("/") + "/"
    for f in files:
        path = PurePosixPath(f)
        if f.startswith(cards_prefix) and path.suffix == ".toml":
            if path.stem in cards:
                add([path.stem], f"its card {f} changed")
        elif len(path.parts) == 4 and path.parts[:2] == ("reports", "published") and path.suffix == ".json":
            if path.stem in cards:
                add([path.stem], f"its baseline {f} changed")
        elif f in graph.files:
            module = graph.files[f]
            arches = graph.architectures_of(module)
            if arches is None:
                add(cards, f"shared code {f} changed")
            else:
                add([cid for a in arches for cid in by_arch.get(a, [])], f"{f} changed ({'/'.join(arches)} architecture)")
        elif f.startswith("qeff/") and path.suffix == ".py":  # deleted or outside the graph: assume shared
            add(cards, f"shared code {f} changed")
        elif f in _EVERYTHING or (f.startswith("pytest_qeff/") and not f.startswith(_REPORT_ONLY)):
            add(cards, f"{f} changed (test configuration or plugin)")
    sel.cards = {cid: sel.cards[cid] for cid in sorted(sel.cards)}
    return sel
