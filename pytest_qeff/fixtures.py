"""Fixtures of the conformance suite (registered by the plugin, usable by any test)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_qeff import devices
from pytest_qeff.options import SETTINGS, Settings, is_worker, worker_id
from pytest_qeff.records import StageRecord
from pytest_qeff.stages import Workspace

__all__ = ["qeff_settings", "qeff_pipeline", "qeff_record", "qeff_ladders"]


@pytest.fixture(scope="session")
def qeff_settings(pytestconfig: pytest.Config) -> Settings:
    return pytestconfig.stash[SETTINGS]


@pytest.fixture(scope="session")
def qeff_pipeline(pytestconfig: pytest.Config, qeff_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """This worker's models and artifacts. Artifacts go to ``$QEFF_HOME/pytest/<worker>`` when
    QEFF_HOME is set (kept between runs, reused while manifests match), else to the session's
    temporary directory; either way each xdist worker has its own directory."""
    worker = worker_id(pytestconfig)
    if is_worker(pytestconfig):
        # N workers each running torch on every core oversubscribe the CPU and make the
        # benchmark stage measure contention: give each worker its share of the cores.
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(pytestconfig.workerinput.get("workercount", 1))))
    home = os.environ.get("QEFF_HOME")
    root = Path(home).expanduser() / "pytest" / worker if home else tmp_path_factory.getbasetemp() / "qeff_models" / worker
    return Workspace(
        root=root,
        tier=qeff_settings.tier,
        device_group=devices.worker_group(qeff_settings.device_groups, worker),
        baseline_dir=qeff_settings.baseline_dir,
        default_baseline_dir=qeff_settings.default_baseline_dir,
        update_baseline=qeff_settings.update_baseline,
        trust_remote_code=qeff_settings.trust_remote_code,
    )


@pytest.fixture
def qeff_record(request: pytest.FixtureRequest) -> Iterator[Callable[[StageRecord], None]]:
    """Attach a stage's record to the test's report (as builtin types, so it travels with
    pytest-xdist's reports), for results.json."""

    from qeff.meter import metering

    with metering() as meter:  # the chain's stages this test runs, each with its peak RSS and wall time

        def record(data: StageRecord) -> None:
            data.resources = list(meter.records)
            request.node.user_properties.append(("qeff", data.to_dict()))

        yield record


@pytest.fixture(scope="session")
def qeff_ladders() -> dict:
    """This worker's precision ladders, by card id (one run serves every tier's test of a card)."""
    return {}
