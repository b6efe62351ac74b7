"""The ``qeff`` parser: one subparser per subcommand, each declared by its own module."""

from __future__ import annotations

import argparse

from qeff._version import __version__
from qeff.cli import check, clean, doctor, execute, export, infer, listing, verify
from qeff.cli import compile as compile_command
from qeff.cli.arguments import Parser

__all__ = ["COMMANDS", "build_parser"]

#: The subcommands, in the order ``qeff --help`` lists them.
COMMANDS = (infer, export, compile_command, execute, verify, check, listing, doctor, clean)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qeff", description="Run and verify HF causal LMs on static-shape accelerators (ONNX Runtime, Cloud AI 100).")
    parser.add_argument("--version", action="version", version=f"qeff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser
