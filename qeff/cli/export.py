"""``qeff export``: the model's retained-state ONNX graph, cached."""

from __future__ import annotations

from qeff.cli import arguments as a
from qeff.cli.building import pipeline
from qeff.cli.options import Invocation
from qeff.cli.output import Out, reuse_note

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export the retained-state ONNX graph")
    a.model_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even when a cached export matches")
    p.set_defaults(func=run)


def run(inv: Invocation) -> int:
    out = Out(False)
    pipe = pipeline(inv)
    reuse_note(out, "export", pipe.export(force=inv.model.force))
    out.say(str(pipe.onnx_path))
    return 0
