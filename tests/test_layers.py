"""qeff's modules import downward only (issue 9): a layer may use the layers below it, never one
above. ``compilers/`` once imported ``pipeline`` (for a progress clock), ``compilers/ort.py`` a
private of ``runtime/ort.py``, and ``runtime/__init__.py`` imported ``compilers`` — a cycle. Every
``import`` counts, function-level ones included, because a lazy import is still a dependency."""

from __future__ import annotations

import ast
import functools
from collections import deque
from pathlib import Path

import pytest

import qeff

ROOT = Path(qeff.__file__).parent

#: Bottom to top. A module not listed fails the test: place it in the layer it belongs to.
LAYERS: list[tuple[str, ...]] = [
    ("qeff._version", "qeff._lazy", "qeff.store", "qeff.intake", "qeff.compat", "qeff.errors", "qeff.shape", "qeff.code_digest", "qeff._system", "qeff.progress", "qeff.store.serialization", "qeff.store.layout", "qeff.metrics", "qeff.data",
     "qeff.store.atomic", "qeff.store.locks", "qeff.store.integrity", "qeff.serving", "qeff.serving.variant", "qeff.serving.ctx_ladder", "qeff.quant", "qeff.meter",
     "qeff.generation"),
    ("qeff.sdk", "qeff.store.artifacts", "qeff.inputs", "qeff.intake.headers", "qeff.validation", "qeff.intake.embedded", "qeff.generation.sampling",
     "qeff.generation.ngram", "qeff.serving.sampling", "qeff.serving.ngram", "qeff.store.home", "qeff.intake.source_digest"),
    ("qeff.intake.loading", "qeff.intake.configs", "qeff.store.doctor", "qeff.intake.tokenizer", "qeff.intake.consistency", "qeff.memory", "qeff.generation.result",
     "qeff.generation.engine", "qeff.serving.result"),
    ("qeff.transforms", "qeff.intake.support", "qeff.serving.graph", "qeff.weights", "qeff.synthetic"),
    ("qeff.exporter", "qeff.intake.preflight", "qeff.offload"),
    ("qeff.runtime",),
    ("qeff.compilers", "qeff.generation.continuous", "qeff.generation.speculative"),
    ("qeff.backends",),
    ("qeff.generation.static", "qeff.serving.continuous", "qeff.serving.speculative", "qeff.serving.options",
     "qeff.serving.dispatch"),
    ("qeff.divergence", "qeff.verification", "qeff.precision", "qeff.layer_check"),
    ("qeff.pipeline", "qeff.cpu_graph"),
    ("qeff.cli", "qeff.cloud", "qeff.__main__", "qeff"),
]


def _layer(module: str) -> int | None:
    best, rank = -1, None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), index
    return rank


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _lazy_table(package: str) -> dict[str, str]:
    """A package's ``_LAZY`` table (:mod:`qeff._lazy`): ``from package import name`` imports the
    module ``table[name]`` on first use, a dependency as real as an import statement."""
    init = ROOT.parent / Path(*package.split(".")) / "__init__.py"
    if not init.is_file():
        return {}
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _imports_in(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "qeff"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "qeff":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                # `from qeff import sdk` imports the module qeff.sdk; `from qeff import transform` the package.
                is_module = (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    ROOT.parent / Path(*sub.split("."))
                ).is_dir()
                found.append((node.lineno, sub if is_module else _lazy_table(node.module).get(alias.name, node.module)))
    return found


def _imports(path: Path) -> list[tuple[int, str]]:
    return _imports_in(ast.parse(path.read_text(encoding="utf-8")))


def _local_imports(path: Path) -> set[str]:
    """What ``path`` imports only inside functions (deferred until the function runs)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = {t for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for _, t in _imports_in(node)}
    return inside - {t for _, t in _imports_in(ast.Module(body=[n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))], type_ignores=[]))}


MODULES = sorted(p for p in ROOT.rglob("*.py"))


def _upward(me: str, path: Path) -> list[str]:
    mine = _layer(me)
    assert mine is not None, f"{me} is in no layer: add it to LAYERS in {__file__}"
    upward = []
    for line, target in _imports(path):
        theirs = _layer(target)
        assert theirs is not None, f"{me}:{line} imports {target}, which is in no layer: add it to LAYERS"
        if theirs > mine:
            upward.append(f"{me}:{line} imports {target} (layer {theirs} > {mine})")
    return upward


@pytest.mark.parametrize("path", MODULES, ids=[_module_name(p) for p in MODULES])
def test_imports_go_downward(path: Path):
    upward = _upward(_module_name(path), path)
    assert not upward, "upward imports: " + "; ".join(upward)


def test_a_seeded_upward_import_is_caught(tmp_path):
    """The check itself sees a lazy import of a higher layer (a runtime module reaching up to the pipeline)."""
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from qeff.pipeline import Pipeline\n")
    assert _upward("qeff.runtime.fake", fake) == ["qeff.runtime.fake:2 imports qeff.pipeline (layer 10 > 5)"]


def _entered(me: str, target: str) -> list[str]:
    """The packages Python initializes when ``me`` imports ``target``: its parent packages, less
    ``qeff`` itself and those ``me`` is inside of (already initializing)."""
    parts = target.split(".")
    parents = (".".join(parts[:i]) for i in range(2, len(parts)))
    return [p for p in parents if not (me == p or me.startswith(p + "."))]


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → what importing it may import: every import, in a function or not, each with the
    packages it enters, and the modules behind the lazy names it uses."""
    graph = {}
    for me, path in modules.items():
        edges = set()
        for _, target in _imports(path):
            edges.add(target)
            edges.update(_entered(me, target))
        edges.discard(me)
        graph[me] = edges
    return graph


def _cycle_through(me: str, graph: dict[str, set[str]], modules: dict[str, Path]) -> str | None:
    """The shortest import cycle from ``me`` back to ``me``, as ``a → b ⇢ a`` (⇢: only inside a
    function, the import that hides the cycle until it runs); None if there is none."""
    parent: dict[str, str] = {}
    queue = deque()
    for nxt in sorted(graph.get(me, ())):
        parent[nxt] = me
        queue.append(nxt)
    while queue and me not in parent:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    if me not in parent:
        return None
    path, node = [me], parent[me]
    while node != me:
        path.append(node)
        node = parent[node]
    path.append(me)
    path.reverse()
    text = path[0]
    for a, b in zip(path, path[1:]):
        hidden = a in modules and b in _local_imports(modules[a])
        text += f" {'⇢' if hidden else '→'} {b}"
    return text


NAMED = {_module_name(p): p for p in MODULES}
GRAPH = _graph(NAMED)

#: Cycles another change removes (strict: when it is gone the test says so, and the mark goes).
#: Cycles known and not yet removed (an xfail(strict=True) each); none since issue 20's items 3 and 5.
KNOWN_CYCLES: dict[str, str] = {}


@pytest.mark.parametrize("me", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=KNOWN_CYCLES[m])) if m in KNOWN_CYCLES else m for m in sorted(NAMED)
])
def test_no_import_cycle(me: str):
    """No module reaches itself through imports — those inside functions, the packages they enter
    and lazy names included: a function-local import that closes a cycle only hides it (issue 20:
    ``generation`` ⇢ ``serving.speculative`` → ``generation``)."""
    assert _cycle_through(me, GRAPH, NAMED) is None, f"import cycle: {_cycle_through(me, GRAPH, NAMED)}"


def _seeded(tmp_path: Path, module: str, extra: str) -> dict[str, Path]:
    """The tree with ``extra`` appended to ``module``'s source."""
    real = NAMED[module]
    fake = tmp_path / real.name
    fake.write_text(real.read_text(encoding="utf-8") + extra, encoding="utf-8")
    return {**NAMED, module: fake}


def test_a_seeded_hidden_cycle_is_caught(tmp_path):
    """The engine reaching up to a loop in a function (the shape of the old generation ⇢
    serving.speculative → generation cycle) is a cycle, and the message names the hidden link."""
    modules = _seeded(tmp_path, "qeff.generation.engine", "\n\ndef _f():\n    from qeff.generation.static import generate\n")
    assert _cycle_through("qeff.generation.engine", _graph(modules), modules) == (
        "qeff.generation.engine ⇢ qeff.generation.static → qeff.generation.engine"
    )


def test_a_seeded_package_cycle_is_caught(tmp_path):
    """A package whose ``__init__`` imports a module that imports back into the package is a cycle
    (the package-level shape of issue 20's): importing ``qeff.generation.continuous`` from outside
    runs ``qeff/generation/__init__`` first."""
    modules = _seeded(tmp_path, "qeff.generation", "\nfrom qeff.serving.dispatch import run_serving  # noqa: E402\n")
    cycle = _cycle_through("qeff.generation", _graph(modules), modules)
    assert cycle is not None and cycle.startswith("qeff.generation → qeff.serving.dispatch → ") and cycle.endswith("qeff.generation")


def test_the_plugin_and_reports_start_without_torch():
    """Every pytest run loads the plugin, and reading a report needs no model: neither imports
    torch, transformers or onnx (seconds on a loaded machine)."""
    import subprocess
    import sys

    code = (
        "import sys, qeff, qeff.verification, pytest_qeff.plugin, pytest_qeff.records, pytest_qeff.report.views;"
        "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_cli_help_and_usage_errors_import_no_heavy_library():
    """Issue 12: `qeff --help` and a usage error answer before torch, transformers or onnx load
    (each costs seconds); a flag module that reaches for a graph class breaks this."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from qeff.cli import main\n"
        "for argv in (['--help'], ['infer', '--help'], ['infer', '--model_name', 'x', '--batch_size', '0']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr
