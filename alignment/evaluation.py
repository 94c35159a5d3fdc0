"""Evaluation of a policy against its reference: KL, reward-model score, gold reward, win rate."""

from __future__ import annotations

import dataclasses

from typing import Callable, Sequence

import torch

from alignment.data import encode_prompt, pad
from alignment.logprobs import sequence_logprobs
from alignment.models import position_ids_from_mask
from alignment.sampling import SampleOutput, SamplingParams, sample

ScoreFn = Callable[[list[str], list[str]], torch.Tensor]  # (prompts, answers) -> [B]


def win_rate(scores: torch.Tensor, baseline_scores: torch.Tensor) -> float:
    """Fraction of prompts where scores > baseline_scores; ties count one half. Both [B]."""
    return float(((scores > baseline_scores).float() + 0.5 * (scores == baseline_scores).float()).mean())


@torch.no_grad()
def answer_logps(model, out: SampleOutput) -> torch.Tensor:
    """Summed log pi(answer | prompt) at temperature 1 for sampled rows. Returns [B]."""
    mask = torch.zeros_like(out.attention_mask)
    mask[:, out.prompt_length :] = out.answer_mask
    logits = model(
        input_ids=out.sequences, attention_mask=out.attention_mask,
        position_ids=position_ids_from_mask(out.attention_mask),
    ).logits
    return sequence_logprobs(logits, out.sequences, mask)[1]


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: Sequence[str], params: SamplingParams, seed: int
) -> tuple[list[str], list[SampleOutput]]:
    """Sample one answer per prompt, params.batch_size prompts at a time, with a seeded generator.
    Returns (texts, raw outputs)."""
    device = next(model.parameters()).device
    params = dataclasses.replace(params, stop_token_ids=params.stop_token_ids or (tokenizer.eos_token_id,))
    generator = torch.Generator(device=device).manual_seed(seed)
    texts, outs = [], []
    for i in range(0, len(prompts), params.batch_size):
        ids, mask = pad([encode_prompt(tokenizer, p) for p in prompts[i : i + params.batch_size]], tokenizer.pad_token_id, "left")
        out = sample(model, ids.to(device), mask.to(device), params, tokenizer.pad_token_id, generator)
        outs.append(out)
        texts += tokenizer.batch_decode(
            [a[m.bool()].tolist() for a, m in zip(out.answer_ids, out.answer_mask)], skip_special_tokens=True
        )
    return texts, outs


@torch.no_grad()
def evaluate_policy(
    policy,
    reference,
    tokenizer,
    prompts: Sequence[str],
    params: SamplingParams,
    seed: int = 0,
    reward_fn: ScoreFn | None = None,
    gold_fn: ScoreFn | None = None,
    banned_fn: Callable[[str], bool] | None = None,
    reference_answers: Sequence[str] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Sample from the policy and the reference on the same prompts and compare them.

    eval/kl = mean over answers of sum_t [log pi(y_t|..) - log pi_ref(y_t|..)] on policy samples (k1).
    eval/gold_win_rate = P(gold(policy answer) > gold(reference answer)), ties one half.
    reference_answers: the reference's answers to these prompts, when they were sampled before (several
    policies evaluated against one reference); sampled here with seed + 1 otherwise.
    Returns (metrics, rows): one row per prompt with both answers and their scores.
    """
    policy.eval()
    reference.eval()
    answers, outs = generate_answers(policy, tokenizer, prompts, params, seed)
    kl = torch.cat([answer_logps(policy, o) - answer_logps(reference, o) for o in outs])  # [B]
    lengths = torch.cat([o.answer_mask.sum(-1) for o in outs]).float()
    prompts = list(prompts)
    metrics = {"eval/kl": float(kl.mean()), "eval/answer_len_mean": float(lengths.mean())}
    rows = [{"prompt": p, "answer": a, "kl": float(k)} for p, a, k in zip(prompts, answers, kl)]
    if reward_fn is not None:
        rm = reward_fn(prompts, answers).float().cpu()
        metrics["eval/rm_reward_mean"] = float(rm.mean())
        for row, r in zip(rows, rm):
            row["rm_reward"] = float(r)
    if gold_fn is not None:
        if reference_answers is None:
            ref_answers, _ = generate_answers(reference, tokenizer, prompts, params, seed + 1)
        else:
            ref_answers = list(reference_answers)
            if len(ref_answers) != len(prompts):
                raise ValueError(f"{len(ref_answers)} reference answers for {len(prompts)} prompts")
        gold = gold_fn(prompts, answers).float().cpu()
        ref_gold = gold_fn(prompts, ref_answers).float().cpu()
        metrics["eval/gold_reward_mean"] = float(gold.mean())
        metrics["eval/ref_gold_reward_mean"] = float(ref_gold.mean())
        metrics["eval/gold_win_rate"] = win_rate(gold, ref_gold)
        for row, g, ra, rg in zip(rows, gold, ref_answers, ref_gold):
            row.update(gold_reward=float(g), reference_answer=ra, reference_gold_reward=float(rg))
    if banned_fn is not None:
        banned = [banned_fn(a) for a in answers]
        metrics["eval/banned_word_rate"] = sum(banned) / len(banned)
        for row, b in zip(rows, banned):
            row["has_banned_word"] = b
    return metrics, rows
