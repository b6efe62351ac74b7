"""The public surface: the verbs at the top level, and every module reachable by its dotted path
(the modules are nouns, so no function shadows them for `import a.b.c` or mock.patch strings)."""

from __future__ import annotations

import importlib
from unittest import mock

import qeff


def test_top_level_verbs():
    for name in ("load", "transform", "export", "compile", "open_session", "generate", "verify", "from_config"):
        assert callable(getattr(qeff, name)), name
    assert set(qeff.__all__) >= {"load", "transform", "export", "compile", "generate", "verify", "supported_model_types"}
    assert "llama" in qeff.supported_model_types()


def test_modules_are_importable_by_dotted_path():
    import qeff.compilers.ort as ort_compiler
    import qeff.exporter as exporter
    import qeff.transforms.model as model
    import qeff.verification as verification

    assert model.transform is qeff.transform and exporter.export is qeff.export
    assert verification.verify is qeff.verify and ort_compiler.OPTIMIZED == "model.opt.onnx"
    for dotted in ("qeff.transforms.cache", "qeff.runtime.ort", "qeff.compilers.qaic", "qeff.pipeline", "qeff.cli"):
        importlib.import_module(dotted)
    with mock.patch("qeff.exporter.fp16_clip", return_value=0) as patched:
        assert exporter.fp16_clip(None) == 0
    assert patched.called
