"""The retained-state model: an HF causal LM wrapped so that its KV cache is graph state.

    forward(input_ids (B,S) int64, position_ids (B,S) int64 [-1 = pad],
            past_key.0, past_value.0, …  (B, n_kv, ctx_len, head_dim) float32)
      → logits (B, 1, vocab) for the last valid position of each row,
        past_key.0_RetainedState, past_value.0_RetainedState, …  (the whole updated cache)

``transform(model)`` never changes the model it is given: the verdicts of this project compare
qeff against HF eager *on that model*, so a transform that swapped its attention class or its
experts implementation would make "HF vs transformed PyTorch" compare qeff with itself (issue 9).
The wrapper holds a structural copy instead: new module objects, a new config, the *same*
parameter and buffer tensors (one copy of the weights in memory). Everything the graph needs is
done to that copy: eval mode, eager attention, dense mixture-of-experts
(:mod:`qeff.transforms.experts`) and the module replacements its architecture declares
(``ArchSpec.replace``). The HF modules' parameters are never touched; the wrapper hands the copy
a :class:`~qeff.transforms.cache.RetainedStateCache` and a mask built from ``position_ids``.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from qeff._system import TRANSFORMS  # names of the transforms applied (one source: manifests read it without torch)
from qeff.errors import UnsupportedModelError, WeightsChangedError
from qeff.transforms.cache import RetainedStateCache
from qeff.transforms.experts import use_dense_experts
from qeff.transforms.mask import additive_mask
from qeff.transforms.registry import ArchSpec, get_spec, supported_model_types

__all__ = [
    "QEffCausalLM",
    "CacheShape",
    "transform",
    "shared_copy",
    "parameter_fingerprint",
    "fingerprint_digest",
    "check_parameters_unchanged",
]


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def past_shape(self, batch_size: int, ctx_len: int) -> tuple[int, int, int, int]:
        return (batch_size, self.num_kv_heads, ctx_len, self.head_dim)


def input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "position_ids"]
    for i in range(num_layers):
        names += [f"past_key.{i}", f"past_value.{i}"]
    return names


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"past_key.{i}_RetainedState", f"past_value.{i}_RetainedState"]
    return names


class QEffCausalLM(nn.Module):
    """See the module docstring for the contract."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        super().__init__()
        self.model = model
        self.spec = spec
        config = model.config
        n_kv, head_dim = spec.kv_shape(config)
        self.shape = CacheShape(config.num_hidden_layers, n_kv, head_dim, config.vocab_size)
        self._windows = spec.windows(config)
        decoder = spec.decoder(model)
        params = inspect.signature(decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.transforms = TRANSFORMS
        self.weights_digest: str | None = None  # set by transform(): a digest of every parameter

    @property
    def config(self):
        return self.model.config

    @property
    def input_names(self) -> list[str]:
        return input_names(self.shape.num_layers)

    @property
    def output_names(self) -> list[str]:
        return output_names(self.shape.num_layers)

    def empty_cache(self, batch_size: int, ctx_len: int) -> list[torch.Tensor]:
        shape = self.shape.past_shape(batch_size, ctx_len)
        return [torch.zeros(shape, dtype=torch.float32) for _ in range(2 * self.shape.num_layers)]

    def _masks(self, position_ids: torch.Tensor, ctx_len: int):
        masks = {t: additive_mask(position_ids, ctx_len, window=w) for t, w in self._windows.items()}
        return masks[""] if set(masks) == {""} else masks

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
        **serving: torch.Tensor | None,
    ):
        """``serving`` holds the keywords of the graph variants of :mod:`qeff.serving`:
        ``batch_index`` (B, 1), the cache rows this step runs (continuous batching; the cache then
        has ``full_batch_size`` rows); ``num_logits_to_keep`` (N, 1), read for its length only:
        return the logits of the last N positions up to each row's last valid token (B, N, vocab),
        as a speculative-decoding target needs; ``comp_ctx_lengths`` (C,), read for its length
        only: attention reads cache slots ``0 … C-1`` (the caller keeps every position of the step
        below C), while the cache is written and returned whole.

        They are ``**serving`` and not named keyword parameters because the TorchScript exporter
        fills every *named* parameter after the positional inputs with its default
        (``_decide_input_format``): with one layer (four inputs) ``num_logits_to_keep=None`` was
        appended to ``past`` and no one-layer model could be exported (issue 19)."""
        unknown = set(serving) - {"batch_index", "num_logits_to_keep", "comp_ctx_lengths"}
        if unknown:
            raise TypeError(f"forward() got unexpected keyword argument(s) {', '.join(sorted(unknown))}")
        batch_index = serving.get("batch_index")
        num_logits_to_keep = serving.get("num_logits_to_keep")
        comp_ctx_lengths = serving.get("comp_ctx_lengths")
        if len(past) != 2 * self.shape.num_layers:
            raise ValueError(f"expected {2 * self.shape.num_layers} cache tensors, got {len(past)}")
        ctx_len = past[0].shape[2]
        pairs = list(zip(past[0::2], past[1::2]))
        # The base graph builds its cache exactly as before the serving variants existed.
        cache = RetainedStateCache(pairs, position_ids) if batch_index is None else RetainedStateCache(pairs, position_ids, batch_index=batch_index)
        attended = ctx_len
        if comp_ctx_lengths is not None:
            attended = comp_ctx_lengths.shape[0]  # symbolic in the trace: one graph for every C
            cache.attend(attended)
        decoder = self.spec.decoder(self.model)
        out = decoder(
            input_ids=input_ids,
            position_ids=position_ids.clamp(min=0),  # pads: any valid position; their output is dropped
            attention_mask=self._masks(position_ids, attended),
            use_cache=True,
            **{self._cache_kw: cache},
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, S, H)
        last = position_ids.argmax(dim=1, keepdim=True)  # (B, 1): column of the last valid token
        if num_logits_to_keep is not None:
            # Columns last-N+1 … last (from 0 when fewer than N tokens precede): (B, N).
            n = num_logits_to_keep.shape[0]
            keep = torch.arange(n, dtype=last.dtype, device=last.device)[None, :]
            last = (last + 1 - n).clamp(min=0) + keep
        hidden = torch.gather(hidden, 1, last[:, :, None].expand(-1, -1, hidden.shape[-1]))  # (B, 1 or N, H)
        logits = self.spec.head(self.model, hidden).float()  # (B, 1 or N, V)
        return (logits, *cache.retained())


def parameter_fingerprint(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """name → (shape, dtype, blake2b of the bytes) for every parameter and persistent buffer."""
    out: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        t = tensor.detach().contiguous().cpu()
        digest = hashlib.blake2b(t.reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=16)
        out[name] = (tuple(t.shape), str(t.dtype), digest.hexdigest())
    return out


def check_parameters_unchanged(before: dict, after: dict) -> None:
    """Raise :class:`WeightsChangedError` naming every parameter added, removed, reshaped or changed."""
    problems = []
    for name in sorted(set(before) | set(after)):
        if name not in after:
            problems.append(f"{name}: removed")
        elif name not in before:
            problems.append(f"{name}: added")
        elif before[name][:2] != after[name][:2]:
            problems.append(f"{name}: shape/dtype {before[name][:2]} -> {after[name][:2]}")
        elif before[name][2] != after[name][2]:
            problems.append(f"{name}: values changed")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; … {len(problems) - 10} more" if len(problems) > 10 else "")
        raise WeightsChangedError(f"the transform changed {len(problems)} parameter(s): {shown}")


def _check_modules(model: nn.Module, spec: ArchSpec) -> None:
    known = spec.modules | {cls.__name__ for cls in spec.replace.values()}  # an already transformed model
    unknown = set()
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith("torch.nn.") or cls.__module__ == "transformers.activations":
            continue
        if cls.__name__ not in known:
            unknown.add(f"{cls.__module__}.{cls.__name__}")
    if unknown:
        raise UnsupportedModelError(
            f"qeff cannot transform module type(s) {', '.join(sorted(unknown))} of architecture "
            f"{spec.name!r}: they are not known to follow the retained-state cache protocol"
        )


def _replace_modules(model: nn.Module, spec: ArchSpec) -> list[str]:
    """Swap the class of each module ``spec.replace`` names for its drop-in subclass, in place."""
    applied = set()
    for module in model.modules():
        replacement = spec.replace.get(type(module).__name__)
        if replacement is not None:
            if not issubclass(replacement, type(module)):  # a drop-in keeps HF's __init__ and state
                raise UnsupportedModelError(
                    f"{replacement.__name__} replaces {type(module).__name__} of {spec.name!r} but does not subclass it"
                )
            module.__class__ = replacement
            applied.add(replacement.__name__)
    return sorted(applied)


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree, config and generation config whose parameters and buffers
    are the original tensors (shared, not copied): changing the copy's classes, modes or config
    leaves ``model`` as it was, at no cost in weight memory."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def transform(model: nn.Module, *, check_weights: bool = True) -> QEffCausalLM:
    """Wrap an HF causal LM into the retained-state contract, verifying nothing else changed.

    ``model`` itself is left untouched (its classes, config, mode and outputs): the wrapper runs a
    :func:`shared_copy` of it. Raises :class:`UnsupportedModelError` naming the architecture or
    module type it cannot handle, and :class:`WeightsChangedError` if any parameter's name, shape
    or value changed.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = get_spec(model_type) if model_type else None
    if spec is None:
        raise UnsupportedModelError(
            f"qeff cannot transform {type(model).__name__} (model_type={model_type!r}); "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    reason = spec.refuse(config)
    if reason:
        raise UnsupportedModelError(f"qeff cannot transform this {spec.name!r} model: {reason}")
    _check_modules(model, spec)
    before = parameter_fingerprint(model) if check_weights else None
    model = shared_copy(model)
    config = model.config
    model.eval()
    # Eager attention: plain MatMul/Softmax in the graph (portable to every compiler), and the
    # same arithmetic as the HF eager reference we verify against. Models whose attention reads
    # the config at run time but refuse a dynamic switch (Falcon) get it set on the copy's config.
    can_switch = getattr(model, "_can_set_attn_implementation", lambda: False)
    if config._attn_implementation != "eager" and can_switch():
        model.set_attn_implementation("eager")
    if config._attn_implementation != "eager":
        config._attn_implementation = "eager"
    extra = tuple(_replace_modules(model, spec))
    if use_dense_experts(model):
        extra += ("DenseExperts",)
    # An nn.Module starts in training mode, and the TorchScript exporter restores the wrapper's mode
    # *recursively* after export: a wrapper left in training mode switched the HF model's dropout on
    # for every later PyTorch run (GPT-2's logits moved by 0.2 after an export).
    wrapped = QEffCausalLM(model, spec).eval()
    wrapped.transforms = TRANSFORMS + extra
    if before is not None:
        after = parameter_fingerprint(wrapped.model)
        check_parameters_unchanged(before, after)
        wrapped.weights_digest = fingerprint_digest(after)
    return wrapped


def fingerprint_digest(fingerprint: dict) -> str:
    """One hex digest of every parameter's name, shape, dtype and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(fingerprint):
        h.update(repr((name, *fingerprint[name])).encode())
    return h.hexdigest()
