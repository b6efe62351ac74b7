"""The shape of a model's KV cache, known before anything slow reads the model.

``model_shape(source)`` reads what :mod:`qeff.configs` reads (``config.json``, or a GGUF header
through :mod:`qeff.headers`) plus the weight files' headers — milliseconds, no tensor data — and
returns a :class:`ModelShape` for :func:`qeff.validation.check_memory`. A config or header that
cannot be read is one sentence from those modules (exit 2); an architecture qeff does not support
returns None here and is refused by the support gate (:mod:`qeff.support`) before loading.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelShape", "model_shape"]


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    weight_bytes: int | None = None  # fp32 bytes of the weights once loaded, when the headers say

    def cache_bytes(self, batch_size: int, ctx_len: int) -> int:
        """fp32 K and V of every layer: [batch_size, n_kv, ctx_len, head_dim] × 2 × layers × 4 bytes."""
        return 2 * self.num_layers * batch_size * self.num_kv_heads * ctx_len * self.head_dim * 4


def model_shape(source, *, cache_dir: str | None = None) -> ModelShape | None:
    """The cache shape of ``source`` (a :class:`qeff.loading.ModelSource`), or None when its config
    does not say (a hub model not in the cache, an architecture qeff does not support)."""
    if source.kind == "hub" and source.repo_id is None:
        return None
    from qeff.configs import check_weight_headers, read_config
    from qeff.errors import UsageError
    from qeff.transforms.registry import get_spec

    import qeff.transforms  # noqa: F401  (registers the built-in architectures)

    try:
        config = read_config(source, cache_dir=cache_dir)
    except UsageError:
        if source.kind == "hub":
            return None  # not in the local cache: the loader says what it can
        raise
    hf = config.hf_config()
    spec = get_spec(hf.model_type) if hf is not None else None
    if spec is None:
        return None  # the support gate refuses it, with the nearest family, before loading
    headers = check_weight_headers(config)  # a truncated or corrupt weights file: one sentence now
    try:
        n_kv, head_dim = spec.kv_shape(hf)
        layers = int(hf.num_hidden_layers)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    weights = 4 * sum(h.n_elements for h in headers) if headers else None
    return ModelShape(layers, int(n_kv), int(head_dim), weight_bytes=weights)
