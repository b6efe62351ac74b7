"""Precision tiers: the number formats a graph is computed in, and which backend can run each.

    fp32            the exported graph as it is (today's verdicts)
    fp16            weights and activations in float16: what Cloud AI computes by default
                    (QEfficient compiles with ``-convert-to-fp16``; the SDK docs: "Computation/
                    activations on the NSP still occur in FP16")
    mxfp6           fp16, and every constant MatMul weight in MXFP6 (``-mxfp6-matmul``)
    mxint8          fp16, and the KV cache in MXINT8 (``-mxint8-kv-cache``)
    mxfp6+mxint8    both (``--mxfp6 --mxint8``)

The lower tiers include fp16 because the device's do: the SDK documents that with MXFP6 "the
calculations are performed as before in FP16 precision". A tier is therefore what a user's
``--mxfp6``/``--mxint8`` compile computes, and the ladder reads cumulatively (the difference
between ``mxfp6`` and ``fp16`` is MXFP6's own cost).

MXFP6's element encoding: E2M3 by default, as QEfficient documents its ``--mxfp6`` flag
("Compress constant MatMul weights to MXFP6 E2M3", ``QEfficient/cloud/compile.py``); the Cloud
AI SDK's own pages name no encoding. E3M2 is selectable: ``mxfp6-e3m2`` (also in combinations,
``mxfp6-e3m2+mxint8``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from qeff.errors import UsageError

__all__ = ["Tier", "TIERS", "FP6_ENCODINGS", "DEFAULT_FP6", "parse_tiers", "parse_tier", "tier_for_flags", "backend_tiers", "check_backend"]

#: The canonical tier names, in ladder order.
TIERS = ("fp32", "fp16", "mxfp6", "mxint8", "mxfp6+mxint8")
FP6_ENCODINGS = ("e2m3", "e3m2")
DEFAULT_FP6 = "e2m3"


@dataclass(frozen=True)
class Tier:
    """What a tier changes with respect to the fp32 graph."""

    fp16: bool = False
    mxfp6: bool = False
    mxint8: bool = False
    fp6: str = DEFAULT_FP6  # MXFP6 element encoding (only meaningful with mxfp6)

    @property
    def name(self) -> str:
        parts = []
        if self.mxfp6:
            parts.append("mxfp6" if self.fp6 == DEFAULT_FP6 else f"mxfp6-{self.fp6}")
        if self.mxint8:
            parts.append("mxint8")
        if parts:
            return "+".join(parts)
        return "fp16" if self.fp16 else "fp32"

    @property
    def slug(self) -> str:
        """The name as a directory name."""
        return self.name.replace("+", "_")

    @property
    def is_fp32(self) -> bool:
        return not (self.fp16 or self.mxfp6 or self.mxint8)

    def __str__(self) -> str:
        return self.name


def _valid() -> str:
    return ", ".join(TIERS) + " (MXFP6 encoding selectable: mxfp6-e2m3, mxfp6-e3m2)"


def parse_tier(text: str) -> Tier:
    """One tier name (components joined by ``+``, in any order) → :class:`Tier`."""
    name = text.strip().lower()
    parts = [p.strip() for p in name.split("+")] if name else []
    if not parts or any(not p for p in parts):
        raise UsageError(f"empty precision tier in {text!r}; valid tiers: {_valid()}")
    fp16 = mxfp6 = mxint8 = False
    fp6 = DEFAULT_FP6
    for part in parts:
        if part == "fp32":
            if len(parts) > 1:
                raise UsageError(f"fp32 cannot be combined with other formats in {text!r}; valid tiers: {_valid()}")
        elif part == "fp16":
            fp16 = True
        elif part == "mxint8":
            mxint8 = True
        elif part == "mxfp6" or (part.startswith("mxfp6-") and part[6:] in FP6_ENCODINGS):
            mxfp6 = True
            fp6 = part[6:] if part != "mxfp6" else DEFAULT_FP6
        else:
            raise UsageError(f"unknown precision tier {text.strip()!r}; valid tiers: {_valid()}")
    # The MX formats run on top of fp16 compute, as on the device.
    return Tier(fp16=fp16 or mxfp6 or mxint8, mxfp6=mxfp6, mxint8=mxint8, fp6=fp6)


def parse_tiers(spec: str | Iterable[str]) -> list[Tier]:
    """``"fp32,fp16,mxfp6"`` (or a list of names) → tiers, duplicates dropped, order kept."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    tiers: list[Tier] = []
    for item in items:
        tier = parse_tier(item)
        if tier not in tiers:
            tiers.append(tier)
    if not tiers:
        raise UsageError(f"no precision tier given; valid tiers: {_valid()}")
    return tiers


def tier_for_flags(*, mxfp6: bool, mxint8: bool, fp6: str = DEFAULT_FP6) -> Tier:
    """The tier that Cloud AI's ``--mxfp6``/``--mxint8`` compile computes."""
    return Tier(fp16=True, mxfp6=mxfp6, mxint8=mxint8, fp6=fp6)


#: backend → (what it can run, how). ``ort`` emulates every tier on the CPU (fake quantization in
#: the graph and its weights); ``qaic`` runs the formats natively and cannot run fp32 end to end
#: through qeff's compile (always ``-convert-to-fp16``); ``torch`` runs the PyTorch model as it is.
_BACKENDS = {
    "ort": (None, "emulated on the CPU"),
    "qaic": (("fp16", "mxfp6", "mxint8", "mxfp6+mxint8"), "native"),
    "torch": (("fp32",), "native"),
}


def backend_tiers(backend: str) -> tuple[str, ...]:
    allowed, _ = _BACKENDS.get(backend, ((), ""))
    return TIERS if allowed is None else allowed


def check_backend(tiers: Iterable[Tier], backend: str) -> None:
    """Raise :class:`UsageError` naming the tiers ``backend`` can run when one of ``tiers`` is not among them."""
    if backend not in _BACKENDS:
        raise UsageError(f"unknown backend {backend!r} for precision tiers; choose one of {', '.join(_BACKENDS)}")
    allowed, how = _BACKENDS[backend]
    if allowed is None:
        return
    for tier in tiers:
        base = Tier(fp16=tier.fp16, mxfp6=tier.mxfp6, mxint8=tier.mxint8).name  # the encoding aside
        if base not in allowed or (tier.mxfp6 and tier.fp6 != DEFAULT_FP6 and backend == "qaic"):
            raise UsageError(
                f"the {backend} backend cannot run precision tier {tier.name!r}; it runs ({how}): {', '.join(allowed)}"
            )
