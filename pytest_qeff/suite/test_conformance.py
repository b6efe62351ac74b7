"""One test per stage per card case (and backend); the bodies are in :mod:`pytest_qeff.stages`.

Parametrized by the plugin from the selected model cards: ``qeff_case`` is a card case
(``llama-2-7b-chat-bs1-pl32-cl128``), ``qeff_backend`` the backend of the stages that have one.
"""

from __future__ import annotations

import pytest

from pytest_qeff import precision, stages


@pytest.mark.qeff_stage("transform")
def test_transform_matches_hf(qeff_case, qeff_pipeline, qeff_record):
    stages.transform(qeff_pipeline, qeff_case, qeff_record)


@pytest.mark.qeff_stage("export")
def test_ort_matches_pytorch(qeff_case, qeff_pipeline, qeff_record):
    stages.export(qeff_pipeline, qeff_case, qeff_record)


@pytest.mark.qeff_stage("compile")
def test_compile(qeff_case, qeff_backend, qeff_pipeline, qeff_record):
    stages.compile(qeff_pipeline, qeff_case, qeff_backend, qeff_record)


@pytest.mark.qeff_stage("generation")
def test_greedy_generation(qeff_case, qeff_backend, qeff_pipeline, qeff_record):
    stages.generation(qeff_pipeline, qeff_case, qeff_backend, qeff_record)


@pytest.mark.qeff_stage("benchmark")
def test_benchmark(qeff_case, qeff_backend, qeff_pipeline, qeff_record, request):
    # pytest-benchmark's fixture when that plugin is installed: asked for by the stage only once it
    # is about to time (a fixture asked for and left unused is an error of that plugin's), and
    # not in the signature, so the suite runs without the plugin.
    timer = (lambda: request.getfixturevalue("benchmark")) if request.config.pluginmanager.hasplugin("benchmark") else None
    stages.benchmark(qeff_pipeline, qeff_case, qeff_backend, qeff_record, timer)


@pytest.mark.qeff_stage("precision")
def test_precision_tier(qeff_case, qeff_precision, qeff_pipeline, qeff_settings, qeff_ladders, qeff_record):
    precision.precision(qeff_pipeline, qeff_case, qeff_precision, qeff_settings.precision, qeff_ladders, qeff_record)


@pytest.mark.qeff_stage("serving")
def test_serving(qeff_case, qeff_pipeline, qeff_record):
    stages.serving(qeff_pipeline, qeff_case, qeff_record)
