"""A model's Hugging Face config, read without its weights, for every kind of source.

    hub id     config.json from the Hugging Face cache (downloaded alone when online and absent)
    directory  its config.json
    .gguf      the file's header (:mod:`qeff.intake.headers`), mapped to HF config keys the way
               transformers' GGUF loader maps them (``load_gguf_checkpoint``): the same key tables
               (``GGUF_CONFIG_MAPPING``), the same architecture renames (``qwen3moe`` → ``qwen3_moe``,
               ``gemma3`` → ``gemma3_text``, a llama named "mistral" → ``mistral``), tied embeddings
               when the file has no ``output.weight``, the vocabulary size from the token list.
               ``tests/test_support.py`` checks the result equals transformers' own on real and
               synthetic files.

Nothing here opens tensor data; weight files are only listed, and their headers read on request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qeff.errors import ModelNotFoundError, UsageError
from qeff.intake.headers import GGUFHeader, StringArray, read_gguf_header, read_safetensors_header
from qeff.intake.loading import ModelSource

__all__ = ["ModelConfig", "read_config", "check_weight_headers", "gguf_config", "gguf_architectures", "transformers_knows"]

#: Prefixes of ``GGUF_CONFIG_MAPPING`` that are not architectures.
_NOT_ARCHITECTURES = frozenset({"general", "tokenizer"})


@dataclass
class ModelConfig:
    """What a source says about its model before any weight is read."""

    source: ModelSource
    values: dict[str, Any]  # config.json as a dict (GGUF: mapped from the header)
    where: Path  # the file the values came from
    weight_files: list[Path] = field(default_factory=list)  # present on this machine
    gguf: GGUFHeader | None = None
    gguf_architecture: str | None = None  # general.architecture, as written in the file
    gguf_loadable: bool = True  # transformers can map this GGUF architecture

    @property
    def model_type(self) -> str | None:
        value = self.values.get("model_type")
        return value if isinstance(value, str) and value else None

    @property
    def remote_code(self) -> bool:
        """The modeling code ships in the repository (``auto_map``), not in transformers."""
        return bool(self.values.get("auto_map")) and not transformers_knows(self.model_type)

    def hf_config(self):
        """The transformers config object (class defaults filled in), or None when transformers has
        no class for this model type (remote code, or an unknown type)."""
        if not transformers_knows(self.model_type):
            return None
        from transformers import CONFIG_MAPPING

        values = {k: v for k, v in self.values.items() if k not in ("model_type", "auto_map")}
        from huggingface_hub.errors import StrictDataclassError

        try:
            return CONFIG_MAPPING[self.model_type].from_dict(values)
        except (TypeError, ValueError, KeyError, StrictDataclassError) as exc:
            # transformers 5 validates configs as strict dataclasses; its error is not a ValueError
            # and its message starts on the second line (issue 19: an INTERNALERROR in the plugin).
            why = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise UsageError(f"{self.where} is not a valid {self.model_type!r} config: {why}") from None


def transformers_knows(model_type: str | None) -> bool:
    if not model_type:
        return False
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def gguf_architectures() -> list[str]:
    """The ``general.architecture`` values transformers can load from a GGUF file."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return sorted(set(GGUF_CONFIG_MAPPING) - _NOT_ARCHITECTURES)


def _renamed_architecture(architecture: str, name: Any) -> str:
    """transformers' ``load_gguf_checkpoint`` renames (llama.cpp names some families differently)."""
    # Its test is list membership of the whole general.name (`"mistral" in [name]`), kept as is.
    if "llama" in architecture and "mistral" in [name]:
        return "mistral"
    for fragment, renamed in (("qwen2moe", "qwen2_moe"), ("gpt_oss", "gpt_oss"), ("gpt-oss", "gpt_oss"),
                              ("qwen3moe", "qwen3_moe"), ("minimax-m2", "minimax_m2")):
        if fragment in architecture:
            return renamed
    return architecture


def gguf_config(header: GGUFHeader) -> tuple[dict[str, Any], bool]:
    """``(config dict, loadable)``: the HF config transformers would build from this header, and
    whether transformers can load the architecture at all (when not, ``model_type`` is the raw
    architecture so that the caller can name it)."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    architecture = header.architecture
    if architecture is None:
        raise UsageError(f"{header.path.name} has no general.architecture in its GGUF header, so its model is unknown")
    updated = _renamed_architecture(architecture, header.metadata.get("general.name"))
    known = gguf_architectures()
    if architecture not in known and updated not in known:
        return {"model_type": architecture}, False
    config: dict[str, Any] = {}
    config["tie_word_embeddings"] = (
        all(t.name != "output.weight" for t in header.tensors) or architecture in ("falcon", "bloom")
    )
    for key, value in (GGUF_CONFIG_DEFAULTS_MAPPING.get(updated) or GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture) or {}).items():
        config.setdefault(key, value)
    for key, value in header.metadata.items():
        key = key.replace(architecture, updated)
        prefix, _, rest = key.partition(".")
        renames = GGUF_CONFIG_MAPPING.get(prefix)
        if not renames or rest not in renames or renames[rest] in (None, -1):
            continue
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, updated)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        config[renames[rest]] = value
    if config.get("model_type") == "gemma3":  # the GGUF holds only the text backbone
        config["model_type"] = "gemma3_text"
    if config.get("model_type") == "gemma4":
        config["model_type"] = "gemma4_text"
        config["eos_token_id"] = [1, 106, 50]
    if updated == "gpt_oss":
        rope_type = header.metadata.get("gpt-oss.rope.scaling.type")
        if rope_type is not None:
            scaling: dict[str, Any] = {"rope_type": rope_type}
            for key, value in header.metadata.items():
                suffix = key.removeprefix("gpt-oss.rope.scaling.")
                if suffix == key or suffix == "type":
                    continue
                if suffix in ("factor", "attention_factor", "beta_fast", "beta_slow"):
                    value = float(value)
                elif suffix in ("original_context_length", "original_max_position_embeddings"):
                    suffix, value = "original_max_position_embeddings", int(value)
                scaling[suffix] = value
            config["rope_scaling"] = scaling
    if "vocab_size" not in config:
        tokens = header.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, StringArray):
            config["vocab_size"] = tokens.count
        elif isinstance(tokens, list):
            config["vocab_size"] = len(tokens)
    return config, True


def _weight_files(directory: Path) -> list[Path]:
    found = []
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf"):
        found += [p for p in sorted(directory.glob(pattern)) if p.is_file() and p.name != "training_args.bin"]
    return found


def _hub_config_path(source: ModelSource, cache_dir: str | None) -> Path:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.repo_id, "config.json", cache_dir=cache_dir, revision=source.revision)
    if isinstance(found, str):
        return Path(found)
    from qeff.intake.loading import _offline

    if _offline():
        raise ModelNotFoundError(f"{source.repo_id}: config.json is not in the Hugging Face cache (offline mode is on)")
    from huggingface_hub import hf_hub_download

    try:  # the config alone: a few kilobytes, never the weights
        return Path(hf_hub_download(source.repo_id, "config.json", revision=source.revision, cache_dir=cache_dir))
    except Exception as exc:  # the hub's errors (not found, gated, network) all mean: no config
        raise ModelNotFoundError(f"{source.repo_id}: could not fetch its config.json ({str(exc).splitlines()[0]})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable JSON config: {exc}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path} is not a JSON object, so it is not a Hugging Face config")
    return values


def read_config(source: ModelSource, *, cache_dir: str | None = None) -> ModelConfig:
    """The config of ``source`` (see the module doc); weights are listed, never read."""
    if source.kind == "gguf":
        header = read_gguf_header(source.path)
        values, loadable = gguf_config(header)
        return ModelConfig(source, values, source.path, [source.path], header, header.architecture, loadable)
    path = source.path / "config.json" if source.kind == "local" else _hub_config_path(source, cache_dir)
    return ModelConfig(source, _read_json(path), path, _weight_files(path.parent))


def check_weight_headers(config: ModelConfig) -> list:
    """The headers of the weight files present (safetensors and GGUF; pickles have none to read),
    each checked for consistency: a truncated or corrupt file raises
    :class:`~qeff.intake.headers.CorruptWeightsError` naming it."""
    headers: list = []
    for path in config.weight_files:
        if path.suffix == ".safetensors":
            headers.append(read_safetensors_header(path))
        elif path.suffix == ".gguf":
            headers.append(config.gguf if config.gguf is not None and path == config.source.path else read_gguf_header(path))
    return headers

