"""The conformance chain for one tiny architecture: HF eager → transformed PyTorch → ONNX Runtime.

The reference is HF itself: ``generate`` at batch 1, greedy, with its own cache, returning the
tokens and the raw logits of every step (step 0 is the prefill's last token). The retained-state
sessions are then fed the same tokens (teacher forcing), so every step's logits are compared on
the same inputs even where greedy choices could differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig

from tests.arch_configs import VOCAB, TinyArch
from qeff.intake.loading import from_config
from qeff.runtime.base import Session
from qeff.transforms import QEffCausalLM, transform
from qeff.transforms.experts import experts_modules

__all__ = [
    "CTX_LEN", "GEN_LEN", "PROMPT_LEN", "PROMPTS", "Built", "Diff", "build", "compare", "hf_forward_greedy",
    "hf_generate_greedy", "hf_greedy", "teacher_forced_logits",
]

PROMPT_LEN = 8
CTX_LEN = 64
GEN_LEN = 32
#: Prompt 0 takes two prefill chunks, prompt 2 three; the padded batch runs all four together.
#: Ids start at 3: HF's generate infers a padding mask from pad_token_id (0) in the prompt.
PROMPTS: list[list[int]] = [
    np.random.default_rng(seed).integers(3, VOCAB, size=n).tolist() for seed, n in enumerate((11, 5, 19, 2))
]
SEED = 0


@dataclass(frozen=True)
class Greedy:
    tokens: list[int]
    logits: np.ndarray  # (GEN_LEN, vocab): the logits each token was chosen from


@dataclass
class Built:
    case: TinyArch
    hf: torch.nn.Module
    qmodel: QEffCausalLM
    reference: list[Greedy]  # HF at batch 1, one per PROMPTS entry


@dataclass(frozen=True)
class Diff:
    max_abs: float
    mse: float
    scale: float  # max |reference logit|: the tolerances are relative to it

    def within(self, rel_max_abs: float, rel_mse: float) -> bool:
        unit = max(1.0, self.scale)
        return self.max_abs <= rel_max_abs * unit and self.mse <= rel_mse * unit**2

    def __str__(self) -> str:
        return f"max-abs {self.max_abs:.2e}, MSE {self.mse:.2e} (logits up to {self.scale:.2f})"


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> Greedy:
    """Exactly ``n`` greedy tokens of HF's: ``generate``, except for LongRoPE models, whose
    ``generate`` throws its cache away on the step a sequence crosses the short/long boundary and
    recomputes it (no retained-state graph can; ``tests/test_longrope.py`` measures that
    difference): for them the reference is HF's forward with its own cache, step by step."""
    if (getattr(model.config, "rope_parameters", None) or {}).get("rope_type") == "longrope":
        return hf_forward_greedy(model, prompt, n)
    return hf_generate_greedy(model, prompt, n)


def hf_forward_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> Greedy:
    """Greedy decoding with HF's forward and the cache it returns (no ``generate``)."""
    steps: list[torch.Tensor] = []
    tokens: list[int] = []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            steps.append(out.logits[0, -1].float())
            tokens.append(int(steps[-1].argmax()))
            if len(tokens) == n:
                break
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
    return Greedy(tokens, torch.stack(steps).numpy())


def hf_generate_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> Greedy:
    """Exactly ``n`` greedy tokens of ``generate``. It fills a None in the config it is given from
    the model's own generation config, so EOS is switched off there: the tiny vocabulary hits it."""
    model.generation_config.eos_token_id = None
    config = GenerationConfig(
        do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    tokens = out.sequences[0, len(prompt):].tolist()
    return Greedy(tokens, torch.stack([step[0] for step in out.logits]).float().numpy())


def _randomize_zero_biases(model: torch.nn.Module, seed: int) -> None:
    """Seeded N(0, 0.2) values in every all-zero bias (HF's init zeroes some, which hides them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("bias") and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def build(case: TinyArch) -> Built:
    """HF's reference and its transformed wrapper (which runs a weight-sharing copy: the
    reference keeps HF's own classes and config)."""
    hf = from_config(case.model_type, case.config, seed=SEED)
    if case.random_biases:
        _randomize_zero_biases(hf, SEED)
    if experts_modules(hf):  # the literal reference: HF's own per-expert loop
        hf.set_experts_implementation("eager")
    qmodel = transform(hf)
    return Built(case, hf, qmodel, [hf_greedy(hf, p, GEN_LEN) for p in PROMPTS])


def teacher_forced_logits(session: Session, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Prefill ``prompt`` in PROMPT_LEN chunks, then decode ``tokens[:-1]``: (len(tokens), vocab)."""
    steps = []
    for start in range(0, len(prompt), PROMPT_LEN):
        piece = prompt[start : start + PROMPT_LEN]
        ids = np.zeros((1, PROMPT_LEN), np.int64)
        pos = np.full((1, PROMPT_LEN), -1, np.int64)
        ids[0, : len(piece)] = piece
        pos[0, : len(piece)] = np.arange(start, start + len(piece))
        logits = session.run(ids, pos)
    steps.append(logits[0].copy())
    for i, token in enumerate(tokens[:-1]):
        steps.append(session.run(np.array([[token]]), np.array([[len(prompt) + i]]))[0].copy())
    return np.stack(steps)


def compare(reference: np.ndarray, got: np.ndarray) -> Diff:
    delta = reference.astype(np.float64) - got.astype(np.float64)
    return Diff(float(np.abs(delta).max()), float((delta**2).mean()), float(np.abs(reference).max()))
