"""View-models of the HTML report: every string and number a template shows is made here, from
``results.json`` alone; the templates only place them (and Jinja2 escapes them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pytest_qeff.baseline import METRICS, NOISE_FLOOR_S
from pytest_qeff.records import (
    BenchmarkRecord,
    CompileRecord,
    PrecisionRecord,
    ExportRecord,
    GenerationRecord,
    ServingRecord,
    StageRecord,
    TransformRecord,
    record_of,
)
from pytest_qeff.summary import CardRow, card_rows

__all__ = ["IndexView", "IndexGroup", "CardView", "index_view", "card_view", "fmt"]

_STATUS = {"passed": "pass", "failed": "fail", "error": "fail", "xpassed": "fail", "skipped": "skip", "xfailed": "xfail"}


def fmt(value: Any, unit: str = "") -> str:
    """Numbers for people: 3 significant digits, '-' for nothing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if value and abs(value) < 1e-2:
            text = f"{value:.3g}"
        elif abs(value) >= 1000:
            text = f"{value:,.0f}"
        else:
            text = f"{value:.4g}"
        return f"{text} {unit}".strip()
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value)
    return f"{value} {unit}".strip()


@dataclass
class Pair:
    label: str
    value: str


@dataclass
class Metric:
    label: str
    value: str
    bound: str  # the tolerance or the allowed change, '' when none
    ok: bool | None  # None: informational


@dataclass
class TokenCell:
    step: int
    reference: str
    generated: str
    cls: str  # same | diff | ambiguous | after


@dataclass
class TokenDiff:
    row: int
    prompt: str
    summary: str
    cells: list[TokenCell]
    reference_text: str | None
    generated_text: str | None


@dataclass
class Bar:
    y: int
    width: int
    label: str
    value: str
    cls: str


@dataclass
class Chart:
    width: int
    height: int
    label_x: int
    bars: list[Bar]
    title: str


@dataclass
class LayerRow:
    layer: int
    max_abs: str
    relative: str
    cls: str  # ok | bad (the first layer over tolerance and after)


@dataclass
class DivergenceView:
    """Where a failed comparison's traces first part (:class:`qeff.divergence.FirstDivergence`)."""

    comparison: str  # e.g. "hf vs pytorch"
    summary: str
    layers: list[LayerRow]


@dataclass
class StageView:
    name: str
    backend: str
    title: str
    outcome: str
    status: str
    duration: str
    message: str
    nodeid: str
    metrics: list[Metric] = field(default_factory=list)
    facts: list[Pair] = field(default_factory=list)
    mismatches: list[Pair] = field(default_factory=list)
    diffs: list[TokenDiff] = field(default_factory=list)
    divergences: list[DivergenceView] = field(default_factory=list)
    chart: Chart | None = None


@dataclass
class CaseView:
    id: str
    title: str
    prompts: list[Pair]
    stages: list[StageView]


@dataclass
class CardView:
    id: str
    name: str
    description: str
    status: str
    row: CardRow
    settings: list[tuple[str, list[Pair]]]
    known_failures: list[Pair]
    cases: list[CaseView]
    environment: list[Pair]
    run: list[Pair]
    ladder: LadderView | None = None


@dataclass
class LadderRow:
    tier: str
    status: str  # pass | fail | skip
    cells: list[str]  # in LADDER_COLUMNS order


@dataclass
class LadderView:
    """The card's precision ladder: one row per tier, and a chart of KLD mean (log scale)."""

    columns: list[str]
    rows: list[LadderRow]
    chart: Chart
    facts: list[Pair]


@dataclass
class IndexRow:
    id: str
    name: str
    href: str
    status: str
    stages: str
    mse: str
    tokens: str
    speed: str
    vs_baseline: str
    graphs: str = ""  # each graph's verdict and speed, when the run certified more than the portable one


@dataclass
class IndexGroup:
    """The cards of one architecture (the HF ``model_type``), a heading and its rows on the index."""

    architecture: str
    title: str  # "llama (5 cards, 1 failing)"
    rows: list[IndexRow]


@dataclass
class IndexView:
    title: str
    created: str
    rows: list[IndexRow]
    groups: list[IndexGroup]  # the same rows, by architecture, architectures sorted
    totals: list[Pair]
    environment: list[Pair]
    run: list[Pair]
    graphs: bool = False  # show the per-graph column (--qeff-graph fused or all)


def _environment(results: dict) -> list[Pair]:
    env = results.get("environment", {})
    pairs = [Pair(k.replace("_", " "), fmt(env.get(k))) for k in ("machine", "platform", "processor", "cores", "physical_cores", "python")]
    commit = env.get("commit")
    pairs.append(Pair("commit", (commit[:12] + (" (uncommitted changes)" if env.get("dirty") else "")) if commit else "-"))
    locked = env.get("locked", {})

    def release(name: str, version: str) -> str:
        tested = locked.get(name)
        if tested is None or tested.split("+")[0] == version.split("+")[0]:
            return version
        return f"{version} (not the locked {tested})"

    pairs += [Pair(name, release(name, version)) for name, version in sorted(env.get("versions", {}).items())]
    return pairs


def _run(results: dict) -> list[Pair]:
    run = results.get("run", {})
    groups = " ".join(",".join(map(str, g)) for g in run.get("device_groups", []))
    return [
        Pair("tier", fmt(run.get("tier"))),
        Pair("backends", fmt(run.get("backends"))),
        Pair("graphs", fmt(run.get("graph", "portable"))),
        Pair("device groups", groups or "-"),
        Pair("models", fmt(run.get("models")) if run.get("models") else "-"),
        Pair("changed since", fmt(run.get("changed_since"))),
        Pair("workers", fmt(run.get("workers"))),
        Pair("command", "pytest " + " ".join(run.get("args", []))),
    ]


def _status(rows_ok: bool, counts: dict[str, int]) -> str:
    if not rows_ok:
        return "fail"
    return "pass" if counts.get("passed") else "skip"


def _groups(rows: list[IndexRow], cards: dict) -> list[IndexGroup]:
    by_arch: dict[str, list[IndexRow]] = {}
    for row in rows:
        by_arch.setdefault(cards.get(row.id, {}).get("architecture") or "unknown", []).append(row)
    groups = []
    for arch in sorted(by_arch):
        members = by_arch[arch]
        failing = sum(r.status == "fail" for r in members)
        title = f"{arch} ({len(members)} card{'s' if len(members) != 1 else ''}" + (f", {failing} failing)" if failing else ")")
        groups.append(IndexGroup(arch, title, members))
    return groups


def index_view(results: dict) -> IndexView:
    rows = [
        IndexRow(r.card, r.name, f"cards/{r.card}.html", _status(r.ok, r.counts), r.stages, r.mse, r.tokens, r.speed, r.vs_baseline,
                 r.by_graph)
        for r in card_rows(results)
    ]
    totals: dict[str, int] = {}
    for rec in results.get("records", []):
        totals[rec["outcome"]] = totals.get(rec["outcome"], 0) + 1
    return IndexView(
        title="qeff conformance report",
        created=results.get("created", ""),
        rows=rows,
        groups=_groups(rows, results.get("cards", {})),
        totals=[Pair(k, str(v)) for k, v in sorted(totals.items())],
        environment=_environment(results),
        run=_run(results),
        graphs=any(r.graphs for r in rows),
    )


def _settings(card: dict, tier: str) -> list[tuple[str, list[Pair]]]:
    def pairs(d: dict) -> list[Pair]:
        return [Pair(k, fmt(v) if not isinstance(v, dict) else ", ".join(f"{a}={fmt(b)}" for a, b in v.items()) or "-") for k, v in d.items()]

    weights = card.get("weights", {})
    sections = [
        ("weights", pairs({k: v for k, v in weights.items() if v is not None})),
        ("architecture (real)", pairs({k: v for k, v in card.get("config", {}).items() if v not in (None, {})})),
        ("tiny overrides", pairs({k: v for k, v in card.get("tiny", {}).items() if v not in (None, {})})),
        ("compile", pairs(card.get("compile", {}))),
        (f"tolerances ({tier})", pairs(card.get("tolerances", {}).get(tier, {}))),
        ("prompts", pairs(card.get("prompts", {}))),
        ("benchmark", pairs(card.get("benchmark", {}))),
    ]
    return [(title, items) for title, items in sections if items]


def _comparison_metrics(comp) -> list[Metric]:
    tol = comp.tolerances
    out = []
    for key, label in (("logits_mse", "logits MSE"), ("logits_max_abs", "logits max-abs"), ("cache_mse", "cache MSE"), ("cache_max_abs", "cache max-abs")):
        value, bound = getattr(comp, key), tol.get(key)
        out.append(Metric(label, fmt(value), f"≤ {fmt(bound)}", bound is not None and value <= bound))
    ambiguous = f" ({comp.ambiguous} ambiguous)" if comp.ambiguous else ""
    hard = [m for m in comp.mismatches if not m.get("ambiguous")]
    out.append(Metric("greedy tokens (teacher-forced)", f"{comp.tokens_matched}/{comp.tokens_total}{ambiguous}", "",
                      comp.tokens_matched == comp.tokens_total or not hard))
    out.append(Metric("KL divergence per step (mean / max)", f"{fmt(comp.kld_mean)} / {fmt(comp.kld_max)}", "", None))
    out.append(Metric("top-1 agreement / top-5 overlap", f"{comp.top1_agree:.1%} / {comp.top5_overlap:.1%}", "", None))
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else ("NaN" if value != value else f"{value:+.2%}")


def _precision_metrics(stage: PrecisionRecord) -> list[Metric]:
    return _budget_metrics(stage.result)


def _budget_metrics(r) -> list[Metric]:
    """A :class:`~qeff.precision.ladder.TierResult` against its budget (a precision tier's, or a
    compressed fused graph's)."""
    b = r.budget
    delta = r.ppl_delta
    ambiguous = f" ({r.tokens_ambiguous} ambiguous)" if r.tokens_ambiguous else ""
    return [
        Metric("KL divergence mean", fmt(r.kld_mean), f"≤ {fmt(b.get('kld_mean'))}", r.kld_mean <= b.get("kld_mean", math.inf)),
        Metric("KL divergence p99", fmt(r.kld_p99), f"≤ {fmt(b.get('kld_p99'))}", r.kld_p99 <= b.get("kld_p99", math.inf)),
        Metric("KL divergence max", fmt(r.kld_max), "", None),
        Metric("top-1 agreement", f"{r.top1_agree:.2%}", f"≥ {b.get('top1_agree', 0):.2%}", r.top1_agree >= b.get("top1_agree", 0)),
        Metric("top-5 overlap", f"{r.top5_overlap:.2%}", "", None),
        Metric("perplexity (HF fp32 → tier)", f"{fmt(r.ppl_ref)} → {fmt(r.ppl)} ({_pct(delta)})", f"≤ {_pct(b.get('ppl_delta'))}",
               None if delta is None else delta <= b.get("ppl_delta", math.inf)),
        Metric("greedy tokens (teacher-forced)", f"{r.tokens_matched}/{r.tokens_total}{ambiguous}", "", None),
    ]


LADDER_COLUMNS = ["tier", "KLD mean", "KLD p99", "KLD max", "top-1", "top-5", "ppl (HF fp32 → tier)", "greedy", "budget"]


def _ladder(records: list[dict]) -> LadderView | None:
    """The card's ladder, in the order the tiers were asked for."""
    found: dict[str, tuple[dict, PrecisionRecord | None]] = {}
    order: list[str] = []
    for rec in records:
        if rec["stage"] != "precision":
            continue
        stage = record_of(rec)
        tier = stage.tier_name if isinstance(stage, PrecisionRecord) else rec.get("precision") or "?"
        found[tier] = (rec, stage if isinstance(stage, PrecisionRecord) else None)
        if isinstance(stage, PrecisionRecord) and not order:
            order = list(stage.tiers)
    if not found:
        return None
    tiers = [t for t in order if t in found] + [t for t in found if t not in order]
    rows, bars, facts = [], [], []
    lo, hi, width = -12.0, 0.0, 300  # log10 of KL in nats: 1e-12 .. 1
    for y, tier in enumerate(tiers):
        rec, stage = found[tier]
        status = _STATUS.get(rec["outcome"], "skip")
        if stage is None:
            rows.append(LadderRow(tier, status, [tier] + ["-"] * (len(LADDER_COLUMNS) - 2) + [rec.get("message", "")[:80]]))
            continue
        r = stage.result
        rows.append(LadderRow(tier, status, [
            tier, fmt(r.kld_mean), fmt(r.kld_p99), fmt(r.kld_max), f"{r.top1_agree:.2%}", f"{r.top5_overlap:.1%}",
            f"{fmt(r.ppl_ref)} → {fmt(r.ppl)} ({_pct(r.ppl_delta)})", f"{r.tokens_matched}/{r.tokens_total}",
            "within" if r.passed else "; ".join(r.failures),
        ]))
        value = r.kld_mean
        level = lo if not value > 0 else min(hi, max(lo, math.log10(value)))  # NaN and 0 sit at the floor
        bars.append(Bar(y * 24, max(1, round(width * (level - lo) / (hi - lo))), tier, fmt(value), "fail" if status == "fail" else "now"))
        if not facts:
            facts = [Pair("reference", "HF eager, fp32, on the untouched model"),
                     Pair("teacher-forced over", f"{stage.rows} x {stage.window} tokens ({stage.corpus}, {stage.corpus_tokens} positions)"),
                     Pair("greedy tokens", f"{len(stage.prompts)} prompt(s) x {stage.steps} steps")]
    chart = Chart(width=620, height=max(24, len(bars) * 24), label_x=120, bars=bars,
                  title="KL divergence mean per tier, nats, log scale from 1e-12 (empty) to 1 (full width)")
    return LadderView(LADDER_COLUMNS, rows, chart, facts)


def _token_diffs(stage: GenerationRecord) -> list[TokenDiff]:
    diffs = []
    for i, row in enumerate(stage.rows):
        ref, got, at = row.reference, row.generated, row.first_divergence
        if at is None:
            continue
        cells = []
        for step in range(max(len(ref), len(got))):
            a = str(ref[step]) if step < len(ref) else ""
            b = str(got[step]) if step < len(got) else ""
            cls = "same" if step < at else ("ambiguous" if row.ambiguous else "diff") if step == at else "after"
            cells.append(TokenCell(step, a, b, cls))
        why = "within the ambiguity margin" if row.ambiguous else "a real divergence"
        prompts, texts = stage.prompts, stage.prompt_texts
        prompt = texts[i] if i < len(texts) and texts[i] else fmt(prompts[i] if i < len(prompts) else [])
        diffs.append(TokenDiff(
            row.row, prompt, f"first difference at step {at}; HF's top-2 margin there {fmt(row.margin)}: {why}",
            cells, row.reference_text, row.generated_text,
        ))
    return diffs


def _chart(stage: BenchmarkRecord) -> Chart | None:
    """Now against the baseline the verdict used: scaled by the machine-speed probe when both runs
    have one (``baseline.check``'s ``machine_speed``), so the bars show what was compared."""
    figures = stage.figures
    if not figures:
        return None
    base = stage.baseline.get("baseline") or {}
    speed = stage.baseline.get("machine_speed") or 1.0
    who_base = "baseline" if speed == 1.0 else f"baseline × {speed:.2f} machine speed"
    bars: list[Bar] = []
    y, full = 0, 260
    for metric, (label, unit, higher_better) in METRICS.items():
        now, then = figures.get(metric), base.get(metric)
        if then is not None:
            then = then * speed if higher_better else then / speed  # what the regression check compared with
        scale = max(v for v in (now, then) if v is not None) or 1.0
        for who, value, cls in (("now", now, "now"), (who_base, then, "baseline")):
            if value is None:
                continue
            shown = fmt(value * 1000, "ms") if unit == "s" else fmt(value, unit)
            bars.append(Bar(y, max(1, round(full * value / scale)), f"{label} ({who})", shown, cls))
            y += 22
        y += 10
    title = "benchmark against the baseline (longer is more: tokens/s faster, TTFT slower)"
    if speed != 1.0:
        title += f"; the baseline is scaled to this machine's speed (probe: {speed:.0%} of the baseline run's), as the verdict was"
    return Chart(width=700, height=y, label_x=260, bars=bars, title=title)


def _divergence(comp) -> DivergenceView | None:
    found = comp.first_divergence
    if found is None:
        return None
    first = found.layer if found.layer is not None else len(found.layers)
    rows = [LayerRow(e["layer"], fmt(e["max_abs"]), fmt(e["relative"]), "bad" if e["layer"] >= first else "ok") for e in found.layers]
    return DivergenceView(f"{comp.reference} vs {comp.candidate}", found.describe(), rows)


_TITLES = {
    "transform": "HF eager vs transformed PyTorch",
    "export": "transformed PyTorch vs ONNX Runtime",
    "compile": "compile",
    "generation": "greedy generation vs HF",
    "benchmark": "benchmark",
    "precision": "precision tier vs HF fp32 (emulated on ONNX Runtime)",
    "serving": "serving feature vs HF eager",
}


def _graph_check(check: dict) -> str:
    """One line for the pipeline's check of a fused graph against the portable one (qeff vs qeff:
    the build's guard; the verdict above is against HF)."""
    if check.get("ran") is False:
        return f"not run: {check.get('reason', '')}"
    gated = "" if check.get("gated", True) else " (re-quantized weights: reported, not gated)"
    return (f"{'passed' if check.get('passed') else 'failed'}: logits max-abs {fmt(check.get('logits_max_abs'))}, "
            f"MSE {fmt(check.get('logits_mse'))}, tokens {check.get('tokens_matched')}/{check.get('tokens_total')}{gated}")


def _stage(rec: dict) -> StageView:
    view = StageView(
        name=rec["stage"], backend=rec.get("backend") or "", title=_TITLES.get(rec["stage"], rec["stage"]),
        outcome=rec["outcome"], status=_STATUS.get(rec["outcome"], "skip"), duration=fmt(rec.get("duration_s"), "s"),
        message=rec.get("message", ""), nodeid=rec["nodeid"],
    )
    stage = record_of(rec)
    if isinstance(stage, (TransformRecord, ExportRecord)):
        comp = stage.comparison
        view.metrics = _comparison_metrics(comp)
        view.mismatches = [
            Pair(f"row {m['row']} step {m['step']}", f"reference {m['reference']} vs {m['candidate']}, margin {fmt(m['margin'])}"
                 + (" (ambiguous)" if m.get("ambiguous") else ""))
            for m in comp.mismatches
        ]
        upstream = stage.hf_vs_pytorch if isinstance(stage, ExportRecord) else None
        view.divergences = [d for d in (_divergence(comp), upstream and _divergence(upstream)) if d]
    if isinstance(stage, TransformRecord) and stage.config_mismatches:
        view.metrics.append(Metric("config equals the card", "; ".join(stage.config_mismatches), "", False))
    if isinstance(stage, ExportRecord):
        o = stage.onnx
        view.facts = [Pair("graph", o.path), Pair("size", fmt(o.bytes, "bytes")), Pair("reused", fmt(o.reused)),
                      Pair("build", fmt(o.build_s, "s")), Pair("fp16-clipped values", fmt(o.fp16_clipped_values))]
    if isinstance(stage, CompileRecord):
        a = stage.artifact
        view.facts = [Pair("artifact", a.name), Pair("path", a.path), Pair("size", fmt(a.bytes, "bytes")),
                      Pair("reused", fmt(a.reused)), Pair("build", fmt(a.build_s, "s")),
                      Pair("device group", fmt(stage.device_group))]
        if stage.hf_vs_graph is not None:  # the fused graph's verdict, against the untouched HF model
            view.title = "the fused ONNX Runtime graph builds, opens, and matches HF eager"
            view.metrics = _comparison_metrics(stage.hf_vs_graph)
            view.divergences = [d for d in (_divergence(stage.hf_vs_graph),) if d]
        if stage.budget is not None:  # compressed weights: their verdict against HF fp32, within the card's budget
            v = stage.budget
            view.title = f"the fused ONNX Runtime graph with {stage.weights} weights builds, opens, and stays within the card's budget vs HF fp32"
            view.metrics = _budget_metrics(v.result)
            view.metrics.append(Metric("logits max-abs vs HF fp32 (0 = compared with itself)", fmt(v.logits_max_abs), "> 0",
                                       v.logits_max_abs > 0))
            view.facts.append(Pair("teacher-forced over", f"{v.rows} x {v.window} tokens ({v.corpus}, {v.result.positions} positions)"))
        if stage.graph_check is not None:
            view.facts.append(Pair("build check vs the portable graph", _graph_check(stage.graph_check)))
    if isinstance(stage, GenerationRecord):
        view.metrics.append(Metric("greedy tokens matched", f"{stage.tokens_matched}/{stage.tokens_total}", "",
                                   stage.tokens_matched == stage.tokens_total or None))
        view.diffs = _token_diffs(stage)
    if isinstance(stage, ServingRecord):
        view.title = f"{stage.feature.replace('_', ' ')} vs HF eager, prompt by prompt"
        view.metrics = [Metric(c.label, c.value, c.bound, c.ok) for c in stage.checks]
        view.metrics += [Metric(k.replace("_", " "), fmt(v), "", None) for k, v in sorted(stage.figures.items())]
        view.facts = [Pair(k.replace("_", " "), fmt(v)) for k, v in sorted(stage.settings.items()) if v is not None]
        view.diffs = _token_diffs(stage)
    if isinstance(stage, BenchmarkRecord):
        against = stage.baseline
        changes = against.get("changes", {})
        allowed = against.get("allowed")
        for metric, (label, unit, _) in METRICS.items():
            value = stage.figures.get(metric)
            shown = fmt(value * 1000, "ms") if unit == "s" and value is not None else fmt(value, unit)
            change = changes.get(metric)
            bound = f"{change:+.0%} vs baseline (allowed {allowed:+.0%})" if change is not None and allowed is not None else ""
            noise = metric in against.get("within_noise", ())
            if noise:
                bound += f"; under the {NOISE_FLOOR_S * 1000:.0f} ms noise floor, not failed"
            view.metrics.append(Metric(label, shown, bound, None if change is None else (change >= allowed or noise)))
        view.facts = [Pair("runs (median shown)", fmt(stage.repeats)), Pair("tokens per run per row", fmt(stage.generation_len)),
                      Pair("threads", fmt(stage.threads)), Pair("baseline", against.get("file", "-") + (f" [{against.get('key')}]" if against.get("key") else "")),
                      Pair("update command", against.get("command", "-"))]
        if against.get("note"):
            view.facts.append(Pair("note", against["note"]))
        if stage.update_baseline:
            view.facts.append(Pair("baseline", "updated from this run"))
        view.chart = _chart(stage)
    if isinstance(stage, PrecisionRecord):
        view.backend = stage.tier_name
        view.metrics = _precision_metrics(stage)
        emulation = stage.result.emulation
        view.facts = [Pair("corpus", f"{stage.rows} x {stage.window} tokens ({stage.corpus})")] + [
            Pair(k.replace("_", " "), fmt(v)) for k, v in emulation.items() if v and k not in ("tier", "notes")]
    if stage is not None:
        view.facts += _resources(stage)
    return view


def _resources(stage: StageRecord) -> list[Pair]:
    """Each chain stage the test ran (issue 18): its peak RSS and wall time, and the preflight's
    estimate when it made one."""
    return [Pair(f"{m.name}: peak RSS, wall time", f"{m.peak_rss / 2**20:,.0f} MiB, {m.wall_s:.1f} s"
                 + (f" (estimated {m.estimate / 2**20:,.0f} MiB)" if m.estimate else ""))
            for m in stage.resources]


def _prompts(stage: StageRecord | None) -> list[Pair]:
    if stage is None:
        return []
    texts, ids = stage.prompt_texts, stage.prompts
    out = []
    for i, p in enumerate(ids):
        text = texts[i] if i < len(texts) and texts[i] else None
        out.append(Pair(f"row {i}", (f"{text}  " if text else "") + f"[{len(p)} tokens: {fmt(p)}]"))
    return out


def card_view(results: dict, card_id: str) -> CardView:
    card = results.get("cards", {}).get(card_id, {"id": card_id, "name": card_id})
    tier = results.get("run", {}).get("tier", "tiny")
    records = [r for r in results.get("records", []) if r["card"] == card_id]
    row = next((r for r in card_rows(results) if r.card == card_id), CardRow(card_id, card.get("name", card_id)))
    cases: dict[str, CaseView] = {}
    for rec in records:
        case = cases.setdefault(rec["case"], CaseView(rec["case"], f"{card_id}-{rec['case']}", [], []))
        if not case.prompts:  # a skipped stage carries no data; the next one may
            case.prompts = _prompts(record_of(rec))
        case.stages.append(_stage(rec))
    known = [Pair(" / ".join(x for x in (kf.get("stage"), kf.get("tier"), kf.get("case"), kf.get("backend")) if x), kf.get("reason", ""))
             for kf in card.get("known_failures", [])]
    return CardView(
        id=card_id, name=card.get("name", card_id), description=card.get("description", ""),
        status=_status(row.ok, row.counts), row=row, settings=_settings(card, tier), known_failures=known,
        cases=list(cases.values()), environment=_environment(results), run=_run(results), ladder=_ladder(records),
    )
