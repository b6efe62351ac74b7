"""The flags of the ``qeff`` command line, declared once and shared by the subcommands.

Each subcommand's module (:mod:`qeff.cli.infer`, …) picks the groups it takes; what the flags say
is turned into typed records by :func:`qeff.cli.options.resolve`, and only those records go on to
the library. Flags keep the seed product's spellings (``--model_name``, ``--num_cores``,
``--device_group [0,1]``, …); each also has a dashed spelling.
"""

from __future__ import annotations

import argparse
import sys

from qeff.serving.ngram import DEFAULT_NGRAM_MAX

__all__ = ["DEFAULT_PROMPT", "Parser", "flag", "model_args", "cache_args", "home_arg", "compile_args", "run_args",
           "verify_layers_arg", "draft_args", "lookup_args"]

DEFAULT_PROMPT = "The capital of France is"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: exit 2 with one sentence too
        self.print_usage(sys.stderr)
        self.exit(2, f"qeff: error: {message}\n")


def flag(parser, name: str, *more: str, **kwargs):
    """--seed_style and --dashed-style spellings of one option."""
    dashed = name.replace("_", "-")
    spellings = [name] + ([dashed] if dashed != name else []) + list(more)
    return parser.add_argument(*spellings, **kwargs)


def home_arg(p) -> None:
    flag(p, "--home", default=None, help="artifact cache directory (default: $QEFF_HOME or ./qeff_models)")


def model_args(p) -> None:
    flag(p, "--model_name", "-m", default="smollm2-135m",
         help="model card/alias, HF repo id, local HF directory or .gguf file (default: smollm2-135m, the embedded SmolLM2-135M-Instruct)")
    flag(p, "--cache_dir", default=None, help="Hugging Face cache directory (default: HF's own)")
    flag(p, "--revision", default=None, help="hub revision (branch, tag or commit)")
    home_arg(p)
    cache_args(p)
    p.add_argument("--skip-memory-check", "--skip_memory_check", action="store_true",
                   help="run even when the memory preflight estimates a stage will not fit (or QEFF_SKIP_MEMORY_CHECK=1)")


def cache_args(p) -> None:
    flag(p, "--verify_cache", action="store_true",
         help="recompute the full digest of every cached file before reusing it (default: sizes, stat and a sampled digest)")


def compile_args(p) -> None:
    flag(p, "--backend", choices=["ort", "qaic", "auto"], default="auto",
         help="ort = ONNX Runtime on the CPU; qaic = Cloud AI 100; auto = qaic when its SDK is installed, else ort (default)")
    flag(p, "--batch_size", type=int, default=None, help="rows per batch (default 1)")
    flag(p, "--prompt_len", type=int, default=32, help="prefill chunk length in tokens (default 32)")
    flag(p, "--ctx_len", type=int, default=128, help="cache slots per row: prompt + generated tokens (default 128)")
    flag(p, "--num_cores", type=int, default=16, help="Cloud AI cores per device (default 16)")
    flag(p, "--device_group", default=None, help="Cloud AI device ids used together, e.g. [0,1] or 0,1 (default: [0])")
    flag(p, "--mxfp6", action="store_true", help="Cloud AI: MatMul weights in MXFP6 (ort: emulated, with fp16 activations)")
    flag(p, "--mxint8", action="store_true", help="Cloud AI: the KV cache in MXINT8 (ort: emulated, with fp16 activations)")
    flag(p, "--mos", type=int, default=-1, help="Cloud AI: -mos effort (default -1 = not passed)")
    flag(p, "--aic_enable_depth_first", action="store_true", help="Cloud AI: depth-first scheduling")
    flag(p, "--aic_hw_version", default=None, help="Cloud AI: -aic-hw-version (default: what the compiler documents)")
    flag(p, "--compiler_option", action="append", default=[], metavar="FLAG",
         help="extra Cloud AI compiler flag, passed through (repeatable), e.g. -stats-level=70")
    serving_compile_args(p)
    p.add_argument("--ort-graph", "--ort_graph", choices=["auto", "fused", "portable"], default="auto",
                   help="ONNX Runtime: the fused CPU graph (llama, mistral, qwen2) or the portable one; auto = fused when "
                        "the architecture is covered and no serving variant is asked for (default)")
    flag(p, "--weights", choices=["fp32", "native", "int8", "int4"], default="fp32",
         help="ONNX Runtime fused graph: fp32; native = a GGUF file's own quantized blocks, exactly; int8/int4 = "
              "round-to-nearest blocks of the float weights (default fp32)")
    p.add_argument("--int8-activations", "--int8_activations", action="store_true",
                   help="ONNX Runtime fused graph with quantized weights: int8 activations inside MatMulNBits (faster, not exact)")


def serving_compile_args(p) -> None:
    """The serving flags that change the compiled graph (:mod:`qeff.serving.options`)."""
    flag(p, "--full_batch_size", type=int, default=None,
         help="continuous batching: N cache slots, each prompt admitted into a free one as soon as a row finishes (not with --batch_size)")
    flag(p, "--num_speculative_tokens", type=int, default=None,
         help="speculative decoding: tokens the draft proposes per step, verified by the target in one step (default 3 with --draft_model_name)")
    flag(p, "--comp_ctx_lengths", default=None, metavar="L",
         help="compute context length of the portable graph: each step attends only the first C cache slots, C the smallest "
              "of these comma-separated lengths above every position (e.g. 256,1024; ctx_len is added last). Default on the "
              "ort portable graph: 256, 1024, 4096, … up to --ctx_len; 'off' attends all --ctx_len slots every step. Cloud AI: "
              "one prefill and one decode specialization per length")


def run_args(p) -> None:
    flag(p, "--prompt", default=None, help=f'prompt(s), several separated by "|" (default: "{DEFAULT_PROMPT}")')
    flag(p, "--prompts_txt_file_path", default=None,
         help="file with one prompt per line, read once (a pipe works); a line may hold at most --ctx_len × 256 bytes")
    flag(p, "--generation_len", type=int, default=None, help="max new tokens per prompt (default: until EOS or the cache is full)")
    flag(p, "--ignore_eos", action="store_true",
         help="do not stop a row at EOS: it emits EOS and goes on, exactly --generation_len tokens (or until the cache is full), "
              "e.g. for benchmarks (vLLM's ignore_eos)")
    flag(p, "--suppress_eos", action="store_true",
         help="never choose EOS (its logits are -inf): exactly --generation_len tokens, as HF min_new_tokens and "
              "llama.cpp --ignore-eos; token comparisons with those hold only this way")
    flag(p, "--threads", type=int, default=None, help="ONNX Runtime threads (default: physical cores)")
    p.add_argument("--specialize-decode", "--specialize_decode", action=argparse.BooleanOptionalAction, default=None,
                   help="ONNX Runtime: a second session pinned to decode shapes, ~12%% faster decode for a second copy of "
                        "the weights in memory (default: on when the weights are under 2 GiB)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="stream the first prompt's tokens as they come (default on)")
    p.add_argument("--json", action="store_true", help="print one JSON line of results on stdout; human output goes to stderr")
    serving_run_args(p)


def serving_run_args(p) -> None:
    """The serving flags of a run: prefix caching and sampling."""
    flag(p, "--prefix_caching", action="store_true",
         help="with --full_batch_size: a prompt that starts like a free slot's previous prompt reuses those cache entries")
    flag(p, "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    flag(p, "--top_k", type=int, default=0, help="sample among the k most likely tokens; 0 = no limit (default)")
    flag(p, "--top_p", type=float, default=1.0, help="sample among the most likely tokens whose probability reaches p, in (0, 1] (default 1)")
    flag(p, "--repetition_penalty", type=float, default=1.0, help="> 1 discourages tokens already seen; 1 = off (default)")
    flag(p, "--seed", type=int, default=0, help="seed of every prompt's own random stream (default 0)")


def draft_args(p) -> None:
    flag(p, "--draft_model_name", default=None,
         help="speculative decoding: the draft model (card, HF id, local dir or .gguf); it must share the target's tokenizer")
    lookup_args(p)


def lookup_args(p) -> None:
    flag(p, "--prompt_lookup", type=int, default=None, metavar="N",
         help="prompt-lookup decoding: each step drafts up to N tokens that followed the latest earlier occurrence of the "
              "text's last few tokens (prompt + generated), verified by the model in one step; greedy, same tokens as without it")
    flag(p, "--prompt_lookup_ngram", type=int, default=DEFAULT_NGRAM_MAX, metavar="M",
         help=f"prompt-lookup decoding: the longest n-gram looked up, tried from M tokens down to 1 (default {DEFAULT_NGRAM_MAX})")


def verify_layers_arg(p) -> None:
    flag(p, "--verify-layers", "--verify_layers", action="store_true",
         help="verify with one decoder layer's weights in memory at a time, read from the safetensors files "
              "(default: when the memory preflight estimates the in-memory verification above 0.8 of the memory available; "
              "QEFF_STREAMED_VERIFY=1 always, =0 never; docs/memory.md)")
