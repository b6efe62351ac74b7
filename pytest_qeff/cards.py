"""Model cards: one TOML file per model, validated, selected by name or glob.

A card is data, not code: ``load_cards(dir)`` reads every ``*.toml`` in ``dir`` into a
:class:`Card` (pydantic, unknown keys are errors) and ``select(cards, patterns)`` turns the
``--qeff-model`` values into a sorted list. Every mistake — bad TOML, a wrong type, an unknown key,
an unknown model name — is a :class:`pytest.UsageError` naming the file and the field path, never a
traceback. ``docs/plugin.md`` documents every key; ``model_cards/llama-2-7b-chat.toml`` is the
annotated example.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict
import fnmatch
import math
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import qeff.verification as _library
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "STAGES",
    "FEATURES",
    "TIERS",
    "BACKENDS",
    "ArchConfig",
    "Benchmark",
    "Card",
    "Case",
    "CompileDefaults",
    "CpuWeights",
    "WEIGHT_MODES",
    "KnownFailure",
    "Precision",
    "PrecisionBudget",
    "Prompts",
    "Serving",
    "TinyOverrides",
    "Tolerances",
    "Weights",
    "card_names",
    "config_value_matches",
    "default_cards_dir",
    "load_card",
    "load_cards",
    "select",
]

#: Stages in pipeline order; ``compile``, ``generation`` and ``benchmark`` run once per backend;
#: ``serving`` once per feature the card's ``[serving]`` declares (ONNX Runtime).
STAGES = ("transform", "export", "compile", "generation", "benchmark", "precision", "serving")
#: The serving features a card may declare (issue 13, ``docs/serving.md``).
FEATURES = ("continuous_batching", "prefix_caching", "sampling", "speculative", "prompt_lookup")
TIERS = ("tiny", "full")
BACKENDS = ("ort", "qaic")
#: The compressed weights of ONNX Runtime's fused CPU graph a card may budget (``[cpu_weights]``),
#: each as ``qeff infer --backend ort`` takes it: mode → (``--weights``, ``--int8-activations``).
WEIGHT_MODES: dict[str, tuple[str, bool]] = {
    "native": ("native", False),  # a GGUF's own blocks, re-encoded exactly (GGUF weights only)
    "int8": ("int8", False),
    "int4": ("int4", False),
    "int8-a8": ("int8", True),  # int8 weights, int8 activations
}

Stage = Literal["transform", "export", "compile", "generation", "benchmark", "precision", "serving"]
Feature = Literal["continuous_batching", "prefix_caching", "sampling", "speculative", "prompt_lookup"]
Tier = Literal["tiny", "full"]
WeightMode = Literal["native", "int8", "int4", "int8-a8"]
Backend = Literal["ort", "qaic"]
Positive = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Weights(_Strict):
    """Where the real weights come from (the ``full`` tier).

    ``source = "none"``: a tiny-tier-only card (one per architecture the transform supports that
    no named card covers); its ``[config]`` is a representative published config, kept for scale,
    and its full tier skips. ``trust_remote_code``: the model's modeling code lives in its hub
    repository, not in transformers; the plugin runs it only under ``--qeff-trust-remote-code``."""

    source: Literal["hub", "local", "gguf", "none"]
    repo: str | None = Field(default=None, min_length=1)  # Hugging Face repo id, e.g. meta-llama/Llama-2-7b-chat-hf
    revision: str = "main"  # branch, tag or commit of ``repo``
    path: str | None = None  # "local": a directory holding config.json; "gguf": the .gguf file (or package + file)
    package: str | None = None  # source = "gguf": the installed distribution shipping the file
    file: str | None = None  # source = "gguf": glob of the .gguf file inside that package
    trust_remote_code: bool = False  # source = "hub": the modeling code ships in the repository

    @model_validator(mode="after")
    def _source_fields(self) -> Weights:
        if self.source == "hub" and not self.repo:
            raise ValueError(f'source = "{self.source}" needs repo = "<org/name>"')
        if self.source == "local" and not self.path:
            raise ValueError('source = "local" needs path = "<directory holding config.json>"')
        if self.source == "gguf" and not (self.package and self.file) and not self.path:
            raise ValueError(
                'source = "gguf" needs package = "<distribution>" and file = "<glob of the .gguf>", or path = "<file.gguf>"'
            )
        if self.trust_remote_code and self.source != "hub":
            raise ValueError('trust_remote_code = true needs source = "hub" (the code ships in the hub repository)')
        return self


#: A value of ``[config.extra]``: a scalar, a list (``layer_types``, ``no_rope_layers``, LongRoPE's
#: factor lists), or a table of those (``rope_scaling``, per-layer-type ``rope_parameters``), e.g.
#: ``[config.extra.rope_scaling]`` with ``rope_type = "llama3"``. Tables are passed to the config as
#: dicts; a ``[tiny.extra]`` table replaces the real one whole (a tiny model needs its own lists).
ConfigScalar = int | float | str | bool | None
ConfigList = list[int] | list[float] | list[str]
ConfigValue = ConfigScalar | ConfigList | dict[str, ConfigScalar | ConfigList | dict[str, ConfigScalar | ConfigList]]


def config_value_matches(expected: Any, actual: Any) -> bool:
    """Whether a loaded config's value equals a card's: floats to 1e-6 relative (a GGUF stores
    them as float32), lists element by element, tables key by key over the card's keys only
    (transformers adds ``rope_theta`` and ``rope_type`` to a loaded ``rope_scaling``)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and config_value_matches(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return (
            isinstance(actual, (list, tuple))
            and len(actual) == len(expected)
            and all(config_value_matches(e, a) for e, a in zip(expected, actual))
        )
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return math.isclose(float(actual), expected, rel_tol=1e-6)
    return actual == expected


class ArchConfig(_Strict):
    """The real model's architecture, in Hugging Face config names. ``extra`` holds keys that only
    some architectures have; everything here is passed to ``AutoConfig.for_model``."""

    num_hidden_layers: Positive
    hidden_size: Positive
    intermediate_size: Positive
    num_attention_heads: Positive
    num_key_value_heads: Positive
    vocab_size: Positive
    max_position_embeddings: Positive
    head_dim: Positive | None = None  # default hidden_size / num_attention_heads
    # None = the architecture's own default (GPT-2, MPT, Falcon … have neither key).
    rope_theta: PositiveFloat | None = None
    rms_norm_eps: PositiveFloat | None = None
    sliding_window: Positive | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, ConfigValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _heads(self) -> ArchConfig:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}), or set head_dim"
            )
        return self

    @property
    def gqa_ratio(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def hf_config(self) -> dict[str, Any]:
        """The keyword arguments for ``AutoConfig.for_model`` / ``qeff.from_config``."""
        values = self.model_dump(exclude={"extra"}, exclude_none=True)
        return {**values, **self.extra}


class TinyOverrides(_Strict):
    """The reduced ``tiny`` tier: keys of :class:`ArchConfig` that replace the real ones."""

    num_hidden_layers: Positive | None = None
    hidden_size: Positive | None = None
    intermediate_size: Positive | None = None
    num_attention_heads: Positive | None = None
    num_key_value_heads: Positive | None = None
    vocab_size: Positive | None = None
    max_position_embeddings: Positive | None = None
    head_dim: Positive | None = None
    rope_theta: PositiveFloat | None = None
    rms_norm_eps: PositiveFloat | None = None
    sliding_window: Positive | None = None
    tie_word_embeddings: bool | None = None
    seed: int = 0  # torch seed of the random weights (and of the random prompts)
    extra: dict[str, ConfigValue] = Field(default_factory=dict)


class CompileDefaults(_Strict):
    """Compile options; the first three are also the default case. The others are Cloud AI 100
    options (``qaic-exec``), recorded for the ``ort`` backend."""

    batch_size: Positive = 1
    prompt_len: Positive = 32
    ctx_len: Positive = 128
    num_cores: Positive = 16
    mxfp6: bool = True  # weights in MX FP6
    mxint8: bool = False  # KV cache in MX INT8
    mos: Positive = 1  # maximum output splits
    aic_enable_depth_first: bool = True


class Serving(_Strict):
    """Serving features proved by the ``serving`` stage, one test per feature and case: each
    against HF eager's greedy tokens and logits, prompt by prompt (``docs/serving.md``)."""

    features: list[Feature] = Field(min_length=1)
    full_batch_size: Positive = 2  # slots of continuous batching (fewer than the prompts: slots are reused)
    prompts: Annotated[int, Field(ge=2)] = 5  # prompts of mixed lengths run through the slots
    num_speculative_tokens: Positive = 3

    @model_validator(mode="after")
    def _distinct(self) -> Serving:
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"features: {sorted(f for f in self.features if self.features.count(f) > 1)[0]!r} is listed twice")
        return self


class Case(_Strict):
    """One compiled shape: a card's tests run once per case."""

    batch_size: Positive
    prompt_len: Positive
    ctx_len: Positive

    @property
    def id(self) -> str:
        return f"bs{self.batch_size}-pl{self.prompt_len}-cl{self.ctx_len}"

    @model_validator(mode="after")
    def _fits(self) -> Case:
        if self.prompt_len > self.ctx_len:
            raise ValueError(f"prompt_len ({self.prompt_len}) must not exceed ctx_len ({self.ctx_len})")
        return self


class Tolerances(_Strict):
    """Bounds of :class:`qeff.Tolerances` for one tier."""

    logits_mse: PositiveFloat
    logits_max_abs: PositiveFloat
    cache_mse: PositiveFloat
    cache_max_abs: PositiveFloat
    ambiguity_margin: PositiveFloat = 1e-3


#: The library's bounds, one source: seeded tiny models (qeff.verification.TINY_TOLERANCES) and
#: real weights (qeff.Tolerances' defaults).
TINY_TOLERANCES = Tolerances(**asdict(_library.TINY_TOLERANCES))
FULL_TOLERANCES = Tolerances(**asdict(_library.Tolerances()))


class TierTolerances(_Strict):
    tiny: Tolerances = TINY_TOLERANCES
    full: Tolerances = FULL_TOLERANCES


class Prompts(_Strict):
    """``text`` is tokenized in the full tier; the tiny tier has no tokenizer and uses seeded
    random token ids of ``tiny_lengths`` (one length per batch row, cycled)."""

    text: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    tiny_lengths: list[Positive] = Field(default_factory=lambda: [24], min_length=1)
    generation_len: Positive = 16  # greedy tokens compared per row


class TierFractions(_Strict):
    tiny: Fraction = 0.8  # random tiny models on shared CI cores: only gross (5x) slowdowns
    full: Fraction = 0.25


class Benchmark(_Strict):
    """How the benchmark stage measures, and how much slower than the baseline it may be.

    ``max_regression`` is the fraction of speed that may be lost against the baseline: 0.25 lets
    tokens/s drop to 75 % and time to first token grow to 1/0.75 of the baseline's."""

    generation_len: Positive = 64
    warmup: Annotated[int, Field(ge=0)] = 1
    repeats: Positive = 11  # the median of these runs is compared (sub-ms TTFTs need many: one scheduler tick is 4 ms)
    threads: Positive | None = 1  # ORT intra-op threads; None = every physical core
    max_regression: TierFractions = TierFractions()


class PrecisionBudget(_Strict):
    """What one precision tier may cost against HF fp32 (:class:`qeff.precision.ladder.Budget`)."""

    kld_mean: PositiveFloat  # mean KL(HF fp32 ‖ tier) per position, nats
    kld_p99: PositiveFloat
    top1_agree: Annotated[float, Field(ge=0, le=1)]  # at least this fraction of argmaxes agree
    ppl_delta: PositiveFloat  # perplexity at most this much (relative: 0.05 = +5%) above HF fp32's


class PrecisionWindows(_Strict):
    """The corpus the ladder is teacher-forced over: ``rows`` windows of ``window`` tokens, one batch."""

    rows: Positive
    window: Annotated[int, Field(ge=2)]


class Precision(_Strict):
    """The precision ladder (``--qeff-precision``): corpus size per tier of the suite, and the
    card's budget per precision tier (tiers not listed use qeff's measured defaults). The tiny
    tier runs seeded random tokens of the tiny vocabulary; the full tier the qeff corpus."""

    tiny: PrecisionWindows = PrecisionWindows(rows=2, window=64)
    full: PrecisionWindows = PrecisionWindows(rows=8, window=512)
    budgets: dict[str, PrecisionBudget] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _tier_names(self) -> Precision:
        from qeff.errors import UsageError
        from qeff.precision.tiers import parse_tier

        for name in self.budgets:
            try:
                canonical = parse_tier(name).name
            except UsageError as exc:
                raise ValueError(f"budgets: {exc}") from None
            if canonical != name:
                raise ValueError(f"budgets: write tier {name!r} as {canonical!r}")
        return self


class CpuWeights(_Strict):
    """The budgets of the fused CPU graph's compressed weights (``--qeff-graph compressed``), per
    tier and weights mode (:data:`WEIGHT_MODES`), each judged as a precision tier is: against HF
    fp32 on the untouched model, over the card's ``[precision]`` corpus. A mode without a budget
    in the tier is not certified there (its stages skip, saying so): there is no default, as
    what quantization costs depends on the weights."""

    tiny: dict[WeightMode, PrecisionBudget] = Field(default_factory=dict)
    full: dict[WeightMode, PrecisionBudget] = Field(default_factory=dict)
    #: The corpus of the verdict per tier (``corpus.full = { rows = 8, window = 128 }``); a tier not
    #: listed runs the card's ``[precision]`` corpus.
    corpus: dict[Tier, PrecisionWindows] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _native_is_gguf(self) -> CpuWeights:
        if "native" in self.tiny:
            raise ValueError("tiny.native: the tiny tier's seeded random weights are no GGUF; `native` "
                             "applies to the full tier of a card whose [weights] source is \"gguf\"")
        return self

    def budget(self, tier: str, mode: str) -> PrecisionBudget | None:
        return getattr(self, tier).get(mode)

    def windows(self, tier: str, precision: Precision) -> PrecisionWindows:
        return self.corpus.get(tier) or getattr(precision, tier)


class KnownFailure(_Strict):
    """A stage that is known to fail: it becomes ``xfail(strict=True)`` with ``reason``, so it
    fails the run the day it starts passing. Unset filters match everything."""

    stage: Stage
    reason: str = Field(min_length=1)
    tier: Tier | None = None
    case: str | None = None  # a case id, e.g. "bs1-pl32-cl128"
    backend: Backend | None = None

    def matches(self, stage: str, tier: str, case: str, backend: str | None) -> bool:
        return (
            self.stage == stage
            and self.tier in (None, tier)
            and self.case in (None, case)
            and (self.backend is None or backend is None or self.backend == backend)
        )


Alias = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]


class Card(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    name: str = Field(min_length=1)
    # Other names --qeff-model finds this card by (case-insensitively), besides its id and its
    # [weights] repo: the names users know it by, e.g. the seed product's "Llama-2-7b-chat-hf".
    aliases: list[Alias] = Field(default_factory=list)
    architecture: str = Field(min_length=1)  # the Hugging Face model_type, e.g. "llama"
    description: str = ""
    weights: Weights
    config: ArchConfig
    tiny: TinyOverrides
    compile: CompileDefaults = CompileDefaults()
    cases: list[Case] = Field(default_factory=list)  # empty: one case from [compile]
    tolerances: TierTolerances = TierTolerances()
    prompts: Prompts
    benchmark: Benchmark = Benchmark()
    precision: Precision = Precision()
    cpu_weights: CpuWeights = CpuWeights()
    serving: Serving | None = None
    known_failures: list[KnownFailure] = Field(default_factory=list)

    @property
    def all_cases(self) -> list[Case]:
        if self.cases:
            return list(self.cases)
        c = self.compile
        return [Case(batch_size=c.batch_size, prompt_len=c.prompt_len, ctx_len=c.ctx_len)]

    def tiny_config(self) -> ArchConfig:
        """The real config with the ``[tiny]`` overrides applied (validated by :func:`_check_tiny`)."""
        overrides = self.tiny.model_dump(exclude={"seed", "extra"}, exclude_none=True)
        merged = {**self.config.model_dump(), **overrides}
        merged["extra"] = {**self.config.extra, **self.tiny.extra}
        # Random weights have no tokenizer: the real special-token ids may not even fit the tiny vocab.
        merged["bos_token_id"] = merged["eos_token_id"] = None
        return ArchConfig.model_validate(merged)

    def arch_config(self, tier: str) -> ArchConfig:
        return self.tiny_config() if tier == "tiny" else self.config

    @model_validator(mode="after")
    def _consistent(self) -> Card:
        try:
            tiny = self.tiny_config()
        except ValidationError as exc:
            raise ValueError("tiny: the overrides give an invalid config: " + _first_message(exc)) from None
        if tiny.gqa_ratio != self.config.gqa_ratio:
            raise ValueError(
                f"tiny: num_attention_heads / num_key_value_heads is {tiny.num_attention_heads}/"
                f"{tiny.num_key_value_heads} but the real model's is {self.config.num_attention_heads}/"
                f"{self.config.num_key_value_heads}; keep the ratio ({self.config.gqa_ratio}) so the tiny "
                f"tier exercises the same grouped-query attention"
            )
        ids = [c.id for c in self.all_cases]
        if len(set(ids)) != len(ids):
            raise ValueError(f"cases: duplicate case {sorted(i for i in ids if ids.count(i) > 1)[0]}")
        for case in self.all_cases:
            need = max(self.prompts.tiny_lengths) + self.prompts.generation_len
            if need > case.ctx_len:
                raise ValueError(
                    f"prompts: a {max(self.prompts.tiny_lengths)}-token tiny prompt plus generation_len="
                    f"{self.prompts.generation_len} needs ctx_len >= {need}, but case {case.id} has {case.ctx_len}"
                )
        if "native" in self.cpu_weights.full and self.weights.source != "gguf":
            raise ValueError(f"cpu_weights.full.native: `native` re-encodes a GGUF's own blocks, and this card's "
                             f"[weights] source is {self.weights.source!r}; budget int8 or int4 instead")
        for i, kf in enumerate(self.known_failures):
            if kf.case is not None and kf.case not in ids:
                raise ValueError(f"known_failures[{i}].case: {kf.case!r} is not a case of this card ({', '.join(ids)})")
        return self

    def known_failure(self, stage: str, tier: str, case: str, backend: str | None) -> KnownFailure | None:
        return next((kf for kf in self.known_failures if kf.matches(stage, tier, case, backend)), None)


# --- loading -------------------------------------------------------------------------------------


def default_cards_dir() -> Path:
    """The cards shipped with the plugin: ``pytest_qeff/model_cards`` in the wheel (in a checkout
    that path is a link to the top-level ``model_cards/``)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_cards", here.parent / "model_cards"):
        if candidate.is_dir():
            return candidate
    return here / "model_cards"


def _first_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{_loc(err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(model: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The pydantic model class found at ``loc`` (the parent of an unknown key), if any."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = _unwrap(current.model_fields[part].annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """The model class inside ``X | None``, ``list[X]``, ``Annotated[X, ...]``."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        if typing.get_origin(arg) in (list, typing.Union, types.UnionType, Annotated):
            found = _unwrap(arg)
            if found is not None:
                return found
    return None


def _describe(err: dict[str, Any]) -> str:
    loc = list(err["loc"])
    where = _loc(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _model_at(Card, loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}: unknown key{hint}; allowed here: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("value_error", "assertion_error") and not loc:
        return msg
    return f"{where}: {msg}"


def load_card(path: Path) -> Card:
    """One card; a :class:`pytest.UsageError` naming the file and every bad field otherwise."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise pytest.UsageError(f"model card {path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise pytest.UsageError(f"model card {path}: cannot be read: {exc.strerror}") from None
    try:
        card = Card.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise pytest.UsageError(f"model card {path}: {problems}") from None
    if card.id != path.stem:
        raise pytest.UsageError(f"model card {path}: id: {card.id!r} must equal the file name {path.stem!r}")
    return card


def load_cards(directory: str | Path) -> dict[str, Card]:
    """Every ``*.toml`` card of ``directory``, by id, sorted. All bad cards are reported at once."""
    directory = Path(directory)
    if not directory.is_dir():
        raise pytest.UsageError(f"--qeff-cards-dir {directory}: no such directory")
    cards: dict[str, Card] = {}
    problems: list[str] = []
    for path in sorted(directory.glob("*.toml")):
        try:
            card = load_card(path)
        except pytest.UsageError as exc:
            problems.append(str(exc))
            continue
        cards[card.id] = card
    if problems:
        raise pytest.UsageError("\n".join(problems))
    if not cards:
        raise pytest.UsageError(f"--qeff-cards-dir {directory}: holds no *.toml model cards")
    _check_names(directory, cards)
    return {cid: cards[cid] for cid in sorted(cards)}  # by id: "gpt2" before "gpt2-xl" (file names sort the other way)


def card_names(card: Card) -> list[str]:
    """Every name ``--qeff-model`` finds ``card`` by, lower-cased: its id, its HF repo id, its aliases."""
    names = [card.id, *(a.lower() for a in card.aliases)]
    if card.weights.repo:
        names.append(card.weights.repo.lower())
    return names


def _check_names(directory: Path, cards: dict[str, Card]) -> None:
    """An alias may not name another card (by its id or alias): a name must find one card. Repo ids
    may repeat (two cards of one repository, e.g. two precisions, are both selected by it)."""
    owner: dict[str, str] = {cid: cid for cid in cards}
    for card in cards.values():
        for alias in card.aliases:
            key = alias.lower()
            other = owner.setdefault(key, card.id)
            if other != card.id:
                raise pytest.UsageError(
                    f"model card {directory / (card.id + '.toml')}: aliases: {alias!r} already names card {other!r}"
                )


def select(
    cards: dict[str, Card], patterns: Iterable[str], fallback: Callable[[str], Card | None] | None = None
) -> list[Card]:
    """The cards named by ``patterns``, sorted by id. A pattern is ``all``, a card's id, HF repo id
    or alias (case-insensitive: ``llama-2-7b``, ``meta-llama/Llama-2-7b-hf``, ``Llama-2-7b-hf``), or
    a glob over those names (``llama-2-*``, ``meta-llama/*``). Commas separate several in one value.
    A pattern no card matches goes to ``fallback`` (a card built on the fly for a model path or
    hub id, :mod:`pytest_qeff.cardless`), which returns None when it is no model either."""
    wanted: dict[str, Card] = {}
    names = {cid: card_names(card) for cid, card in cards.items()}
    for raw in patterns:
        for pattern in filter(None, (p.strip() for p in raw.split(","))):
            if pattern == "all":
                wanted.update(cards)
                continue
            key = pattern.lower()
            found = {cid for cid, ns in names.items() if key in ns}
            if not found and any(c in pattern for c in "*?["):
                found = {cid for cid, ns in names.items() if any(fnmatch.fnmatchcase(n, key) for n in ns)}
            if found:
                wanted.update((cid, cards[cid]) for cid in found)
                continue
            built = fallback(pattern) if fallback is not None and not any(c in pattern for c in "*?[") else None
            if built is None:
                raise pytest.UsageError(_unknown(pattern, cards))
            wanted[built.id] = built
    return [wanted[cid] for cid in sorted(wanted)]


def _unknown(pattern: str, cards: dict[str, Card]) -> str:
    stem = pattern.replace("*", "").replace("?", "").lower().rsplit("/", 1)[-1]
    # Ids that extend what was typed come first ("llama-2-7b" → "llama-2-7b-chat"), then similar ones.
    close = [cid for cid in cards if stem and stem in cid]
    close += [cid for cid in difflib.get_close_matches(stem, list(cards), n=3, cutoff=0.5) if cid not in close]
    hint = f"closest: {', '.join(close[:3])}" if close else f"known: {', '.join(cards)}"
    return (
        f"--qeff-model {pattern}: no model card matches; {hint} (or 'all'; a card is found by its id, HF repo id "
        f"or alias, and a model directory, .gguf file or cached hub repo id gets a card built from its config)"
    )
