"""``qeff compile``: an exported graph compiled for a backend (``--dry-run`` for Cloud AI without an SDK)."""

from __future__ import annotations

from qeff.cli import arguments as a
from qeff.cli.building import check_cpu_graph, compile_graph, compile_options, pipeline
from qeff.cli.checks import resolve_backend
from qeff.cli.options import Invocation
from qeff.cli.output import Out, reuse_note
from qeff.errors import UsageError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("compile", help="compile an exported graph for a backend")
    a.model_args(p)
    a.flag(p, "--onnx_path", default=None, help="an exported model.onnx (default: export --model_name first)")
    a.compile_args(p)
    a.flag(p, "--dry_run", action="store_true", help="qaic: write the compiler's files and print its command without running it")
    p.set_defaults(func=run)


def run(inv: Invocation) -> int:
    out = Out(False)
    serving, o = inv.serving, inv.compile
    backend = resolve_backend(o.backend)
    if o.dry_run and backend != "qaic":
        raise UsageError("--dry_run applies to --backend qaic (the ort backend needs no external compiler)")
    options = compile_options(inv, backend, out, serving)
    if o.onnx_path:
        result = compile_graph(None, backend, inv, options, onnx_path=o.onnx_path)
    else:
        check_cpu_graph(inv, backend)
        pipe = pipeline(inv)
        reuse_note(out, "export", pipe.export(variant=serving.variant))
        result = compile_graph(pipe, backend, inv, options, variant=serving.variant, out=out)
    if o.dry_run:
        out.say(f"[qeff] wrote the compiler's files to {result.out_dir}; run the compile by hand with:\n{result.shell_command()}")
        return 0
    reuse_note(out, f"{backend} artifact", result)
    out.say(str(result.path))
    return 0
