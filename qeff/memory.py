"""How much memory each stage of a run will hold, estimated before anything loads (issue 18).

The chain runs in one process and keeps the model it loaded until it exits, so a stage's peak is
what it allocates on top of what earlier stages still hold. Each stage's estimate is one function
of the model's fp32 weight bytes ``W`` (read from the file headers by :mod:`qeff.intake.preflight`, no
tensor data), the KV cache bytes of the run and the mode (which graph, which weights):

    peak = BASE + MARGIN × (factor × W + fixed) (+ the KV caches the stage holds)

``BASE`` is the process once torch, transformers and ONNX Runtime are imported. ``factor`` and
``fixed`` of each stage were fitted to measurements of today's chain (``make bench-scale``,
:mod:`qeff.meter`'s per-stage peaks; docs/memory.md has the table): SmolLM2-135M's shape and
Llama-3.2-1B's widths with 6 layers and a 32000-row vocabulary, each ``qeff infer --prompt "My
name is" --generation_len 8`` on a fresh cache, then rounded up and multiplied by :data:`MARGIN`.
The export is priced on the bytes it traces instead (:data:`EXPORT_SMALL`), its factor falling
with size.

One function per stage and mode (:data:`STAGES`): when the streaming export and memory-mapped
weights land (DESIGN.md "Memory"), :func:`export` and :func:`load` are the two to swap.

:func:`check` refuses a run with a stage that cannot fit the memory available
(:func:`qeff.validation.available_memory`: MemAvailable, a cgroup's limit, and ``QEFF_MEMORY_LIMIT``)
in one sentence that names the first such stage, its need, what is available and a mode that would fit.
``--skip-memory-check`` (or ``QEFF_SKIP_MEMORY_CHECK=1``) runs anyway.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from qeff.store.atomic import human_bytes
from qeff.errors import UsageError

__all__ = ["Mode", "Sizes", "Estimate", "Factor", "STAGES", "FACTORS", "plan", "sizes", "stages_for", "check",
           "skip_requested", "MARGIN", "BASE", "WEIGHT_SHARE", "streamed_verify_setting", "choose_verification",
           "fused_check_fits", "STREAMED_BUILD"]

GiB = 2**30
#: The process with torch, transformers, onnx and ONNX Runtime imported (measured: 0.55–0.65 GiB).
BASE = int(0.7 * GiB)
#: Every fitted factor and fixed part is multiplied by this: the measurements were taken on a shared
#: machine, and an estimate that is short by 10 % lets the kernel kill the run it should have refused.
MARGIN = 1.15


@dataclass(frozen=True)
class Factor:
    """A stage's peak above :data:`BASE`: ``weights × W + fixed`` bytes (before :data:`MARGIN`),
    ``W`` the model's fp32 weight bytes."""

    weights: float
    fixed: int = 0


#: Fitted per stage to ``make bench-scale``'s measurements of two shapes (docs/memory.md
#: "Calibration": SmolLM2-135M's, W = 0.54 GB, and 1b-6l-v32k, W = 1.72 GB), as the line through
#: both, the slope rounded up and never below 1 for a stage that holds the loaded model.
#: ``compile`` (the portable graph's optimiser) was not measured at scale: it is priced like
#: ``fused-check`` (the model, the graph it reads and the graph it writes).
FACTORS: dict[str, Factor] = {
    "load": Factor(1.5, int(0.1 * GiB)),  # measured 1.50 W: the fp32 model and the bf16 file's pages
    "transform": Factor(1.2, int(0.1 * GiB)),  # 1.14 W
    "reference": Factor(1.0, int(0.3 * GiB)),  # 0.75 W + 0.25 GB: the model (1 W) at least
    "verify": Factor(2.1, int(0.1 * GiB)),  # 2.08 W
    "compile": Factor(3.1, int(0.1 * GiB)),  # not measured: as fused-check
    "fused-build": Factor(2.3, int(0.1 * GiB)),  # 2.25 W
    "fused-check": Factor(3.1, int(0.1 * GiB)),  # 3.05 W
    "run": Factor(1.7, int(0.55 * GiB)),  # 1.61 W + 0.53 GB
}
#: The export, priced on the bytes it traces ``T`` (a tied vocabulary table twice): measured 3.59 T
#: (135M) and 3.79 T (1b-6l-v32k) below 2 GiB, where the graph is one protobuf in memory; above it
#: the factor falls — issue 18's 1B peaked at 2.2 T (13.9 GB), while 1b-2l (T = 2.6 GB) and 1b-4l
#: (3.1 GB) passed 8.6 GB before this machine's 8 GB cap killed them. ``max(small, large)``
#: covers every one of these, and the 3B export the kernel killed at 23.4 GB (T = 14.4 GB).
EXPORT_SMALL = 3.8  # × T, for T below EXPORT_BOUNDARY
EXPORT_LARGE = (2.2, int(2.5e9))  # × T + bytes, above it
EXPORT_BOUNDARY = 2 * GiB
#: What the fused graph keeps of its fp32 weights' bytes per --weights: int8 blocks of 32 with an
#: fp32 scale are ~0.28 of them, 4-bit ~0.16 (not measured here: derived from the block layout, with
#: the vocabulary table's gather kept in fp32 — so the table term is not scaled).
WEIGHT_SHARE = {"fp32": 1.0, "native": 0.3, "int8": 0.3, "int4": 0.2}
#: The stages whose peak holds a fused graph's weights beyond the loaded model's (1 × W).
_FUSED = ("fused-build", "fused-check", "run")


@dataclass(frozen=True)
class Mode:
    """What a run will do, from its options (normalised once, before any work)."""

    command: str = "infer"  # infer | verify | export | compile
    verify: bool = True
    graph: str = "fused"  # fused | portable | qaic (the graph the run compiles)
    weights: str = "fp32"
    batch_size: int = 1
    ctx_len: int = 128
    export_cached: bool = False
    #: the export is written from the weight files (a local safetensors directory, the base graph):
    #: it never loads the model (qeff.pipeline.Pipeline._streamable); with ``--weights
    #: fp32|int8|int4`` the fused graph is built from the same files (``from_safetensors``)
    streamed: bool = False
    #: verification runs the HF and transformed models a decoder layer at a time from the weight
    #: files (qeff.offload): it never loads the model. Only where ``streamed`` (the same files)
    verify_layers: bool = False
    #: ...and checks ONNX Runtime one decoder layer's sub-graph at a time (qeff.layer_check) instead
    #: of one session of the whole graph, when that session does not fit either
    ort_layers: bool = False
    #: ...keeping this many bytes of float32 layer tensors resident between forwards (qeff.offload,
    #: ``SharedTables.resident``): 0, or every layer when they all fit comfortably (:func:`choose_verification`)
    resident: int = 0
    #: the fused build's check against the portable graph runs (False: its two sessions would not
    #: fit, and the run says so instead: :func:`fused_check_fits`)
    fused_check: bool = True

    def describe(self, than: Mode | None = None) -> str:
        """The flags that select this mode (those that differ from ``than``'s, when given)."""
        flags = []
        if self.command == "infer" and not self.verify and (than is None or than.verify):
            flags.append("--no-verify")
        if self.graph == "fused" and self.weights != "fp32" and (than is None or than.weights != self.weights):
            flags.append(f"--weights {self.weights}")
        if self.verify and self.verify_layers and (than is None or not than.verify_layers):
            flags.append("--verify-layers")
        if self.graph == "portable" and (than is None or than.graph != "portable"):
            flags.append("--ort-graph portable")
        return " ".join(flags)


@dataclass(frozen=True)
class Sizes:
    """The bytes a stage's estimate is made of (from :class:`qeff.intake.preflight.ModelShape`)."""

    weights: int  # W: fp32 bytes of every weight
    table: int  # E: fp32 bytes of one vocabulary table (0 when the config does not say)
    kv: int  # one fp32 KV cache of the run's batch and context
    tied: bool = True  # the table is also the output head (traced as two initializers)
    layers: int = 0  # decoder layers (0: unknown, then one layer is priced as the whole model)

    @property
    def outer(self) -> int:
        """fp32 bytes outside the decoder layers: the vocabulary table, and the output head when untied."""
        return min(self.weights, self.table * (1 if self.tied else 2))

    @property
    def layer(self) -> int:
        """fp32 bytes of one decoder layer (the layers are alike in the families that stream)."""
        return (self.weights - self.outer) // self.layers if self.layers else self.weights

    @property
    def traced(self) -> int:
        """T: the bytes the export traces (a tied table twice)."""
        return self.weights + (self.table if self.tied else 0)


@dataclass(frozen=True)
class Estimate:
    stage: str
    bytes: int


def _fit(stage: str, s: Sizes, *, share: float = 1.0) -> int:
    """:data:`BASE` + the stage's factor over W. ``share`` (a quantized fused graph) scales what the
    stage holds beyond the loaded model's 1 × W."""
    f = FACTORS[stage]
    factor = f.weights if share == 1.0 else 1.0 + (f.weights - 1.0) * share
    return int(BASE + MARGIN * (factor * s.weights + f.fixed))


# --- one function per stage and mode: Sizes, Mode -> peak bytes ---------------------------------
# When the streaming export and memory-mapped weights land (DESIGN.md, Memory), `load` and
# `export` are the ones to replace; the others keep the loaded model's 1 × W until then.


def load(s: Sizes, mode: Mode) -> int:
    """from_pretrained in fp32: the model and the file pages it reads through."""
    return _fit("load", s)


def transform(s: Sizes, mode: Mode) -> int:
    """The retained-state wrapper shares the model's weights: nothing more than the load."""
    return _fit("transform", s)


def export(s: Sizes, mode: Mode) -> int:
    """TorchScript's export: the model, the traced graph's constants, the raw ONNX graph read back
    and the passes over it (see :data:`EXPORT_SMALL`). Streamed from the weight files: the skeleton's
    small tensors, one fp32 copy of the largest weight (the trace makes it contiguous: the vocabulary
    table) and 16 MB conversion chunks — measured 1.52 GB on the 1B shape (W 4.94 GB, E 1.05 GB)
    and 2.12 GB on the 3B (W 12.85 GB, E 1.58 GB); priced at 0.1 W + E + 0.3 GB, with the margin."""
    if mode.streamed:
        return int(BASE + MARGIN * (0.1 * s.weights + s.table + 0.3e9))
    t = s.traced
    small = EXPORT_SMALL * min(t, EXPORT_BOUNDARY)
    large = EXPORT_LARGE[0] * t + EXPORT_LARGE[1] if t > EXPORT_BOUNDARY else 0
    return int(BASE + MARGIN * max(small, large))


#: Layer-streamed verification (qeff.offload). The reference and the candidate share one copy of the
#: tensors outside the layers (``O``: the vocabulary table, an untied head) and ONNX Runtime's
#: per-layer check takes the table from it too (qeff.layer_check, resident tensors), so ``O`` is
#: held once. Measured (docs/memory.md, "Layer-streamed verification"): the Llama-3.2-1B shape (W
#: 4.60 GiB, O 0.98 GiB, one layer L 0.23 GiB) under ``QEFF_MEMORY_LIMIT=5G``, ONNX Runtime per layer:
#: reference 1.69 GiB, verify 1.80 GiB (estimated 2.7 and 3.0 GiB; 2.71 and 3.60 GiB measured while
#: each tree and ONNX Runtime held their own table). Priced as what each holds — ``O``, a layer being filled
#: (its float32 parameters and the next one's), ``fixed`` for activations, logits and spills — and,
#: for the whole-graph ONNX Runtime session, the portable graph's weights (1.1 W, from the in-memory
#: verify stage's 2.1 W).
STREAMED_FIXED = int(0.3 * GiB)
ORT_SESSION = 1.1  # × W: ONNX Runtime's session of the whole portable graph (its own copy of every weight)
ORT_LAYER = 3.0  # × one layer: a layer's sub-graph session, its inputs and outputs (qeff.layer_check)
FILL_LAYERS = 2.0  # × one layer: the layer a forward fills in float32, and what the allocator keeps of the last


def reference(s: Sizes, mode: Mode) -> int:
    """HF eager's greedy trace: the model and its cache. Layer-streamed: the tensors outside the
    layers, once (the pair built before the reference runs shares them), a layer being filled,
    and the cache."""
    if mode.verify_layers:
        return int(BASE + MARGIN * (s.outer + FILL_LAYERS * s.layer + mode.resident + STREAMED_FIXED)) + s.kv
    return _fit("reference", s) + s.kv


def verify(s: Sizes, mode: Mode) -> int:
    """The model, the transformed model (sharing its weights) and an ONNX Runtime session of the
    portable graph, with both retained caches. Layer-streamed: the shared tensors outside the
    layers and both caches, with either the whole graph's session beside a layer being filled, or
    (``mode.ort_layers``) the larger of a layer being filled and one layer's sub-graph session —
    :func:`qeff.layer_check.check_layers` runs PyTorch's steps first and the sub-graphs after, and
    the prefix's and suffix's sessions take the vocabulary table from PyTorch's tensor."""
    if mode.verify_layers:
        if mode.ort_layers:
            held = max(FILL_LAYERS, ORT_LAYER) * s.layer
        else:
            held = FILL_LAYERS * s.layer + ORT_SESSION * s.weights
        return int(BASE + MARGIN * (s.outer + held + mode.resident + STREAMED_FIXED)) + 2 * s.kv
    return _fit("verify", s) + 2 * s.kv


def compile_portable(s: Sizes, mode: Mode) -> int:
    """ONNX Runtime's optimiser over the portable graph, beside the loaded model."""
    return _fit("compile", s)


def _from_files(mode: Mode) -> bool:
    """The fused graph is built from the weight files, and no stage holds the loaded model (no
    verification, or the layer-streamed one)."""
    return (mode.graph == "fused" and mode.streamed and mode.weights != "native"
            and (not mode.verify or mode.verify_layers))


#: The fused build from files (``from_safetensors``): one vocabulary table in float32 (the gathered
#: embedding, and the head while it is quantized), two decoder layers quantized plus one tensor in
#: float32 and its bf16 read, and the graph's node list — a fixed share of W per layer count would
#: need the layer count, so it is priced on W with the fraction two layers of a 16-layer model
#: take, and measured (docs/memory.md, "The fused graph from files").
STREAMED_BUILD = (0.12, int(0.3 * GiB))  # × W + bytes, plus 2 E


def fused_build(s: Sizes, mode: Mode) -> int:
    """The fused graph's weights laid out (transposed, packed or quantized) beside the model.
    Quantizing works through an fp32 copy of each tensor: measured on 135M, the int8 build holds
    0.72 W beyond the model against fp32's 1.25 W, so a share below 0.6 is not believed. Built from
    the weight files there is no model, and the graph's constants go to its data file as they are
    made: :data:`STREAMED_BUILD`."""
    if _from_files(mode):
        return int(BASE + MARGIN * (STREAMED_BUILD[0] * s.weights + 2 * s.table + STREAMED_BUILD[1]))
    return _fit("fused-build", s, share=max(0.6, WEIGHT_SHARE[mode.weights]))


def _session_share(s: Sizes, weights: str) -> float:
    """The fused graph's bytes over W: its linear layers at the format's share, its gathered
    vocabulary table in float32 whatever the format."""
    share = WEIGHT_SHARE[weights]
    if s.weights <= 0:
        return share
    return min(1.0, share + (1 - share) * s.table / s.weights)


def fused_check(s: Sizes, mode: Mode) -> int:
    """The fused session and a portable session side by side (the build's check), beside the model:
    of its 3.1 W, 1 W is the model and 1 W the portable session, fp32 whatever --weights says
    (135M int8: 2.33 W measured; scaling the whole 2.1 W by the share under-estimated it). Built
    from files there is no model: the portable session and the fused one."""
    f = FACTORS["fused-check"]
    model = 0.0 if _from_files(mode) else 1.0
    if not mode.fused_check:  # the check does not run; the fused session opens in `run`
        return BASE
    factor = model + 1.0 + (f.weights - 2.0) * (_session_share(s, mode.weights) if model == 0.0 else WEIGHT_SHARE[mode.weights])
    return int(BASE + MARGIN * (factor * s.weights + f.fixed)) + 2 * s.kv


def fused_check_fits(s: Sizes, mode: Mode, available: int | None) -> bool:
    """Whether the fused build's check (the portable graph's session beside the fused one) fits
    ``available`` bytes; unknown memory lets it run."""
    return available is None or fused_check(s, replace(mode, fused_check=True)) <= available


def run(s: Sizes, mode: Mode) -> int:
    """The session that generates and its cache, beside the model when this process loaded it.
    A fused graph built from files: the session alone, which holds every byte of its graph (a
    generation touches every weight; measured fp32 on 1.28 GiB of weights: 1.75 GiB with the
    process, docs/memory.md) — so a float32 7B (25 GiB) is refused on 24 GB, its int4 graph is not."""
    if _from_files(mode):
        return int(BASE + MARGIN * (_session_share(s, mode.weights) * s.weights + FACTORS["run"].fixed)) + s.kv
    share = WEIGHT_SHARE[mode.weights] if mode.graph == "fused" else 1.0
    return _fit("run", s, share=share) + s.kv


STAGES: dict[str, Callable[[Sizes, Mode], int]] = {
    "load": load,
    "transform": transform,
    "export": export,
    "reference": reference,
    "verify": verify,
    "compile": compile_portable,
    "fused-build": fused_build,
    "fused-check": fused_check,
    "run": run,
}


def stages_for(mode: Mode) -> list[str]:
    """The stages a run of ``mode`` goes through on a cache that holds only what ``mode`` says."""
    verify_loads = mode.verify and not mode.verify_layers
    fused_build = (mode.command in ("infer", "compile") and mode.graph == "fused" and mode.weights != "native"
                   and not _from_files(mode))
    loads = (not mode.export_cached and not mode.streamed) or verify_loads or fused_build
    names = ["load", "transform"] if loads else []
    if not mode.export_cached:
        names.append("export")
    if mode.verify:
        names += ["reference", "verify"]
    if mode.command == "verify" or mode.command == "export":
        return names
    if mode.graph == "fused":
        names += ["fused-build"] + (["fused-check"] if mode.fused_check else [])
    elif mode.graph == "portable":
        names.append("compile")
    if mode.command == "infer" and mode.graph != "qaic":
        names.append("run")
    return names


def sizes(shape, mode: Mode) -> Sizes:
    w = int(shape.weight_bytes or 0)
    return Sizes(w, int(getattr(shape, "embedding_bytes", 0) or 0), shape.cache_bytes(mode.batch_size, mode.ctx_len),
                 tied=bool(getattr(shape, "tied", True)), layers=int(getattr(shape, "num_layers", 0) or 0))


def plan(shape, mode: Mode) -> list[Estimate]:
    """Each stage's estimated peak for ``shape`` (a :class:`qeff.intake.preflight.ModelShape` that knows
    its weight bytes) run as ``mode``."""
    s = sizes(shape, mode)
    return [Estimate(name, STAGES[name](s, mode)) for name in stages_for(mode)]


def skip_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("QEFF_SKIP_MEMORY_CHECK", "") not in ("", "0")


def streamed_verify_setting(flag: bool | None = None) -> bool | None:
    """Layer-streamed verification asked for: True (``--verify-layers`` or
    ``QEFF_STREAMED_VERIFY=1``), False (``QEFF_STREAMED_VERIFY=0``: never), None (chosen by memory)."""
    if flag:
        return True
    value = os.environ.get("QEFF_STREAMED_VERIFY", "").strip().lower()
    if value in ("", "auto"):
        return None
    return value not in ("0", "false", "no", "off")


_VERIFY_IN_MEMORY = ("load", "transform", "reference", "verify")


#: A verification "fits comfortably" when its largest stage's estimate is at most this share of the
#: memory available; then it runs in memory (the fast path: docs/memory.md, "When", has the measured
#: cost of streaming; the reports are the same to the bit). Above it, a run that can stream does: the
#: estimates were fitted on two shapes with a 15 % margin, and on a shared machine MemAvailable moves
#: by gigabytes while a run is going (the 3B export was killed at 23.4 GB on a 24 GB machine). The
#: same share bounds the layers kept resident by a streamed run (all of them, or none).
COMFORT = 0.8


def _verify_peak(s: Sizes, mode: Mode) -> int:
    """The largest estimate of the verification's stages in ``mode`` (load and transform in memory)."""
    names = ("reference", "verify") if mode.verify_layers else _VERIFY_IN_MEMORY
    return max(STAGES[name](s, mode) for name in names)


def choose_verification(shape, mode: Mode, *, available: int | None, want: bool | None = None) -> Mode:
    """How ``mode`` verifies (issue 18's policy; docs/memory.md, "When").

    - ``want`` False (``QEFF_STREAMED_VERIFY=0``), a source that does not stream (``mode.streamed``
      False: not a safetensors directory) or headers that do not give the weights' size: in memory.
    - ``want`` None (chosen by memory): in memory while its largest stage fits comfortably
      (:data:`COMFORT` × ``available``), or when ``available`` is unknown; otherwise layer-streamed
      if that fits ``available`` at all (else in memory, which the preflight then refuses naming
      ``--verify-layers`` if that would fit).
    - ``want`` True (``--verify-layers``, ``QEFF_STREAMED_VERIFY=1``): layer-streamed.

    Streamed, ONNX Runtime keeps its session of the whole graph where it fits ``available`` and is
    checked a layer at a time otherwise. Every layer is kept resident between forwards
    (``mode.resident``: read once, as the in-memory path reads them) when all of them fit comfortably
    beside the rest; otherwise none is, and the peak stays at one layer's (a partial set would save
    reads in proportion to the peak it adds, which the issue's targets bound)."""
    if not mode.verify or not mode.streamed or want is False or shape.weight_bytes is None:
        return mode
    s = sizes(shape, mode)
    if want is None:
        if available is None or _verify_peak(s, mode) <= COMFORT * available:
            return mode
    whole = replace(mode, verify_layers=True, ort_layers=False, resident=0)
    chosen = whole
    if available is not None and _verify_peak(s, whole) > available:  # the whole graph's session does not fit
        chosen = replace(whole, ort_layers=True)
    if want is None and _verify_peak(s, chosen) > available:
        return mode
    every = s.layer * s.layers if s.layers else 0
    if every and available is not None and _verify_peak(s, replace(chosen, resident=every)) <= COMFORT * available:
        chosen = replace(chosen, resident=every)
    return chosen


def _alternatives(mode: Mode) -> list[Mode]:
    """Modes that do the same job in less memory, most faithful first."""
    out: list[Mode] = []
    if mode.verify and mode.streamed and not mode.verify_layers:  # the same verdict, a layer at a time
        out += [replace(mode, verify_layers=True), replace(mode, verify_layers=True, ort_layers=True)]
    if mode.command != "infer":
        return out
    if mode.graph == "fused" and mode.weights == "fp32":
        out.append(replace(mode, weights="int8"))
    if mode.verify:
        out.append(replace(mode, verify=False))
        if mode.graph == "fused" and mode.weights == "fp32":
            out.append(replace(mode, verify=False, weights="int8"))
            out.append(replace(mode, verify=False, weights="int4"))
    if mode.graph == "fused" and mode.weights == "fp32":
        out.append(replace(mode, weights="int4"))
    return out


def check(shape, mode: Mode, *, available: int | None, what: str = "this run") -> list[Estimate]:
    """Refuse ``mode`` when one of its stages cannot fit ``available`` bytes (one sentence, exit 2);
    return the plan otherwise. ``available`` None (unknown) lets every run through."""
    estimates = plan(shape, mode)
    if available is None or not estimates or shape.weight_bytes is None:
        return estimates
    over = [e for e in estimates if e.bytes > available]
    if not over:
        return estimates
    worst = over[0]  # the first stage, in the chain's order, that the kernel would kill
    from qeff.validation import memory_sources

    kv = shape.cache_bytes(mode.batch_size, mode.ctx_len)
    peak = lambda m: max(e.bytes for e in plan(shape, m))  # noqa: E731
    alternatives = [replace(alt, fused_check=fused_check_fits(sizes(shape, alt), alt, available)) for alt in _alternatives(mode)]
    fitting = [alt for alt in alternatives if peak(alt) <= available]
    fits = fitting[0] if fitting else None
    if fits is not None:
        # The other weight formats that fit with the same verification, so the choice is the user's.
        same = [alt for alt in fitting if alt.verify == fits.verify and alt.graph == fits.graph]
        hint = "run with " + " or ".join(f"{alt.describe(mode)} (about {human_bytes(peak(alt))})" for alt in same)
    elif kv > 0.25 * worst.bytes and mode.ctx_len > 1:
        hint = "use a smaller --ctx_len or --batch_size"
    elif worst.stage in ("load", "export"):
        hint = ("no mode of this qeff fits it: loading and exporting hold the whole model in fp32 (the export several "
                "times) until the streaming export lands (DESIGN.md, Memory); use a machine with more memory")
    else:
        hint = "use a machine with more memory"
    raise UsageError(
        f"{what} would need about {human_bytes(worst.bytes)} at its {worst.stage} stage "
        f"({human_bytes(shape.weight_bytes)} of fp32 weights, {human_bytes(kv)} of KV cache), but only "
        f"{human_bytes(available)} of memory is available ({memory_sources()}); {hint}, or pass "
        f"--skip-memory-check if you know better"
    )
