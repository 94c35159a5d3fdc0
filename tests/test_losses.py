"""Losses against numbers computed by hand (values written in the test) and independent formulas."""

import math

import pytest
import torch

from alignment.losses import (
    dpo_loss,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    reward_model_loss,
    value_loss,
)
from alignment.logprobs import token_entropy


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_reward_model_loss_by_hand():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([0.0, 2.0])
    loss, m = reward_model_loss(chosen, rejected)
    # -mean(log sig(1), log sig(-2)) = (0.3132617 + 2.1269280) / 2
    assert loss.item() == pytest.approx((0.31326169 + 2.12692801) / 2, abs=1e-6)
    assert m["accuracy"].item() == 0.5
    assert m["margin"].item() == pytest.approx(-0.5)


def test_reward_model_loss_margin_and_centering():
    chosen, rejected = torch.tensor([1.0]), torch.tensor([0.0])
    loss, _ = reward_model_loss(chosen, rejected, margin=1.0)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)  # -log sig(0)
    loss, _ = reward_model_loss(chosen, rejected, center_coef=0.5)
    assert loss.item() == pytest.approx(-math.log(sig(1.0)) + 0.5 * 1.0, abs=1e-6)


def test_reward_model_loss_gradient_matches_analytic():
    # d/dr_w [-log sig(r_w - r_l)] = -(1 - sig(r_w - r_l)) / B
    chosen = torch.tensor([0.3, -1.2], requires_grad=True)
    rejected = torch.tensor([0.1, 0.4], requires_grad=True)
    loss, _ = reward_model_loss(chosen, rejected)
    loss.backward()
    expected = [-(1 - sig(0.2)) / 2, -(1 - sig(-1.6)) / 2]
    assert chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)
    assert rejected.grad.tolist() == pytest.approx([-e for e in expected], abs=1e-6)
    assert torch.autograd.gradcheck(
        lambda c, r: reward_model_loss(c, r)[0], (chosen.double().detach().requires_grad_(), rejected.double().detach().requires_grad_())
    )


def test_dpo_equals_log2_when_policy_is_reference():
    lp = torch.tensor([-3.0, -7.5, -1.0])
    lr = torch.tensor([-4.0, -2.0, -9.0])
    losses, cr, rr = dpo_loss(lp, lr, lp.clone(), lr.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2.0)))
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_dpo_sigmoid_by_hand_subtracts_log_ratios():
    # chosen log-ratio = -1 - (-2) = 1; rejected log-ratio = -3 - (-1) = -2; h = 1 - (-2) = 3
    losses, cr, rr = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), beta=0.5
    )
    assert losses.item() == pytest.approx(-math.log(sig(1.5)), abs=1e-6)  # beta * h = 1.5
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-1.0)
    # Had the log-ratios been added (the erratum), h would be -1 and the loss -log sig(-0.5) = 0.974.
    assert losses.item() != pytest.approx(-math.log(sig(-0.5)), abs=1e-3)


def test_dpo_label_smoothing_and_ipo_by_hand():
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0]))
    losses, _, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * -math.log(sig(1.5)) + 0.1 * -math.log(sig(-1.5)), abs=1e-6)
    losses, _, _ = dpo_loss(*args, beta=0.5, loss_type="ipo")
    assert losses.item() == pytest.approx((3.0 - 1.0) ** 2, abs=1e-6)  # (h - 1/(2*0.5))^2
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(*args, beta=0.5, loss_type="hinge-typo")


def test_kl_estimators_by_hand_and_k3_nonnegative():
    logps = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])  # log_ratio = [0.5, -1.0]
    assert kl_penalty(logps, ref, "k1").tolist()[0] == pytest.approx([0.5, -1.0])
    assert kl_penalty(logps, ref, "k2").tolist()[0] == pytest.approx([0.125, 0.5])
    assert kl_penalty(logps, ref, "k3").tolist()[0] == pytest.approx(
        [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0], abs=1e-6
    )
    x = torch.linspace(-20, 20, 2001)
    assert torch.all(kl_penalty(x, torch.zeros_like(x), "k3") >= 0)


def test_k1_and_k3_estimate_true_kl_on_samples():
    # Independent check: KL between two categoricals computed exactly vs. Monte-Carlo estimates.
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[idx], q.log()[idx]
    assert kl_penalty(lp, lq, "k1").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert kl_penalty(lp, lq, "k3").mean().item() == pytest.approx(true_kl, abs=0.01)


def test_ppo_loss_is_plain_surrogate_inside_clip_range():
    logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.05, -1.9, -0.5]])  # ratios e^0.05, e^-0.1, 1: all inside [0.8, 1.2]
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.ones(1, 3)
    loss, m = ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    ratios = [math.exp(0.05), math.exp(-0.1), 1.0]
    expected = -(ratios[0] * 1.0 + ratios[1] * -2.0 + ratios[2] * 3.0) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["clip_frac"].item() == 0.0
    loss.backward()
    # d loss / d logp_t = -ratio_t * A_t / 3
    assert logps.grad.tolist()[0] == pytest.approx([-r * a / 3 for r, a in zip(ratios, [1.0, -2.0, 3.0])], abs=1e-6)


def test_ppo_loss_stops_gradient_outside_clip_range():
    # ratio e^0.5 = 1.65 > 1.2 with A > 0: clipped, zero gradient. ratio e^-0.5 with A < 0: clipped too.
    logps = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-0.5, 0.5]])
    adv = torch.tensor([[2.0, -1.0]])
    loss, m = ppo_policy_loss(logps, old, adv, torch.ones(1, 2), clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.2 * 2.0 + 0.8 * -1.0) / 2, abs=1e-6)
    assert m["clip_frac"].item() == 1.0
    loss.backward()
    assert logps.grad.abs().max().item() == 0.0


def test_ppo_loss_ignores_masked_tokens():
    logps = torch.tensor([[-1.0, 5.0]])
    old = torch.tensor([[-1.0, -9.0]])
    adv = torch.tensor([[2.0, 100.0]])
    loss, m = ppo_policy_loss(logps, old, adv, torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(-2.0)
    assert m["approx_kl"].item() == pytest.approx(0.0)


def test_value_loss_plain_and_clipped_by_hand():
    values = torch.tensor([[1.0, 3.0]])
    old = torch.tensor([[0.0, 3.0]])
    returns = torch.tensor([[0.0, 1.0]])
    mask = torch.ones(1, 2)
    # plain: 0.5 * mean(1, 4) = 1.25
    assert value_loss(values, old, returns, mask).item() == pytest.approx(1.25)
    # clipped with eps 0.5: V1 clipped to 0.5 -> (0.5-0)^2=0.25; max(1, 0.25)=1; V2 unchanged 4 -> 1.25
    assert value_loss(values, old, returns, mask, clip_eps=0.5).item() == pytest.approx(1.25)
    # clipped estimate larger than the plain one: V=0, old=2, R=3: plain 9, clipped clip(0, 1.5, 2.5)=1.5 -> 2.25
    v = value_loss(torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.5)
    assert v.item() == pytest.approx(0.5 * 9.0)


def test_value_loss_takes_the_larger_error():
    # V=4, V_old=2, R=3, eps=0.5: plain (4-3)^2 = 1; clipped V = 2.5 -> (2.5-3)^2 = 0.25; max = 1.
    v = value_loss(torch.tensor([[4.0]]), torch.tensor([[2.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.5)
    assert v.item() == pytest.approx(0.5)


def test_token_entropy_by_hand():
    # uniform over 4 tokens: log 4; one-hot-ish (very peaked): ~0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    assert token_entropy(logits).tolist()[0] == pytest.approx([math.log(4.0), 0.0], abs=1e-6)
    # p = (0.5, 0.25, 0.25): H = 1.5 log 2, in float32 from half-precision logits as well
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    assert token_entropy(logits).item() == pytest.approx(1.5 * math.log(2.0), abs=1e-6)
    assert token_entropy(logits.bfloat16()).dtype == torch.float32


def test_masked_mean_excludes_masked():
    assert masked_mean(torch.tensor([1.0, 100.0, 3.0]), torch.tensor([1, 0, 1])).item() == 2.0
