"""Precision tiers: the accelerator's number formats (fp16, OCP MX) emulated on the CPU.

    mx       OCP Microscaling encode/decode (MXFP6 E2M3/E3M2, MXINT8) and fp16 rounding, NumPy
    tiers    tier names (fp32, fp16, mxfp6, mxint8, mxfp6+mxint8), parsing, which backend runs which
    emulate  ONNX passes that build a tier's emulated graph beside the portable one
    ladder   every tier against HF fp32 over a real text and the prompts, judged by budgets
    commands the ``qeff verify --precision`` / ``qeff infer --mxfp6`` glue

See docs/precision.md.
"""

__all__: list[str] = []
