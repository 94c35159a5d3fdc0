"""Losses of RLHF: reward model (Bradley-Terry), DPO / IPO, PPO (clip, value, entropy), KL estimators.

Every function is pure: tensors and floats in, tensors out. Symbols follow ../shared/MATH.md.
Shapes: B = batch, T = tokens, V = vocabulary.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the positions where mask is 1.

    mean = sum(x * mask) / max(sum(mask), 1)
    x: [B, T] (any shape), mask: same shape as x (0/1, bool or float). Returns a scalar.
    """
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------


def reward_model_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: float | Tensor = 0.0,
    center_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry loss of a reward model.

    L_RM = -mean( log sigma(r_w - r_l - m) ) + eta * mean( (r_w + r_l)^2 )
    Source: Ouyang et al. 2022 (InstructGPT), Eq. 1; the centering term is Eisenstein et al. 2023.

    chosen_rewards r_w: [B], rejected_rewards r_l: [B], margin m: float or [B], center_coef eta: float.
    Returns (loss: scalar, metrics) with metrics accuracy (fraction r_w > r_l), margin (mean r_w - r_l),
    chosen_reward, rejected_reward (means); all detached scalars.
    """
    diff = chosen_rewards - rejected_rewards  # [B]
    loss = -F.logsigmoid(diff - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    with torch.no_grad():
        metrics = {
            "accuracy": (diff > 0).float().mean(),
            "margin": diff.mean(),
            "chosen_reward": chosen_rewards.mean(),
            "rejected_reward": rejected_rewards.mean(),
        }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# DPO family. One variant, one function; `dpo_loss` picks one by name.
# ---------------------------------------------------------------------------------------------


def dpo_sigmoid_loss(logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO loss (sigmoid), with optional label smoothing (conservative DPO).

    L = (1 - eps) * -log sigma(beta * h) + eps * -log sigma(-beta * h)
    Source: Rafailov et al. 2023, Eq. 7; cDPO: Mitchell 2023.
    logits h: [B] = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected). Returns [B].
    """
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(
        -beta * logits
    )


def ipo_loss(logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """IPO loss: L = (h - 1 / (2 beta))^2.

    Source: Azar et al. 2023, Eq. 17. logits h: [B]. Returns [B]. label_smoothing is ignored.
    """
    return (logits - 1.0 / (2.0 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": dpo_sigmoid_loss,
    "ipo": ipo_loss,
}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct Preference Optimization loss per pair, and the implicit rewards.

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]   (chosen MINUS rejected)
    sigmoid: L = -log sigma(beta h) (with label smoothing eps: see dpo_sigmoid_loss); ipo: (h - 1/(2 beta))^2.
    Implicit rewards: beta * (log pi - log pi_ref) for chosen and rejected.
    Source: Rafailov et al. 2023, Eq. 7 (the two log-ratios are subtracted, never added).

    All four log-prob inputs: [B] sequence log-probs summed over answer tokens.
    Returns (losses [B], chosen_rewards [B] detached, rejected_rewards [B] detached).
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B]
    logits = chosen_logratios - rejected_logratios  # [B]
    losses = DPO_LOSSES[loss_type](logits, beta, label_smoothing)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


# ---------------------------------------------------------------------------------------------
# KL estimators. One estimator, one function; `kl_penalty` picks one by name.
# ---------------------------------------------------------------------------------------------


def kl_k1(log_ratio: Tensor) -> Tensor:
    """k1 = log_ratio = log pi(a|s) - log pi_ref(a|s). Unbiased, can be negative. Schulman 2020."""
    return log_ratio


def kl_k2(log_ratio: Tensor) -> Tensor:
    """k2 = 0.5 * log_ratio^2. Biased, low variance, >= 0. Schulman 2020."""
    return 0.5 * log_ratio**2


def kl_k3(log_ratio: Tensor) -> Tensor:
    """k3 = exp(-log_ratio) - 1 + log_ratio. Unbiased for KL(pi||pi_ref) and >= 0. Schulman 2020."""
    return torch.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logps: Tensor, ref_logps: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta.

    log_ratio = logps - ref_logps; kind in k1, k2, k3 (see kl_k1, kl_k2, kl_k3).
    logps, ref_logps: [B, T] per-token log-probs of the sampled tokens. Returns [B, T].
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logps - ref_logps)


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss (minimised).

    rho_t = exp(logp_new - logp_old)     (a ratio of probabilities, not of log-probs)
    L_clip = -mean_t[ min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) ]   over unmasked tokens
    Source: Schulman et al. 2017, Eq. 7.

    logps, old_logps, advantages, mask: [B, T]. Returns (loss scalar, metrics) with
    clip_frac (fraction of tokens where the clipped term is the active one) and
    approx_kl (mean k3 estimate of KL(pi_old || pi_new) over unmasked tokens).
    """
    log_ratio = logps - old_logps  # [B, T]
    ratio = torch.exp(log_ratio)
    surrogate = ratio * advantages
    surrogate_clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -masked_mean(torch.min(surrogate, surrogate_clipped), mask)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((surrogate_clipped < surrogate).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = None,
) -> Tensor:
    """Value-function loss of PPO (minimised).

    L_V = 0.5 * mean_t[ (V - R)^2 ]; with clip_eps: 0.5 * mean_t[ max((V - R)^2, (clip(V, V_old - e, V_old + e) - R)^2) ]
    Source: Schulman et al. 2017 (Eq. 9), clipped form from OpenAI baselines ppo2.

    values V, old_values V_old, returns R, mask: [B, T]. Returns a scalar.
    """
    err = (values - returns) ** 2  # [B, T]
    if clip_eps is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        err = torch.max(err, (clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


# ---------------------------------------------------------------------------------------------
# Critic-free online RL (GRPO, Dr. GRPO, DAPO, RLOO): one advantage per answer, spread over its tokens
# ---------------------------------------------------------------------------------------------

GROUP_LOSS_TYPES = ("grpo", "dapo", "sequence")


def group_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    loss_type: str = "grpo",
    unbiased_kl: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate of GRPO with an answer-level advantage and an optional KL term (minimised).

    rho_t = exp(logp_t - logp_old_t)
    l_t   = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * w_t * k3_t,
            k3_t = exp(ref_t - logp_t) - 1 - (ref_t - logp_t)     (KL(pi || pi_ref) >= 0, ../shared/MATH.md)
            w_t  = rho_t (unbiased_kl, TRL's use_bias_correction_kl; differentiable) or 1
    grpo: L = mean_i [ sum_t l_it / |y_i| ]    (each answer weighs the same; Shao et al. 2024, Eq. 3)
    dapo: L = sum_it l_it / sum_i |y_i|        (each token weighs the same; Yu et al. 2025, Eq. 8)
    sequence: the answer is one action (RLOO, Ahmadian et al. 2024, Eq. 6; TRL's RLOOTrainer):
          rho_i = exp(sum_t (logp_it - logp_old_it)),  L = mean_i [ -min(rho_i A_i, clip(rho_i) A_i) + beta sum_t w_t k3_t ]
          whose gradient at rho = 1 is -A_i grad log pi(y_i | x), the REINFORCE estimator (no 1 / |y_i|).
    Separate low and high clip ranges are DAPO's clip-higher (eps_high > eps_low lets unlikely tokens rise).

    Why w_t = rho_t: at rho = 1 the gradient of beta * rho_t * k3_t is beta * (logp_t - ref_t) * grad logp_t,
    whose expectation over tokens sampled from pi is the gradient of KL(pi || pi_ref), the divergence the KL
    estimate measures and evaluation reports. Plain k3 has gradient beta * (1 - pi_ref / pi) * grad logp_t, whose
    expectation is the gradient of the *forward* KL(pi_ref || pi): it barely holds back a token the policy has
    made far more likely than the reference did (its weight saturates at 1), the way a reward model is exploited.

    logps, old_logps, mask: [B, T] per-token log-probs of the answer tokens (mask 1 on answer tokens);
    advantages A: [B], one per answer; ref_logps: [B, T] (needed when beta > 0).
    Returns (loss scalar, metrics): clip_frac (tokens, or answers for "sequence", where a clip is active), kl_k3
    (mean k3 per token, when ref_logps are given), approx_kl (old || new, per token).
    """
    if loss_type not in GROUP_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {list(GROUP_LOSS_TYPES)}")
    mask = mask.to(logps.dtype)
    log_ratio = (logps - old_logps) * mask  # [B, T]
    adv = advantages.to(logps.dtype)[:, None]  # [B, 1]
    if loss_type == "sequence":
        ratio = torch.exp(log_ratio.sum(-1, keepdim=True))  # [B, 1]: the answer's probability ratio
    else:
        ratio = torch.exp(log_ratio)  # [B, T]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv)
    kl = None
    kl_term = torch.zeros_like(logps)  # [B, T]
    if ref_logps is not None:
        kl = kl_k3(logps - ref_logps)  # [B, T]
        if beta:
            kl_term = beta * (torch.exp(log_ratio) if unbiased_kl else 1.0) * kl
    if loss_type == "sequence":
        loss = (-surrogate.squeeze(-1) + (kl_term * mask).sum(-1)).mean()
    else:
        per_token = (-surrogate + kl_term) * mask  # [B, T]
        if loss_type == "grpo":
            loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        else:
            loss = per_token.sum() / mask.sum().clamp(min=1.0)
    with torch.no_grad():
        clipped = ((ratio < 1.0 - clip_eps_low) & (adv < 0)) | ((ratio > 1.0 + clip_eps_high) & (adv > 0))
        metrics = {
            "clip_frac": clipped.to(logps.dtype).mean() if loss_type == "sequence" else masked_mean(clipped.to(logps.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
        if kl is not None:
            metrics["kl_k3"] = masked_mean(kl, mask)
    return loss, metrics
