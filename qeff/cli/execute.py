"""``qeff execute``: run a compiled artifact (an ORT artifact or a Cloud AI QPC)."""

from __future__ import annotations

from qeff.cli import arguments as a
from qeff.cli.options import Invocation, eos_mode
from qeff.cli.output import Out, emit_json, ladder_record, print_figures
from qeff.cli.running import run as run_prompts
from qeff.cli.running import session_options
from qeff.errors import UsageError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("execute", help="run a compiled artifact")
    a.flag(p, "--qpc_path", "--artifact", required=True, help="a compile directory (ort_… or qpc_…) or a QPC directory")
    a.flag(p, "--model_name", "-m", default=None, help="where the tokenizer comes from (default: the one saved beside the export)")
    a.flag(p, "--device_group", default=None, help="Cloud AI device ids, e.g. [0,1]")
    a.cache_args(p)
    a.run_args(p)
    a.lookup_args(p)
    p.set_defaults(func=run)


def _tokenizer(inv: Invocation):
    """The tokenizer of --model_name, else the one saved beside the export (checked against its manifest)."""
    artifact = inv.artifact
    if inv.model.model_name:
        from qeff.intake.loading import load_tokenizer, resolve

        return load_tokenizer(resolve(inv.model.model_name))
    for candidate in (artifact, *artifact.parents[:3]):
        if (candidate / "tokenizer_config.json").is_file():
            from qeff.store.artifacts import check_holder
            from qeff.intake.tokenizer import open_saved_tokenizer

            check_holder(candidate, levels=0)  # the export's tokenizer files against its manifest (issue 19)
            return open_saved_tokenizer(candidate)
    return None


def run(inv: Invocation) -> int:
    import qeff

    out = Out(inv.json)
    artifact = inv.artifact
    if not artifact.exists():
        raise UsageError(f"--qpc_path {str(artifact)!r} does not exist")
    tokenizer = _tokenizer(inv)
    if tokenizer is None:
        raise UsageError(f"no tokenizer found beside {artifact}; pass --model_name to say where it comes from")
    lookup = inv.serving.prompt_lookup
    eos_mode(inv.run)
    session = qeff.open_session(artifact, **session_options(inv))
    draft = None
    if lookup:
        from qeff.serving.ngram import NgramDrafter
        from qeff.serving.speculative import can_verify

        if not can_verify(session):
            raise UsageError(f"the artifact {artifact} returns one position's logits per step, so it cannot verify drafted "
                             "tokens; build one with `qeff infer --prompt_lookup N` (its artifact line names it), or drop --prompt_lookup")
        draft = NgramDrafter(inv.serving.prompt_lookup_ngram)
    summary = run_prompts(session, tokenizer, list(inv.run.prompts), inv, out, draft=draft)
    print_figures(out, summary, show_texts=not inv.run.stream or len(summary.prompts) > 1)
    if inv.json:
        emit_json(summary, inv, backend=session.backend, artifact=str(artifact), load_s=0.0, **ladder_record(session))
    return 0
