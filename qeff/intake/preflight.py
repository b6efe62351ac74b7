"""The shape of a model's KV cache, known before anything slow reads the model.

``model_shape(source)`` reads what :mod:`qeff.intake.configs` reads (``config.json``, or a GGUF header
through :mod:`qeff.intake.headers`) plus the weight files' headers — milliseconds, no tensor data — and
returns a :class:`ModelShape` for :func:`qeff.validation.check_memory`. A config or header that
cannot be read is one sentence from those modules (exit 2); an architecture qeff does not support
returns None here and is refused by the support gate (:mod:`qeff.intake.support`) before loading. The
common config keys are read directly (no transformers, no torch: a cached run's start-up).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelShape", "model_shape", "check_draft"]


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    weight_bytes: int | None = None  # fp32 bytes of the weights once loaded, when the headers say
    vocab_size: int = 0  # 0 where the config does not say: the buffers it sizes are then not counted
    hidden_size: int = 0
    num_heads: int = 0
    intermediate_size: int = 0
    #: fp32 bytes of one vocabulary table (vocab × hidden × 4), when the config says: the export holds
    #: it more times than a decoder layer's weights (a tied table is traced as two), so
    #: :mod:`qeff.memory` prices it apart
    embedding_bytes: int | None = None
    tied: bool = True  # the output head is the embedding table (unknown: assumed, the costlier export)

    def cache_bytes(self, batch_size: int, ctx_len: int) -> int:
        """fp32 K and V of every layer: [batch_size, n_kv, ctx_len, head_dim] × 2 × layers × 4 bytes."""
        return 2 * self.num_layers * batch_size * self.num_kv_heads * ctx_len * self.head_dim * 4

    def buffer_bytes(self, batch_size: int, prompt_len: int, ctx_len: int) -> dict[str, int]:
        """What a run allocates besides the weights and the KV cache, by buffer (issue 19: a preflight
        that counted only the cache let ``--batch_size 100000`` through to die in the allocator):

            logits       [B, prompt_len, vocab] fp32: a prefill chunk's (HF's reference keeps every
                         position's; the runtimes' graph keeps 1, the speculative target K + 1)
            attention    [B, heads, prompt_len, ctx_len] fp32 × 2 + [B, 1, prompt_len, ctx_len]: one
                         layer's scores and probabilities (eager attention reads every slot), the mask
            activations  [B, prompt_len, hidden + 2 × intermediate] fp32: one layer's residual and MLP
            token ids    [B, ctx_len] int64: the generated tokens

        One layer's at a time (a runtime frees a layer's buffers before the next): the least the run
        needs, not a sum over layers."""
        rows = batch_size * prompt_len
        return {
            "logits": 4 * rows * self.vocab_size,
            "attention scores": 4 * rows * ctx_len * (2 * self.num_heads + 1) if self.num_heads else 0,
            "activations": 4 * rows * (self.hidden_size + 2 * self.intermediate_size),
            "token ids": 8 * batch_size * ctx_len,
        }


def model_shape(source, *, cache_dir: str | None = None) -> ModelShape | None:
    """The cache shape of ``source`` (a :class:`qeff.intake.loading.ModelSource`), or None when its config
    does not say (a hub model not in the cache, an architecture qeff does not support)."""
    if source.kind == "hub" and source.repo_id is None:
        return None
    from qeff.intake.configs import check_weight_headers, read_config
    from qeff.errors import UsageError

    try:
        config = read_config(source, cache_dir=cache_dir)
    except UsageError:
        if source.kind == "hub":
            return None  # not in the local cache: the loader says what it can
        raise
    from qeff.intake.consistency import check_config

    check_config(config)  # sizes no model can be built from: one sentence now, not after loading (issue 19)
    try:
        headers = check_weight_headers(config)  # a truncated or corrupt weights file: one sentence now
    except UsageError:
        # An architecture qeff cannot run is the answer that matters even when its weights are also
        # bad (issue 11): the support gate's order. Only this error path pays the gate's imports.
        from qeff.intake.support import require_supported

        require_supported(source, cache_dir=cache_dir)
        raise
    shape = _plain_shape(config.values)
    if shape is None:
        shape = _spec_shape(config)
    if shape is None:
        return None
    layers, n_kv, head_dim = shape
    weights = 4 * sum(h.n_elements for h in headers) if headers else None
    vocab = _first(config.values, "vocab_size", "n_vocab", "padded_vocab_size")
    hidden = _first(config.values, "hidden_size", "n_embd", "d_model")
    table = 4 * vocab * hidden if vocab and hidden else None
    if table is not None and weights is not None:
        table = min(table, weights)
    tied = config.values.get("tie_word_embeddings")
    return ModelShape(layers, n_kv, head_dim, weight_bytes=weights, embedding_bytes=table, tied=tied is not False,
                      **_buffer_dims(config.values))


def _buffer_dims(values: dict) -> dict[str, int]:
    """The sizes :meth:`ModelShape.buffer_bytes` reads, from the config's own keys (0 when absent)."""
    hidden = _first(values, "hidden_size", "n_embd", "d_model") or 0
    return {
        "vocab_size": _first(values, "vocab_size", "padded_vocab_size") or 0,
        "hidden_size": hidden,
        "num_heads": _first(values, "num_attention_heads", "n_head", "n_heads", "num_heads") or 0,
        "intermediate_size": _first(values, "intermediate_size", "n_inner", "ffn_hidden_size") or 4 * hidden,
    }


def _first(values: dict, *keys: str):
    return next((values[k] for k in keys if isinstance(values.get(k), int) and values[k] > 0), None)


def _plain_shape(values: dict) -> tuple[int, int, int] | None:
    """(layers, KV heads, head_dim) read from the config's own keys, without transformers: building
    a transformers config class imports torch (1.5 s), which a cached run must not pay (issue 12's
    3 s to the first token). None when the keys are not the common ones (then :func:`_spec_shape`).
    Falcon's flags are read as its transform reads them (multi-query: one KV head; the new decoder
    architecture: one per query head before transformers 5.25, its ``num_kv_heads`` groups after)."""
    layers = _first(values, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
    heads = _first(values, "num_attention_heads", "n_head", "n_heads", "num_heads")
    hidden = _first(values, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None or hidden is None:
        return None
    if values.get("model_type") == "falcon" and values.get("new_decoder_architecture"):
        from qeff.compat import falcon_cache_per_query_head

        n_kv = heads if falcon_cache_per_query_head() else (_first(values, "num_kv_heads", "num_key_value_heads") or heads)
    elif values.get("multi_query") is True:
        n_kv = 1
    else:
        n_kv = _first(values, "num_key_value_heads", "num_kv_heads") or heads
    head_dim = _first(values, "head_dim") or hidden // heads
    return layers, n_kv, head_dim


def _spec_shape(config) -> tuple[int, int, int] | None:
    """The same through the transformers config class and qeff's architecture spec (slow: imports
    torch), for configs whose keys :func:`_plain_shape` does not know."""
    from qeff.transforms.registry import get_spec

    import qeff.transforms  # noqa: F401  (registers the built-in architectures)

    hf = config.hf_config()
    spec = get_spec(hf.model_type) if hf is not None else None
    if spec is None:
        return None  # the support gate refuses it, with the nearest family, before loading
    try:
        n_kv, head_dim = spec.kv_shape(hf)
        return int(hf.num_hidden_layers), int(n_kv), int(head_dim)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None


def check_draft(source, *, cache_dir: str | None = None) -> None:
    """The draft model of speculative decoding (``--draft_model_name``), checked like the target
    before any work: its config can build a model, and its vocabulary holds its tokenizer's ids (the
    draft proposes the target's token ids; a smaller embedding indexes out of range, issue 19)."""
    from qeff.intake.configs import read_config
    from qeff.intake.consistency import check_config, check_tokenizer
    from qeff.errors import UsageError

    if source.kind == "hub" and source.repo_id is None:
        return
    try:
        config = read_config(source, cache_dir=cache_dir)
    except UsageError:
        if source.kind == "hub":
            return  # not in the local cache: the loader says what it can
        raise
    try:
        check_config(config)
        check_tokenizer(config)
    except UsageError as exc:
        raise UsageError(f"--draft_model_name {source.name}: {exc}") from None
