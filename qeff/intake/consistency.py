"""Can a model be built from this config, and run with its tokenizer? Checked before anything loads.

Issue 19 found configs no model can be built from accepted as input: ``qeff check`` said
"supported yes" for ``num_hidden_layers = -1`` and ``qeff infer`` failed after loading; a hidden
size that does not divide among the heads, a zero vocabulary, a weight whose shape disagrees with
the config, a directory without a tokenizer and a vocabulary smaller than the tokenizer's ids were
each an internal error after seconds of work, and the plugin's cardless run an INTERNALERROR. One
layer of checks now runs first; each failure is a :class:`~qeff.errors.UsageError` naming the field:

- :func:`check_config`: the sizes are positive integers, the hidden size divides among the heads
  (unless ``head_dim`` says otherwise) and the query heads among the KV heads. The config's own keys
  only (a key it leaves out takes the class default, which is valid): no transformers, no torch,
  so the CLI's preflight runs it at a cached run's start-up for free.
- :func:`check_weight_shapes`: every tensor of the safetensors files that the model built from the
  config also has must have the shape the config implies. The model is built on PyTorch's ``meta``
  device (nothing is allocated) and only the files' headers are read (no tensor data).
- :func:`check_tokenizer`: a local model directory holds tokenizer files, and the config's
  ``vocab_size`` holds every id of the tokenizer (read from ``tokenizer.json`` / ``vocab.json`` as
  JSON: no tokenizer is built). A GGUF file carries its own vocabulary, so it is consistent by
  construction; a hub model's tokenizer is checked once its files are in the cache.

Callers: ``qeff check`` (:func:`qeff.intake.support.inspect`), the CLI's argument preflight
(:func:`qeff.intake.preflight.model_shape`; a draft model too), the gate before loading
(:func:`qeff.intake.support.require_supported`) and the plugin's cardless run (:mod:`pytest_qeff.cardless`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from qeff.errors import UsageError

__all__ = ["check_config", "check_weight_shapes", "check_tokenizer", "tokenizer_files", "tokenizer_id_count"]

#: Config keys by meaning, in the spellings of the supported families (GPT-2/CodeGen's ``n_*``, MPT's
#: ``d_model``/``n_heads``/``n_layers``). Each present key must be a positive integer.
_LAYERS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
_HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
_OTHER_SIZES = ("vocab_size", "padded_vocab_size", "intermediate_size", "n_inner", "ffn_hidden_size", "head_dim",
                "max_position_embeddings", "n_positions", "num_local_experts", "num_experts", "num_experts_per_tok")

#: The decoder layer index in a checkpoint's tensor names (``model.layers.3.``, GPT-2's ``h.3.``, MPT's ``blocks.3.``).
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")

#: Files a tokenizer can be built from (transformers' fast, SentencePiece, BPE, WordPiece, tiktoken).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                    "vocab.txt", "qwen.tiktoken")


def _where(config) -> str:
    return str(config.where)


def _positive(config, key: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{_where(config)}: {key} must be a positive integer (got {value!r}); no model can be built from this config")


def _present(values: dict, keys: tuple[str, ...]) -> tuple[str, Any] | tuple[None, None]:
    for key in keys:
        if values.get(key) is not None:
            return key, values[key]
    return None, None


def check_config(config) -> None:
    """The sizes of ``config`` (a :class:`qeff.intake.configs.ModelConfig`) can build a model; else one
    sentence naming the field."""
    values = config.values
    for key in (*_LAYERS, *_HEADS, *_HIDDEN, *_KV_HEADS, *_OTHER_SIZES):
        _positive(config, key, values.get(key))
    heads_key, heads = _present(values, _HEADS)
    hidden_key, hidden = _present(values, _HIDDEN)
    if heads and hidden and values.get("head_dim") is None and hidden % heads:
        raise UsageError(
            f"{_where(config)}: {hidden_key} {hidden} is not divisible by {heads_key} {heads}, so the heads cannot "
            f"split the hidden size; no model can be built from this config"
        )
    kv = values.get("num_key_value_heads")  # the grouped-query key; Falcon's flags are read by its transform
    if heads and kv and heads % kv:
        raise UsageError(
            f"{_where(config)}: {heads_key} {heads} is not a multiple of num_key_value_heads {kv}, so the query heads "
            f"cannot share the KV heads in equal groups; no model can be built from this config"
        )


def _fields_for(values: dict, dims: list[int]) -> list[str]:
    """The config keys that made ``dims``: a key whose value is the dimension, else a product of two
    (``num_key_value_heads 3 × head_dim 16`` for a K projection of 48 rows)."""
    sizes = {k: v for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool) and v > 1
             and not k.endswith("token_id")}
    found = []
    for dim in dims:
        single = [f"{k} {v}" for k, v in sizes.items() if v == dim]
        pairs = [f"{a} {sizes[a]} × {b} {sizes[b]}" for i, a in enumerate(sizes) for b in list(sizes)[i + 1:]
                 if sizes[a] * sizes[b] == dim]
        found += single or pairs[:1]
    return found


def check_weight_shapes(config, headers: list) -> None:
    """Every tensor the safetensors ``headers`` share (by name) with the model the config builds has
    the config's shape; else one sentence naming the tensor, both shapes and the config fields
    behind the dimension that differs. Imports torch (the gate before loading pays it anyway)."""
    from qeff.intake.headers import SafetensorsHeader

    tables = [h for h in headers if isinstance(h, SafetensorsHeader)]
    if not tables:
        return  # a GGUF's tensors are mapped by transformers' loader; a pickle has no header to read
    cfg = config.hf_config()
    if cfg is None:
        return
    layers = getattr(cfg, "num_hidden_layers", None)
    stored = {int(m.group(1)) for h in tables for name in h.tensors for m in [_LAYER_INDEX.search(name)] if m}
    complete = len(stored) == max(stored, default=-1) + 1 and not _shards_missing(config)
    if isinstance(layers, int) and stored and complete and max(stored) + 1 != layers:
        # A config with more layers than the file would load the missing ones as random weights (with
        # only a warning); fewer would leave the file's extra layers unused.
        raise UsageError(
            f"{tables[0].path.name} holds {max(stored) + 1} decoder layer(s), but {config.where.name} says "
            f"num_hidden_layers {layers}; the weights and {config.where.name} do not belong together"
        )
    expected = _meta_shapes(cfg)
    if not expected:
        return
    prefix = expected.pop("", "")
    for header in tables:
        for name, info in header.tensors.items():
            want = expected.get(name) or (expected.get(f"{prefix}.{name}") if prefix else None)
            got = tuple(int(d) for d in info["shape"])
            if want is None or want == got:
                continue
            differ = [w for w, g in zip(want, got) if w != g] if len(want) == len(got) else list(want)
            because = _fields_for(config.values, differ)
            why = f" (from {', '.join(because)})" if because else ""
            raise UsageError(
                f"{header.path.name} holds {name} of shape {list(got)}, but the config builds it as {list(want)}{why}; "
                f"the weights and {config.where.name} do not belong together"
            )


def _shards_missing(config) -> bool:
    """A sharded checkpoint whose index names files that are not here (a partial download)."""
    index = config.where.parent / "model.safetensors.index.json"
    if not index.is_file():
        return False
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError):
        return True
    return not all((config.where.parent / s).is_file() for s in shards)


def _meta_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """name → shape of every parameter and buffer of the model ``cfg`` builds, on the meta device
    (``""`` → the base model prefix, for checkpoints saved without it). Empty when the class
    cannot be built from ``cfg`` (the transform's own checks speak then)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated or read
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 - not a causal LM, or a config its class rejects: no shapes to compare
        return {}
    finally:
        hf_logging.set_verbosity(level)
    shapes: dict[str, tuple[int, ...]] = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shapes[""] = getattr(model, "base_model_prefix", "") or ""  # type: ignore[assignment]
    return shapes


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files in a model directory (any one is enough to build a tokenizer)."""
    found = [directory / name for name in _TOKENIZER_FILES if (directory / name).is_file()]
    return found + sorted(directory.glob("*.tiktoken"))


def tokenizer_id_count(directory: Path) -> int | None:
    """1 + the largest token id of the tokenizer in ``directory``, read from ``tokenizer.json`` (or
    ``vocab.json`` + ``added_tokens.json``) as JSON; None when neither says (a SentencePiece model)."""
    ids: list[int] = []
    fast = directory / "tokenizer.json"
    try:
        if fast.is_file():
            data = json.loads(fast.read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):
                ids += [v for v in vocab.values() if isinstance(v, int)]
            elif isinstance(vocab, list):  # Unigram: [[piece, score], …], ids are positions
                ids.append(len(vocab) - 1)
            ids += [t["id"] for t in data.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
        elif (directory / "vocab.json").is_file():
            vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
            ids += [v for v in vocab.values() if isinstance(v, int)] if isinstance(vocab, dict) else []
            added = directory / "added_tokens.json"
            if added.is_file():
                extra = json.loads(added.read_text(encoding="utf-8"))
                ids += [v for v in extra.values() if isinstance(v, int)] if isinstance(extra, dict) else []
    except (OSError, ValueError, AttributeError):
        return None  # an unreadable tokenizer is the tokenizer loader's to report
    return max(ids) + 1 if ids else None


def check_tokenizer(config, *, what: str = "", files: bool = True, ids: bool = True) -> None:
    """A local model directory has a tokenizer (``files``; ``qeff check`` and the plugin's tiny
    tier need none), and (``ids``) the config's ``vocab_size`` holds every id of it. ``what`` names
    the model's role in the message (e.g. ``"--draft_model_name "``)."""
    if config.gguf is not None:
        return  # the vocabulary is the file's own token list
    directory = config.where.parent
    found = tokenizer_files(directory)
    if not found:
        if files and config.source.kind == "local":
            raise UsageError(
                f"{what}{directory} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:5])}, …), so its text cannot "
                f"be tokenized; save the model's tokenizer into it (tokenizer.save_pretrained)"
            )
        return  # a hub model: its tokenizer files come with the download
    vocab = config.values.get("vocab_size")
    if not ids or not isinstance(vocab, int) or isinstance(vocab, bool):
        return
    count = tokenizer_id_count(directory)
    if count is not None and vocab < count:
        raise UsageError(
            f"{what}{config.where.name}: vocab_size {vocab} is smaller than its tokenizer's {count} token ids (the "
            f"largest is {count - 1}): the embedding has no row for ids from {vocab} on; use the model's own tokenizer, "
            f"or a config whose vocab_size is at least {count}"
        )
