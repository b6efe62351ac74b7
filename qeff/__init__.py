"""qeff: run Hugging Face causal LMs on static-shape accelerators, and prove they still compute
the same thing.

    model, tokenizer = qeff.load("smollm2-135m")
    qmodel = qeff.transform(model)                     # retained-state KV cache
    onnx = qeff.export(qmodel, "out/")                 # one graph: prefill + decode
    built = qeff.compile(onnx.path, backend="ort", batch_size=1, prompt_len=32, ctx_len=256)
    session = qeff.open_session(built.path)
    result = qeff.generate(session, ["The capital of France is"], tokenizer=tokenizer)
    report = qeff.verify(model, qmodel=qmodel, session=session, prompt_token_ids=[...])
"""

from __future__ import annotations

from qeff._lazy import lazy_attributes
from qeff._version import __version__
from qeff.errors import QEffError, UsageError

# The public names, imported on first use: `import qeff` (and with it `qeff --help`, the pytest
# plugin's start-up, reading a report) does not pay for torch, transformers and onnx.
_LAZY = {
    "GenerationResult": "qeff.generation.result",
    "generate": "qeff.generation.static",
    "compile": "qeff.backends",
    "export": "qeff.exporter",
    "from_config": "qeff.intake.loading",
    "load": "qeff.intake.loading",
    "open_session": "qeff.backends",
    "supported_model_types": "qeff.transforms",
    "transform": "qeff.transforms",
    "Tolerances": "qeff.verification",
    "VerifyReport": "qeff.verification",
    "verify": "qeff.verification",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "GenerationResult",
    "QEffError",
    "Tolerances",
    "UsageError",
    "VerifyReport",
    "__version__",
    "compile",
    "export",
    "from_config",
    "generate",
    "load",
    "open_session",
    "supported_model_types",
    "transform",
    "verify",
]
