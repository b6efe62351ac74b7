"""The mutation suite, through the Python API: each seeded fault (``tests/faults.py``) fails
``qeff.verify``, by the measures it must, and the report names where the traces part.

The same faults go through ``qeff verify``/``qeff infer --verify`` in ``test_faults_cli.py`` and
the plugin's stages in ``test_faults_plugin.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qeff
from tests.faults import FAULT_GEOMETRY, FAULTS, NON_FAULT, Fault, tiny_arch

torch.set_num_threads(1)


def _prompts(lengths, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def _verify(fault: Fault, monkeypatch: pytest.MonkeyPatch, tmp_path) -> qeff.VerifyReport:
    arch = tiny_arch(fault.card)
    model = qeff.from_config(arch.model_type, arch.config, seed=0)
    g = FAULT_GEOMETRY[fault.geometry]
    prompts = _prompts(g["lengths"], model.config.vocab_size)
    fault.inject(monkeypatch)
    qmodel = qeff.transform(model)
    session = None
    if fault.comparison == "pytorch_vs_ort":
        from qeff.runtime.ort import OrtSession

        exported = qeff.export(qmodel, tmp_path / "export")
        session = OrtSession(exported.path, batch_size=len(prompts), ctx_len=g["ctx_len"], threads=1)
    return qeff.verify(model, qmodel=qmodel, session=session, prompt_token_ids=prompts, prompt_len=g["prompt_len"],
                       ctx_len=g["ctx_len"], steps=g["steps"])


def _verify_streamed(fault: Fault, monkeypatch: pytest.MonkeyPatch, tmp_path) -> qeff.VerifyReport:
    """As :func:`_verify`, on the layer-streamed models (:mod:`qeff.offload`) of the same seeded
    model saved as safetensors: the reference and the candidate each fill one decoder layer at a time."""
    from qeff.errors import NotStreamableError
    from qeff.offload import offloaded_hf, offloaded_transformed

    arch = tiny_arch(fault.card)
    model = qeff.from_config(arch.model_type, arch.config, seed=0)
    g = FAULT_GEOMETRY[fault.geometry]
    prompts = _prompts(g["lengths"], model.config.vocab_size)
    model.save_pretrained(tmp_path / "ckpt")  # fp32: the offloaded reference is this very model
    try:
        hf = offloaded_hf(tmp_path / "ckpt")
    except NotStreamableError as exc:
        pytest.skip(f"{fault.card} cannot stream (it verifies in memory): {exc}")
    fault.inject(monkeypatch)
    qmodel = offloaded_transformed(tmp_path / "ckpt")
    return qeff.verify(hf, qmodel=qmodel, prompt_token_ids=prompts, prompt_len=g["prompt_len"],
                       ctx_len=g["ctx_len"], steps=g["steps"])


def labels(comparison) -> set[str]:
    """The measures a comparison failed on: 'logits MSE', 'cache shape', 'greedy token', …"""
    out = set()
    for failure in comparison.failures:
        for label in ("logits MSE", "logits max-abs", "cache MSE", "cache max-abs", "cache shape"):
            if failure.startswith(label):
                out.add(label)
        if "greedy token" in failure:
            out.add("greedy token")
    return out


@pytest.mark.parametrize("fault", list(FAULTS.values()), ids=list(FAULTS))
def test_fault_fails_verify_by_its_measures_and_names_its_layer(fault: Fault, monkeypatch, tmp_path):
    report = _verify(fault, monkeypatch, tmp_path)

    assert not report.passed
    failed = {c.name for c in report.comparisons if not c.passed}
    assert failed == {fault.comparison}, report.describe()
    comparison = report[fault.comparison]
    caught = labels(comparison)
    assert set(fault.measures) <= caught, comparison.failures
    assert not caught & set(fault.absent), comparison.failures
    divergence = comparison.first_divergence
    assert divergence is not None and divergence.layer == fault.layer, divergence
    assert (divergence.step, divergence.row) == fault.at
    assert not divergence.note
    # The message a user sees names the measures and the place.
    with pytest.raises(qeff.QEffError) as info:
        report.raise_for_failure()
    message = str(info.value)
    assert all(m in message for m in fault.measures)
    step, row = fault.at
    assert f"first divergence at step {step} ({'prefill' if step == 0 else 'decode'}), row {row}" in message
    if fault.layer is None:
        assert "after the last decoder layer" in message
    else:
        assert f"layer {fault.layer} of 2" in message
    # The record round-trips with its divergence (results.json, the verify artifact).
    record = comparison.to_dict()["first_divergence"]
    assert record["layer"] == fault.layer
    # Where the cache parts first it names the layer itself; otherwise every layer was compared.
    assert len(record["layers"]) == (0 if record["measure"].startswith("cache") else 2)


STREAMED_FAULTS = [f for f in FAULTS.values() if f.comparison == "hf_vs_pytorch"]


@pytest.mark.parametrize("fault", STREAMED_FAULTS, ids=[f.id for f in STREAMED_FAULTS])
def test_fault_fails_streamed_verify_by_its_measures_and_names_its_layer(fault: Fault, monkeypatch, tmp_path):
    """Layer-streamed verification (models larger than memory) catches each fault by the same
    measures and finds the same first divergence as the in-memory one."""
    report = _verify_streamed(fault, monkeypatch, tmp_path)
    assert not report.passed
    comparison = report[fault.comparison]
    caught = labels(comparison)
    assert set(fault.measures) <= caught, comparison.failures
    assert not caught & set(fault.absent), comparison.failures
    divergence = comparison.first_divergence
    assert divergence is not None and divergence.layer == fault.layer, divergence
    assert (divergence.step, divergence.row) == fault.at
    assert not divergence.note


def test_streamed_verify_of_an_unchanged_model_passes(monkeypatch, tmp_path):
    """And measures what the in-memory verification measures, to the bit: same weights, same arithmetic."""
    report = _verify_streamed(NON_FAULT, monkeypatch, tmp_path)
    assert report.passed, report.describe()
    memory = _verify(NON_FAULT, monkeypatch, tmp_path)
    a, b = report["hf_vs_pytorch"], memory["hf_vs_pytorch"]
    assert (a.logits_mse, a.logits_max_abs, a.cache_mse, a.cache_max_abs) == (b.logits_mse, b.logits_max_abs, b.cache_mse, b.cache_max_abs)
    assert report.reference_tokens == memory.reference_tokens


def test_a_change_no_valid_token_can_see_is_not_a_fault(monkeypatch, tmp_path):
    """Pads writing their own values into slots that only later positions use: the same model."""
    report = _verify(NON_FAULT, monkeypatch, tmp_path)
    assert report.passed, report.describe()
    assert all(c.first_divergence is None for c in report.comparisons)
