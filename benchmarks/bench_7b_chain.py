"""The design's two commands on a 7B-shaped checkpoint, offline, with each stage's peak RSS and time
(issue 18, item 7)::

    pytest --qeff-model llama-2-7b --qeff-tier full --device-group 0,1
    qeff compile -m meta-llama/Llama-2-7b-hf --backend qaic --dry-run --device_group [0,1] --mxfp6 --mos 2

The card's weights are a hub repo id; nothing is downloaded. The checkpoint (``--checkpoint DIR``,
e.g. one :func:`qeff.synthetic.write_llama` wrote with ``SHAPES["7b"]``, or ``--shape NAME`` to
write one under ``--work``) is laid out as that repo in a Hugging Face cache under ``--work`` by
:func:`qeff.synthetic.hub_cache` — hard links, no copy — after staging:

- ``config.json`` gets the card's ``[config]`` values where they do not change a weight's shape
  (Llama 2's RoPE theta and context, against the synthetic writer's Llama 3 ones); a shape key that
  differs is an error: the weights are not the card's model;
- the tokenizer is kept when its ids fit ``vocab_size``; otherwise (SmolLM2's 49152 ids against
  Llama 2's 32000 rows, in a checkpoint written before ``write_llama`` cut it) it is cut with
  :func:`qeff.synthetic.truncate_tokenizer`, or replaced by a word-level tokenizer of ``vocab_size``
  ids when it is not a BPE, since qeff refuses a tokenizer whose ids the embedding has no row for.

Without ``--card`` a card is written from the checkpoint's own config (for small shapes: testing
this script). Both commands run in child processes, each on its own fresh artifact cache (so each
measures its export), with ``HF_HUB_CACHE``/``HF_HUB_OFFLINE=1``; the parent samples each child's
``VmRSS``/``RssAnon`` and kills it above ``--max-rss-gb``. The pytest child also loads
``benchmarks/pytest_rss.py``: per-test peaks and times. A table on stderr, one JSON line on stdout::

    python benchmarks/bench_7b_chain.py --checkpoint /work/scale/llama-7b --work /tmp/qeff-7b --card llama-2-7b
    python benchmarks/bench_7b_chain.py --shape 135m --work /tmp/qeff-chain      # small: no card needed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qeff.synthetic import SHAPES, hub_cache, write_llama  # noqa: E402

#: Config keys that set a weight's shape: they must already be the card's.
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "tie_word_embeddings", "head_dim")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")


def stage_checkpoint(src: Path, dst: Path, card_config: dict | None) -> list[str]:
    """``dst``: the weights hard-linked from ``src``, the config with the card's values, a tokenizer
    that fits. Returns what was changed, for the report."""
    notes: list[str] = []
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for pattern in WEIGHT_PATTERNS:
        for path in sorted(src.glob(pattern)):
            try:
                os.link(path, dst / path.name)
            except OSError:  # another file system: a symbolic link (the hub cache's blob follows it)
                (dst / path.name).symlink_to(path.resolve())
    config = json.loads((src / "config.json").read_text())
    for key, value in (card_config or {}).items():
        if config.get(key) == value:
            continue
        if key in SHAPE_KEYS and key in config:
            raise SystemExit(f"{src}: config.{key} is {config[key]!r} but the card says {value!r}: these weights are "
                             f"not the card's model")
        notes.append(f"config.{key}: {config.get(key)!r} -> {value!r} (the card's)")
        config[key] = value
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    from qeff.intake.consistency import tokenizer_files

    files = tokenizer_files(src)
    for path in files:
        shutil.copy2(path, dst / path.name)
    from qeff.intake.consistency import tokenizer_id_count

    count = tokenizer_id_count(dst) if files else None
    vocab = config["vocab_size"]
    if count is not None and count > vocab and (dst / "tokenizer.json").is_file():
        from qeff.synthetic import truncate_tokenizer

        try:  # what write_llama does now (a checkpoint written before it kept SmolLM2's 49152 ids)
            truncate_tokenizer(dst / "tokenizer.json", vocab)
            notes.append(f"tokenizer: {count} ids cut to the embedding's {vocab} rows (qeff.synthetic.truncate_tokenizer)")
            count = tokenizer_id_count(dst)
        except ValueError:
            pass
    if count is None or count > vocab:
        for path in files:
            (dst / path.name).unlink(missing_ok=True)
        from tests.word_tokenizer import word_tokenizer

        word_tokenizer(vocab).save_pretrained(str(dst))
        notes.append(f"tokenizer: {count} ids do not fit vocab_size {vocab}: a word-level tokenizer of {vocab} ids "
                     f"replaces it")
    return notes


def write_card(cards: Path, card_id: str, repo: str, config: dict) -> None:
    """A card for a checkpoint no built-in card describes (small shapes, testing this script)."""
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "tie_word_embeddings", "rope_theta", "rms_norm_eps", "max_position_embeddings")
    ratio = config["num_attention_heads"] // config["num_key_value_heads"]
    lines = [f'id = "{card_id}"', 'name = "Synthetic Llama"', 'architecture = "llama"',
             'description = "A synthetic checkpoint measured by benchmarks/bench_7b_chain.py."', "",
             "[weights]", 'source = "hub"', f'repo = "{repo}"', 'revision = "main"', "", "[config]"]
    lines += [f"{k} = {json.dumps(config[k])}" for k in keys if k in config]
    lines += ["", "[tiny]", "num_hidden_layers = 2", f"hidden_size = {32 * ratio}", "intermediate_size = 128",
              f"num_attention_heads = {2 * ratio}", "num_key_value_heads = 2", "vocab_size = 256", "",
              "[prompts]", 'text = ["My name is", "The capital of France is"]', "tiny_lengths = [24, 9]",
              "generation_len = 16", ""]
    cards.mkdir(parents=True, exist_ok=True)
    (cards / f"{card_id}.toml").write_text("\n".join(lines))


def run(cmd: list[str], env: dict, cwd: Path, max_rss: int, log: Path) -> dict:
    """``cmd`` in a child: exit code, wall time, the peaks of its VmRSS and RssAnon (sampled every
    20 ms by this process), killed above ``max_rss``."""
    top = {"VmRSS": 0, "RssAnon": 0}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        killed = threading.Event()

        def sample() -> None:
            while proc.poll() is None:
                try:
                    text = Path(f"/proc/{proc.pid}/status").read_text()
                except OSError:
                    return
                for line in text.splitlines():
                    key, _, value = line.partition(":")
                    if key in top:
                        top[key] = max(top[key], int(value.split()[0]) * 1024)
                if top["VmRSS"] > max_rss and not killed.is_set():
                    killed.set()
                    os.kill(proc.pid, signal.SIGKILL)
                time.sleep(0.02)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        rc = proc.wait()
        thread.join()
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
    return {"cmd": cmd, "rc": rc, "wall_s": round(time.perf_counter() - start, 1), "peak_rss": top["VmRSS"],
            "peak_anon": top["RssAnon"], "killed": killed.is_set(), "tail": tail, "log": str(log)}


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}G"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--checkpoint", type=Path, help="a safetensors checkpoint directory (read only: linked, never changed)")
    given.add_argument("--shape", choices=sorted(SHAPES), help="write a synthetic checkpoint of this shape under --work")
    parser.add_argument("--work", type=Path, required=True, help="where the staged checkpoint, HF cache, caches and logs go")
    parser.add_argument("--card", default=None, help="a built-in card id (e.g. llama-2-7b); default: one written from the config")
    parser.add_argument("--repo", default=None, help="the hub repo id (default: the card's)")
    parser.add_argument("--device-group", default="0,1")
    parser.add_argument("--memory-limit", default=None, help="QEFF_MEMORY_LIMIT for both children (e.g. 6G)")
    parser.add_argument("--max-rss-gb", type=float, default=8.0, help="kill a child whose RSS passes this (default 8)")
    parser.add_argument("--only", choices=["pytest", "compile"], default=None, help="run one of the two commands")
    args = parser.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.shape:
        ckpt = work / f"llama-{args.shape}"
        if not (ckpt / ".complete").is_file():
            write_llama(ckpt, SHAPES[args.shape], seed=0)
            (ckpt / ".complete").write_text("")
    else:
        ckpt = args.checkpoint.resolve()
    card_config, cards_dir = None, None
    if args.card:
        from pytest_qeff.cards import load_cards

        card = load_cards(ROOT / "pytest_qeff" / "model_cards")[args.card]
        card_config, card_id, repo = card.config.hf_config(), card.id, args.repo or card.weights.repo
    else:
        card_id, repo = f"synthetic-{ckpt.name}", args.repo or f"synthetic/{ckpt.name}"
    start = time.perf_counter()
    notes = stage_checkpoint(ckpt, work / "staged", card_config)
    cache = work / "hub"
    shutil.rmtree(cache / ("models--" + repo.replace("/", "--")), ignore_errors=True)
    hub_cache(work / "staged", repo, cache)
    staging_s = round(time.perf_counter() - start, 1)
    if not args.card:
        cards_dir = work / "cards"
        write_card(cards_dir, card_id, repo, json.loads((work / "staged" / "config.json").read_text()))

    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    if args.memory_limit:
        env["QEFF_MEMORY_LIMIT"] = args.memory_limit
    max_rss = int(args.max_rss_gb * 2**30)
    results: dict = {"checkpoint": str(ckpt), "card": card_id, "repo": repo, "staging_s": staging_s, "notes": notes}

    if args.only in (None, "pytest"):
        for name in ("home-pytest", "report"):
            shutil.rmtree(work / name, ignore_errors=True)
        rss_file = work / "pytest-rss.jsonl"
        rss_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "pytest_rss", "--qeff-model", card_id,
               "--qeff-tier", "full", "--device-group", args.device_group, "--qeff-report", str(work / "report"), "-rs", "-q"]
        if cards_dir:
            cmd += ["--qeff-cards-dir", str(cards_dir)]
        res = run(cmd, {**env, "QEFF_HOME": str(work / "home-pytest"), "QEFF_BENCH_RSS": str(rss_file)}, work, max_rss,
                  work / "pytest.log")
        peaks = {}
        if rss_file.is_file():
            peaks = {json.loads(x)["nodeid"]: json.loads(x) for x in rss_file.read_text().splitlines()}
        records = []
        report = work / "report" / "results.json"
        if report.is_file():
            for r in json.loads(report.read_text())["records"]:
                p = peaks.get(r["nodeid"], {})
                records.append({"test": r["nodeid"].split("::")[-1], "stage": r["stage"], "backend": r["backend"],
                                "outcome": r["outcome"], "peak_rss": p.get("peak_rss"), "peak_anon": p.get("peak_anon"),
                                "wall_s": p.get("wall_s", r.get("duration_s")), "message": r.get("message", "")[:400]})
        results["pytest"] = {**res, "stages": records}

    if args.only in (None, "compile"):
        home = work / "home-compile"
        shutil.rmtree(home, ignore_errors=True)
        group = "[" + args.device_group.strip("[]") + "]"
        cmd = [sys.executable, "-m", "qeff.cli", "compile", "-m", repo, "--backend", "qaic", "--dry-run", "--device_group",
               group, "--mxfp6", "--mos", "2", "--home", str(home)]
        results["compile"] = run(cmd, env, work, max_rss, work / "compile.log")

    _table(results)
    print(json.dumps(results, default=str))
    failed = any(results.get(k, {}).get("rc", 0) not in (0,) for k in ("compile",))
    pytest_rc = results.get("pytest", {}).get("rc", 0)
    return 1 if failed or pytest_rc not in (0, 1) else 0


def _table(results: dict) -> None:
    err = sys.stderr
    print(f"checkpoint {results['checkpoint']} as {results['repo']} (card {results['card']}); staged in "
          f"{results['staging_s']} s", file=err)
    for note in results["notes"]:
        print(f"  staged: {note}", file=err)
    if "pytest" in results:
        p = results["pytest"]
        print(f"\npytest --qeff-model {results['card']} --qeff-tier full: exit {p['rc']}"
              f"{' (KILLED above --max-rss-gb)' if p['killed'] else ''}, peak RSS {gib(p['peak_rss'])} "
              f"(anonymous {gib(p['peak_anon'])}), {p['wall_s']} s", file=err)
        print(f"  {'test':58} {'outcome':8} {'peak RSS':>9} {'anon':>8} {'wall s':>8}", file=err)
        for r in p["stages"]:
            print(f"  {r['test'][:58]:58} {r['outcome']:8} {gib(r['peak_rss']):>9} {gib(r['peak_anon']):>8} "
                  f"{r['wall_s'] if r['wall_s'] is not None else '-':>8}", file=err)
            if r["outcome"] != "passed" and r["message"]:
                print(f"      {r['message'][:300]}", file=err)
    if "compile" in results:
        c = results["compile"]
        print(f"\n{' '.join(c['cmd'][2:])}: exit {c['rc']}{' (KILLED)' if c['killed'] else ''}, peak RSS "
              f"{gib(c['peak_rss'])} (anonymous {gib(c['peak_anon'])}), {c['wall_s']} s", file=err)
        for line in c["tail"]:
            print(f"  {line[:300]}", file=err)


if __name__ == "__main__":
    sys.exit(main())
