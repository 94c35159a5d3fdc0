"""Advantage and return estimators, whitening, and KL-coefficient controllers.

Pure functions on [B, T] tensors whose mask marks the answer tokens (1) against prompt/padding (0).
Symbols follow ../shared/MATH.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor


def _local(t: Tensor) -> Tensor:
    return t


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over the answer tokens.

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)          (V after the last answer token is 0)
    A_t     = delta_t + gamma * lam * A_{t+1}              (backwards over answer tokens only)
    R_t     = A_t + V(s_t)                                 (value targets)
    Source: Schulman et al. 2016 (GAE), Eq. 16. lam = 1: Monte-Carlo returns minus V; lam = 0: TD error.

    rewards r, values V, mask: [B, T]; the answer tokens of a row are contiguous (prompt tokens
    before them and padding after them are masked). Returns (advantages [B, T], returns [B, T]),
    both 0 at masked positions.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])  # [B]
    next_value = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        # A masked position passes nothing back: the answer's first token sees V = 0 and A = 0 past its end.
        next_advantage = advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def rewards_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted rewards-to-go: G_t = sum_{t' >= t} gamma^(t' - t) r_t' over answer tokens.

    Source: the REINFORCE variance-reduction step of ../shared/MATH.md ("the past cannot be changed").
    rewards, mask: [B, T]. Returns [B, T], 0 at masked positions.
    """
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # [B]
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
           total: Callable[[Tensor], Tensor] = _local) -> Tensor:
    """Whiten x with statistics over unmasked positions only: (x - mean) / (std + eps).

    x, mask: [B, T]. std is the unbiased standard deviation over unmasked entries.
    With shift_mean=False the mean is added back (scale only). Returns [B, T], 0 where masked.
    total: how a sum over the batch is completed; several processes pass their all-reduce, so that each
    whitens its rows with the statistics of the whole batch.
    """
    m = mask.to(x.dtype)
    n = total(m.sum()).clamp(min=1.0)
    mean = total((x * m).sum()) / n
    var = total((((x - mean) * m) ** 2).sum()) / (n - 1).clamp(min=1.0)
    out = (x - mean) / (var.sqrt() + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, total: Callable[[Tensor], Tensor] = _local) -> Tensor:
    """Explained variance of the value function: 1 - Var(R - V) / Var(R), over unmasked tokens.

    values, returns, mask: [B, T]. Returns a scalar (1 = perfect, 0 = no better than a constant).
    total: as whiten's (the whole batch's over several processes).
    """
    m = mask.to(returns.dtype)
    n = total(m.sum()).clamp(min=1.0)

    def var(x: Tensor) -> Tensor:
        mean = total((x * m).sum()) / n
        return total((((x - mean) * m) ** 2).sum()) / n

    var_r = var(returns)
    return 1.0 - var(returns - values) / var_r.clamp(min=1e-12)


@dataclass
class FixedKLController:
    """A constant KL coefficient beta."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, Sec. 2.2).

    e = clip((KL - KL_target) / KL_target, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)
    """

    value: float  # current beta
    target: float  # KL_target, nats per answer
    horizon: int  # number of samples over which beta may change by a factor e

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max((current_kl - self.target) / self.target, -0.2), 0.2)
        self.value = self.value * (1.0 + error * n_steps / self.horizon)
        return self.value


# ---------------------------------------------------------------------------------------------
# Critic-free group baselines: several answers per prompt, scores [P, G] (prompt p, answer g)
# ---------------------------------------------------------------------------------------------


def group_advantages(scores: Tensor, scale: bool = True, eps: float = 1e-4, std: Tensor | None = None) -> Tensor:
    """Group-relative advantages of GRPO: each answer against the other answers to its prompt.

    A_pg = (r_pg - mean_g r_pg) / (std_g r_pg + eps)   (scale=True: GRPO, Shao et al. 2024, Eq. 3)
    A_pg = (r_pg - mean_g r_pg) / (std + eps)          (std given: one divisor for every group, such as the
                                                       whole batch's std: TRL's scale_rewards="batch")
    A_pg =  r_pg - mean_g r_pg                        (scale=False: Dr. GRPO, Liu et al. 2025, Sec. 3.1)
    std_g is the unbiased standard deviation over the group. A group whose scores are all equal gets
    A = 0 for every answer (no signal, and no NaN: the eps keeps 0 / 0 away).

    scores r: [P, G] with G >= 2. Returns [P, G].
    """
    if scores.shape[-1] < 2:
        raise ValueError(f"a group needs at least 2 answers a prompt, got {scores.shape[-1]}")
    # all equal: exactly 0 (the float mean of equal numbers can miss them by an ulp, which / eps would blow up)
    equal = (scores == scores[..., :1]).all(-1, keepdim=True)
    centred = torch.where(equal, torch.zeros_like(scores), scores - scores.mean(-1, keepdim=True))
    if std is not None:
        return centred / (std + eps)
    if not scale:
        return centred
    return centred / (scores.std(-1, keepdim=True) + eps)


def leave_one_out_advantages(scores: Tensor) -> Tensor:
    """RLOO advantages: each answer against the mean score of the OTHER answers to its prompt.

    b_pk = (sum_j r_pj - r_pk) / (K - 1);   A_pk = r_pk - b_pk = K / (K - 1) * (r_pk - mean_j r_pj)
    Source: Kool et al. 2019; Ahmadian et al. 2024 (RLOO), Eq. 6. The baseline does not depend on the
    answer it is subtracted from, so the policy gradient stays unbiased.

    scores r: [P, K] with K >= 2 (here r already holds the KL penalty). Returns [P, K].
    """
    k = scores.shape[-1]
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 answers a prompt, got {k}")
    baseline = (scores.sum(-1, keepdim=True) - scores) / (k - 1)
    return scores - baseline
