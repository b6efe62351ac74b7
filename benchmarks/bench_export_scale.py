"""Peak memory and wall time of the export alone, at real model shapes (issue 18).

    python benchmarks/bench_export_scale.py write --shape llama-1b --out /tmp/qeff-scale/llama-1b
    python benchmarks/bench_export_scale.py run --ckpt /tmp/qeff-scale/llama-1b --mode streamed

``write`` makes a synthetic checkpoint: the shape's ``config.json`` and seeded random bf16
safetensors, one shard per decoder layer (the embedding in its own), written a layer at a time so
the writer never holds the model. ``run`` exports it in a fresh child process — ``streamed``
(:mod:`qeff.weights`: memory-mapped source, placeholders, data written tensor by tensor) or
``memory`` (today's path: load in float32, transform, export) — and reports the child's peak RSS
(``wait4``'s ru_maxrss, its own) against the checkpoint's float32 bytes, and the wall time of the
export. A table line on stderr, one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: Llama 3.2 shapes (hidden, layers, heads, KV heads, intermediate, vocab), tied embeddings.
SHAPES = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256),
    "llama-3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}


def write_checkpoint(shape: str, out: Path, *, layers: int | None = None, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
           **SHAPES[shape]}
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    h, n, heads, kv, inter, vocab = (cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                      "num_key_value_heads", "intermediate_size", "vocab_size"))
    hd = h // heads
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):  # fp32 draws, stored bf16 (one tensor alive at a time)
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards: list[dict] = [{"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}]
    if not cfg["tie_word_embeddings"]:
        shards[0]["lm_head.weight"] = rand(vocab, h)
    total = len(shards) + n
    weight_map = {}

    def flush(i: int, tensors: dict) -> None:
        name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    flush(0, shards.pop())
    for layer in range(n):
        p = f"model.layers.{layer}."
        flush(layer + 1, {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(heads * hd, h), p + "self_attn.k_proj.weight": rand(kv * hd, h),
            p + "self_attn.v_proj.weight": rand(kv * hd, h), p + "self_attn.o_proj.weight": rand(h, heads * hd),
            p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
        })
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def _child(ckpt: Path, mode: str, out: Path) -> None:
    """The measured process: export ``ckpt`` into ``out``, print the export's wall time."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if mode == "streamed":
        from qeff.pipeline import streamed_model

        qmodel, weights, placeholders = streamed_model(ckpt)
        from qeff.exporter import export

        result = export(qmodel, out, model_id=str(ckpt), weights=weights, placeholders=placeholders)
    else:
        from transformers import AutoModelForCausalLM

        from qeff.exporter import export
        from qeff.transforms import transform

        # What qeff.intake.loading.load_source does for the weights (the synthetic checkpoints have no tokenizer).
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager").eval()
        result = export(transform(model), out, model_id=str(ckpt))
    print(json.dumps({"export_s": time.perf_counter() - t0, "streamed": result.streamed}))


def measure(ckpt: Path, mode: str, out: Path) -> dict:
    weights_fp32 = sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) * 2  # bf16 → fp32
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "child", "--ckpt", str(ckpt), "--mode", mode, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    line = proc.stdout.read().decode().strip().splitlines()
    rc = os.waitstatus_to_exitcode(status)
    record = {"ckpt": ckpt.name, "mode": mode, "rc": rc, "process_s": round(wall, 1),
              "export_s": round(json.loads(line[-1])["export_s"], 1) if rc == 0 and line else None,
              "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "fp32_weights_gb": round(weights_fp32 / 1e9, 2),
              "peak_over_fp32": round(usage.ru_maxrss * 1024 / weights_fp32, 2),
              "onnx_data_gb": round(sum(p.stat().st_size for p in out.glob("model.onnx*")) / 1e9, 2) if rc == 0 else None}
    print(f"{record['ckpt']:>14} {mode:>8}: rc {rc}, export {record['export_s']} s, peak RSS {record['peak_rss_gb']} GB "
          f"= {record['peak_over_fp32']}x the fp32 weights ({record['fp32_weights_gb']} GB)", file=sys.stderr)
    return record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("write", "run", "child"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape's")
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--mode", choices=("streamed", "memory"), default="streamed")
    args = ap.parse_args()
    if args.what == "write":
        write_checkpoint(args.shape, args.out, layers=args.layers)
    elif args.what == "child":
        _child(args.ckpt, args.mode, args.out)
    else:
        out = args.out or Path(f"/tmp/qeff-scale/export-{args.ckpt.name}-{args.mode}")
        print(json.dumps(measure(args.ckpt, args.mode, out)))


if __name__ == "__main__":
    main()
