"""Stage records: what each stage test measured, typed, and serialized with its kind.

A stage builds one record and hands it to ``qeff_record`` before it judges, so a failing stage
still brings its numbers to the report. The record travels from an xdist worker to the controller
as ``record.to_dict()`` (builtin types, with ``"kind"``), lands in ``results.json`` as a record's
``data``, and every reader (report views, the terminal table, baselines) rebuilds it with
:meth:`StageRecord.from_dict` — no reader guesses a stage's kind from which keys a dict has.

    StageRecord                     prompts, prompt texts, the case's shape, the device group
    ├── TransformRecord  transform  HF eager vs transformed PyTorch (a qeff Comparison), model facts
    ├── ExportRecord     export     transformed PyTorch vs ONNX Runtime (and HF vs it, if that failed), the graph's facts
    ├── CompileRecord    compile    the artifact, the compile options, what the session opened with; for the
    │                               fused graph: HF eager vs it (its verdict) and its build check vs the portable graph
    ├── GenerationRecord generation free-running greedy tokens vs HF's, per row
    ├── BenchmarkRecord  benchmark  median figures, every run, the baseline comparison
    ├── PrecisionRecord  precision  one precision tier against HF fp32 (a qeff TierResult), the corpus it ran on
    └── ServingRecord    serving    one serving feature against HF eager, per prompt (tokens, logits)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from qeff.meter import Measurement
from qeff.store.serialization import from_dict, to_dict
from qeff.precision.ladder import TierResult
from qeff.verification import Comparison

__all__ = [
    "StageRecord",
    "TransformRecord",
    "ExportRecord",
    "CompileRecord",
    "GenerationRecord",
    "GenerationRow",
    "BenchmarkRecord",
    "PrecisionRecord",
    "ServingRecord",
    "ServingCheck",
    "ModelFacts",
    "OnnxFacts",
    "ArtifactFacts",
    "WeightsVerdict",
    "KINDS",
    "record_of",
]


@dataclass
class StageRecord:
    KIND: ClassVar[str] = ""

    prompts: list[list[int]]  # token ids per batch row
    prompt_texts: list[str | None]  # the texts they came from (None in the tiny tier)
    batch_size: int
    prompt_len: int
    ctx_len: int
    device_group: list[int]
    #: each chain stage this test ran: peak RSS and wall time (:mod:`qeff.meter`; issue 18)
    resources: list[Measurement] = field(default_factory=list, kw_only=True)

    @property
    def kind(self) -> str:
        return self.KIND

    def to_dict(self) -> dict:
        return {"kind": self.KIND, **to_dict(self)}

    @staticmethod
    def from_dict(data: dict) -> StageRecord:
        kind = data.get("kind")
        if kind not in KINDS:
            raise ValueError(f"not a qeff stage record (kind {kind!r}; known: {', '.join(sorted(KINDS))})")
        return from_dict(KINDS[kind], data)


@dataclass
class ModelFacts:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    parameters: int


@dataclass
class TransformRecord(StageRecord):
    KIND: ClassVar[str] = "transform"

    comparison: Comparison
    reference_tokens: list[list[int]]
    model: ModelFacts
    config_mismatches: list[str] = field(default_factory=list)


@dataclass
class OnnxFacts:
    path: str
    bytes: int | None
    reused: bool
    build_s: float
    fp16_clipped_values: int | None


@dataclass
class ExportRecord(StageRecord):
    KIND: ClassVar[str] = "export"

    comparison: Comparison
    onnx: OnnxFacts
    #: HF vs the transformed PyTorch, kept when it failed: ORT is judged against HF through it.
    hf_vs_pytorch: Comparison | None = None


@dataclass
class ArtifactFacts:
    path: str
    name: str
    reused: bool
    build_s: float
    bytes: int


@dataclass
class CompileRecord(StageRecord):
    KIND: ClassVar[str] = "compile"

    artifact: ArtifactFacts
    compile_options: dict[str, Any]
    session: dict[str, Any]  # what the session opened with: batch_size, ctx_len, num_layers
    graph: str = "portable"  # portable | fused (--qeff-graph)
    #: the fused graph's verdict: HF eager (untouched) vs this graph, teacher-forced over HF's greedy tokens
    hf_vs_graph: Comparison | None = None
    #: the pipeline's check of the fused graph against the portable one (qeff vs qeff: a guard, not the verdict)
    graph_check: dict[str, Any] | None = None
    #: the fused graph's weights mode: fp32, or a compressed mode (native, int8, int4, int8-a8)
    weights: str = "fp32"
    #: a compressed graph's verdict: HF fp32 (untouched) vs this graph over the card's corpus, held
    #: to the card's [cpu_weights] budget (the precision ladder's measures)
    budget: WeightsVerdict | None = None


@dataclass
class WeightsVerdict:
    """A compressed fused graph against HF fp32 on the untouched model: the measures and the
    budget (:class:`~qeff.precision.ladder.TierResult`, ``tier`` = the weights mode), and what
    they were measured over."""

    result: TierResult
    corpus: str  # "qeff corpus" (full tier) or "random tokens" (tiny tier)
    rows: int
    window: int
    #: the largest |HF fp32 - candidate| logit over every position: 0 means the candidate was
    #: compared with itself (re-quantized weights never reproduce fp32 bit for bit)
    logits_max_abs: float


@dataclass
class GenerationRow:
    row: int
    reference: list[int]  # HF's greedy tokens
    generated: list[int]  # the backend's
    first_divergence: int | None
    margin: float | None  # HF's top-2 logit margin at the divergence
    ambiguous: bool
    reference_text: str | None
    generated_text: str | None


@dataclass
class GenerationRecord(StageRecord):
    KIND: ClassVar[str] = "generation"

    rows: list[GenerationRow]
    tokens_matched: int
    tokens_total: int
    stats: dict[str, float]  # ttft_s, decode_tok_s, total_tok_s, e2e_s, new_tokens


@dataclass
class BenchmarkRecord(StageRecord):
    KIND: ClassVar[str] = "benchmark"

    figures: dict[str, float]  # medians: decode_tok_s, total_tok_s, ttft_s
    runs: list[dict[str, float]]
    generation_len: int
    repeats: int
    threads: int | None
    probe: float | None  # machine-speed probe, runs/s
    baseline: dict[str, Any]  # pytest_qeff.baseline.check's comparison
    update_baseline: bool


@dataclass
class PrecisionRecord(StageRecord):
    KIND: ClassVar[str] = "precision"

    tier_name: str  # the precision tier, e.g. "mxfp6+mxint8"
    result: TierResult
    corpus: str  # "qeff corpus" (full tier) or "random tokens" (tiny tier)
    corpus_tokens: int
    rows: int
    window: int
    steps: int  # greedy steps per prompt
    tiers: list[str]  # every tier of the ladder, in order


@dataclass
class ServingCheck:
    """One judged measure of a serving stage: ``ok`` None = information only."""

    label: str
    value: str
    bound: str
    ok: bool | None


@dataclass
class ServingRecord(StageRecord):
    """``prompts`` are every prompt the feature ran (not one per batch row); ``rows`` compare each
    prompt's tokens with HF eager's own greedy tokens for it (alone, batch 1)."""

    KIND: ClassVar[str] = "serving"

    feature: str  # continuous_batching | prefix_caching | sampling | speculative | prompt_lookup
    checks: list[ServingCheck]
    rows: list[GenerationRow]
    logits_max_abs: float | None  # vs HF's logits, over the steps before any divergence
    figures: dict[str, float]  # e.g. slot_occupancy, mean_accepted_tokens, prefix_hit_tokens
    settings: dict[str, Any]  # full_batch_size, num_speculative_tokens, sampling, arrivals


KINDS: dict[str, type[StageRecord]] = {
    cls.KIND: cls
    for cls in (TransformRecord, ExportRecord, CompileRecord, GenerationRecord, BenchmarkRecord, PrecisionRecord, ServingRecord)
}


def record_of(result: dict) -> StageRecord | None:
    """The typed record of one ``results.json`` record (None for a stage that recorded nothing,
    e.g. one skipped before it measured)."""
    data = result.get("data")
    return StageRecord.from_dict(data) if data else None
