"""The ``qeff`` command line.

    qeff infer    load → transform → export → verify → compile → execute, each stage cached
    qeff export   export a model's retained-state ONNX graph
    qeff compile  compile an exported graph for a backend (``--dry-run`` for Cloud AI without an SDK)
    qeff execute  run a compiled artifact (an ORT artifact or a Cloud AI QPC)
    qeff verify   HF vs transformed PyTorch vs ONNX Runtime on a model
    qeff list     the cached artifacts under $QEFF_HOME
    qeff check    is a model supported? from its config and file headers, no weights loaded
    qeff doctor   verify every cached artifact; show stale temporaries and locks
    qeff clean    remove what killed runs left behind (never a build in progress); --superseded:
                  also what another qeff or library version built (this one never reuses it)

Flags keep the seed product's spellings (``--model_name``, ``--num_cores``, ``--device_group [0,1]``,
…); each also has a dashed spelling. ``python -m qeff.cloud.infer`` and ``python -m qeff.cloud.execute``
are aliases. Exit codes: 0 success, 1 a failed stage (compiler error, verification outside
tolerance, a full disk), 2 a usage error (one sentence, no traceback). ``--debug`` (anywhere on the
command line, or ``QEFF_DEBUG=1``) adds the traceback to any error.

The package is thin, and its edge is typed:

    arguments  the flags, declared once (groups the subcommands share)
    parser     the parser: one subparser per subcommand module
    options    the edge: the parsed Namespace resolved once, every argument checked, into typed
               records (ModelOptions, qeff.shape.Shape, CompileOptions, RunOptions, ServingOptions,
               VerifyOptions); nothing past it reads the Namespace
    checks     the cache's leftovers reclaimed and the memory preflight, from the records
    building   pipeline, compile options and target shared by infer and compile
    running    the session's options and the generation run shared by infer and execute
    output     human lines, figures, the --json record
    infer, export, compile, execute, verify, check, listing (qeff list), doctor, clean:
               one module per subcommand, each ``add_parser(sub)`` and ``run(invocation) -> exit code``
"""

from __future__ import annotations

import os
import sys
import traceback

from qeff.cli.checks import check_memory, check_model
from qeff.cli.options import resolve
from qeff.cli.parser import build_parser
from qeff.errors import QEffError, UsageError

__all__ = ["main", "build_parser", "preflight", "memory_preflight"]


def preflight(argv: list[str]) -> dict[str, int]:
    """Every check a command line's run makes before any work, the memory preflight included,
    without running it: each stage's estimated peak (bytes), or the :class:`UsageError` the run
    would end with. ``make bench-scale`` asks it before writing a 3B checkpoint's 6 GB."""
    invocation = resolve(build_parser().parse_args(argv))
    check_model(invocation)
    return dict(invocation.estimates or {})


def memory_preflight(argv: list[str]) -> dict[str, int]:
    """The memory preflight alone of a command line (no cache clean-up, no other check): each
    stage's estimated peak (bytes), or the one-sentence :class:`UsageError` the run would be
    refused with. The pytest plugin's full tier asks it before a stage that may not fit, so that
    a stage runs exactly when the same command would (the streamed modes included)."""
    invocation = resolve(build_parser().parse_args(argv), checks=False)
    check_memory(invocation)
    return dict(invocation.estimates or {})


def _fail(line: str, exc: BaseException, debug: bool, code: int) -> int:
    if debug:
        traceback.print_exception(exc)
    print(line, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    from contextlib import nullcontext

    from qeff.store.artifacts import verify_cache
    from qeff.store.atomic import is_disk_full
    from qeff.meter import metering

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("QEFF_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    run = args.func  # the subcommand's module's run()
    try:
        invocation = resolve(args)  # the flags' last reader: typed records from here on
        with verify_cache("full") if invocation.verify_cache else nullcontext():
            check_model(invocation)
            with metering(invocation.estimates) as invocation.meter:
                return run(invocation)
    except UsageError as exc:
        return _fail(f"qeff: error: {exc}", exc, debug, 2)
    except QEffError as exc:
        return _fail(f"qeff: {type(exc).__name__}: {exc}", exc, debug, 1)
    except KeyboardInterrupt as exc:
        return _fail("qeff: interrupted", exc, debug, 130)
    except Exception as exc:  # noqa: BLE001 - the promise is one sentence, never a traceback
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        if is_disk_full(exc):
            return _fail(f"qeff: DiskFullError: the disk is full ({first})", exc, debug, 1)
        if isinstance(exc, OSError):
            return _fail(f"qeff: error: {exc.strerror or first}{f': {exc.filename}' if exc.filename else ''}", exc, debug, 1)
        return _fail(f"qeff: internal error ({type(exc).__name__}: {first}); run again with --debug for the traceback",
                     exc, debug, 1)
