"""Measure a card's tiny-tier ``[cpu_weights]`` budgets (docs/plugin.md, "Compressed weights: per-card
budgets"): the card is given provisional wide budgets in a copy of ``model_cards/``, the compressed
compile stage runs (``--qeff-graph compressed -m "qeff_compressed and qeff_compile"``), and each
mode's measures in ``results.json`` become a budget about 2x the measured cost. Prints the TOML;
``--write`` appends it to the card (only when every mode was measured)::

    python benchmarks/cpu_weight_budgets.py llama-2-7b llama-3.2-3b [--write]
"""
import json, math, shutil, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(tempfile.mkdtemp(prefix="qeff-budgets-"))
MODES = ("int8", "int4", "int8-a8")
WIDE = "\n".join(f"\n[cpu_weights.tiny.{m}]\nkld_mean = 10.0\nkld_p99 = 10.0\ntop1_agree = 0.0\nppl_delta = 10.0" for m in MODES)

def up2(x):  # round up to 2 significant digits
    if x <= 0: return x
    e = math.floor(math.log10(x)) - 1
    return math.ceil(x / 10**e) * 10**e

def measure(card):
    cards = WORK / "cards" / card; shutil.rmtree(cards, ignore_errors=True); shutil.copytree(ROOT / "model_cards", cards)
    p = cards / f"{card}.toml"; p.write_text(p.read_text() + "\n" + WIDE + "\n")
    out = WORK / "out" / card; shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--qeff-model", card,
           "--qeff-cards-dir", str(cards), "--qeff-graph", "compressed", "-m", "qeff_compressed and qeff_compile",
           "--qeff-report", str(out), "-n", "0", "--rootdir", str(ROOT), str(ROOT / "pytest_qeff/suite")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(card, "rc", r.returncode, r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:], file=sys.stderr)
    recs = json.loads((out / "results.json").read_text())["records"]
    found = {}
    for rec in recs:
        b = (rec.get("data") or {}).get("budget")
        if b: found[rec["data"]["weights"]] = b["result"]
    return found

def block(mode, r):
    ppl = (r["ppl"] / r["ppl_ref"] - 1) if r.get("ppl") and r.get("ppl_ref") else 0.0
    top1 = r["top1_agree"]
    return (f"[cpu_weights.tiny.{mode}]  # measured KLD mean {r['kld_mean']:.2g}, p99 {r['kld_p99']:.2g}, "
            f"top-1 {top1:.2%}, perplexity {ppl:+.2%}\n"
            f"kld_mean = {up2(2 * r['kld_mean']):.2g}\nkld_p99 = {up2(2 * r['kld_p99']):.2g}\n"
            f"top1_agree = {round(1 - max(2 * (1 - top1), 0.02), 4)}\nppl_delta = {round(max(2 * abs(ppl), 0.002), 4)}\n")

if __name__ == "__main__":
    write = "--write" in sys.argv
    for card in [a for a in sys.argv[1:] if not a.startswith("--")]:
        found = measure(card)
        text = "\n".join(block(m, found[m]) for m in MODES if m in found)
        print(f"== {card}\n{text}")
        if write and len(found) == len(MODES):
            p = ROOT / "model_cards" / f"{card}.toml"
            p.write_text(p.read_text().rstrip("\n") + "\n\n# Compressed CPU weights, tiny tier (pytest --qeff-graph compressed; `qeff infer --backend ort --weights ...`):\n"
                         "# the fused graph vs HF fp32 on the untouched model, teacher-forced over the card's [precision] corpus, measured\n"
                         "# 2026-12-07 with provisional wide budgets (x86, ORT 1.32; benchmarks/cpu_weight_budgets.py).\n"
                         "# Each bound ~2x the measured cost (KLD mean, p99 x2; top-1 disagreement x2, at least 2%; perplexity rise x2, at least +0.2%).\n" + text)
