"""Issue 18: the export's identity is keyed on the qeff code that can shape it (qeff/code_digest.py),
not on all of qeff's source. An edit outside that code keeps the key and the export is reused; an
edit inside it (a transform, a module the exporter imports inside a function, the pipeline's export
method) changes the key and re-exports; an export keyed the old way is never trusted."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import onnx
import pytest

import qeff
from qeff import code_digest
from qeff._system import library_versions, source_digest
from qeff.code_digest import PACKAGE_ROOT, closure, scope_digest, scope_of

TRANSFORM_MODULES = sorted(
    "qeff." + ".".join(p.relative_to(PACKAGE_ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (PACKAGE_ROOT / "transforms").rglob("*.py")
)


def _copy(tmp_path: Path) -> Path:
    """An editable copy of the installed qeff package (its directory is named qeff, as modules are)."""
    copy = tmp_path / "src" / "qeff"
    shutil.copytree(PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _module_file(root: Path, module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    return root / rel / "__init__.py" if (root / rel).is_dir() else root / rel.with_suffix(".py")


def _append_comment(root: Path, module: str) -> None:
    path = _module_file(root, module)
    path.write_text(path.read_text(encoding="utf-8") + "\n# edited by a test\n", encoding="utf-8")


def _add_statement(root: Path, cls: str, method: str) -> None:
    """Add ``_edited = 1`` at the end of ``cls.method`` in qeff/pipeline.py (a code change, not a comment)."""
    path = root / "pipeline.py"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    klass = next(n for n in ast.parse("".join(lines)).body if isinstance(n, ast.ClassDef) and n.name == cls)
    func = next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == method)
    indent = " " * func.body[0].col_offset
    lines.insert(func.end_lineno, f"{indent}_edited = 1\n")
    path.write_text("".join(lines), encoding="utf-8")


def _cli_module() -> str:
    """The CLI's module (a file today, a package once it is split)."""
    return "qeff.cli"


# --- the closure -------------------------------------------------------------------------------


def test_the_export_closure_holds_the_export_path_and_every_transform():
    found = closure("export").modules
    assert TRANSFORM_MODULES and set(TRANSFORM_MODULES) <= found  # registered by computed names: all of them
    # the exporter, its streamed writer, loading, the tokenizer files saved beside the graph, and
    # qeff.serving.graph, which the exporter imports only inside a function
    assert {"qeff", "qeff.exporter", "qeff.weights", "qeff.intake.loading", "qeff.intake.tokenizer", "qeff.serving.graph",
            "qeff.serving", "qeff._system", "qeff.code_digest"} <= found
    # code that runs after the export, or around it: not the export's
    assert not any(m == _cli_module() or m.startswith(_cli_module() + ".") for m in found)
    assert not {"qeff.generation", "qeff.verification", "qeff.pipeline"} & found  # pipeline: a slice, not the file
    assert closure("export").slices == ("qeff.pipeline:Pipeline.export",)


def test_the_verify_closure_holds_the_export_and_the_verification():
    export, verify = closure("export").modules, closure("verify").modules
    assert export <= verify and {"qeff.verification", "qeff.runtime.ort"} <= verify


def test_the_fast_import_scan_finds_everything_a_full_parse_finds():
    """Whole modules are scanned (import statements found by a pattern, parsed alone), not parsed
    whole: on every module of qeff, the scan must find at least what the full ``ast`` walk finds."""
    pkg = code_digest._Package(PACKAGE_ROOT)
    missed = {m: sorted(code_digest._imports(pkg, m, [pkg.tree(m)]) - code_digest._scan(pkg, m)) for m in pkg.files}
    assert not {m: v for m, v in missed.items() if v}
    assert "qeff.serving.graph" in code_digest._scan(pkg, "qeff.exporter")  # imported inside a function


def test_the_scan_reads_every_form_of_import(tmp_path):
    root = _copy(tmp_path)
    (root / "probe.py").write_text(
        "import os\n"
        "def f():\n    from qeff.transforms import llama\n    return llama\n"
        "try: import qeff.sdk as s\nexcept ImportError: pass\n"
        "from .store import (\n    atomic,\n    locks,\n)\n"
        "import importlib\nm = importlib.import_module('qeff.metrics')\n"
        "import qeff\nqeff.verify(1)\n"
        "from qeff import generate\n", encoding="utf-8")
    pkg = code_digest._Package(root)
    found = code_digest._scan(pkg, "qeff.probe")
    assert {"qeff.transforms.llama", "qeff.sdk", "qeff.store.atomic", "qeff.store.locks", "qeff.metrics",
            "qeff.verification", "qeff.generation.static"} <= found  # what qeff._LAZY names
    assert found >= code_digest._imports(pkg, "qeff.probe", [pkg.tree("qeff.probe")])


def test_a_root_that_no_longer_exists_is_an_error_not_an_empty_key(monkeypatch):
    monkeypatch.setitem(code_digest.SCOPES, "export", ("qeff.pipeline:Pipeline.no_such_method",))
    with pytest.raises(LookupError, match="does not exist"):
        scope_digest("export")


# --- the key -----------------------------------------------------------------------------------


def test_an_edit_outside_the_export_code_keeps_its_key(tmp_path):
    root = _copy(tmp_path)
    assert scope_digest("export", root) == scope_digest("export")  # a copy: the same key (names, not paths)
    before, whole = scope_digest("export", root), source_digest(root)
    _append_comment(root, _cli_module())
    _append_comment(root, "qeff.generation")
    _add_statement(root, "Pipeline", "compile")  # pipeline.py, outside the export's slice
    assert source_digest(root) != whole  # the old key would have re-exported
    assert scope_digest("export", root) == before


@pytest.mark.parametrize("module", ["qeff.transforms.llama", "qeff.transforms.gpt_oss", "qeff.serving.graph",
                                    "qeff.exporter", "qeff.weights", "qeff.intake.loading", "qeff._system", "qeff"])
def test_an_edit_inside_the_export_code_changes_its_key(tmp_path, module):
    root = _copy(tmp_path)
    before = scope_digest("export", root)
    _append_comment(root, module)
    assert scope_digest("export", root) != before


@pytest.mark.parametrize("method", ["export", "_export_streamed", "model", "qmodel", "tokenizer", "__init__"])
def test_an_edit_to_the_pipeline_code_the_export_runs_changes_its_key(tmp_path, method):
    root = _copy(tmp_path)
    before = scope_digest("export", root)
    _add_statement(root, "Pipeline", method)
    assert scope_digest("export", root) != before


def test_the_verification_record_is_keyed_on_the_verification_code(tmp_path):
    root = _copy(tmp_path)
    export, verify = scope_digest("export", root), scope_digest("verify", root)
    _append_comment(root, "qeff.verification")
    assert scope_digest("export", root) == export and scope_digest("verify", root) != verify
    _add_statement(root, "Pipeline", "verify_cached")
    assert scope_digest("export", root) == export
    _append_comment(root, "qeff.exporter")
    assert scope_digest("export", root) != export


def test_the_scoped_key_never_equals_a_whole_source_key():
    versions = library_versions("export")
    assert versions["qeff_source"].startswith("export:") and scope_of(versions["qeff_source"]) == "export"
    assert scope_of(library_versions()["qeff_source"]) is None and versions["qeff"] == qeff.__version__


# --- the export, end to end --------------------------------------------------------------------


@pytest.fixture
def counted_exports(monkeypatch):
    import qeff.exporter

    calls = []
    real = qeff.exporter.export

    def export(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(qeff.exporter, "export", export)
    return calls


def _export(home: Path):
    from qeff.pipeline import Pipeline
    from tests.tiny import tiny_model

    pipe = Pipeline("tiny-llama", model=tiny_model("llama", seed=1), identity={"test": "export-key"}, home=home, progress=False)
    return pipe.export()


def test_the_export_is_reused_across_edits_outside_its_code_and_rebuilt_after_one_inside(tmp_path, monkeypatch, counted_exports):
    from qeff.store.doctor import superseded_because

    root = _copy(tmp_path)
    monkeypatch.setattr(code_digest, "PACKAGE_ROOT", root)
    monkeypatch.setattr(code_digest, "_CACHE", {})
    home = tmp_path / "home"
    first = _export(home)
    assert not first.reused and len(counted_exports) == 1
    stamped = {p.key: p.value for p in onnx.load(str(first.path / "model.onnx"), load_external_data=False).metadata_props}
    assert stamped["qeff.versions"].count(first.manifest["inputs"]["versions"]["qeff_source"]) == 1

    _append_comment(root, _cli_module())  # a CLI message
    _add_statement(root, "Pipeline", "compile")
    monkeypatch.setattr(code_digest, "_CACHE", {})
    again = _export(home)
    assert again.reused and again.path == first.path and len(counted_exports) == 1
    assert superseded_because(first.manifest) is None

    _append_comment(root, "qeff.transforms.llama")  # the architecture file: loaded by a computed name
    monkeypatch.setattr(code_digest, "_CACHE", {})
    rebuilt = _export(home)
    assert not rebuilt.reused and rebuilt.path != first.path and len(counted_exports) == 2
    assert "another revision of qeff's source" in superseded_because(first.manifest)


def test_an_export_keyed_on_all_of_the_source_is_rebuilt_and_superseded(tmp_path, monkeypatch, counted_exports):
    """A manifest an older qeff wrote (``qeff_source``: the whole-source digest, bare hex) is never
    trusted under the new meaning, even where its digest would still match."""
    import qeff._system
    from qeff.store.doctor import superseded_because

    home = tmp_path / "home"
    real = qeff._system.library_versions
    with monkeypatch.context() as m:
        m.setattr(qeff._system, "library_versions", lambda scope=None: real())
        old = _export(home)
    assert scope_of(old.manifest["inputs"]["versions"]["qeff_source"]) is None
    new = _export(home)
    assert not new.reused and new.path != old.path and len(counted_exports) == 2
    assert new.manifest["inputs"]["versions"]["qeff_source"].startswith("export:")
    assert "another revision of qeff's source" in superseded_because(old.manifest)
    assert superseded_because(new.manifest) is None


def test_the_verification_record_is_rebuilt_after_an_edit_to_the_verification_code_and_the_export_is_not(
        tmp_path, monkeypatch, counted_exports):
    """The verify record no longer inherits the whole-source key through the export's inputs: its
    own key covers the verification code, so an edit there re-verifies (on the reused export)."""
    from qeff.pipeline import Pipeline
    from tests.tiny import random_prompts, tiny_model

    root = _copy(tmp_path)
    monkeypatch.setattr(code_digest, "PACKAGE_ROOT", root)
    monkeypatch.setattr(code_digest, "_CACHE", {})
    home, prompts = tmp_path / "home", random_prompts([5])

    def verified():
        pipe = Pipeline("tiny-llama", model=tiny_model("llama", seed=1), identity={"test": "verify-key"}, home=home,
                        progress=False)
        return pipe.verify_cached(prompts, prompt_len=8, ctx_len=32, steps=2)[0]

    first = verified()
    assert not first.reused and first.manifest["inputs"]["versions"]["qeff_source"].startswith("verify:")
    _append_comment(root, _cli_module())
    monkeypatch.setattr(code_digest, "_CACHE", {})
    assert verified().reused and len(counted_exports) == 1
    _append_comment(root, "qeff.verification")
    monkeypatch.setattr(code_digest, "_CACHE", {})
    again = verified()
    assert not again.reused and again.path != first.path and len(counted_exports) == 1  # the export was reused
