"""Prepare what ``bench_peers.py`` compares, once (cached under ``--work``, default ``.bench/``):

- qeff's artifacts: the export, the fused graph with fp32 and native weights and the portable
  graph, at each batch size;
- an HF folder of the same weights (what onnxruntime-genai's model builder and HF eager read);
- an F32 GGUF of the same weights for llama.cpp: every tensor of the shipped file de-quantized,
  metadata copied — the very numbers HF loads, in llama.cpp's own format;
- the prompt token ids, and the bytes each engine's decode step must read (for the roofline).

Prints one JSON line: ``{"prompt_ids", "artifacts": {...}, "paths": {...}, "step_bytes": {...}}``.
Runs in qeff's virtual environment.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. " * 4


def f32_gguf(src: Path, dst: Path) -> None:
    import gguf
    import numpy as np

    if dst.is_file():
        return
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst) + ".tmp", arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        values = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest dim first
        writer.add_tensor(tensor.name, values.reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(dst) + ".tmp").rename(dst)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=".bench")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--prompt-tokens", type=int, default=33)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--ctx-len", type=int, default=256)
    parser.add_argument("--portable", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    import qeff
    from qeff.compilers.ort_fused_artifact import compile_fused
    from qeff.intake.loading import embedded_gguf
    from qeff.pipeline import prepare
    from qeff.quant.blocks import NBitsWeight

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    prepared = prepare("smollm2-135m", progress=True)
    ids = prepared.tokenizer(PROMPT)["input_ids"][: args.prompt_tokens]
    assert len(ids) == args.prompt_tokens
    gguf_path = embedded_gguf()
    artifacts: dict[str, dict[int, str]] = {"qeff-fused-fp32": {}, "qeff-fused-native": {}, "qeff-fused-native-a8": {},
                                            "qeff-fused-int8": {}, "qeff-fused-int4": {}}
    if args.portable:
        artifacts["qeff-portable"] = {}
    shape = dict(prompt_len=args.prompt_len, ctx_len=args.ctx_len)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for weights, a8 in (("fp32", False), ("native", False), ("native", True), ("int8", False), ("int4", False)):
            log(f"[setup] qeff fused graph, {weights} weights{', int8 activations' if a8 else ''}, batch {batch}")
            built = compile_fused(prepared.export_dir, batch_size=batch, **shape, weights=weights, load_model=lambda: prepared.model,
                                  gguf_path=gguf_path, int8_activations=a8, progress=True)
            artifacts[f"qeff-fused-{weights}" + ("-a8" if a8 else "")][batch] = str(built.path)
        if args.portable:
            artifacts["qeff-portable"][batch] = str(qeff.compile(prepared.onnx_path, batch_size=batch, **shape, progress=True).path)

    hf_dir = work / "smollm2-hf"
    if not (hf_dir / "config.json").is_file():
        log("[setup] saving the HF folder")
        import torch
        from transformers import AutoModelForCausalLM

        # A model loaded from GGUF refuses save_pretrained; a plain copy of its (de-quantized) weights does not.
        plain = AutoModelForCausalLM.from_config(prepared.model.config, dtype=torch.float32)
        plain.load_state_dict(prepared.model.state_dict())
        plain.save_pretrained(hf_dir)
        prepared.tokenizer.save_pretrained(hf_dir)
        config = json.loads((hf_dir / "config.json").read_text())
        config.pop("quantization_config", None)  # the weights saved are plain floats
        (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    f32 = work / "smollm2-f32.gguf"
    log("[setup] F32 GGUF for llama.cpp")
    f32_gguf(gguf_path, f32)

    # Bytes a decode step reads: every matmul weight once (the embedding is gathered a row at a time).
    from qeff.compilers.ort_fused_weights import from_gguf

    config = prepared.model.config if prepared._model is not None else None
    if config is None:
        from qeff.compilers.ort_fused_artifact import export_config as _export_config

        config = _export_config(prepared.export_dir)
    native = from_gguf(gguf_path, config, 8)
    linears = [getattr(layer, n) for layer in native.layers for n in ("q", "k", "v", "o", "gate", "up", "down")] + [native.lm_head]
    fp32_bytes = sum(4 * w.shape[0] * w.shape[1] for w in linears)
    native_bytes = sum(w.nbytes if isinstance(w, NBitsWeight) else w.nbytes for w in linears)
    # Round-to-nearest blocks of 32 (LM head included): codes, a float32 scale and a packed zero point per block.
    rtn_bytes = {bits: int(fp32_bytes / 4 * (bits / 8 + 4 / 32 + bits / 8 / 32)) for bits in (8, 4)}
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    file_bytes = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2)  # token_embd doubles as the LM head
    print(json.dumps({
        "prompt_ids": ids, "artifacts": artifacts,
        "paths": {"hf": str(hf_dir), "gguf_q4_1": str(gguf_path), "gguf_f32": str(f32)},
        "step_bytes": {"fp32": fp32_bytes, "qeff-native": native_bytes, "gguf-q4_1": file_bytes,
                       "qeff-int8": rtn_bytes[8], "qeff-int4": rtn_bytes[4]},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
