"""Is a model supported? Answered from its config alone, before any weight is read.

``require_supported(source)`` is the gate :func:`qeff.pipeline.prepare` runs before loading: it
reads the config (:mod:`qeff.intake.configs`: config.json, or a GGUF header), checks the weight files'
headers (a truncated or corrupt file is named, :class:`~qeff.errors.CorruptWeightsError`), and
refuses what the transform would refuse later — after minutes of loading — with
:class:`~qeff.errors.UnsupportedArchitectureError`: the architecture's name, why, the supported
model types and the nearest supported family.

``inspect(name)`` is ``qeff check``: the same verdict plus the detected features (sliding window,
mixture of experts, RoPE scaling, tied embeddings, remote code, how the file is quantized), the
parameter count and bytes (from the weight files' headers, else by building the model on
PyTorch's ``meta`` device, which allocates nothing), and the model cards that cover it.

The nearest family is read from transformers itself: a model's ``modular_<name>.py`` imports the
classes it is derived from (``from ..qwen2.modeling_qwen2 import ...``), and older modeling files
say ``# Copied from transformers.models.<name>``. The supported model type the model borrows most
from is the nearest (ties broken by how many config keys the two share); a model with no such
lineage gets the supported type whose config keys overlap most, if any overlaps enough.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import time
import tomllib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qeff.intake.configs import ModelConfig, check_weight_headers, gguf_architectures, read_config, transformers_knows
from qeff.intake.consistency import check_config, check_tokenizer, check_weight_shapes, tokenizer_files
from qeff.errors import UnsupportedArchitectureError, UsageError
from qeff.intake.headers import GGUFHeader, SafetensorsHeader
from qeff.intake.loading import ModelSource, resolve

__all__ = [
    "Verdict",
    "SupportReport",
    "assess",
    "require_supported",
    "inspect",
    "features",
    "nearest_family",
    "covering_cards",
    "format_report",
    "run_check",
]

#: Config keys shared with a supported type's config, as a fraction (Jaccard), below which a model
#: with no code lineage is said to have no near family.
_MIN_KEY_OVERLAP = 0.6


@dataclass(frozen=True)
class Verdict:
    """``status``: ``supported``; ``unsupported`` (a real architecture qeff cannot run, or a
    configuration of one it refuses); ``unknown`` (a model type neither transformers nor qeff
    knows: bad input)."""

    status: str
    model_type: str | None
    reasons: tuple[str, ...] = ()
    nearest: str | None = None

    @property
    def supported(self) -> bool:
        return self.status == "supported"

    def sentence(self, name: str) -> str:
        """One sentence for a refusal: the architecture, why, the supported list, the nearest."""
        from qeff.transforms import supported_model_types

        why = "; ".join(self.reasons)
        near = f"; the nearest supported family is {self.nearest!r}" if self.nearest else ""
        return f"{name}: {why}{near} (supported model types: {', '.join(supported_model_types())})"


# --- the verdict ---------------------------------------------------------------------------------


def assess(config: ModelConfig) -> Verdict:
    """Supported or not, and why, from the config alone."""
    from qeff.transforms import get_spec

    model_type = config.model_type
    if model_type is None:
        return Verdict("unknown", None, (f"{config.where.name} names no model_type, so the architecture is unknown",))
    if config.gguf is not None and not config.gguf_loadable:
        return Verdict("unknown", model_type, (
            f"its GGUF header declares architecture {model_type!r}, which transformers cannot load from GGUF "
            f"(it reads {', '.join(gguf_architectures())})",
        ), nearest_family(model_type))
    if not transformers_knows(model_type):
        if config.remote_code:
            classes = config.values.get("auto_map") or {}
            target = classes.get("AutoModelForCausalLM") if isinstance(classes, dict) else None
            return Verdict("unsupported", model_type, (
                f"model_type {model_type!r} is remote code (its modeling code{f' {target}' if target else ''} ships in "
                f"the repository, not in transformers) and qeff has no transform for it",
            ), nearest_family(model_type))
        return Verdict("unknown", model_type, (
            f"{config.where.name} names model_type {model_type!r}, which neither transformers nor qeff knows",
        ), nearest_family(model_type))
    quant = config.values.get("quantization_config")
    if isinstance(quant, dict):
        method = quant.get("quant_method", "an unnamed method")
        return Verdict("unsupported", model_type, (
            f"the checkpoint is quantized with {method} (quantization_config); qeff loads float weights and "
            f"verifies against them, so use the unquantized checkpoint (or a GGUF, which loads de-quantized)",
        ))
    spec = get_spec(model_type)
    if spec is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        what = "" if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else " (and it is not a causal language model)"
        return Verdict("unsupported", model_type, (f"qeff has no transform for model_type {model_type!r}{what}",),
                       nearest_family(model_type))
    reason = spec.refuse(config.hf_config())
    if reason:
        return Verdict("unsupported", model_type, (f"qeff refuses this {spec.name!r} configuration: {reason}",))
    return Verdict("supported", model_type)


def require_supported(source: ModelSource, *, cache_dir: str | None = None) -> ModelConfig:
    """The gate before loading: the config, checked weight headers, and a supported verdict, or
    :class:`UnsupportedArchitectureError` / :class:`~qeff.errors.CorruptWeightsError`; a config no
    model can be built from, weights of other shapes or a missing or too large tokenizer are a
    :class:`~qeff.errors.UsageError` (:mod:`qeff.intake.consistency`)."""
    config = read_config(source, cache_dir=cache_dir)
    check_config(config)  # a config no model can be built from is bad input whatever its type (issue 19)
    verdict = assess(config)
    if not verdict.supported:
        raise UnsupportedArchitectureError(verdict.sentence(source.display), model_type=verdict.model_type,
                                           nearest=verdict.nearest)
    check_weight_shapes(config, check_weight_headers(config))
    check_tokenizer(config)
    return config


# --- the nearest family --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _models_root() -> Path | None:
    spec = importlib.util.find_spec("transformers.models")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _module_name(model_type: str) -> str:
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    return model_type_to_module_name(model_type)


@functools.lru_cache(maxsize=None)
def _lineage(module: str) -> dict[str, int]:
    """How many names ``models/<module>`` borrows from each other model module."""
    root = _models_root()
    counts: Counter[str] = Counter()
    if root is None:
        return {}
    modular = root / module / f"modular_{module}.py"
    if modular.is_file():
        for node in ast.walk(ast.parse(modular.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                other = node.module.split(".")[0]
                if other != module:
                    counts[other] += len(node.names)
    modeling = root / module / f"modeling_{module}.py"
    if modeling.is_file():
        for match in re.finditer(r"# Copied from transformers\.models\.(\w+)\.", modeling.read_text(encoding="utf-8")):
            if match.group(1) != module:
                counts[match.group(1)] += 1
    return dict(counts)


@functools.lru_cache(maxsize=None)
def _config_keys(model_type: str) -> frozenset[str]:
    """The keys a model type's config class adds to the common ``PretrainedConfig`` ones."""
    from transformers import CONFIG_MAPPING, PretrainedConfig
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # default configs warn about their own default token ids
    try:
        return frozenset(CONFIG_MAPPING[model_type]().to_dict()) - frozenset(PretrainedConfig().to_dict())
    except Exception:  # a config class that cannot be built with defaults: no keys to compare
        return frozenset()
    finally:
        hf_logging.set_verbosity(level)


def _overlap(a: str, b: str) -> float:
    ka, kb = _config_keys(a), _config_keys(b)
    return len(ka & kb) / len(ka | kb) if ka and kb else 0.0


def nearest_family(model_type: str) -> str | None:
    """The supported model type ``model_type`` is closest to (see the module doc), or None."""
    from qeff.transforms import supported_model_types

    supported = supported_model_types()
    if not transformers_knows(model_type):
        import difflib

        close = difflib.get_close_matches(model_type, supported, n=1, cutoff=0.6)
        return close[0] if close else None
    by_module: dict[str, list[str]] = {}
    for t in supported:
        by_module.setdefault(_module_name(t), []).append(t)
    start = _module_name(model_type)
    seen, frontier = {start}, [(start, 1.0)]
    for _ in range(3):  # the model's own sources, then theirs, then theirs
        scores: Counter[str] = Counter()
        following = []
        for module, weight in frontier:
            borrowed = _lineage(module)
            total = sum(borrowed.values()) or 1
            for other, n in borrowed.items():
                for t in by_module.get(other, ()):
                    scores[t] += n * weight
                if other not in seen:
                    seen.add(other)
                    following.append((other, weight * n / total))
        if scores:
            return max(scores, key=lambda t: (scores[t], _overlap(model_type, t), t))
        frontier = following
    best = max(supported, key=lambda t: (_overlap(model_type, t), t))
    return best if _overlap(model_type, best) >= _MIN_KEY_OVERLAP else None


# --- features and size ---------------------------------------------------------------------------


def _get(cfg: Any, values: dict, *keys: str) -> Any:
    for key in keys:
        value = getattr(cfg, key, None) if cfg is not None else None
        if value is None:
            value = values.get(key)
        if value is not None:
            return value
    return None


def features(config: ModelConfig, headers: list | None = None) -> dict[str, Any]:
    """What the config (and the weight headers) say about the model, builtin types only."""
    cfg = config.hf_config() if transformers_knows(config.model_type) else None
    v = config.values
    heads = _get(cfg, v, "num_attention_heads", "n_head", "num_heads")
    kv = _get(cfg, v, "num_key_value_heads", "num_kv_heads", "multi_query_group_num") or heads
    if getattr(cfg, "multi_query", False):
        kv = 1
    out: dict[str, Any] = {
        "layers": _get(cfg, v, "num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": _get(cfg, v, "hidden_size", "n_embd", "d_model"),
        "attention_heads": heads,
        "kv_heads": kv,
        "gqa_ratio": heads // kv if isinstance(heads, int) and isinstance(kv, int) and kv and heads % kv == 0 else None,
        "vocab_size": _get(cfg, v, "vocab_size", "padded_vocab_size"),
        "max_position_embeddings": _get(cfg, v, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length"),
    }
    window = _get(cfg, v, "sliding_window")
    layer_types = _get(cfg, v, "layer_types")
    if _get(cfg, v, "use_sliding_window") is False:
        window = None
    if window and isinstance(layer_types, list) and layer_types:
        sliding = sum(1 for t in layer_types if t == "sliding_attention")
        out["sliding_window"] = {"window": window, "layers": sliding, "of": len(layer_types)} if sliding else None
    else:
        out["sliding_window"] = {"window": window, "layers": out["layers"], "of": out["layers"]} if window else None
    experts = _get(cfg, v, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    if isinstance(experts, int) and experts > 1:
        out["moe"] = {"experts": experts, "per_token": _get(cfg, v, "num_experts_per_tok", "moe_top_k", "top_k")}
    else:
        out["moe"] = None
    out["rope_scaling"] = _rope_scaling(cfg, v)
    out["tied_embeddings"] = bool(_get(cfg, v, "tie_word_embeddings"))
    auto_map = v.get("auto_map")
    out["remote_code"] = {"auto_map": auto_map} if config.remote_code else None
    out["dtype"] = v.get("torch_dtype") or v.get("dtype")
    out["quantization"] = _quantization(config, headers or [])
    return out


def _rope_scaling(cfg: Any, values: dict) -> Any:
    """The non-default RoPE scaling (``rope_scaling`` in older configs, ``rope_parameters`` in
    transformers 5, possibly one table per layer type), or None."""
    found = {}
    for source in (values.get("rope_scaling"), getattr(cfg, "rope_parameters", None), values.get("rope_parameters")):
        if not isinstance(source, dict):
            continue
        tables = source.values() if all(isinstance(x, dict) for x in source.values()) and source else [source]
        for table in tables:
            kind = table.get("rope_type") or table.get("type")
            if kind and kind != "default":
                found = {k: table[k] for k in ("rope_type", "type", "factor", "original_max_position_embeddings") if k in table}
                found["rope_type"] = kind
                found.pop("type", None)
        if found:
            return found
    return None


def _quantization(config: ModelConfig, headers: list) -> dict[str, Any] | None:
    quant = config.values.get("quantization_config")
    if isinstance(quant, dict):
        return {"method": quant.get("quant_method"), "config": quant}
    for header in headers:
        if isinstance(header, GGUFHeader):
            return {"method": "gguf", "file_type": header.metadata.get("general.file_type"),
                    "tensor_types": header.tensor_types()}
    dtypes: Counter[str] = Counter()
    for header in headers:
        if isinstance(header, SafetensorsHeader):
            dtypes.update(header.dtypes())
    return {"method": None, "tensor_types": dict(dtypes.most_common())} if dtypes else None


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1}


def _size(config: ModelConfig, headers: list) -> dict[str, Any]:
    """Parameter count and bytes: from every weight file's header when the files are here (what
    the file holds), else from the config by building the model on the ``meta`` device."""
    if headers and not _missing_shards(config):
        return {
            "parameters": sum(h.n_elements for h in headers),
            "file_bytes": sum(h.n_bytes for h in headers),
            "from": "GGUF header" if isinstance(headers[0], GGUFHeader) else "safetensors headers",
        }
    out: dict[str, Any] = {"parameters": None, "file_bytes": None, "from": None}
    cfg = config.hf_config() if transformers_knows(config.model_type) else None
    if cfg is None:
        out["from"] = "unknown: transformers has no class for this model type"
        return out
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):  # shapes only: nothing is allocated or read
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:  # not a causal LM, or a config the class rejects
        out["from"] = f"unknown: the model cannot be built from the config ({type(exc).__name__})"
        return out
    out["parameters"] = sum(p.numel() for p in model.parameters())
    dtype = str(config.values.get("torch_dtype") or config.values.get("dtype") or "")
    if dtype in _DTYPE_BYTES:
        out["file_bytes"] = out["parameters"] * _DTYPE_BYTES[dtype]
    out["from"] = "config arithmetic (the model built on the meta device)"
    return out


def _missing_shards(config: ModelConfig) -> bool:
    """True when a sharded checkpoint's index names files that are not here."""
    index = config.where.parent / "model.safetensors.index.json"
    if config.source.kind == "gguf" or not index.is_file():
        return not any(p.suffix in (".safetensors", ".gguf") for p in config.weight_files)
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
    except (OSError, ValueError):
        return True
    return not all((config.where.parent / s).is_file() for s in shards)


# --- cards ---------------------------------------------------------------------------------------


def _default_cards_dir() -> Path | None:
    spec = importlib.util.find_spec("pytest_qeff")  # located, not imported (it needs pytest)
    if spec is None or not spec.submodule_search_locations:
        return None
    here = Path(spec.submodule_search_locations[0])
    for candidate in (here / "model_cards", here.parent / "model_cards"):
        if candidate.is_dir():
            return candidate
    return None


def covering_cards(source: ModelSource, model_type: str | None, cards_dir: Path | None = None) -> list[dict[str, str]]:
    """The model cards that cover this model: ``this model`` (its id, an alias or its repo id is
    what was asked for, or its repo is the model's), then ``same architecture`` (the cards whose
    tiny tier tests the model type). Cards are read as plain TOML: the library never imports the
    pytest plugin."""
    directory = cards_dir or _default_cards_dir()
    if directory is None or not directory.is_dir():
        return []
    names = {n.lower() for n in (source.name, source.repo_id or "") if n}
    exact, family = [], []
    for path in sorted(directory.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            continue
        card_id = str(data.get("id", path.stem))
        weights = data.get("weights") or {}
        keys = {card_id.lower(), str(weights.get("repo") or "").lower(), *(str(a).lower() for a in data.get("aliases", []))}
        keys.discard("")
        if names & keys:
            exact.append({"id": card_id, "covers": "this model"})
        elif model_type and data.get("architecture") == model_type:
            family.append({"id": card_id, "covers": "same architecture"})
    return sorted(exact, key=lambda c: c["id"]) + sorted(family, key=lambda c: c["id"])


# --- the report (qeff check) ---------------------------------------------------------------------


@dataclass
class SupportReport:
    name: str
    source: dict[str, Any]
    model_type: str | None
    architectures: list[str]
    supported: bool
    status: str
    reasons: list[str]
    nearest_family: str | None
    supported_model_types: list[str]
    features: dict[str, Any]
    size: dict[str, Any]
    cards: list[dict[str, str]]
    weights_loaded: bool = False  # never: the report is built from headers and the config only
    seconds: float = 0.0
    config_file: str = ""
    weight_files: list[str] = field(default_factory=list)
    tokenizer: str = ""  # where the tokenizer comes from, or why there is none (issue 19)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect(name: str, *, revision: str | None = None, cache_dir: str | None = None,
            cards_dir: Path | None = None) -> SupportReport:
    """Everything ``qeff check`` reports about ``name``, without loading a weight. Bad input (no
    such model, a corrupt weights file, an unknown model type or GGUF architecture) raises a
    :class:`~qeff.errors.UsageError`; an unsupported model is a report saying so."""
    from qeff.transforms import supported_model_types

    start = time.perf_counter()
    source = resolve(name, revision=revision, cache_dir=cache_dir)
    config = read_config(source, cache_dir=cache_dir)
    check_config(config)  # never "supported" for a config no model can be built from (issue 19)
    verdict = assess(config)
    if verdict.status == "unknown":
        raise UsageError(verdict.sentence(source.display))
    headers = check_weight_headers(config)
    if verdict.supported:
        check_weight_shapes(config, headers)
        check_tokenizer(config, files=False)  # a config-only directory can still be checked
    report = SupportReport(
        name=name,
        source={"kind": source.kind, "path": str(source.path) if source.path else None, "repo_id": source.repo_id,
                "revision": source.revision},
        model_type=verdict.model_type,
        architectures=list(config.values.get("architectures") or []),
        supported=verdict.supported,
        status=verdict.status,
        reasons=list(verdict.reasons),
        nearest_family=verdict.nearest,
        supported_model_types=supported_model_types(),
        features=features(config, headers),
        size=_size(config, headers),
        cards=covering_cards(source, verdict.model_type, cards_dir),
        config_file=str(config.where),
        weight_files=[str(p) for p in config.weight_files],
        tokenizer=_tokenizer_line(config),
    )
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _tokenizer_line(config: ModelConfig) -> str:
    if config.gguf is not None:
        return "the GGUF file's own vocabulary"
    found = tokenizer_files(config.where.parent)
    if found:
        return ", ".join(p.name for p in found)
    if config.source.kind == "local":
        return f"none: {config.where.parent} has no tokenizer files, so qeff infer and qeff verify refuse it"
    return "not in the cache yet (downloaded with the weights)"


def _bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return ""


def _feature_lines(f: dict[str, Any]) -> list[str]:
    lines = []
    if f.get("attention_heads"):
        ratio = f" (grouped-query, {f['gqa_ratio']} query heads per KV head)" if (f.get("gqa_ratio") or 1) > 1 else ""
        lines.append(f"attention       {f['attention_heads']} heads, {f['kv_heads']} KV heads{ratio}")
    sw = f.get("sliding_window")
    lines.append(f"sliding window  {sw['window']} tokens on {sw['layers']} of {sw['of']} layers" if sw else "sliding window  none")
    moe = f.get("moe")
    lines.append(f"experts         {moe['experts']} experts, {moe['per_token']} per token" if moe else "experts         none (dense)")
    rope = f.get("rope_scaling")
    lines.append("rope scaling    " + (", ".join(f"{k}={v}" for k, v in rope.items()) if rope else "none"))
    lines.append(f"tied embeddings {'yes' if f.get('tied_embeddings') else 'no'}")
    remote = f.get("remote_code")
    lines.append("remote code     " + (f"yes: {json.dumps(remote['auto_map'])}" if remote else "no"))
    q = f.get("quantization")
    if q and q.get("method") == "gguf":
        types = ", ".join(f"{k} x{v}" for k, v in q["tensor_types"].items())
        lines.append(f"quantization    GGUF tensors: {types}")
    elif q and q.get("method"):
        lines.append(f"quantization    {q['method']} (quantization_config)")
    elif q:
        lines.append("quantization    none; tensors: " + ", ".join(f"{k} x{v}" for k, v in q["tensor_types"].items()))
    else:
        lines.append(f"quantization    none declared{'; dtype ' + str(f['dtype']) if f.get('dtype') else ''}")
    return lines


def format_report(r: SupportReport) -> str:
    where = r.source["repo_id"] or r.source["path"]
    verdict = "yes" if r.supported else "NO: " + "; ".join(r.reasons)
    if not r.supported and r.nearest_family:
        verdict += f"; nearest supported family: {r.nearest_family}"
    size = r.size
    params = f"{size['parameters']:,}" if size["parameters"] is not None else "unknown"
    fp32 = f"; {_bytes(size['parameters'] * 4)} as float32 (what qeff loads)" if size["parameters"] else ""
    stored = f"; {_bytes(size['file_bytes'])} stored" if size["file_bytes"] is not None else ""
    exact = [c["id"] for c in r.cards if c["covers"] == "this model"]
    family = [c["id"] for c in r.cards if c["covers"] == "same architecture"]
    cards = ", ".join(exact) + (" (this model)" if exact else "")
    if family:
        cards += ("; " if exact else "") + f"{len(family)} card(s) of architecture {r.model_type}: {', '.join(family)}"
    lines = [
        f"{r.name}  ({r.source['kind']}: {where}; checked from {Path(r.config_file).name} in {r.seconds:.2f} s, no weights loaded)",
        f"model type      {r.model_type}" + (f" ({', '.join(r.architectures)})" if r.architectures else ""),
        f"supported       {verdict}",
        *_feature_lines(r.features),
        f"parameters      {params}{stored}{fp32}  [{size['from']}]",
        f"cards           {cards or 'none'}",
        f"tokenizer       {r.tokenizer}",
    ]
    if not r.supported:
        lines.append(f"supported types {', '.join(r.supported_model_types)}")
    return "\n".join(lines)


def run_check(name: str, *, revision: str | None = None, cache_dir: str | None = None, json_mode: bool = False) -> int:
    """``qeff check``: print the report (one JSON object with ``json_mode``); 0 when supported, 1
    when not. Bad input raises :class:`~qeff.errors.UsageError` (the CLI exits 2)."""
    report = inspect(name, revision=revision, cache_dir=cache_dir)
    print(json.dumps(report.to_dict(), default=str) if json_mode else format_report(report), flush=True)
    return 0 if report.supported else 1
