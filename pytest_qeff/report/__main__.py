"""``python -m pytest_qeff.report``:

    render RESULTS --out DIR         re-render a results file
    merge DIR_OR_FILE… --out DIR     join the results.json of several runs (the shards of one
                                     --qeff-shard matrix) into DIR/results.json and render it
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pytest_qeff import merge as merge_mod
from pytest_qeff import results
from pytest_qeff.report import render


def _render(args) -> int:
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


def _merge(args) -> int:
    try:
        inputs = []
        for given in args.inputs:
            path = given / "results.json" if given.is_dir() else given
            inputs.append((path, results.load(path)))
        merged = merge_mod.merge(inputs, allow_missing_shards=args.allow_missing_shards)
    except ValueError as exc:  # results.load's and merge's errors: one sentence each
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = results.write(args.out / "results.json", merged)
    index = render(merged, args.out)
    print(f"merged {len(inputs)} run(s), {len(merged['records'])} records, {len(merged['cards'])} cards: {path}")
    print(index)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_qeff.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("render", help="render the HTML report of a results.json")
    cmd.add_argument("results", type=Path, help="a results.json written by the qeff pytest plugin")
    cmd.add_argument("--out", type=Path, required=True, help="directory for index.html, cards/ and style.css")
    cmd.set_defaults(func=_render)
    cmd = commands.add_parser("merge", help="join several results.json (e.g. the shards of one run) and render them")
    cmd.add_argument("inputs", type=Path, nargs="+", metavar="DIR", help="report directories (or results.json files)")
    cmd.add_argument("--out", type=Path, required=True, help="directory for the merged results.json and its report")
    cmd.add_argument("--allow-missing-shards", action="store_true",
                     help="merge even when some of the N shards are not given (the run records which are missing)")
    cmd.set_defaults(func=_merge)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
