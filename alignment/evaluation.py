"""Evaluation of a policy against its reference.

On prompts: KL (k3 headline, k1 beside it), answer length, distinct-n, and with a reward function the
reward of both answers and the win rate; with a gold function (the sandbox), gold reward and win rate.
On held-out preference pairs: the policy's preference accuracy and DPO's implicit-reward accuracy and
margin (`pair_metrics`); the reward model's accuracy is RewardTrainer.evaluate.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from alignment.data import PairExample, Prompt, collate_answers, encode_answer, encode_prompt, fit_to_length, pad, templated
from alignment.logprobs import answer_logprobs
from alignment.losses import kl_k1, kl_k3
from alignment.models import position_ids_from_mask
from alignment.sampling import SampleOutput, SamplingParams, sample, stop_token_ids

ScoreFn = Callable[[list, list[str]], torch.Tensor]  # (prompts, answers) -> [B]


def win_rate(scores: torch.Tensor, baseline_scores: torch.Tensor) -> float:
    """Fraction of prompts where scores > baseline_scores; ties count one half. Both [B]."""
    return float(((scores > baseline_scores).float() + 0.5 * (scores == baseline_scores).float()).mean())


def distinct_n(answers: Sequence[str], n: int) -> float:
    """distinct-n (Li et al. 2016): distinct word n-grams / all word n-grams over all answers; 0 if none."""
    grams = [tuple(words[i : i + n]) for a in answers for words in [a.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def reward_scores(rm, tokenizer, max_length: int) -> ScoreFn:
    """reward_fn(prompts, answers) -> [B] of a reward model, text in: it renders each prompt with its own
    tokenizer (and chat template), so it may differ from the policy's. max_length: the RM's training length."""

    @torch.no_grad()
    def fn(prompts, answers):
        rm.eval()
        device = next(rm.parameters()).device
        enc = [fit_to_length(encode_prompt(tokenizer, p), [encode_answer(tokenizer, a, templated(tokenizer, p))], max_length)
               for p, a in zip(prompts, answers)]
        ids, mask, _ = collate_answers([e[0] for e in enc], [e[1][0] for e in enc], tokenizer.pad_token_id)
        return rm(ids.to(device), mask.to(device)).float().cpu()

    return fn


@torch.no_grad()
def answer_logps(model, out: SampleOutput) -> torch.Tensor:
    """Per-token log pi(answer token | ..) at temperature 1 for sampled rows: [B, P + N], 0 off the answer."""
    mask = torch.zeros_like(out.attention_mask)
    mask[:, out.prompt_length :] = out.answer_mask
    return answer_logprobs(model, out.sequences, out.attention_mask, mask, position_ids_from_mask(out.attention_mask))


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: Sequence[Prompt], params: SamplingParams, seed: int
) -> tuple[list[str], list[SampleOutput]]:
    """Sample one answer per prompt, params.batch_size prompts at a time, with a seeded generator.
    Returns (texts, raw outputs)."""
    device = next(model.parameters()).device
    params = dataclasses.replace(params, stop_token_ids=stop_token_ids(params, tokenizer, model))
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
    prompts: Sequence[Prompt],
    params: SamplingParams,
    seed: int = 0,
    reward_fn: ScoreFn | None = None,
    gold_fn: ScoreFn | None = None,
    banned_fn: Callable[[str], bool] | None = None,
    reference_answers: Sequence[str] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Sample from the policy and the reference on the same prompts and compare them.

    eval/kl = mean over answers of sum_t k3(log pi(y_t|..) - log pi_ref(y_t|..)) on policy samples: an
    unbiased, non-negative estimate of KL(pi || pi_ref) per answer (MATH.md); eval/kl_k1 sums the log-ratio.
    eval/rm_win_rate, eval/gold_win_rate = P(score(policy answer) > score(reference answer)), ties one half.
    reference_answers: the reference's answers to these prompts, when they were sampled before (several
    policies evaluated against one reference); sampled here with seed + 1 otherwise.
    Returns (metrics, rows): one row per prompt with both answers and their scores.
    """
    policy.eval()
    reference.eval()
    prompts = list(prompts)
    answers, outs = generate_answers(policy, tokenizer, prompts, params, seed)
    log_ratio = [answer_logps(policy, o) - answer_logps(reference, o) for o in outs]  # each [b, P + N]
    masks = [torch.nn.functional.pad(o.answer_mask, (o.prompt_length, 0)).to(lr.dtype) for o, lr in zip(outs, log_ratio)]
    kl = torch.cat([(kl_k3(lr) * m).sum(-1) for lr, m in zip(log_ratio, masks)])  # [B]
    kl_1 = torch.cat([(kl_k1(lr) * m).sum(-1) for lr, m in zip(log_ratio, masks)])  # [B]
    lengths = torch.cat([o.answer_mask.sum(-1) for o in outs]).float()
    if reference_answers is None:
        ref_answers, _ = generate_answers(reference, tokenizer, prompts, params, seed + 1)
    else:
        ref_answers = list(reference_answers)
        if len(ref_answers) != len(prompts):
            raise ValueError(f"{len(ref_answers)} reference answers for {len(prompts)} prompts")
    metrics = {
        "eval/kl": float(kl.mean()), "eval/kl_k1": float(kl_1.mean()), "eval/answer_len_mean": float(lengths.mean()),
        "eval/distinct_1": distinct_n(answers, 1), "eval/distinct_2": distinct_n(answers, 2),
        "eval/ref_distinct_2": distinct_n(ref_answers, 2),
    }
    rows = [{"prompt": p if isinstance(p, str) else str(list(p)[-1]["content"]), "answer": a, "reference_answer": ra,
             "kl": float(k)} for p, a, ra, k in zip(prompts, answers, ref_answers, kl)]
    for name, fn in (("rm", reward_fn), ("gold", gold_fn)):
        if fn is None:
            continue
        scores = fn(prompts, answers).float().cpu()
        ref_scores = fn(prompts, ref_answers).float().cpu()
        metrics[f"eval/{name}_reward_mean"] = float(scores.mean())
        metrics[f"eval/ref_{name}_reward_mean"] = float(ref_scores.mean())
        metrics[f"eval/{name}_win_rate"] = win_rate(scores, ref_scores)
        for row, r, rr in zip(rows, scores, ref_scores):
            row.update({f"{name}_reward": float(r), f"reference_{name}_reward": float(rr)})
    if banned_fn is not None:
        banned = [banned_fn(a) for a in answers]
        metrics["eval/banned_word_rate"] = sum(banned) / len(banned)
        metrics["eval/ref_banned_word_rate"] = sum(banned_fn(a) for a in ref_answers) / len(ref_answers)
        for row, b in zip(rows, banned):
            row["has_banned_word"] = b
    return metrics, rows


@torch.no_grad()
def answer_pair_logps(model, examples: Sequence[PairExample], pad_token_id: int, batch_size: int = 16) -> torch.Tensor:
    """(log pi(y_w|x), log pi(y_l|x)) of every pair: [N, 2], on the CPU. Each distinct answer of a prompt is
    scored once (alignment.prefix.group_by_prompt); rows come in group order, the same for any model."""
    from alignment.prefix import group_by_prompt, pair_values
    from alignment.trainers.dpo import group_logps

    model.eval()
    device = next(model.parameters()).device
    groups, rows = group_by_prompt(examples), []
    for i in range(0, len(groups), batch_size):
        part = groups[i : i + batch_size]
        rows.append(torch.stack(pair_values(group_logps(model, part, pad_token_id, device), part), -1).float().cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 2)


@torch.no_grad()
def pair_metrics(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> dict[str, float]:
    """Metrics of a policy on held-out preference pairs, from summed answer log-probs.

    policy_logps, reference_logps: [N, 2] = (log pi(y_w|x), log pi(y_l|x)) per pair.
    eval/pref_accuracy: P(log pi(y_w|x) > log pi(y_l|x)), the policy itself prefers the chosen answer.
    eval/implicit_accuracy, eval/implicit_margin: DPO's implicit reward r = beta * (log pi - log pi_ref)
    (Rafailov et al. 2023, Eq. 5): P(r_w > r_l) and mean(r_w - r_l). At the reference, the margin is 0.
    """
    policy_logps, reference_logps = policy_logps.float(), reference_logps.float()
    rewards = beta * (policy_logps - reference_logps)  # [N, 2]
    margin = rewards[:, 0] - rewards[:, 1]  # [N]
    return {
        "eval/pref_accuracy": float((policy_logps[:, 0] > policy_logps[:, 1]).float().mean()),
        "eval/implicit_accuracy": float((margin > 0).float().mean()),
        "eval/implicit_margin": float(margin.mean()),
        "eval/pairs": float(len(margin)),
    }
