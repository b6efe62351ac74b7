"""Card × case → parametrized stage tests: ids, markers, xdist groups, known failures.

Every stage test of the suite takes ``qeff_case`` (one :class:`Target` per card case) and, when it
runs once per backend, ``qeff_backend``. Tests run stage by stage (every transform, then every
export, ...); the worker's :class:`~pytest_qeff.stages.Pipeline` keeps what earlier stages built. Ids read ``llama-2-7b-chat-bs1-pl32-cl128`` (``…-ort``).

The graph axis (``--qeff-graph``) rides on ``qeff_backend``: ``ort`` is ONNX Runtime's portable
graph, ``ort-fused`` its fused CPU graph (:func:`graph_targets`, :func:`split_backend`), so a
portable run's ids, markers and baselines are what they were; a fused test carries ``qeff_ort``
and ``qeff_fused``, and its record ``"graph": "fused"``. The fused graph with compressed weights
(``--qeff-graph compressed``) is ``ort-fused-<mode>`` (:data:`COMPRESSED`, one per
:data:`~pytest_qeff.cards.WEIGHT_MODES` mode): its compile stage is judged within the card's
``[cpu_weights]`` budget and its benchmark has its own baseline; it has no greedy-generation stage
(re-quantized weights may pick other tokens where the budget allows), carries ``qeff_ort`` and
``qeff_compressed``, and records ``"graph": "fused"`` and ``"weights": <mode>``. A card with no
budget in the tier gets no compressed tests at all.

Markers set here: ``qeff`` on every stage test, ``qeff_<stage>``, ``qeff_<backend>``, and
``xdist_group(<card>)`` (the documented grouping; :mod:`pytest_qeff.distribute` does the actual
scheduling by card, so a card's artifacts are built once, on one worker). A card's known failure becomes ``xfail(strict=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_qeff.cards import BACKENDS, STAGES, WEIGHT_MODES, Card, Case
from pytest_qeff.options import Settings, worker_id

__all__ = ["graph_targets", "split_backend", "weight_mode", "FUSED", "COMPRESSED", "Target", "MARKERS", "SUITE_DIR", "register_markers", "targets", "parametrize", "mark_items", "item_meta", "is_suite_test", "prepare_items", "route_args", "skip_precision_function", "undeclared", "serving_targets"]

SUITE_DIR = Path(__file__).resolve().parent / "suite"

MARKERS = {
    "qeff": "a qeff conformance test generated from a model card",
    "qeff_stage(name)": "which pipeline stage a suite test checks (transform, export, compile, generation, benchmark, precision, serving)",
    **{f"qeff_{s}": f"the {s} stage of the qeff conformance suite" for s in STAGES},
    **{f"qeff_{b}": f"a qeff stage that runs on the {b} backend" for b in BACKENDS},
    "qeff_fused": "a qeff stage that runs ONNX Runtime's fused CPU graph (--qeff-graph fused or all)",
    "qeff_compressed": "a qeff stage that runs the fused CPU graph with compressed weights (--qeff-graph compressed or all)",
    "xdist_group(name)": "pytest-xdist --dist loadgroup: tests of one group run on one worker",
}


#: The ``qeff_backend`` value of ONNX Runtime's fused CPU graph.
FUSED = "ort-fused"
#: The ``qeff_backend`` values of the fused graph with compressed weights, one per weights mode.
COMPRESSED = tuple(f"{FUSED}-{mode}" for mode in WEIGHT_MODES)
#: Stages that run on a compressed graph: no greedy generation (see the module docstring).
COMPRESSED_STAGES = ("compile", "benchmark")


def graph_targets(backends: Sequence[str], graph: str) -> tuple[str, ...]:
    """The ``qeff_backend`` values for these backends and ``--qeff-graph``: each backend's
    portable graph (``portable``/``all``), ONNX Runtime's fused graph (``fused``/``all``) and its
    compressed-weights graphs (``compressed``/``all``). Cloud AI 100 has the portable graph only."""
    found: list[str] = []
    for backend in backends:
        if graph in ("portable", "all") or backend != "ort":
            if graph not in ("fused", "compressed"):
                found.append(backend)
        if graph in ("fused", "all") and backend == "ort":
            found.append(FUSED)
        if graph in ("compressed", "all") and backend == "ort":
            found.extend(COMPRESSED)
    return tuple(found)


def split_backend(value: str) -> tuple[str, str]:
    """``(backend, graph)`` of a ``qeff_backend`` value: ``ort-fused`` and ``ort-fused-int4`` are
    ``("ort", "fused")``."""
    return ("ort", "fused") if value == FUSED or value in COMPRESSED else (value, "portable")


def weight_mode(value: str | None) -> str | None:
    """The compressed-weights mode of a ``qeff_backend`` value (``ort-fused-int4`` → ``int4``);
    None for every other graph (the fused graph's fp32 weights included)."""
    return value[len(FUSED) + 1:] if value in COMPRESSED else None


@dataclass(frozen=True, eq=False)
class Target:
    """One case of one card in one tier: the value of the ``qeff_case`` parameter."""

    card: Card
    case: Case
    tier: str
    #: The serving feature a ``serving`` stage test proves (one of the card's ``[serving]`` features).
    feature: str | None = None

    @property
    def id(self) -> str:
        return f"{self.card.id}-{self.case.id}" + (f"-{self.feature}" if self.feature else "")


def register_markers(config: pytest.Config) -> None:
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def targets(cards: Sequence[Card], tier: str) -> list[Target]:
    return [Target(card, case, tier) for card in cards for case in card.all_cases]


def serving_targets(cards: Sequence[Card], tier: str) -> list[Target]:
    """One target per case and declared serving feature, for the cards with a ``[serving]`` table."""
    return [Target(card, case, tier, feature) for card in cards if card.serving
            for case in card.all_cases for feature in card.serving.features]


def parametrize(metafunc: pytest.Metafunc, cards: Sequence[Card], tier: str, backends: Sequence[str],
                precision: Sequence[str] = ()) -> None:
    if "qeff_case" in metafunc.fixturenames:
        stage = metafunc.definition.get_closest_marker("qeff_stage")
        found = serving_targets(cards, tier) if stage is not None and stage.args[0] == "serving" else targets(cards, tier)
        metafunc.parametrize("qeff_case", found, ids=[t.id for t in found])
    if "qeff_backend" in metafunc.fixturenames:
        metafunc.parametrize("qeff_backend", list(backends))
    if "qeff_precision" in metafunc.fixturenames:  # empty without --qeff-precision: dropped in prepare_items
        metafunc.parametrize("qeff_precision", list(precision), ids=list(precision))


def undeclared(obj: object, cards: Sequence[Card]) -> bool:
    """A suite test of the ``serving`` stage when no selected card declares ``[serving]``: it is
    not collected at all (an empty parametrization would leave a "[NOTSET]" placeholder)."""
    marks = getattr(obj, "pytestmark", [])
    stage = next((m.args[0] for m in marks if m.name == "qeff_stage" and m.args), None)
    return stage == "serving" and not any(card.serving for card in cards)


def is_suite_test(item: pytest.Item) -> bool:
    return "qeff_case" in getattr(item, "fixturenames", ())


def item_meta(item: pytest.Item) -> dict | None:
    """Who a suite test is (builtin types only, so it travels with xdist reports)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    target = params.get("qeff_case")
    marker = item.get_closest_marker("qeff_stage")
    if not isinstance(target, Target) or marker is None:
        return None
    meta = {
        "card": target.card.id,
        "case": target.case.id,
        "tier": target.tier,
        "stage": marker.args[0],
        "backend": params.get("qeff_backend"),
        "precision": params.get("qeff_precision"),
        "worker": worker_id(item.config),
    }
    if target.feature:
        meta["feature"] = target.feature
    if meta["backend"] == FUSED or meta["backend"] in COMPRESSED:
        meta["graph"] = "fused"
    if weight_mode(meta["backend"]):
        meta["weights"] = weight_mode(meta["backend"])
    return meta


def prepare_items(config: pytest.Config, items: list[pytest.Item], settings: Settings) -> None:
    """Refuse the suite without cards, drop its empty placeholders, mark the rest."""
    if not settings.active and any(is_suite_test(i) for i in items):
        raise pytest.UsageError("the qeff conformance suite needs cards: add --qeff-model NAME (or all) or --qeff-changed-since REF")
    if not settings.cards:  # --qeff-changed-since selected nothing: no "[NOTSET]" placeholders
        dropped = [i for i in items if is_suite_test(i)]
        if dropped:
            items[:] = [i for i in items if not is_suite_test(i)]
            config.hook.pytest_deselected(items=dropped)
    # The precision ladder runs once per card (its corpus, not the case's shape, sets what it
    # compiles): only on the card's first case, and only when --qeff-precision names tiers.
    extra = [i for i in items if is_suite_test(i) and _stage(i) == "precision" and not _first_case_with_tiers(i, settings)]
    extra += [i for i in items if is_suite_test(i) and not _compressed_collected(i)]
    if extra:
        items[:] = [i for i in items if i not in extra]
        config.hook.pytest_deselected(items=extra)
    mark_items(items)


def skip_precision_function(name: str, obj: object, settings: Settings) -> list | None:
    """``pytest_pycollect_makeitem``: without --qeff-precision the precision stage's test function
    yields no items at all (an empty parametrization would still count one placeholder)."""
    if settings.precision or not callable(obj) or not name.startswith("test"):
        return None
    marks = getattr(obj, "pytestmark", [])
    if any(m.name == "qeff_stage" and m.args and m.args[0] == "precision" for m in marks):
        return []
    return None


def _stage(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("qeff_stage")
    return marker.args[0] if marker is not None else None


def _compressed_collected(item: pytest.Item) -> bool:
    """Whether a stage test is kept: a compressed-weights test only for a stage it has
    (:data:`COMPRESSED_STAGES`) and a card that budgets compressed weights in the tier (a mode it
    does not budget is kept and skips with its reason, e.g. ``native`` on non-GGUF weights)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    target = params.get("qeff_case")
    if weight_mode(params.get("qeff_backend")) is None or not isinstance(target, Target):
        return True
    return _stage(item) in COMPRESSED_STAGES and bool(getattr(target.card.cpu_weights, target.tier))


def _first_case_with_tiers(item: pytest.Item, settings: Settings) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    target = params.get("qeff_case")
    return bool(settings.precision) and isinstance(target, Target) and params.get("qeff_precision") in settings.precision \
        and target.case.id == target.card.all_cases[0].id


def mark_items(items: Sequence[pytest.Item]) -> None:
    for item in items:
        meta = item_meta(item)
        if meta is None:
            continue
        target: Target = item.callspec.params["qeff_case"]
        item.add_marker(pytest.mark.qeff)
        item.add_marker(getattr(pytest.mark, f"qeff_{meta['stage']}"))
        backend = split_backend(meta["backend"])[0] if meta["backend"] else None
        if backend:
            item.add_marker(getattr(pytest.mark, f"qeff_{backend}"))
        if meta["backend"] == FUSED:
            item.add_marker(pytest.mark.qeff_fused)
        if meta.get("weights"):
            item.add_marker(pytest.mark.qeff_compressed)
        item.add_marker(pytest.mark.xdist_group(target.card.id))
        known = target.card.known_failure(meta["stage"], meta["tier"], meta["case"], backend)
        if known is not None:
            item.add_marker(pytest.mark.xfail(reason=known.reason, strict=True))
        item.user_properties.append(("qeff_test", meta))


def route_args(config: pytest.Config) -> None:
    """``pytest --qeff-model X`` with no paths runs the suite, from any directory: the suite
    replaces the default paths (``testpaths`` or the current directory). Explicit paths are kept:
    add ``--pyargs pytest_qeff.suite`` to run the suite beside them."""
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args = [str(SUITE_DIR)]
