"""The plugin's command-line options, and :class:`Settings`: what they mean for this run.

``resolve(config)`` checks every option once, at configure time, on the controller and on each
xdist worker alike (so they agree on what is collected); a bad value is a ``pytest.UsageError``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_qeff import cardless, changed, devices
from pytest_qeff import cards as cards_mod
from pytest_qeff import shard as shard_mod
from pytest_qeff.cards import Card

__all__ = ["Settings", "SETTINGS", "add_options", "resolve", "worker_id", "is_worker"]

BACKEND_CHOICES = ("auto", "ort", "qaic")
#: --qeff-graph: which graphs the compile, generation and benchmark stages certify.
GRAPH_CHOICES = ("portable", "fused", "compressed", "all")


@dataclass(frozen=True)
class Settings:
    active: bool  # the suite was asked for (--qeff-model or --qeff-changed-since)
    cards: list[Card]  # selected, sorted by id
    all_cards: dict[str, Card]
    cards_dir: Path
    tier: str
    backend: str  # the option's value
    backends: tuple[str, ...]  # the backends stage tests run on
    device_groups: list[devices.DeviceGroup]
    report_dir: Path
    baseline_dir: Path
    default_baseline_dir: Path
    update_baseline: bool
    changed: changed.Selection | None = None
    patterns: list[str] = field(default_factory=list)
    trust_remote_code: bool = False
    cardless: list[str] = field(default_factory=list)  # ids of the cards built from a model's config
    written_cards: list[Path] = field(default_factory=list)  # --qeff-write-card
    shard: shard_mod.Shard | None = None
    unsharded: int = 0  # how many cards were selected before --qeff-shard took its part
    precision: tuple[str, ...] = ()  # --qeff-precision: tier names, ladder order as given
    graph: str = "portable"  # --qeff-graph

    @property
    def stage_backends(self) -> tuple[str, ...]:
        """The values of ``qeff_backend``: each backend's graphs this run certifies (``ort``,
        ``ort-fused``, ``qaic``; :func:`pytest_qeff.collect.graph_targets`)."""
        from pytest_qeff.collect import graph_targets

        return graph_targets(self.backends, self.graph)


SETTINGS = pytest.StashKey[Settings]()


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("qeff", "qeff conformance suite (model cards become tests, benchmarks and reports)")
    group.addoption(
        "--qeff-model", action="append", default=[], metavar="NAME",
        help="model card to test: an id (llama-2-7b-chat), HF repo id (meta-llama/Llama-2-7b-chat-hf) or alias, "
        "any case; a glob (llama-2-*) or 'all'; or a model directory, .gguf file or cached hub repo id with no "
        "card, for which a card is built from its config. Repeatable, commas allowed. Without it (or "
        "--qeff-changed-since) the suite is off. Default: none.",
    )
    group.addoption(
        "--qeff-write-card", nargs="?", const="", default=None, metavar="PATH",
        help="save each card built from a model's config (see --qeff-model) as TOML, to commit: into PATH (a "
        "directory, or a <id>.toml file), or without PATH into the cards directory (--qeff-cards-dir) when it "
        "is inside the rootdir, else the current directory. Default: off.",
    )
    group.addoption(
        "--qeff-shard", metavar="I/N", default=None, type=shard_mod.parse,
        help="run only the I-th of N parts of the selected cards (1-based; cards dealt round-robin over their "
        "sorted ids), one part per CI machine; join the parts' results with python -m pytest_qeff.report "
        "merge. Default: all cards.",
    )
    group.addoption(
        "--device-group", "--device_group", action="append", default=[], metavar="IDS", dest="qeff_device_groups",
        help="accelerator device ids used together, e.g. 0,1 or [0,1] (one two-device group); repeat for several "
        "groups, one per pytest-xdist worker (-n N). Only the qaic backend uses devices. Default: 0.",
    )
    group.addoption(
        "--qeff-backend", choices=BACKEND_CHOICES, default="auto",
        help="backend of the compile, generation and benchmark stages: ort (ONNX Runtime, CPU), qaic (Cloud AI "
        "100; skipped with the reason where its SDK is missing) or auto (both). Default: auto.",
    )
    group.addoption(
        "--qeff-graph", choices=GRAPH_CHOICES, default="portable",
        help="graphs the compile, generation and benchmark stages certify: portable (the graph every backend "
        "compiles), fused (ONNX Runtime's fused CPU graph with fp32 weights, what `qeff infer --backend ort` runs "
        "where it covers the architecture; judged against HF eager like the portable one, with its own benchmark) "
        "compressed (the fused graph with the compressed weights `qeff infer --weights native|int8|int4 "
        "[--int8-activations]` builds, each judged against HF fp32 within the card's [cpu_weights] budget, with its own "
        "benchmark; cards without a budget in the tier are not collected) or all (every one of them; Cloud AI has the "
        "portable graph only). Default: portable.",
    )
    group.addoption(
        "--qeff-tier", choices=cards_mod.TIERS, default="tiny",
        help="tiny: each card's reduced config with seeded random weights (seconds per card); full: the real "
        "weights, skipped with a reason where they are not on this machine. Default: tiny.",
    )
    group.addoption(
        "--qeff-report", metavar="DIR", default="qeff_report",
        help="directory for results.json and the HTML report (index.html). Default: ./qeff_report.",
    )
    group.addoption(
        "--qeff-baseline", metavar="DIR", default=None,
        help="benchmark baselines, one <backend>/<card>.json per card; each card's [benchmark] max_regression "
        "(a fraction of tokens/s) is the allowed slowdown. Default: reports/published under the rootdir.",
    )
    group.addoption(
        "--qeff-update-baseline", action="store_true", default=False,
        help="write this run's benchmark medians (decode and total tokens/s, seconds to first token) into the "
        "baseline files instead of comparing with them. Default: off.",
    )
    group.addoption(
        "--qeff-trust-remote-code", action="store_true", default=False,
        help="run the cards marked [weights] trust_remote_code (Jais, ChatGLM2, Baichuan2): this executes Python "
        "code from the model's hub repository, read from the local Hugging Face cache (never downloaded). "
        "Without it their stages skip. Default: off.",
    )
    group.addoption(
        "--qeff-precision", metavar="TIERS", default=None, type=parse_precision,
        help="run the precision ladder: each tier (fp32, fp16, mxfp6, mxint8, mxfp6+mxint8; mxfp6-e3m2 for the "
        "other MXFP6 encoding) emulated on ONNX Runtime and judged against HF fp32 by the card's budgets, one "
        "test per tier. Comma-separated. Default: off.",
    )
    group.addoption(
        "--qeff-cards-dir", metavar="DIR", default=None,
        help="directory of *.toml model cards. Default: the cards shipped with pytest_qeff (model_cards/).",
    )
    group.addoption(
        "--qeff-changed-since", metavar="REF", default=None,
        help="select the cards that the changes since git REF affect (card files, architecture files and what "
        "they import; shared code selects all); combined with --qeff-model, the intersection. Default: off.",
    )


def parse_precision(value: str) -> tuple[str, ...]:
    """``--qeff-precision``'s converter: canonical tier names, or an error naming the valid ones."""
    import argparse

    from qeff.errors import UsageError
    from qeff.precision.tiers import parse_tiers

    try:
        return tuple(t.name for t in parse_tiers(value))
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def worker_id(config: pytest.Config) -> str:
    return config.workerinput["workerid"] if is_worker(config) else "main"


def _workers(config: pytest.Config) -> int:
    if is_worker(config):
        return int(config.workerinput.get("workercount", 1))
    if (config.getoption("dist", "no") or "no") == "no":
        return 0
    return int(config.getoption("numprocesses", 0) or 0)


def _path(config: pytest.Config, value: str) -> Path:
    return (config.invocation_params.dir / os.path.expanduser(value)).resolve()


def _check_directory(flag: str, path: Path) -> None:
    """A directory the run writes into at its end must be one (issue 14: ``--qeff-report`` naming a
    file lost the run's report at session end, exit 1 instead of a usage error up front)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise pytest.UsageError(f"{flag} {path} cannot be a directory: {probe} is a file")


def resolve(config: pytest.Config) -> Settings:
    opt = config.getoption
    patterns: list[str] = opt("qeff_model")
    since: str | None = opt("qeff_changed_since")
    groups = devices.parse_groups(opt("qeff_device_groups"))
    active = bool(patterns or since)
    cards_dir = _path(config, opt("qeff_cards_dir")) if opt("qeff_cards_dir") else cards_mod.default_cards_dir()
    all_cards: dict[str, Card] = cards_mod.load_cards(cards_dir) if active else {}
    known = frozenset(all_cards)
    selected = (
        cards_mod.select(all_cards, patterns, fallback=lambda p: cardless.card_for(p, known))
        if patterns else list(all_cards.values())
    )
    built = [c for c in selected if c.id not in known]
    all_cards = {**all_cards, **{c.id: c for c in built}}
    selection = None
    if since:
        repo = changed.git_root(config.rootpath)
        try:
            rel_cards = cards_dir.resolve().relative_to(repo.resolve()).as_posix()
        except ValueError:
            rel_cards = str(cards_dir)
        selection = changed.select_changed(
            changed.changed_files(repo, since), all_cards, rel_cards, changed.module_graph(repo), since
        )
        selected = [c for c in selected if c.id in selection.cards or c.id not in known]  # named models stay
    unsharded = len(selected)
    shard: shard_mod.Shard | None = opt("qeff_shard")
    if shard is not None:
        selected = shard.take(sorted(selected, key=lambda c: c.id))
    written = _write_cards(config, built, cards_dir) if opt("qeff_write_card") is not None else []
    if active:
        devices.check_workers(groups, _workers(config))
        _check_directory("--qeff-report", _path(config, opt("qeff_report")))
        if opt("qeff_baseline"):
            _check_directory("--qeff-baseline", _path(config, opt("qeff_baseline")))
    backend = opt("qeff_backend")
    graph = opt("qeff_graph") or "portable"
    if graph in ("fused", "compressed") and backend == "qaic":
        raise pytest.UsageError(f"--qeff-graph {graph}: the fused graph is ONNX Runtime's (--qeff-backend ort or auto); "
                                "Cloud AI 100 runs the portable graph")
    default_baseline = (config.rootpath / "reports" / "published").resolve()
    return Settings(
        active=active,
        cards=selected,
        all_cards=all_cards,
        cards_dir=cards_dir,
        tier=opt("qeff_tier"),
        backend=backend,
        backends=("ort", "qaic") if backend == "auto" else (backend,),
        device_groups=groups,
        report_dir=_path(config, opt("qeff_report")),
        baseline_dir=_path(config, opt("qeff_baseline")) if opt("qeff_baseline") else default_baseline,
        default_baseline_dir=default_baseline,
        update_baseline=opt("qeff_update_baseline"),
        changed=selection,
        patterns=patterns,
        trust_remote_code=opt("qeff_trust_remote_code"),
        cardless=[c.id for c in built],
        written_cards=written,
        shard=shard,
        unsharded=unsharded,
        precision=opt("qeff_precision") or (),
        graph=graph,
    )


def _write_cards(config: pytest.Config, built: list[Card], cards_dir: Path) -> list[Path]:
    """``--qeff-write-card``: on the controller only (workers build the same cards)."""
    value: str = config.getoption("qeff_write_card")
    if not built:
        raise pytest.UsageError(
            "--qeff-write-card: no card was built from a model's config (every --qeff-model name matched a card)"
        )
    if is_worker(config):
        return []
    if value:
        target = _path(config, value)
        if target.suffix == ".toml" and len(built) > 1:
            raise pytest.UsageError(f"--qeff-write-card {value}: {len(built)} cards were built; give a directory")
    else:
        inside = cards_dir.resolve().is_relative_to(config.rootpath.resolve())
        target = cards_dir if inside else config.invocation_params.dir
    return [cardless.write(card, target) for card in built]
