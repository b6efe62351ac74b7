"""The end of a run, on the controller only: results.json, the HTML report, updated baselines."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_qeff import baseline, report, results, summary
from pytest_qeff.options import Settings

__all__ = ["Published", "PUBLISHED", "COLLECTOR", "publish", "terminal_lines"]


@dataclass
class Published:
    results: Path
    index: Path
    rows: list[summary.CardRow]
    baselines: list[Path] = field(default_factory=list)


COLLECTOR = pytest.StashKey[results.Collector]()
PUBLISHED = pytest.StashKey[Published]()


def publish(config: pytest.Config, settings: Settings, collector: results.Collector, exitstatus: int) -> Published | None:
    if not collector.records:
        return None
    env = results.environment(config.rootpath, list(settings.backends))
    run = {
        "tier": settings.tier,
        "backend": settings.backend,
        "backends": list(settings.backends),
        "graph": settings.graph,  # --qeff-graph: the graphs the staged tests certified
        "device_groups": [list(g) for g in settings.device_groups],
        "models": settings.patterns,
        "changed_since": settings.changed.ref if settings.changed else None,
        "shard": str(settings.shard) if settings.shard else None,
        "cardless": list(settings.cardless),
        "baseline_dir": str(settings.baseline_dir),
        "update_baseline": settings.update_baseline,
        "workers": int(config.getoption("numprocesses", 0) or 0) if config.getoption("dist", "no") != "no" else 0,
        "exit_status": int(exitstatus),
        "args": list(config.invocation_params.args),
    }
    content = results.build(collector, settings.all_cards, env, run)
    path = results.write(settings.report_dir / "results.json", content)
    index = report.render(content, settings.report_dir)
    written = []
    if settings.update_baseline:
        keep = {k: env[k] for k in ("machine", "processor", "cores", "physical_cores", "versions", "commit")}
        written = baseline.update(settings.baseline_dir, content["records"], keep)
    return Published(results=path, index=index, rows=summary.card_rows(content), baselines=written)


def terminal_lines(settings: Settings, published: Published | None) -> list[str]:
    if published is None:
        if settings.changed is not None and not settings.cards:
            return ["no model card is affected by the changes since " + settings.changed.ref]
        if settings.shard is not None and not settings.cards:
            return [f"shard {settings.shard} holds no card ({settings.unsharded} selected card(s) over {settings.shard.count} shards)"]
        return []
    lines = summary.format_table(published.rows)
    lines.append(f"report: {published.index}  (source: {published.results})")
    for b in published.baselines:
        if getattr(b, "message", None):
            lines.append(b.message)
        lines.append(f"baseline updated: {b}")
    lines += [f"card written: {p} (built from its model's config; commit it to keep it)" for p in settings.written_cards]
    return lines
