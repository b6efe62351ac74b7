"""``python -m pytest_qeff.report render RESULTS --out DIR``: re-render a results file."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pytest_qeff import results
from pytest_qeff.report import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_qeff.report", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("render", help="render the HTML report of a results.json")
    cmd.add_argument("results", type=Path, help="a results.json written by the qeff pytest plugin")
    cmd.add_argument("--out", type=Path, required=True, help="directory for index.html, cards/ and style.css")
    args = parser.parse_args(argv)
    try:
        data = results.load(args.results)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    index = render(data, args.out)
    target = args.out / "results.json"
    if not target.exists() or not target.samefile(args.results):
        shutil.copyfile(args.results, target)  # the report links to its source
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
