"""Cards built on the fly: ``pytest --qeff-model ./checkpoint`` (or a ``.gguf`` file, or a hub repo
id in the local cache) with no card that names it.

The card is built from the model's config alone (:mod:`qeff.intake.configs`, no weight is read), after
:mod:`qeff.intake.support` has said the architecture is supported (a refusal is a usage error naming it):

- ``[config]``: the real config: the schema's standard keys read through the config class (so
  GPT-2's ``n_embd`` is ``hidden_size``), every other key of ``config.json`` that a card can hold
  in ``[config.extra]`` (keys it cannot hold, e.g. nested tables, are listed in the description);
- ``[tiny]``: the same architecture and features, shrunk: 2 layers (more when per-layer patterns
  need them to show every layer kind), query heads per KV head kept (GQA ratio; two KV heads when
  that makes at most 4 query heads), 16-dim heads (8 or 4 when the ratio needs many heads), the
  FFN width kept in proportion (at most 4x the hidden size), a sliding window of
  16 tokens (the tiny prompts of 24 tokens plus 16 generated cross it), at most 4 experts and 2 per
  token, partial-rotary dims scaled with the head, per-layer lists cut to the tiny depth, a
  256-token vocabulary (special token ids beyond it moved to 0); scaled RoPE keeps its type, its
  per-frequency factor lists (LongRoPE) resampled to the tiny rotary dimensions and the original
  context it scales from shrunk to 16 tokens, so that the tiny prompts reach the scaled regime;
- the full tier runs on the weights themselves (``[weights]`` names the directory, file or repo);
- two cases: batch 1 (``bs1-pl32-cl128``) and a padded batch of 2 prefilled in 16-token chunks
  (``bs2-pl16-cl64``).

``--qeff-write-card [PATH]`` saves such a card as TOML (:func:`dumps`); it loads back through
:func:`pytest_qeff.cards.load_card` unchanged.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pytest_qeff.cards import ArchConfig, Card

__all__ = ["build", "card_for", "dumps", "toml", "write"]

#: config.json keys that describe the file, not the architecture.
_META_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "_name_or_path", "_model_name_or_path",
    "torch_dtype", "dtype", "quantization_config", "task_specific_params", "id2label", "label2id", "_commit_hash",
    "use_cache", "return_dict", "output_hidden_states", "output_attentions", "torchscript", "_attn_implementation",
})
_STANDARD = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "max_position_embeddings", "head_dim", "rope_theta", "rms_norm_eps", "sliding_window",
             "tie_word_embeddings", "bos_token_id", "eos_token_id")
_KV_KEYS = frozenset({"num_kv_heads", "n_head_kv", "multi_query_group_num"})
_EXPERT_KEYS = frozenset({"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"})
_TOPK_KEYS = frozenset({"num_experts_per_tok", "moe_top_k", "num_experts_per_token", "top_k"})
_WIDTH_KEYS = frozenset({"n_inner", "ffn_hidden_size"})
_TINY_VOCAB = 256
_TINY_WINDOW = 16
_TINY_ORIGINAL_CONTEXT = 16  # the context scaled RoPE scales from, in the tiny tier
_MAX_TINY_LAYERS = 8


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return slug or "model"


def _value_ok(key: str, value: Any) -> bool:
    """Whether ``[config.extra]`` can hold this value (what the card schema accepts)."""
    try:
        ArchConfig.model_validate(dict(_PROBE, extra={key: value}))
        return True
    except ValidationError:
        return False


_PROBE = dict(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1, num_key_value_heads=1,
              vocab_size=8, max_position_embeddings=8)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _real_config(model_type: str, values: dict[str, Any], cfg: Any) -> tuple[dict[str, Any], list[str]]:
    """The card's ``[config]`` (standard keys + extra) and the keys it could not hold."""
    heads = cfg.num_attention_heads
    kv = _first(values.get("num_key_value_heads"), *(values.get(k) for k in _KV_KEYS),
                1 if values.get("multi_query") else None, getattr(cfg, "num_key_value_heads", None), heads)
    hidden = cfg.hidden_size
    rope = values.get("rope_parameters") if isinstance(values.get("rope_parameters"), dict) else {}
    std: dict[str, Any] = {
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": hidden,
        "intermediate_size": _first(getattr(cfg, "intermediate_size", None), *(values.get(k) for k in _WIDTH_KEYS),
                                    (values.get("expansion_ratio") or 4) * hidden),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": _first(getattr(cfg, "max_position_embeddings", None), values.get("max_seq_len"),
                                          values.get("n_positions"), values.get("seq_length"), 2048),
        "head_dim": values.get("head_dim"),
        "rope_theta": _first(values.get("rope_theta"), rope.get("rope_theta")),
        "rms_norm_eps": values.get("rms_norm_eps"),
        "sliding_window": values.get("sliding_window"),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "bos_token_id": values.get("bos_token_id"),
        "eos_token_id": values.get("eos_token_id"),
    }
    std = {k: v for k, v in std.items() if v is not None}
    # Keys the config class maps the standard names to (GPT-2's n_embd for hidden_size) would
    # override the tiny sizes: the standard name carries them.
    aliased = {v for k, v in getattr(cfg, "attribute_map", {}).items() if k in _STANDARD}
    extra, dropped = {}, []
    for key, value in values.items():
        if key in _META_KEYS or key in _STANDARD or key in aliased or value is None:
            continue
        if _value_ok(key, value):
            extra[key] = value
        else:
            dropped.append(key)
    return {**std, "extra": extra}, sorted(dropped)


def _tiny_layers(real: dict[str, Any], cfg: Any) -> int:
    """2, or the shortest prefix of the per-layer patterns that shows every kind of layer."""
    n_real = real["num_hidden_layers"]
    need = 2
    patterns = [v for v in real["extra"].values() if isinstance(v, list) and len(v) == n_real]
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n_real:
        patterns.append(layer_types)
    for pattern in patterns:
        for kind in set(map(str, pattern)):
            need = max(need, [str(x) for x in pattern].index(kind) + 1)
    return min(n_real, need, _MAX_TINY_LAYERS) if n_real > 1 else 1


def _tiny(real: dict[str, Any], cfg: Any) -> dict[str, Any]:
    heads, kv = real["num_attention_heads"], real["num_key_value_heads"]
    ratio = heads // kv
    kv_t = min(kv, 2) if ratio * min(kv, 2) <= 4 else 1  # two KV heads where cheap: grouping across heads shows
    heads_t = kv_t * ratio
    head_dim_t = 16 if heads_t <= 8 else 8 if heads_t <= 16 else 4
    real_head_dim = real.get("head_dim") or real["hidden_size"] // heads
    explicit_head_dim = real.get("head_dim") not in (None, real["hidden_size"] // heads)
    hidden_t = 64 if explicit_head_dim else heads_t * head_dim_t
    width = max(16, 8 * math.ceil(hidden_t * min(real["intermediate_size"] / real["hidden_size"], 4) / 8))
    layers_t = _tiny_layers(real, cfg)
    tiny: dict[str, Any] = {
        "num_hidden_layers": layers_t,
        "hidden_size": hidden_t,
        "intermediate_size": width,
        "num_attention_heads": heads_t,
        "num_key_value_heads": kv_t,
        "vocab_size": _TINY_VOCAB,
        "seed": 0,
    }
    if explicit_head_dim:
        tiny["head_dim"] = head_dim_t
    if real.get("sliding_window"):
        tiny["sliding_window"] = min(real["sliding_window"], _TINY_WINDOW)
    extra: dict[str, Any] = {}
    experts_t = None
    for key, value in real["extra"].items():
        if isinstance(value, bool) or not isinstance(value, (int, list)):
            continue
        if key in _KV_KEYS and value == kv:
            extra[key] = kv_t
        elif key in _EXPERT_KEYS and isinstance(value, int) and value > 1:
            extra[key] = experts_t = min(value, 4)
        elif (key in _WIDTH_KEYS or key.endswith("intermediate_size")) and isinstance(value, int):
            extra[key] = max(8, 8 * math.ceil(hidden_t * value / real["hidden_size"] / 8))
        elif key == "rotary_dim" and isinstance(value, int):
            extra[key] = max(2, 2 * round(value * head_dim_t / real_head_dim / 2))
        elif key.endswith("_token_id") and isinstance(value, int) and value >= _TINY_VOCAB:
            extra[key] = 0
        elif isinstance(value, list) and len(value) == real["num_hidden_layers"]:
            extra[key] = value[:layers_t]
        elif key == "first_k_dense_replace" and isinstance(value, int):
            extra[key] = min(value, layers_t - 1)
    _tiny_rope(real, tiny, extra, head_dim_t)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the card clears bos/eos: the class default
        value = getattr(cfg, key, None)                              # returns, and may not fit the tiny vocab
        if isinstance(value, int) and value >= _TINY_VOCAB:
            extra[key] = 0
    for key, value in real["extra"].items():
        if key in _TOPK_KEYS and isinstance(value, int) and not isinstance(value, bool):
            extra[key] = min(value, 2, experts_t or value)
    if extra:
        tiny["extra"] = extra
    return tiny


def _resample(factors: list, n: int) -> list:
    """``n`` entries spread evenly over a per-frequency factor list (first and last kept)."""
    if n <= 1:
        return factors[:1]
    return [factors[round(i * (len(factors) - 1) / (n - 1))] for i in range(n)]


def _shrink_rope_table(table: dict[str, Any], half: int) -> dict[str, Any]:
    out = dict(table)
    for key in ("short_factor", "long_factor"):
        if isinstance(out.get(key), list) and out[key]:
            out[key] = _resample(out[key], half)  # LongRoPE: one factor per rotary frequency
    if isinstance(out.get("original_max_position_embeddings"), int):
        out["original_max_position_embeddings"] = _TINY_ORIGINAL_CONTEXT
    return out


def _tiny_rope(real: dict[str, Any], tiny: dict[str, Any], extra: dict[str, Any], head_dim_t: int) -> None:
    """Scaled RoPE in the tiny tier: the same scaling type, its per-frequency factor lists resampled
    to the tiny rotary dimensions, and the original context it scales from shrunk to 16 tokens, so
    the tiny prompts (24 tokens) reach the scaled regime (LongRoPE switches factor sets there)."""
    fraction = real["extra"].get("partial_rotary_factor", 1.0)
    half = max(1, int(head_dim_t * (fraction if isinstance(fraction, (int, float)) else 1.0)) // 2)
    original = real["extra"].get("original_max_position_embeddings")
    for key in ("rope_scaling", "rope_parameters"):
        table = real["extra"].get(key)
        if not isinstance(table, dict) or not table:
            continue
        if all(isinstance(v, dict) for v in table.values()):  # one table per layer type
            extra[key] = {kind: _shrink_rope_table(t, half) for kind, t in table.items()}
        else:
            extra[key] = _shrink_rope_table(table, half)
        original = original or table.get("original_max_position_embeddings")
    if isinstance(original, int) and original > 0:
        if "original_max_position_embeddings" in real["extra"]:
            extra["original_max_position_embeddings"] = _TINY_ORIGINAL_CONTEXT
        # Keep the ratio the scaling is computed from (LongRoPE's attention factor uses it).
        tiny["max_position_embeddings"] = max(_TINY_ORIGINAL_CONTEXT * max(1, round(real["max_position_embeddings"] / original)), 256)


def build(name: str, existing: set[str] | frozenset[str] = frozenset()) -> Card:
    """A card for the model ``name`` (a directory, ``.gguf`` file or hub repo id), from its config.
    Raises :class:`pytest.UsageError` for a model that cannot be found, is not supported, or whose
    weight files are corrupt."""
    from qeff.intake.configs import check_weight_headers, read_config
    from qeff.intake.consistency import check_config, check_tokenizer, check_weight_shapes
    from qeff.errors import QEffError
    from qeff.intake.loading import resolve
    from qeff.intake.support import assess

    try:
        source = resolve(name)
        config = read_config(source)
        check_config(config)  # sizes no model can be built from (issue 19: an INTERNALERROR here)
        verdict = assess(config)
        if not verdict.supported:
            raise pytest.UsageError(f"--qeff-model {verdict.sentence(name)}")
        check_weight_shapes(config, check_weight_headers(config))
        check_tokenizer(config, files=False)  # the tiny tier needs no tokenizer; a too large one is still wrong
        cfg = config.hf_config()
    except QEffError as exc:
        raise pytest.UsageError(f"--qeff-model {name}: {exc}") from None
    model_type = verdict.model_type
    real, dropped = _real_config(model_type, config.values, cfg)
    if source.kind == "hub":
        weights = {"source": "hub", "repo": source.repo_id, "revision": source.revision or "main"}
        stem = source.repo_id.rsplit("/", 1)[-1]
    elif source.kind == "local":
        weights = {"source": "local", "path": str(source.path)}
        stem = source.path.name
    else:
        weights = {"source": "gguf", "path": str(source.path)}
        stem = source.path.stem
    card_id = _slug(stem)
    if card_id in existing:
        card_id = f"{card_id}-cardless"
    note = f" Keys a card cannot hold, left to the config class's defaults in the tiny tier: {', '.join(dropped)}." if dropped else ""
    data = {
        "id": card_id,
        "name": f"{stem} (cardless)",
        "architecture": model_type,
        "description": (
            f"Built from {config.where} by pytest --qeff-model {name} (no card named it): the real config, and a "
            f"tiny tier of the same architecture and features, shrunk.{note}"
        ),
        "weights": weights,
        "config": real,
        "tiny": _tiny(real, cfg),
        "cases": [{"batch_size": 1, "prompt_len": 32, "ctx_len": 128}, {"batch_size": 2, "prompt_len": 16, "ctx_len": 64}],
        "prompts": {"text": ["My name is", "The capital of France is"], "tiny_lengths": [24, 9], "generation_len": 16},
    }
    try:
        return Card.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise pytest.UsageError(f"--qeff-model {name}: no card can be built from its config ({problems})") from None


def _is_path(pattern: str) -> bool:
    return Path(pattern).expanduser().exists() or pattern.endswith(".gguf") or pattern.startswith((".", "/", "~"))


def card_for(pattern: str, existing: set[str] | frozenset[str] = frozenset()) -> Card | None:
    """The fallback of :func:`pytest_qeff.cards.select`: a built card when ``pattern`` names a model
    here (a path, or a hub repo id in the local cache); None when it is no model (a mistyped card
    name or repo id: the caller then names the closest cards)."""
    if _is_path(pattern):
        return build(pattern, existing)
    if "/" in pattern:
        from qeff.intake.loading import _hub_cached

        if _hub_cached(pattern, None, None):
            return build(pattern, existing)
    return None


# --- TOML -----------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _table(lines: list[str], prefix: str, data: dict[str, Any]) -> None:
    plain = {k: v for k, v in data.items() if v is not None and not isinstance(v, dict)
             and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}
    for key, value in plain.items():
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in data.items():
        path = f"{prefix}.{_key(key)}" if prefix else _key(key)
        if isinstance(value, dict) and value:
            lines += ["", f"[{path}]"]
            _table(lines, path, value)
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for item in value:
                lines += ["", f"[[{path}]]"]
                _table(lines, path, item)


def toml(data: dict[str, Any], header: str = "") -> str:
    """``data`` as a TOML document: scalars and lists of a table first, then its sub-tables
    (``[a.b]``) and arrays of tables (``[[a.c]]``); None values are left out (TOML has no null)."""
    lines = [f"# {header}"] if header else []
    _table(lines, "", data)
    return "\n".join(lines).lstrip("\n") + "\n"


def dumps(card: Card) -> str:
    """``card`` as a TOML model card (the keys that differ from the schema's defaults)."""
    data = card.model_dump(mode="json", exclude_defaults=True)
    data = {"id": card.id, "name": card.name, **data}  # required keys first, whatever their values
    return toml(data, "A model card built by pytest --qeff-write-card from the model's config; edit and commit it.")


def write(card: Card, target: Path) -> Path:
    """Write ``card`` to ``target`` (a ``.toml`` file, or a directory: ``<dir>/<id>.toml``) and
    check that it loads back, through the normal loader, as the same card."""
    from pytest_qeff.cards import load_card

    path = target if target.suffix == ".toml" else target / f"{card.id}.toml"
    if path.suffix == ".toml" and path.stem != card.id:
        raise pytest.UsageError(f"--qeff-write-card {target}: a card's file is named by its id: use {path.parent / (card.id + '.toml')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(card), encoding="utf-8")
    loaded = load_card(path)
    if loaded != card:  # a writer bug, not a user mistake: say so loudly
        raise AssertionError(f"the card written to {path} does not load back as the card built in memory")
    return path
