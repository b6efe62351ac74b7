"""Join the results.json of several runs (the shards of one ``--qeff-shard I/N`` matrix) into one.

    python -m pytest_qeff.report merge shard-1/ shard-2/ shard-3/ --out report/

The merged file is an ordinary results.json (the report renders it like any other):

- ``records``: every input's, sorted as one run sorts them (card, case, stage, backend); a test
  (node id) found in two inputs is an error: the inputs overlap, so they are not shards of one run;
- ``cards``: the union; one card id with two different definitions is an error;
- ``run``: the first input's settings; ``models``, ``backends`` and ``cardless`` joined;
  ``exit_status`` the worst; ``shard`` null; ``merged`` lists each input (file, shard, machine,
  created, exit status, number of records); runs of different tiers are refused;
- ``environment``: the first input's (each input's machine is in ``run.merged``).

When the inputs carry shard numbers, all N shards must be there (``--allow-missing-shards`` merges
what is there, and the run's ``missing_shards`` says what is not).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from pytest_qeff.cards import STAGES

__all__ = ["MergeError", "merge", "sort_records"]


class MergeError(ValueError):
    """Inputs that cannot be joined; the message names the files and what disagrees."""


def _case_ids(card: dict[str, Any]) -> list[str]:
    cases = card.get("cases") or [card.get("compile", {})]
    return [f"bs{c.get('batch_size', 1)}-pl{c.get('prompt_len', 32)}-cl{c.get('ctx_len', 128)}" for c in cases]


def sort_records(records: list[dict], cards: dict[str, dict]) -> list[dict]:
    """The order of one run's records (see ``results.Collector.sorted_records``), from card dicts."""

    def key(rec: dict) -> tuple:
        cases = _case_ids(cards.get(rec["card"], {}))
        case_index = cases.index(rec["case"]) if rec["case"] in cases else len(cases)
        stage = STAGES.index(rec["stage"]) if rec["stage"] in STAGES else len(STAGES)
        return (rec["card"], case_index, stage, rec.get("backend") or "", rec["nodeid"])

    return sorted(records, key=key)


def _union(lists: list[list]) -> list:
    out: list = []
    for items in lists:
        out += [x for x in items or [] if x not in out]
    return out


def merge(inputs: list[tuple[Path, dict]], *, allow_missing_shards: bool = False) -> dict:
    """One results dict from ``(path, results)`` pairs (each already checked by ``results.load``)."""
    if not inputs:
        raise MergeError("nothing to merge: give at least one results.json or directory holding one")
    first_path, first = inputs[0]
    tiers = {path: data.get("run", {}).get("tier") for path, data in inputs}
    if len(set(tiers.values())) > 1:
        shown = ", ".join(f"{p} ({t})" for p, t in tiers.items())
        raise MergeError(f"the runs are of different tiers ({shown}); merge runs of one tier")
    records: dict[str, dict] = {}
    owner: dict[str, Path] = {}
    cards: dict[str, dict] = {}
    card_owner: dict[str, Path] = {}
    for path, data in inputs:
        for rec in data.get("records", []):
            if rec["nodeid"] in records:
                raise MergeError(
                    f"{rec['nodeid']} is in both {owner[rec['nodeid']]} and {path}: the runs overlap, so they are not "
                    f"shards of one run (--qeff-shard I/N gives disjoint parts)"
                )
            records[rec["nodeid"]], owner[rec["nodeid"]] = rec, path
        for cid, card in data.get("cards", {}).items():
            if cid in cards and cards[cid] != card:
                raise MergeError(f"card {cid!r} differs between {card_owner[cid]} and {path}: the runs used different cards")
            cards[cid], card_owner[cid] = card, path
    shards = [data.get("run", {}).get("shard") for _, data in inputs]
    missing: list[str] = []
    if any(shards):
        if not all(shards):
            raise MergeError("some runs are shards (--qeff-shard) and some are not: " + ", ".join(
                f"{p} ({s or 'unsharded'})" for (p, _), s in zip(inputs, shards)))
        counts = {int(s.split("/")[1]) for s in shards}
        if len(counts) > 1:
            raise MergeError(f"the runs split the cards differently ({', '.join(sorted(set(shards)))})")
        count = counts.pop()
        have = {int(s.split("/")[0]) for s in shards}
        missing = [f"{i}/{count}" for i in range(1, count + 1) if i not in have]
        if missing and not allow_missing_shards:
            raise MergeError(
                f"shard(s) {', '.join(missing)} missing: the merged report would lack their cards "
                f"(pass --allow-missing-shards to merge what is here)"
            )
    run = dict(first.get("run", {}))
    runs = [data.get("run", {}) for _, data in inputs]
    run.update(
        models=_union([r.get("models", []) for r in runs]),
        backends=_union([r.get("backends", []) for r in runs]),
        cardless=_union([r.get("cardless", []) for r in runs]),
        exit_status=max(int(r.get("exit_status", 0) or 0) for r in runs),
        workers=sum(int(r.get("workers", 0) or 0) for r in runs),
        shard=None,
        missing_shards=missing,
        merged=[
            {"file": str(path), "shard": r.get("shard"), "machine": data.get("environment", {}).get("machine"),
             "created": data.get("created"), "exit_status": r.get("exit_status"), "records": len(data.get("records", []))}
            for (path, data), r in zip(inputs, runs)
        ],
    )
    return {
        "schema": first["schema"],
        "version": first["version"],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": first.get("environment", {}),
        "run": run,
        "cards": {cid: cards[cid] for cid in sorted(cards)},
        "records": sort_records(list(records.values()), cards),
    }
