"""One inference engine in its own process, driven by ``bench_peers.py`` over JSON lines.

    python peer_worker.py ENGINE PATH --batch B --threads T

reads commands on stdin, one JSON object a line, and answers each with one JSON line on stdout:

    {"cmd": "run", "prompt_ids": [...], "new_tokens": N}  →  {"ttft_s", "decode_s", "tokens": [[...] per row]}
    {"cmd": "score", "ids": [...], "start": P, "out": F}  →  {"positions": n}: the logits (float32, one row
        per position) after reading ids[:P], ids[:P+1], …, ids[:-1] (teacher-forced), saved to F (.npy)
    {"cmd": "rss"}                                        →  {"peak_rss_mb", "load_s"}
    {"cmd": "quit"}

Every engine gets the same prompt token ids (no tokenizer runs here), runs greedy, and generates
exactly N tokens per row (EOS does not stop it, or — where an engine cannot be told so — the
driver sees fewer tokens and says so). TTFT is from the call to the first generated token of every
row; decode time is from there to the last token. Each engine imports only its own library, so a
worker runs in whichever virtual environment has it (qeff's, or the peers').
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux starts a child's ru_maxrss at its
    parent's RSS (fork), which exec does not reset."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Qeff:
    """qeff's ONNX Runtime backend: any compiled artifact directory (fused or portable)."""

    def __init__(self, path: str, batch: int, threads: int):
        import qeff

        self.qeff = qeff
        self.session = qeff.open_session(path, threads=threads)
        assert self.session.batch_size == batch, (self.session.batch_size, batch)

    def run(self, ids: list[int], new_tokens: int) -> dict:
        rows = [ids] * self.session.batch_size
        r = self.qeff.generate(self.session, prompt_token_ids=rows, generation_len=new_tokens, ignore_eos=True)
        return {"ttft_s": r.ttft_s, "decode_s": r.decode_s, "tokens": r.token_ids}

    def score(self, ids: list[int], start: int):
        import numpy as np

        batch = self.session.batch_size
        rows = np.array([ids[:start]] * batch)
        out = [np.array(self.session.run(rows, np.arange(start)[None].repeat(batch, 0))[0], np.float32)]
        for t in range(start, len(ids) - 1):
            logits = self.session.run(np.full((batch, 1), ids[t]), np.full((batch, 1), t))
            out.append(np.array(logits[0], np.float32))
        return np.stack(out)


class Genai:
    """onnxruntime-genai with a model folder made by its own model builder."""

    def __init__(self, path: str, batch: int, threads: int):
        import onnxruntime_genai as og

        self.og, self.batch = og, batch
        config = og.Config(path)
        config.clear_providers()  # the CPU provider
        self.model = og.Model(config)

    def run(self, ids: list[int], new_tokens: int) -> dict:
        import numpy as np

        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False, batch_size=self.batch)
        start = time.perf_counter()
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.array([ids] * self.batch, dtype=np.int32))
        tokens: list[list[int]] = [[] for _ in range(self.batch)]
        first = None
        while not generator.is_done() and len(tokens[0]) < new_tokens:
            generator.generate_next_token()
            for r, t in enumerate(generator.get_next_tokens()):
                tokens[r].append(int(t))
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        del generator
        return {"ttft_s": first - start, "decode_s": end - first, "tokens": tokens}


class LlamaCpp:
    """llama.cpp through llama-cpp-python, on a GGUF file (batch 1)."""

    def __init__(self, path: str, batch: int, threads: int):
        from llama_cpp import Llama

        if batch != 1:
            raise SystemExit("llama-cpp-python runs one sequence at a time here: batch 1 only")
        self.llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         logits_all=False, verbose=False)

    def run(self, ids: list[int], new_tokens: int) -> dict:
        import numpy as np

        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        tokens = []
        first = None
        vocab = llm.n_vocab()
        for _ in range(new_tokens):
            # The last evaluated token's logits, straight from llama.cpp (llama-cpp-python keeps
            # them in ``scores`` only with logits_all, and ``eval_logits`` copies every row).
            token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
            tokens.append(token)
            if first is None:
                first = time.perf_counter()
            if len(tokens) == new_tokens:
                break
            llm.eval([token])
        end = time.perf_counter()
        return {"ttft_s": first - start, "decode_s": end - first, "tokens": [tokens]}

    def score(self, ids: list[int], start: int):
        import numpy as np

        llm, vocab = self.llm, self.llm.n_vocab()
        llm.reset()
        llm.eval(ids[:start])
        out = [np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).astype(np.float32)]
        for t in range(start, len(ids) - 1):
            llm.eval([ids[t]])
            out.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).astype(np.float32))
        return np.stack(out)


class HfEager:
    """HF transformers eager ``generate`` (the untouched reference), from a saved HF folder."""

    def __init__(self, path: str, batch: int, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch, self.batch = torch, batch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()

    def run(self, ids: list[int], new_tokens: int) -> dict:
        torch = self.torch
        x = torch.tensor([ids] * self.batch)
        with torch.no_grad():
            start = time.perf_counter()
            self.model.generate(x, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            out = self.model.generate(x, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            e2e = time.perf_counter() - start
        return {"ttft_s": ttft, "decode_s": max(e2e - ttft, 1e-9), "tokens": out[:, len(ids):].tolist()}

    def score(self, ids: list[int], start: int):
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([ids])).logits[0, start - 1:len(ids) - 1]
        return logits.float().numpy()


ENGINES = {"qeff": Qeff, "genai": Genai, "llama.cpp": LlamaCpp, "hf": HfEager}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=sorted(ENGINES))
    parser.add_argument("path")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()
    engine = ENGINES[args.engine](args.path, args.batch, args.threads)
    load_s = time.perf_counter() - start
    print(json.dumps({"ready": True, "load_s": load_s}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "run":
            reply = engine.run(command["prompt_ids"], command["new_tokens"])
        elif command["cmd"] == "score":
            import numpy as np

            if not hasattr(engine, "score"):
                reply = {"error": f"{args.engine} does not score"}
            else:
                logits = engine.score(command["ids"], command["start"])
                np.save(command["out"], logits)
                reply = {"positions": len(logits)}
        elif command["cmd"] == "rss":
            reply = {"peak_rss_mb": peak_rss_mb(), "load_s": load_s}
        else:
            break
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
