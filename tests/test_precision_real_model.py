"""SmolLM2-135M's precision ladder on a slice of the corpus, and an independent check of the MXFP6
emulation: the same rounding applied to the PyTorch model's ``nn.Linear`` weights (along
``in_features``, by :mod:`qeff.precision.mx`) gives the ONNX-emulated tier's perplexity and KL.

The full 4,096-token ladder is ``make bench-precision`` (docs/precision.md); here 2 windows of 128
tokens keep CI time bounded while every tier still has to move the numbers the way the full run does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qeff.data import corpus_token_ids
from qeff.metrics import DistributionStats
from qeff.pipeline import Pipeline
from qeff.precision import mx
from qeff.precision.ladder import Ladder, run_ladder

# One worker builds this module's SmolLM2 artifacts once (not one copy per xdist worker), and the
# same worker runs Gemma 3's real-weights module (tests/test_real_gemma3.py): the two biggest
# writers of the suite never fill the disk together.
pytestmark = pytest.mark.xdist_group("real-weights-disk")

ROWS, WINDOW = 2, 128


@pytest.fixture(scope="module")
def ladder_and_windows(smollm2, module_tmp) -> tuple[Ladder, np.ndarray]:
    model, tokenizer = smollm2
    pipe = Pipeline("smollm2-135m", model=model, tokenizer=tokenizer, identity={"test": "smollm2-precision"},
                    home=module_tmp("precision-home"), progress=False)
    pipe.export()
    corpus = corpus_token_ids(tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in ("The capital of France is", "def fibonacci(n):")]
    ladder = run_ladder(model, pipe.onnx_path, "fp32,fp16,mxint8,mxfp6", corpus_ids=corpus, prompt_token_ids=prompts,
                        rows=ROWS, window=WINDOW, steps=8, prompt_len=16, progress=False, keep_tiers=False)
    return ladder, np.asarray(corpus[: ROWS * WINDOW]).reshape(ROWS, WINDOW)


def test_smollm2_ladder_orders_the_formats(ladder_and_windows):
    ladder, _ = ladder_and_windows
    print(ladder.describe())
    fp32, fp16, mxint8, mxfp6 = (ladder[t] for t in ("fp32", "fp16", "mxint8", "mxfp6"))
    assert fp32.kld_max < 1e-8 and fp32.top1_agree == 1.0 and abs(fp32.ppl / fp32.ppl_ref - 1) < 1e-6
    assert fp32.tokens_matched == fp32.tokens_total == 16
    # every lower tier measurably differs, in the order the full run measured (docs/precision.md)
    assert 100 * fp32.kld_mean < fp16.kld_mean < mxint8.kld_mean < mxfp6.kld_mean
    assert mxfp6.ppl_delta > 0.01 and mxfp6.top1_agree < 0.97
    assert ladder.passed, ladder.describe()  # within the default budgets measured on 4,096 tokens


@torch.no_grad()
def _mxfp6_in_pytorch(model, windows: np.ndarray, fmt: mx.ElementFormat):
    """KL/perplexity of the model with every nn.Linear weight rounded to MXFP6 along in_features
    (lm_head untied from the embedding), against the model as it is; the model is restored."""
    reference = [model(input_ids=torch.from_numpy(w[None])).logits[0].numpy() for w in windows]
    saved = {}
    try:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                saved[name] = module.weight
                rounded = mx.fake_quantize(module.weight.detach().numpy(), fmt, axis=1)  # (out, in): blocks along in
                module.weight = torch.nn.Parameter(torch.from_numpy(rounded), requires_grad=False)
        candidate = [model(input_ids=torch.from_numpy(w[None])).logits[0].numpy() for w in windows]
    finally:
        for name, weight in saved.items():
            model.get_submodule(name).weight = weight
    stats = DistributionStats()
    for w, ref, cand in zip(windows, reference, candidate):
        stats.add(ref, cand, np.append(w[1:], -1))
    return len(saved), stats.summary()


def test_mxfp6_emulation_equals_mxfp6_weights_in_pytorch(smollm2, ladder_and_windows):
    """An independent route to the same numbers: no ONNX, no graph pass, PyTorch's own Linear layers."""
    model, _ = smollm2
    ladder, windows = ladder_and_windows
    emulated = ladder["mxfp6"]
    linears, torch_route = _mxfp6_in_pytorch(model, windows, mx.FP6_E2M3)
    print(f"PyTorch MXFP6 weights: KLD mean {torch_route.kld_mean:.4g}, ppl {torch_route.ppl:.4f}; "
          f"emulated graph: KLD mean {emulated.kld_mean:.4g}, ppl {emulated.ppl:.4f}")
    assert linears == 211  # 7 per layer x 30 + lm_head, as the graph pass counts MatMul weights
    assert emulated.emulation["mxfp6_weights"] == 211
    assert torch_route.ppl_ref == pytest.approx(emulated.ppl_ref, rel=1e-5)  # the same reference
    assert torch_route.ppl == pytest.approx(emulated.ppl, rel=0.01)
    assert torch_route.kld_mean == pytest.approx(emulated.kld_mean, rel=0.10)
    # Seeded fault: the other encoding (what a graph pass with the wrong element format would hold)
    # is told apart by the same comparison.
    _, other = _mxfp6_in_pytorch(model, windows, mx.FP6_E3M2)
    assert other.kld_mean != pytest.approx(emulated.kld_mean, rel=0.10)
    assert other.ppl != pytest.approx(emulated.ppl, rel=0.01)
