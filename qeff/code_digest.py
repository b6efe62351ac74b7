"""Which of qeff's own code can shape an artifact, and a digest of exactly that code (issue 18).

Every manifest records what shaped its artifact, qeff's own source included (the ``qeff_source``
of :func:`qeff._system.library_versions`). That used to be a digest of all of qeff's ``*.py``
files, so editing a CLI message or a docstring of the doctor made the next run export a 7B
checkpoint again (~7 min, 27 GB written) and verify it again. An export's bytes (graph and data)
and a verification's verdict depend on far less: the code reachable from the function that
builds them. This module finds that code from a *static* import graph — ``ast`` over
``qeff/**/*.py``, nothing imported, so it is deterministic and cheap — and digests it.

What a **scope** (:data:`SCOPES`) covers, from its roots:

- a root ``module:Class.method`` (or ``module:function``) is a *slice* of its module: that
  function, every function and method it reaches there (``self.name`` / ``cls.name``,
  ``Class.name``, a module-level ``name``; properties and nested functions included, transitively;
  a class named bare — instantiated, say — whole), the class's ``__init__`` and class-level
  statements, and the module's top-level statements (imports, constants). A slice because
  :mod:`qeff.pipeline` orchestrates every stage: its whole file would key the export on the compile
  and serving code it also drives. The slice is compared as the source lines of what it holds
  (moving a method, or editing code outside the slice, leaves it unchanged);
- every qeff module the slice imports, and everything those import, each **whole file** (its
  bytes). Whole modules are not parsed: each import statement is found by a pattern and parsed
  alone (:func:`_scan`, a superset of a full parse's; the key is computed on every run): ``import qeff.x``, ``from qeff.x import y`` (``y`` a submodule too), ``from qeff import
  x``, relative imports, imports inside functions, ``importlib.import_module("qeff.x")`` with a
  literal name, a name a package's lazy table (a module-level dict of ``"qeff.…"`` strings, as
  ``qeff/__init__.py``'s ``_LAZY``) maps to a module when it is imported from, or read off, that
  package, and every package ``__init__`` above an imported module (Python runs them);
- :data:`WHOLE_PACKAGES` (``qeff.transforms``) whole, as soon as any module of it is reached: its
  registry imports the architecture files by computed names (``pkgutil``), which no static graph
  sees.

Every rule errs towards including: a module too many re-exports once; a module too few would serve
a stale graph. The digest is written ``"<scope>:<hex>"`` so that it can never equal a whole-source
digest (bare hex) that an older qeff recorded: such an export is rebuilt and listed as superseded,
never trusted under the new meaning.

Kinds keyed this way: the **export** (``Pipeline.export``: loading, the transforms, the exporter,
the streamed writer, the tokenizer files saved beside the graph) and the **verification record**
(``Pipeline.verify_cached``: that plus the reference, the verification and the ONNX Runtime session
it runs). Every other kind keeps the whole-source digest: compiled ONNX Runtime graphs (portable
and fused), Cloud AI QPCs, emulated precision tiers, and the fused graph's check record (which
holds the fused graph's inputs). Their builders are reached from ``Pipeline.compile`` *and* called
directly (``qeff.compile``, ``qeff compile``, the precision commands), with options settled in
the CLI and the CPU-graph policy, so no single root bounds them cleanly yet.
"""

from __future__ import annotations

import ast
import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SCOPES", "WHOLE_PACKAGES", "Closure", "closure", "scope_digest", "scoped_source", "scope_for", "scope_of", "PACKAGE_ROOT"]

#: The qeff package's directory (tests point it at an edited copy).
PACKAGE_ROOT = Path(__file__).parent

#: Each scoped artifact kind and its roots (``module:qualified.name``).
SCOPES: dict[str, tuple[str, ...]] = {
    "export": ("qeff.pipeline:Pipeline.export",),
    "verify": ("qeff.pipeline:Pipeline.verify_cached",),
}

#: Packages whose modules are imported by computed names at run time: taken whole when reached.
WHOLE_PACKAGES: tuple[str, ...] = ("qeff.transforms",)

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class Closure:
    """The code of a scope: modules hashed whole, and the roots' slices."""

    modules: frozenset[str]
    slices: tuple[str, ...]


class _Package:
    """The qeff package under ``root`` as files, each parsed once, on demand."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.top = self.root.name
        self.files: dict[str, Path] = {}
        for path in sorted(self.root.rglob("*.py")):
            parts = path.relative_to(self.root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            self.files[".".join((self.top, *parts))] = path
        self._trees: dict[str, ast.Module] = {}
        self._lazy: dict[str, dict[str, str]] = {}
        self.scanned: dict[str, set[str]] = {}  # a module's imports (_scan), shared by every scope

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            path = self.files[module]
            with warnings.catch_warnings():  # e.g. an invalid escape: the interpreter's business, not a run's output
                warnings.simplefilter("ignore", SyntaxWarning)
                self._trees[module] = ast.parse(path.read_bytes(), filename=str(path))
        return self._trees[module]

    def is_package(self, module: str) -> bool:
        return self.files[module].name == "__init__.py"

    def lazy(self, module: str) -> dict[str, str]:
        """A package's lazy attribute table: module-level dicts whose values all name qeff modules."""
        if module not in self._lazy:
            table: dict[str, str] = {}
            if module in self.files and self.is_package(module):
                for node in self.tree(module).body:
                    value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
                    if not isinstance(value, ast.Dict) or not value.keys:
                        continue
                    pairs = [(k.value, v.value) for k, v in zip(value.keys, value.values)
                             if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
                             and isinstance(k.value, str) and isinstance(v.value, str)]
                    if len(pairs) == len(value.keys) and all(v in self.files for _, v in pairs):
                        table.update(pairs)
            self._lazy[module] = table
        return self._lazy[module]


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _absolute(node: ast.ImportFrom, package: str) -> str | None:
    if node.level == 0:
        return node.module
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        return None
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def _is_import_call(node: ast.Call) -> bool:
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    return name in ("import_module", "__import__")


def _imports(pkg: _Package, module: str, nodes: list[ast.AST]) -> set[str]:
    """The qeff modules ``nodes`` (statements of ``module``) import, by every rule of the module docstring."""
    walked = [n for node in nodes for n in ast.walk(node)]
    found, bound = _statements(pkg, module, walked)
    for n in walked:
        if isinstance(n, ast.Call) and _is_import_call(n) and n.args:
            arg = n.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value in pkg.files:
                found.add(arg.value)
    reads = [(n.value.id, n.attr) for n in walked
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in bound]
    return found | _attributes(pkg, bound, reads)


def _statements(pkg: _Package, module: str, nodes) -> tuple[set[str], dict[str, str]]:
    """(the qeff modules the import statements among ``nodes`` import, the local names bound to them)."""
    package = module if pkg.is_package(module) else module.rpartition(".")[0]
    found: set[str] = set()
    bound: dict[str, str] = {}  # a local name -> the qeff module or package it names

    def add(name: str) -> bool:
        if name in pkg.files:
            found.add(name)
            return True
        return False

    for n in nodes:
        if isinstance(n, ast.Import):
            for alias in n.names:
                if add(alias.name):
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(n, ast.ImportFrom):
            base = _absolute(n, package)
            if base is None or not add(base):
                continue
            for alias in n.names:
                if alias.name == "*":
                    found.update(pkg.lazy(base).values())
                elif add(f"{base}.{alias.name}"):
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
                elif alias.name in pkg.lazy(base):
                    add(pkg.lazy(base)[alias.name])
    return found, bound


def _attributes(pkg: _Package, bound: dict[str, str], reads) -> set[str]:
    """``import qeff; qeff.export(...)``: the modules attributes read off imported packages name."""
    found = set()
    for local, attr in reads:
        target = bound[local]
        if f"{target}.{attr}" in pkg.files:
            found.add(f"{target}.{attr}")
        elif attr in pkg.lazy(target):
            found.add(pkg.lazy(target)[attr])
    return found


#: An import statement: at a line's start, or after a ``:`` or ``;`` (``try: import x``).
_STATEMENT = re.compile(rb"(?:^|[:;])[ \t]*((?:from[ \t]+[.\w]+[ \t]+import|import)\b)", re.M)
_IMPORT_CALL = re.compile(rb"""(?:import_module|__import__)\(\s*[rbuRBU]?["']([\w.]+)["']""")


def _scan(pkg: _Package, module: str) -> set[str]:
    """What :func:`_imports` finds in a whole module, without parsing all of it: each import
    statement is located by a pattern and parsed alone (issue 18's key is computed on every run; a
    whole parse of the export's modules took ~0.3 s). Finds a superset of the full parse's
    (tests/test_export_key.py checks it on every module): an ``import`` line inside a string
    only adds a module, never hides one."""
    if module not in pkg.scanned:
        pkg.scanned[module] = _scan_file(pkg, module)
    return pkg.scanned[module]


def _scan_file(pkg: _Package, module: str) -> set[str]:
    data = pkg.files[module].read_bytes()
    nodes: list[ast.AST] = []
    fragments: list[bytes] = []
    for match in _STATEMENT.finditer(data):
        start = match.start(1)
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        while data[start:end].rstrip().endswith(b"\\") and end < len(data):  # a continued line
            nxt = data.find(b"\n", end + 1)
            end = len(data) if nxt < 0 else nxt
        if b"(" in data[start:end] and b")" not in data[start:end]:  # from x import (a,\n b)
            close = data.find(b")", end)
            end = len(data) if close < 0 else close + 1
        fragments.append(data[start:end].strip())
    try:  # all at once (one parse), else one by one
        nodes = _parse(b"\n".join(fragments)).body
    except SyntaxError:
        for fragment in fragments:
            for text in (fragment, fragment.split(b";")[0], fragment.split(b"#")[0]):
                try:
                    nodes += _parse(text.strip()).body
                    break
                except SyntaxError:
                    continue
    found, bound = _statements(pkg, module, [n for node in nodes for n in ast.walk(node)])
    found.update(m.decode() for m in _IMPORT_CALL.findall(data) if m.decode() in pkg.files)
    reads = []
    for local in bound:
        pattern = re.compile(rb"(?<![\w.])" + re.escape(local.encode()) + rb"\.(\w+)")
        reads += [(local, attr.decode()) for attr in pattern.findall(data)]
    return found | _attributes(pkg, bound, reads)


def _parse(source: bytes) -> ast.Module:
    with warnings.catch_warnings():  # e.g. an invalid escape: the interpreter's business, not a run's output
        warnings.simplefilter("ignore", SyntaxWarning)
        return ast.parse(source)


def _annotations(node: ast.AST) -> set[int]:
    """ids of the nodes inside annotations (not run under ``from __future__ import annotations``)."""
    skip: set[int] = set()
    for n in ast.walk(node):
        notes: list[ast.AST | None] = []
        if isinstance(n, _FUNCS):
            args = n.args
            notes += [a.annotation for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
            notes += [args.vararg.annotation if args.vararg else None, args.kwarg.annotation if args.kwarg else None, n.returns]
        elif isinstance(n, ast.AnnAssign):
            notes.append(n.annotation)
        for note in notes:
            if note is not None:
                skip.update(id(x) for x in ast.walk(note))
    return skip


def _slice(pkg: _Package, root: str) -> tuple[str, set[str]]:
    """(the text of a root's slice, the qeff modules it imports)."""
    module, _, qualname = root.partition(":")
    if module not in pkg.files:
        raise LookupError(f"qeff.code_digest: the root {root} names a module that does not exist")
    tree = pkg.tree(module)
    top = {n.name: n for n in tree.body if isinstance(n, _DEFS)}
    owner, _, name = qualname.rpartition(".")

    def defs(cls: str, attr: str) -> list[ast.AST]:
        body = top[cls].body if cls else tree.body
        return [n for n in body if isinstance(n, _DEFS if not cls else _FUNCS) and n.name == attr]

    def methods(cls: str) -> set[str]:
        return {n.name for n in top[cls].body if isinstance(n, _FUNCS)}

    if (owner and not isinstance(top.get(owner), ast.ClassDef)) or not defs(owner, name):
        raise LookupError(f"qeff.code_digest: the root {root} names a function that does not exist")
    header = [n for n in tree.body if not isinstance(n, _DEFS)]
    reached: dict[tuple[str, str], list[ast.AST]] = {}
    classes: set[str] = set()
    # the root, and what the module's own top-level code calls when it is imported
    todo = [(owner, name), *(("", n.func.id) for stmt in header for n in ast.walk(stmt)
                             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in top)]
    attrs: set[str] = set()  # every attribute name the reached code reads: x.name may be any reached class's method
    while todo:
        cls, attr = todo.pop()
        if (cls, attr) in reached:
            if not todo:  # to a fixed point: methods of classes reached after the code naming them
                todo += [(c, m) for c in sorted(classes) for m in sorted(methods(c) & attrs) if (c, m) not in reached]
            continue
        nodes = defs(cls, attr)
        reached[(cls, attr)] = nodes
        if cls and cls not in classes:
            classes.add(cls)
            todo.append((cls, "__init__"))
        for node in nodes:
            if isinstance(node, ast.ClassDef):  # a module-level class named bare: all of it
                todo += [(node.name, n.name) for n in node.body if isinstance(n, _FUNCS)]
                classes.add(node.name)
                continue
            skip = _annotations(node)
            for n in ast.walk(node):
                if id(n) in skip:
                    continue
                if isinstance(n, ast.Attribute):
                    attrs.add(n.attr)  # self.x, cls.x, other_pipeline.x: any receiver
                    if isinstance(n.value, ast.Name) and isinstance(top.get(n.value.id), ast.ClassDef):
                        todo.append((n.value.id, n.attr))
                elif isinstance(n, ast.Name) and n.id in top:
                    todo.append(("", n.id))
        if not todo:
            todo += [(c, m) for c in sorted(classes) for m in sorted(methods(c) & attrs) if (c, m) not in reached]
    class_parts: list[ast.AST] = []
    for cls in sorted(classes):
        node = top[cls]
        class_parts += [*node.decorator_list, *node.bases, *node.keywords, *(n for n in node.body if not isinstance(n, _FUNCS))]
    functions = [n for key in sorted(reached) for n in reached[key]]
    lines = pkg.files[module].read_text(encoding="utf-8", errors="surrogateescape").splitlines()

    def source(node: ast.AST) -> str:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))])
        return "\n".join(lines[first - 1: node.end_lineno])

    text = "\n".join([f"slice {root}", *(source(n) for n in header), *(source(n) for n in class_parts),
                      *(f"{cls}.{attr}\n{source(n)}" for (cls, attr) in sorted(reached) for n in reached[(cls, attr)])])
    return text, _imports(pkg, module, [*header, *class_parts, *functions]) | set(_parents(module))


def _closure(pkg: _Package, scope: str) -> tuple[Closure, list[str]]:
    try:
        roots = SCOPES[scope]
    except KeyError:
        raise LookupError(f"qeff.code_digest: no scope {scope!r} (known: {', '.join(SCOPES)})") from None
    texts, todo = [], []
    for root in roots:
        text, imported = _slice(pkg, root)
        texts.append(text)
        todo += sorted(imported)
    modules: set[str] = set()
    while todo:
        module = todo.pop()
        if module in modules:
            continue
        modules.add(module)
        todo += _parents(module)
        todo += sorted(_scan(pkg, module))
        for whole in WHOLE_PACKAGES:
            if module == whole or module.startswith(whole + "."):
                todo += [m for m in pkg.files if m == whole or m.startswith(whole + ".")]
    return Closure(frozenset(modules), roots), texts


def closure(scope: str, root: str | Path | None = None) -> Closure:
    """The code of ``scope`` in the qeff package at ``root`` (default: this installation's)."""
    return _closure(_Package(Path(root) if root is not None else PACKAGE_ROOT), scope)[0]


def scope_digest(scope: str, root: str | Path | None = None) -> str:
    """A blake2b digest of the code of ``scope``: the modules' bytes and the slices' text."""
    return _digest(_Package(Path(root) if root is not None else PACKAGE_ROOT), scope)


def _digest(pkg: _Package, scope: str) -> str:
    found, texts = _closure(pkg, scope)
    h = hashlib.blake2b(digest_size=12)
    for module in sorted(found.modules):
        h.update(f"module {module}\0".encode() + pkg.files[module].read_bytes() + b"\0")
    for text in texts:
        h.update(text.encode() + b"\0")
    return h.hexdigest()


#: This process's digests by scope, and its reading of the package (key ``""``), shared by the scopes.
_CACHE: dict[str, object] = {}


def scoped_source(scope: str) -> str:
    """``"<scope>:<digest>"`` for this installation (computed once per process, as the
    whole-source digest is: the code running is the code imported at start)."""
    if scope not in _CACHE:
        pkg = _CACHE.setdefault("", _Package(PACKAGE_ROOT))
        assert isinstance(pkg, _Package)
        _CACHE[scope] = f"{scope}:{_digest(pkg, scope)}"
    return str(_CACHE[scope])


def scope_for(inputs: object) -> str | None:
    """The scope that keys a manifest's ``inputs`` now (a scope is named after the stage it keys:
    ``"export"``, ``"verify"``), or None for the kinds keyed on the whole source."""
    stage = inputs.get("stage") if isinstance(inputs, dict) else None
    return stage if isinstance(stage, str) and stage in SCOPES else None


def scope_of(recorded: object) -> str | None:
    """The scope a manifest's ``qeff_source`` was computed for, or None for a whole-source digest."""
    if isinstance(recorded, str) and ":" in recorded:
        name = recorded.partition(":")[0]
        return name if name in SCOPES else None
    return None
