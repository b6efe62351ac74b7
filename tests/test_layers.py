"""qeff's modules import downward only (issue 9): a layer may use the layers below it, never one
above. ``compilers/`` once imported ``pipeline`` (for a progress clock), ``compilers/ort.py`` a
private of ``runtime/ort.py``, and ``runtime/__init__.py`` imported ``compilers`` — a cycle. Every
``import`` counts, function-level ones included, because a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qeff

ROOT = Path(qeff.__file__).parent

#: Bottom to top. A module not listed fails the test: place it in the layer it belongs to.
LAYERS: list[tuple[str, ...]] = [
    ("qeff._version", "qeff._lazy", "qeff.compat", "qeff.errors", "qeff._system", "qeff.progress", "qeff.serialization", "qeff.layout", "qeff.metrics", "qeff.data",
     "qeff.atomic", "qeff.locks", "qeff.integrity", "qeff.serving", "qeff.serving.variant", "qeff.serving.ctx_ladder", "qeff.quant", "qeff.meter"),
    ("qeff.sdk", "qeff.artifacts", "qeff.inputs", "qeff.headers", "qeff.validation", "qeff.embedded", "qeff.serving.sampling", "qeff.serving.ngram",
     "qeff.home", "qeff.source_digest"),
    ("qeff.loading", "qeff.configs", "qeff.doctor", "qeff.tokenizer", "qeff.consistency", "qeff.memory"),
    ("qeff.transforms", "qeff.support", "qeff.serving.graph", "qeff.weights", "qeff.synthetic"),
    ("qeff.exporter", "qeff.preflight", "qeff.offload"),
    ("qeff.runtime",),
    ("qeff.compilers",),
    ("qeff.backends",),
    ("qeff.generation", "qeff.serving.result", "qeff.serving.continuous", "qeff.serving.speculative", "qeff.serving.options",
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


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
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
                found.append((node.lineno, sub if is_module else node.module))
    return found


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
