"""GAE, rewards-to-go, whitening and KL controllers against hand-computed numbers and identities."""

import pytest
import torch

from alignment.advantages import AdaptiveKLController, FixedKLController, gae, rewards_to_go, whiten


def test_gae_by_hand():
    # 3 answer tokens, gamma = 0.9, lam = 0.5
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.5)
    d2 = 2.0 + 0.0 - 1.5  # V after the last token is 0
    d1 = 0.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5], abs=1e-6)


def test_gae_lambda_one_is_discounted_return_minus_value():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6)
    adv, _ = gae(r, v, mask, gamma=0.8, lam=1.0)
    # independent formula: G_t = sum_k gamma^k r_{t+k}
    G = torch.zeros(4, 6)
    for t in range(6):
        G[:, t] = sum(0.8**k * r[:, t + k] for k in range(6 - t))
    assert torch.allclose(adv, G - v, atol=1e-5)
    assert torch.allclose(rewards_to_go(r, mask, 0.8), G, atol=1e-5)


def test_gae_lambda_zero_is_one_step_td_error():
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    adv, _ = gae(r, v, torch.ones(3, 5), gamma=0.7, lam=0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1)], dim=1)
    assert torch.allclose(adv, r + 0.7 * next_v - v, atol=1e-6)


def test_gae_ignores_prompt_and_padding():
    # answer tokens at positions 1..2 of 4; prompt at 0, padding at 3 with garbage rewards/values
    r = torch.tensor([[50.0, 1.0, 2.0, 77.0]])
    v = torch.tensor([[9.0, 0.5, 1.0, 33.0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    # token 2: 2 - 1 = 1; token 1: 1 + 1 - 0.5 + (1) ... = (1 + 2) - 0.5 = 2.5
    assert adv.tolist()[0] == pytest.approx([0.0, 2.5, 1.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.0, 3.0, 2.0, 0.0])
    # the same answer without prompt or padding gives the same numbers
    adv2, _ = gae(r[:, 1:3], v[:, 1:3], torch.ones(1, 2), gamma=1.0, lam=1.0)
    assert adv2.tolist()[0] == pytest.approx([2.5, 1.0])


def test_whiten_uses_unmasked_statistics_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 1000.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = whiten(x, mask)
    # mean 2, unbiased std 1 -> [-1, 0, 1], masked 0
    assert w.tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert whiten(x, mask, shift_mean=False).tolist()[0] == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    # KL 12 -> error clipped to 0.2; beta = 0.1 * (1 + 0.2 * 10 / 100) = 0.102
    assert ctl.update(12.0, 10) == pytest.approx(0.102)
    # KL 5.4 -> error -0.1; beta = 0.102 * (1 - 0.1 * 50 / 100) = 0.0969
    assert ctl.update(5.4, 50) == pytest.approx(0.0969)
    assert FixedKLController(0.3).update(100.0, 10) == 0.3
