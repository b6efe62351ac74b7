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

__version__ = "0.1.0"

from qeff.compilers import compile
from qeff.errors import QEffError, UsageError
from qeff.exporter import export
from qeff.generation import GenerationResult, generate
from qeff.loading import from_config, load
from qeff.runtime import open_session
from qeff.transforms import supported_model_types, transform
from qeff.verification import Tolerances, VerifyReport, verify

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
