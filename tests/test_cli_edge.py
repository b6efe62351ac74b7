"""The command line's ``Namespace`` stops at its edge (issue 20, item 4): :func:`qeff.cli.options.resolve`
turns it into typed records once, and no library module (``qeff/`` outside ``qeff/cli/``) takes one.

Once ``serving_options(args)``, ``check_precision_args(args)`` and ``verify_precision(args, …)`` read
flags off the parsed ``Namespace`` (19 ``getattr(args, …)``): a library function whose behaviour
depends on which attributes a parser happened to set. Two guards: one reads the source (no
``argparse``, no ``Namespace``, no function that reads attributes off a parameter named ``args``),
one watches a real run (no function of the library is called with a ``Namespace`` among its
arguments). Each is shown failing on a seeded fault.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

import pytest

import qeff
from qeff.errors import UsageError
from qeff.shape import Shape

LIBRARY = Path(qeff.__file__).parent
EDGE = LIBRARY / "cli"


def _namespace_uses(path: Path) -> list[str]:
    """Where a module's source takes the command line's Namespace: ``import argparse``, the name
    ``Namespace``, or a function reading attributes off a parameter named ``args``
    (``args.x``, ``getattr(args, …)``, ``hasattr(args, …)``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
            found.append(f"{path.name}:{node.lineno} imports argparse")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
            found.append(f"{path.name}:{node.lineno} imports from argparse")
        elif (isinstance(node, ast.Name) and node.id == "Namespace") or (isinstance(node, ast.Attribute) and node.attr == "Namespace"):
            found.append(f"{path.name}:{node.lineno} names Namespace")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            if not any(p.arg == "args" for p in params):
                continue
            for inner in ast.walk(node):
                read = (isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) and inner.value.id == "args") or (
                    isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id in ("getattr", "hasattr")
                    and inner.args and isinstance(inner.args[0], ast.Name) and inner.args[0].id == "args")
                if read:
                    found.append(f"{path.name}:{inner.lineno} {node.name}() reads attributes off its parameter args")
                    break
    return found


LIBRARY_MODULES = sorted(p for p in LIBRARY.rglob("*.py") if EDGE not in p.parents)


def test_no_library_module_takes_the_namespace():
    found = [use for path in LIBRARY_MODULES for use in _namespace_uses(path)]
    assert not found, "the CLI's Namespace reaches the library: " + "; ".join(found)
    assert len(LIBRARY_MODULES) > 40  # the walk saw the library, not an empty folder


@pytest.mark.parametrize("source,expected", [
    ("import argparse\n\ndef serving_options(args: argparse.Namespace):\n    return args\n", "imports argparse"),
    ("from argparse import Namespace\n", "imports from argparse"),
    ("def check_precision_args(args) -> list:\n    return parse_tiers(args.precision)\n", "check_precision_args() reads attributes"),
    ("def f(args):\n    return getattr(args, 'threads', None)\n", "f() reads attributes"),
])
def test_the_source_check_catches_a_seeded_namespace(tmp_path, source, expected):
    """The shapes the library had before the edge was typed (issue 20) are each caught."""
    fake = tmp_path / "fake.py"
    fake.write_text(source)
    found = _namespace_uses(fake)
    assert found and expected in found[0]


def test_the_source_check_leaves_tuples_named_args_alone(tmp_path):
    """A forward hook's ``args`` tuple (qeff.divergence, qeff.layer_check) is not a Namespace."""
    fake = tmp_path / "fake.py"
    fake.write_text("def hook(module, args, output):\n    return args[0]\n")
    assert _namespace_uses(fake) == []


def _calls_with_a_namespace(run) -> list[str]:
    """Run ``run()`` and list every function of the library (``qeff/`` outside ``qeff/cli/``)
    that was called with an ``argparse.Namespace`` among its arguments (one level into
    ``*args``/``**kwargs`` too)."""
    library, edge = str(LIBRARY) + os.sep, str(EDGE) + os.sep
    seen: list[str] = []

    def carries(value) -> bool:
        if isinstance(value, argparse.Namespace):
            return True
        if isinstance(value, (tuple, list)):
            return any(isinstance(v, argparse.Namespace) for v in value)
        if isinstance(value, dict):
            return any(isinstance(v, argparse.Namespace) for v in value.values())
        return False

    def hook(frame, event, arg):  # the global trace function: called once per Python call, no line events
        path = frame.f_code.co_filename
        if not path.startswith(library) or path.startswith(edge):
            return
        code = frame.f_code
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 4) + bool(code.co_flags & 8)]
        if any(carries(frame.f_locals.get(n)) for n in names):
            seen.append(f"{Path(path).relative_to(LIBRARY.parent)}:{code.co_name}")
        return None  # nothing to trace inside the frame

    previous = sys.gettrace()
    sys.settrace(hook)
    try:
        run()
    finally:
        sys.settrace(previous)
    return seen


def _preflight_run(model: Path, home: Path):
    from qeff.cli import preflight

    return lambda: preflight(["infer", "-m", str(model), "--home", str(home), "--ctx_len", "32", "--prompt", "Hi", "--threads", "1",
                              "--generation_len", "2"])


def test_a_run_hands_the_library_typed_values_only(tiny_model_dir, tmp_path, capsys):
    """Every check of a run before any work (sizes, serving flags, prompts, the model's files, the
    memory preflight) and a whole ``qeff infer`` on a tiny model: no library function gets a Namespace."""
    from qeff.cli import main

    home = tmp_path / "home"
    assert _calls_with_a_namespace(_preflight_run(tiny_model_dir, home)) == []
    code = []
    assert _calls_with_a_namespace(lambda: code.append(main(["infer", "-m", str(tiny_model_dir), "--home", str(home), "--ctx_len", "32",
                                                             "--prompt", "Hi", "--generation_len", "2", "--no-verify",
                                                             "--threads", "1", "--no-stream"]))) == []
    assert code == [0], capsys.readouterr().err


def test_the_run_check_catches_a_seeded_namespace(tiny_model_dir, tmp_path, monkeypatch):
    """Seeded: the edge hands the parsed Namespace to a library function (as ``serving_options(args)``
    was handed it before issue 20); the watch names that function."""
    import qeff.cli.options
    from qeff import memory

    resolve = qeff.cli.options.resolve

    def leaky(args, **kwargs):
        memory.skip_requested(args)  # a library function given the Namespace
        return resolve(args, **kwargs)

    monkeypatch.setattr("qeff.cli.resolve", leaky)
    seen = _calls_with_a_namespace(_preflight_run(tiny_model_dir, tmp_path / "home"))
    assert "qeff/memory.py:skip_requested" in seen


# -- the Shape --------------------------------------------------------------------------------


def test_a_shape_is_checked_once_with_the_cli_sentences():
    assert Shape(2, 16, 64).as_dict() == {"batch_size": 2, "prompt_len": 16, "ctx_len": 64}
    assert Shape() == Shape(batch_size=1, prompt_len=32, ctx_len=128)
    cases = [
        (dict(batch_size=0), "--batch_size must be a positive integer (got 0)"),
        (dict(prompt_len=-1), "--prompt_len must be a positive integer (got -1)"),
        (dict(ctx_len=True), "--ctx_len must be a positive integer (got True)"),
        (dict(ctx_len=2.5), "--ctx_len must be a positive integer (got 2.5)"),
        (dict(prompt_len=64, ctx_len=32), "--prompt_len 64 is larger than --ctx_len 32; a prefill chunk must fit in the context"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError) as caught:
            Shape(**kwargs)
        assert str(caught.value) == message
    with pytest.raises(Exception):  # frozen: a checked shape stays checked
        Shape().ctx_len = 0  # type: ignore[misc]


@pytest.mark.parametrize("argv,message", [
    (["--prompt_len", "64", "--ctx_len", "32"], "qeff: error: --prompt_len 64 is larger than --ctx_len 32; a prefill chunk must fit in the context"),
    (["--batch_size", "0"], "qeff: error: --batch_size must be a positive integer (got 0)"),
])
def test_the_cli_gives_the_shape_sentence(tiny_model_dir, tmp_path, capsys, argv, message):
    from qeff.cli import main

    code = main(["infer", "-m", str(tiny_model_dir), "--home", str(tmp_path / "home"), *argv])
    assert code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == message


def test_resolve_types_every_record(tiny_model_dir, tmp_path):
    """The edge's records for one command line: frozen, typed, the batch size settled."""
    from dataclasses import FrozenInstanceError

    from qeff.cli import build_parser
    from qeff.cli.options import resolve

    args = build_parser().parse_args(["infer", "-m", str(tiny_model_dir), "--home", str(tmp_path / "home"), "--ctx_len", "64",
                                      "--prompt", "a|b", "--device_group", "[0,1]", "--temperature", "0.5", "--threads", "1"])
    inv = resolve(args)
    assert inv.shape == Shape(1, 32, 64) and inv.run.prompts == ("a", "b") and inv.device_group == [0, 1]
    assert inv.serving.sampling.temperature == 0.5 and inv.compile.backend == "auto" and inv.run.threads == 1
    assert inv.model.model_name == str(tiny_model_dir) and inv.home == tmp_path / "home"
    with pytest.raises(FrozenInstanceError):
        inv.run.threads = 2  # type: ignore[misc]
