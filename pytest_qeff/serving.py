"""The ``serving`` stage: one serving feature of a card, against HF eager on the untouched model.

One test per declared feature (``[serving] features``) and case, on ONNX Runtime:

    continuous_batching  ``[serving] prompts`` prompts of mixed lengths arrive on a seeded
                         schedule and run through ``full_batch_size`` slots (reused)
    prefix_caching       prompts that extend earlier ones run through one slot with prefix reuse;
                         the tokens equal those of the same run without it
    sampling             sampled tokens equal each prompt's run alone in a slot (same seed and
                         index): independent of batch composition; two runs agree
    speculative          the target verifies K drafted tokens per step, drafted by the model itself
                         (its base graph): every draft is accepted
    prompt_lookup        the same target verifies up to K tokens per step drafted from the text
                         itself (qeff.generation.ngram): no draft model

The verdict, for every prompt, is HF eager's: one forward of HF over the prompt and the tokens the
feature produced gives the logits HF would have chosen each token from. Greedy features must choose
HF's argmax at every step (unless HF's own top-2 margin there is below the card's ambiguity
margin), and every feature's logits must be within the card's ``logits_max_abs`` of HF's. Comparing
logits keeps the verdict meaningful on tiny random models whose greedy tokens barely depend on the
context (a tied-embedding model repeats its last token): a slot mix-up or a stale cache entry
moves the logits long before it moves a token.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from pytest_qeff.records import GenerationRow, ServingCheck, ServingRecord

__all__ = ["run", "workload"]

#: The sampling the ``sampling`` feature runs with (seeded per card).
SAMPLING = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1)


def workload(ws, target) -> tuple[list[list[int]], list[str | None]]:
    """``[serving] prompts`` prompts of mixed lengths that fit the case with the generation."""
    card, case = target.card, target.case
    n, steps = card.serving.prompts, card.prompts.generation_len
    room = case.ctx_len - steps - (card.serving.num_speculative_tokens if target.feature in ("speculative", "prompt_lookup") else 0)
    if ws.tier == "tiny":
        rng = random.Random(f"{card.id}/{card.tiny.seed}/serving")
        vocab = card.tiny_config().vocab_size
        longest = max(1, min(room, 2 * max(card.prompts.tiny_lengths)))
        ids = [[rng.randrange(vocab) for _ in range(rng.randint(1, longest))] for _ in range(n)]
        return ids, [None] * n
    tokenizer = ws.pipeline(card).tokenizer
    texts = card.prompts.text
    chosen = [texts[i % len(texts)] + ("" if i < len(texts) else " " + texts[(i + 1) % len(texts)]) for i in range(n)]
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"][:room] for t in chosen]
    return ids, chosen


def _hf_logits(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """HF eager's logits for each generated token, given the prompt and the tokens before it:
    (len(tokens), vocab)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt + tokens[:-1]]))
    return out.logits[0, len(prompt) - 1 :].float().numpy()


def _judge(ws, target, prompts, tokens, logits, *, greedy: bool):
    """Rows (HF's choice vs ours at every step), max-abs of the logits, and the problems."""
    from qeff.verification import top2_margin

    card = target.card
    tol = getattr(card.tolerances, target.tier)
    model = ws.pipeline(card).model
    rows, problems, worst, matched, total = [], [], 0.0, 0, 0
    for r, (prompt, ours, mine) in enumerate(zip(prompts, tokens, logits)):
        hf = _hf_logits(model, prompt, ours)
        diff = float(np.abs(hf - mine).max())
        worst = max(worst, diff)
        choice = hf.argmax(-1).tolist()
        first = next((t for t, (a, b) in enumerate(zip(choice, ours)) if a != b), None)
        margin = top2_margin(hf[first]) if first is not None else None
        ambiguous = margin is not None and margin < tol.ambiguity_margin
        if greedy:
            matched += len(ours) if first is None else first
            total += len(ours)
            if first is not None and not ambiguous:
                problems.append(f"prompt {r} step {first}: HF would choose {choice[first]}, the {target.feature} run chose {ours[first]} "
                                f"(HF's top-2 margin {margin:.3g} >= {tol.ambiguity_margin:.3g})")
        rows.append(GenerationRow(row=r, reference=choice, generated=list(ours), first_divergence=first if greedy else None,
                                  margin=margin if greedy else None, ambiguous=ambiguous and greedy,
                                  reference_text=ws.decode(card, choice), generated_text=ws.decode(card, list(ours))))
    if worst > tol.logits_max_abs:
        problems.append(f"logits differ from HF's by {worst:.3g} > logits_max_abs {tol.logits_max_abs:.3g}")
    checks = [ServingCheck("logits max-abs vs HF (teacher-forced on these tokens)", f"{worst:.3g}", f"<= {tol.logits_max_abs:.3g}",
                           worst <= tol.logits_max_abs)]
    if greedy:
        checks.append(ServingCheck("tokens = HF's argmax", f"{matched}/{total}", "all, or ambiguous", not problems or matched == total))
    return rows, worst, checks, problems


def _serving_session(ws, target, variant, **options):
    card, case = target.card, target.case
    pipe = ws.pipeline(card)
    built = pipe.compile("ort", variant=variant, prompt_len=case.prompt_len, ctx_len=case.ctx_len, **options)
    return pipe.open_session(built)[0]


def run(ws, target, record) -> None:
    from qeff.serving.variant import GraphVariant

    card, case, feature, cfg = target.card, target.case, target.feature, target.card.serving
    prompts, texts = workload(ws, target)
    steps = card.prompts.generation_len
    base = {"prompts": prompts, "prompt_texts": texts, "batch_size": case.batch_size, "prompt_len": case.prompt_len,
            "ctx_len": case.ctx_len, "device_group": list(ws.device_group)}
    greedy, figures, settings, extra_checks, extra_problems = True, {}, {}, [], []

    if feature in ("continuous_batching", "prefix_caching", "sampling"):
        from qeff.generation import generate
        from qeff.generation.continuous import generate_continuous
        from qeff.generation.sampling import SamplingParams
        from qeff.runtime.ort_serving import SlotView

        slots = 1 if feature == "prefix_caching" else cfg.full_batch_size
        session = _serving_session(ws, target, GraphVariant(continuous_batching=True), batch_size=1, full_batch_size=slots)
        rng = random.Random(f"{card.id}/{case.id}/arrivals")
        arrivals = sorted(rng.randint(0, steps) for _ in prompts) if feature == "continuous_batching" else None
        sampling = SamplingParams(**SAMPLING, seed=card.tiny.seed) if feature == "sampling" else None
        if feature == "prefix_caching":
            # Each prompt after the first extends the one before it: the slot holds its prefix.
            grown = [prompts[0]]
            for extra in prompts[1:]:
                grown.append((grown[-1] + extra)[: case.ctx_len - steps])
            prompts = base["prompts"] = grown
            base["prompt_texts"] = [None] * len(grown)
        settings = {"full_batch_size": slots, "arrival_steps": arrivals, "sampling": sampling.to_dict() if sampling else None}

        def go(**kw):
            return generate_continuous(session, prompt_token_ids=prompts, prompt_len=case.prompt_len, generation_len=steps,
                                       eos_token_id=[], sampling=sampling, arrival_steps=arrivals, return_logits=True, **kw)

        result = go(prefix_caching=feature == "prefix_caching")
        tokens, logits = result.token_ids, result.logits
        figures = {"slot_occupancy": result.slot_occupancy, "decode_steps": float(result.steps),
                   "prefill_runs": float(result.prefill_runs), "prefix_hit_tokens": float(sum(result.prefix_hit_tokens))}
        if feature == "prefix_caching":
            miss = go()
            hits = sum(result.prefix_hit_tokens)
            same = miss.token_ids == tokens
            extra_checks += [ServingCheck("prompt tokens reused from the slot", str(hits), "> 0", hits > 0),
                             ServingCheck("tokens with prefix reuse = without", "equal" if same else "differ", "equal", same)]
            if not hits:
                extra_problems.append("no prompt reused its predecessor's cache entries")
            if not same:
                extra_problems.append("tokens with prefix reuse differ from the same run without it")
        if feature == "sampling":
            greedy = False
            again = go().token_ids
            alone = [generate(SlotView(session, [0]), prompt_token_ids=[p], prompt_len=case.prompt_len, generation_len=steps,
                              eos_token_id=[], sampling=sampling, sample_keys=[i]).token_ids[0]
                     for i, p in enumerate(prompts)]
            for label, other in (("a second run", again), ("each prompt alone (batch 1)", alone)):
                same = other == tokens
                extra_checks.append(ServingCheck(f"sampled tokens = {label}", "equal" if same else "differ", "equal", same))
                if not same:
                    extra_problems.append(f"sampled tokens differ from {label} with the same seed")
    elif feature in ("speculative", "prompt_lookup"):
        from qeff.inputs import batches
        from qeff.generation.ngram import NgramDrafter
        from qeff.generation.speculative import generate_speculative

        k = cfg.num_speculative_tokens
        target_session = _serving_session(ws, target, GraphVariant(speculative=True), batch_size=case.batch_size, num_speculative_tokens=k)
        tokens, logits, rates, means = [], [], [], []
        for rows, real in batches(prompts, case.batch_size):
            # The model itself, base graph, a fresh cache; or the text's own n-grams.
            draft = ws.session(card, case, "ort") if feature == "speculative" else NgramDrafter()
            r = generate_speculative(target_session, draft, prompt_token_ids=rows, prompt_len=case.prompt_len, generation_len=steps,
                                     eos_token_id=[], num_speculative_tokens=k, return_logits=True)
            tokens += r.token_ids[:real]
            logits += r.logits[:real]
            rates.append(r.acceptance_rate)
            means.append(r.mean_accepted_tokens)
        rate = min(rates)
        figures = {"mean_accepted_tokens": float(np.mean(means)), "acceptance_rate": rate}
        if feature == "speculative":
            settings = {"num_speculative_tokens": k, "draft": "the model itself (base graph)"}
            extra_checks.append(ServingCheck("self-draft tokens accepted", f"{rate:.0%}", ">= 95%", rate >= 0.95))
            if rate < 0.95:
                extra_problems.append(f"the model drafting for itself had only {rate:.0%} of its tokens accepted")
        else:  # what the lookup proposes depends on the text: reported, the tokens are judged by HF
            settings = {"num_speculative_tokens": k, "draft": "prompt lookup (n-grams of the text itself)"}
    else:  # pragma: no cover - the card schema admits only the features above
        raise AssertionError(feature)

    rows, worst, checks, problems = _judge(ws, target, prompts, tokens, logits, greedy=greedy)
    record(ServingRecord(**base, feature=feature, checks=checks + extra_checks, rows=rows, logits_max_abs=worst,
                         figures=figures, settings=settings))
    problems += extra_problems
    if problems:
        pytest.fail(f"{target.id}: " + "; ".join(problems), pytrace=False)
