"""The pytest plugin (entry point ``pytest11``: ``pytest_qeff.plugin``). Hooks only: each one
delegates to the module that owns the work.

    options   --qeff-* and --device-group → Settings (config.stash)
    cards     model cards: schema, loading, selection
    collect   card × case → parametrized stage tests, markers, xfail for known failures
    distribute  pytest-xdist: schedule each card's stages on one worker
    stages    the stage tests' bodies (suite/test_conformance.py calls them)
    results   records from every worker → results.json (controller only)
    publish   results.json, the HTML report (report/), baselines, the terminal table
"""

from __future__ import annotations

import pytest

from pytest_qeff import collect, distribute, fixtures, options, publish, results

__all__: list[str] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    collect.register_markers(config)
    settings = options.resolve(config)
    config.stash[options.SETTINGS] = settings
    config.pluginmanager.register(fixtures, "qeff-fixtures")
    if not settings.active:
        return
    collect.route_args(config)
    if not options.is_worker(config):  # the controller merges; workers only send reports
        collector = config.stash[publish.COLLECTOR] = results.Collector()
        config.pluginmanager.register(collector, "qeff-results")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    settings = config.stash.get(options.SETTINGS, None)
    if settings is None or not settings.active or config.getoption("dist") not in distribute.DIST_MODES:
        return None
    return distribute.make_scheduler(config, log, [c.id for c in settings.cards])


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash.get(options.SETTINGS, None)
    if settings is None or not settings.active:
        return []
    groups = " ".join(",".join(map(str, g)) for g in settings.device_groups)
    lines = [
        f"qeff: {len(settings.cards)} card(s), tier {settings.tier}, backends {'+'.join(settings.backends)}, "
        + (f"graphs {settings.graph}, " if settings.graph != "portable" else "")
        + f"device groups {groups}, cards from {settings.cards_dir}"
    ]
    if settings.changed is not None:
        lines += settings.changed.describe()
    if settings.shard is not None:
        lines.append(f"qeff: shard {settings.shard} of the {settings.unsharded} selected card(s): "
                     f"{', '.join(c.id for c in settings.cards) or 'none'}")
    for cid in settings.cardless:
        lines.append(f"qeff: card {cid} built from its model's config ({settings.all_cards[cid].weights.source})")
    lines += [f"qeff: wrote card {p}" for p in settings.written_cards]
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    settings = metafunc.config.stash[options.SETTINGS]
    collect.parametrize(metafunc, settings.cards, settings.tier, settings.stage_backends, settings.precision)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name: str, obj: object):
    settings = collector.config.stash.get(options.SETTINGS, None)
    if settings is None:
        return None
    if settings.active and collect.undeclared(obj, settings.cards):
        return []
    return collect.skip_precision_function(name, obj, settings)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    collect.prepare_items(config, items, config.stash[options.SETTINGS])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    settings = config.stash.get(options.SETTINGS, None)
    collector = config.stash.get(publish.COLLECTOR, None)
    if settings is None or collector is None:
        return
    published = publish.publish(config, settings, collector, exitstatus)
    if published is not None:
        config.stash[publish.PUBLISHED] = published
    nothing_to_do = settings.changed is not None or settings.shard is not None
    if nothing_to_do and not settings.cards and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        # Nothing affected (pull-request gating), or an empty shard (more machines than cards): a pass.
        session.exitstatus = pytest.ExitCode.OK


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    settings = config.stash.get(options.SETTINGS, None)
    if settings is None or not settings.active or options.is_worker(config):
        return
    lines = publish.terminal_lines(settings, config.stash.get(publish.PUBLISHED, None))
    if lines:
        terminalreporter.section("qeff")
        for line in lines:
            terminalreporter.write_line(line)
