"""``qeff check``: is a model supported? Answered from its config and file headers, no weights loaded."""

from __future__ import annotations

from qeff.cli import arguments as a
from qeff.cli.options import Invocation
from qeff.cli.output import warn_untested_libraries

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="is a model supported? answered from its config and file headers, without loading weights")
    a.flag(p, "--model_name", "-m", required=True,
           help="model card/alias, HF repo id, local HF directory or .gguf file")
    a.flag(p, "--cache_dir", default=None, help="Hugging Face cache directory (default: HF's own)")
    a.flag(p, "--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def run(inv: Invocation) -> int:
    from qeff.intake.support import run_check

    warn_untested_libraries()
    model = inv.model
    return run_check(model.model_name, revision=model.revision, cache_dir=model.cache_dir, json_mode=inv.json)
