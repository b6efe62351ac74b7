"""One row per card, computed from ``results.json``: the terminal table and the report's index.

    card              stages        worst MSE / tol      tokens   decode tok/s   vs baseline
    llama-2-7b-chat   10/10         3.1e-15 / 1e-12      32/32    1450.2         +2%

When the run certified more than the portable graph (``--qeff-graph fused``/``all``), a last
column gives each graph's verdict and decode speed side by side:
``ort 3/3 1450.2 tok/s · ort-fused 3/3 2210.4 tok/s``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pytest_qeff.records import BenchmarkRecord, ExportRecord, GenerationRecord, TransformRecord, record_of

__all__ = ["CardRow", "GraphRow", "card_rows", "format_table", "worst_comparison"]

#: The stages that run once per graph (``qeff_backend``: ort, ort-fused, qaic).
GRAPH_STAGES = ("compile", "generation", "benchmark")


@dataclass
class GraphRow:
    """One graph's stages of a card: how many passed, and its median decode tokens/s."""

    backend: str  # the qeff_backend value: ort, ort-fused, qaic
    passed: int = 0
    total: int = 0
    skipped: int = 0
    decode_tok_s: float | None = None

    def describe(self) -> str:
        speed = f" {self.decode_tok_s:.1f} tok/s" if self.decode_tok_s is not None else ""
        skipped = f" ({self.skipped} skipped)" if self.skipped else ""
        return f"{self.backend} {self.passed}/{self.total}{skipped}{speed}"


@dataclass
class CardRow:
    card: str
    name: str
    passed: int = 0
    total: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    worst_mse: float | None = None
    worst_tol: float | None = None
    worst_what: str = ""
    tokens_matched: int = 0
    tokens_total: int = 0
    decode_tok_s: float | None = None
    change: float | None = None  # worst speed change against the baseline (-0.1 = 10 % slower)
    baseline_note: str = ""  # "no baseline" / "updated"
    graphs: dict[str, GraphRow] = field(default_factory=dict)  # by qeff_backend value, when a fused graph ran

    @property
    def by_graph(self) -> str:
        return " · ".join(g.describe() for g in self.graphs.values())

    @property
    def ok(self) -> bool:
        return not (self.counts.get("failed") or self.counts.get("error") or self.counts.get("xpassed"))

    @property
    def stages(self) -> str:
        extra = [f"{n} {o}" for o, n in sorted(self.counts.items()) if o != "passed" and n]
        return f"{self.passed}/{self.total}" + (f" ({', '.join(extra)})" if extra else "")

    @property
    def mse(self) -> str:
        if self.worst_mse is None:
            return "-"
        return f"{self.worst_mse:.2g} / {self.worst_tol:.0e}"

    @property
    def tokens(self) -> str:
        return f"{self.tokens_matched}/{self.tokens_total}" if self.tokens_total else "-"

    @property
    def speed(self) -> str:
        return f"{self.decode_tok_s:.1f}" if self.decode_tok_s is not None else "-"

    @property
    def vs_baseline(self) -> str:
        if self.change is not None and self.change == self.change:
            text = f"{self.change:+.0%}"
            return f"{text} ({self.baseline_note})" if self.baseline_note else text
        return self.baseline_note or "-"


def worst_comparison(records: list[dict]) -> tuple[float, float, str] | None:
    """(MSE, its tolerance, what) of the comparison closest to its MSE tolerance."""
    worst = None
    for rec in records:
        stage = record_of(rec)
        if not isinstance(stage, (TransformRecord, ExportRecord)):
            continue
        comp = stage.comparison
        for kind in ("logits", "cache"):
            value, tol = getattr(comp, f"{kind}_mse"), comp.tolerances.get(f"{kind}_mse")
            if not tol:
                continue
            ratio = value / tol if value == value else float("inf")
            if worst is None or ratio > worst[0]:
                worst = (ratio, value, tol, f"{comp.reference} vs {comp.candidate} {kind} MSE ({rec['case']})")
    return None if worst is None else worst[1:]


def card_rows(results: dict) -> list[CardRow]:
    by_card: dict[str, list[dict]] = {}
    for rec in results.get("records", []):
        by_card.setdefault(rec["card"], []).append(rec)
    rows = []
    for card_id in sorted(by_card):
        recs = by_card[card_id]
        card = results.get("cards", {}).get(card_id, {})
        counts = Counter(r["outcome"] for r in recs)
        row = CardRow(card=card_id, name=card.get("name", card_id), passed=counts["passed"], total=len(recs), counts=dict(counts))
        worst = worst_comparison(recs)
        if worst:
            row.worst_mse, row.worst_tol, row.worst_what = worst
        if any(r.get("graph") == "fused" for r in recs):
            for rec in recs:
                if rec["stage"] in GRAPH_STAGES and rec.get("backend"):
                    graph = row.graphs.setdefault(rec["backend"], GraphRow(rec["backend"]))
                    graph.total += 1
                    graph.passed += rec["outcome"] == "passed"
                    graph.skipped += rec["outcome"] == "skipped"
                    bench = record_of(rec)
                    if isinstance(bench, BenchmarkRecord):
                        graph.decode_tok_s = bench.figures.get("decode_tok_s")
        for rec in recs:
            stage = record_of(rec)
            if isinstance(stage, GenerationRecord):
                row.tokens_matched += stage.tokens_matched
                row.tokens_total += stage.tokens_total
            if isinstance(stage, BenchmarkRecord):
                if row.decode_tok_s is None:
                    row.decode_tok_s = stage.figures.get("decode_tok_s")
                changes = [c for c in stage.baseline.get("changes", {}).values() if c == c]
                if changes:
                    worst_change = min(changes)
                    row.change = worst_change if row.change is None else min(row.change, worst_change)
                if stage.update_baseline:
                    row.baseline_note = "updated"
                elif not stage.baseline.get("found") and not row.baseline_note:
                    row.baseline_note = "no baseline"
        rows.append(row)
    return rows


def format_table(rows: list[CardRow]) -> list[str]:
    header = ("card", "stages passed", "worst MSE / tol", "tokens", "decode tok/s", "vs baseline")
    cells = [header] + [(r.card, r.stages, r.mse, r.tokens, r.speed, r.vs_baseline) for r in rows]
    if any(r.graphs for r in rows):
        header += ("per graph",)
        cells = [header] + [(*c, r.by_graph or "-") for c, r in zip(cells[1:], rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    right = {3, 4}
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
