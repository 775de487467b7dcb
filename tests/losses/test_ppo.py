"""PPO's pure pieces against hand-computed numbers (float64, so the checks are exact)."""

import math

import pytest
import torch

from alignforge.losses.ppo import (
    adaptive_kl_coef,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_estimate,
    last_token_index,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)


def T(x):
    return torch.tensor(x, dtype=torch.float64)


def test_kl_estimators():
    lp, ref = T([[-1.0, -2.0]]), T([[-1.5, -1.0]])  # Δ = 0.5, -1.0
    assert torch.equal(kl_estimate(lp, ref, "k1"), T([[0.5, -1.0]]))
    assert torch.equal(kl_estimate(lp, ref, "k2"), T([[0.125, 0.5]]))
    k3 = kl_estimate(lp, ref, "k3")
    torch.testing.assert_close(k3, T([[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]]))
    assert torch.equal(kl_estimate(T([[30.0]]), T([[0.0]]), "k1"), T([[10.0]]))  # clamped at ±10
    assert torch.equal(kl_estimate(T([[30.0]]), T([[0.0]]), "k1", clamp=0), T([[30.0]]))
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(lp, ref, "k4")


def test_token_rewards_put_score_at_last_real_token():
    mask = T([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 0]
    kl = T([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])
    r = token_rewards(T([2.0, -1.0]), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(r, T([[-0.01, -0.02, 2.0 - 0.03, 0.0], [-1.0 - 0.05, 0.0, 0.0, 0.0]]))


def test_gae_hand_computed():
    # one response of 3 tokens then padding; gamma=0.9, lambda=0.5
    r, v, m = T([[0.0, 0.0, 1.0, 5.0]]), T([[0.5, 0.2, 0.4, 7.0]]), T([[1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.5)
    d2 = 1.0 + 0.9 * 0.0 - 0.4  # 0.6 (no value past the end)
    d1 = 0.0 + 0.9 * 0.4 - 0.2  # 0.16
    d0 = 0.0 + 0.9 * 0.2 - 0.5  # -0.32
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    torch.testing.assert_close(adv, T([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, T([[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0]]))
    # gamma = lambda = 1: the advantage is the return-to-go minus the value
    adv1, _ = gae(r, v, m, 1.0, 1.0)
    torch.testing.assert_close(adv1, T([[1 - 0.5, 1 - 0.2, 1 - 0.4, 0.0]]))


def test_group_advantages():
    r = T([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    g = group_advantages(r, 3, "grpo", eps=0.0 + 1e-12)
    torch.testing.assert_close(g[:3], T([-1.0, 0.0, 1.0]), atol=1e-9, rtol=0)  # std (ddof=1) of 1,2,3 is 1
    assert torch.equal(g[3:], T([0.0, 0.0, 0.0]))  # identical rewards: no signal, no NaN
    assert torch.equal(group_advantages(r, 3, "grpo", norm_std=False)[:3], T([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(group_advantages(r, 3, "rloo"), T([1 - 2.5, 2 - 2.0, 3 - 1.5, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="K=4"):
        group_advantages(r, 4, "grpo")


def test_policy_loss_clips_and_counts():
    old = T([[0.0, 0.0, 0.0]])
    lp = T([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    adv = T([[1.0, -1.0, 2.0]])
    losses, m = policy_loss(lp, old, adv, T([[1, 1, 0]]), clip=0.2)
    # token 0: ratio 1.5, A>0 -> clipped to 1.2 -> -1.2; token 1: ratio 0.5, A<0 -> clipped 0.8 -> 0.8
    torch.testing.assert_close(losses, T([[-1.2, 0.8, 0.0]]))
    assert m["clipped"].item() == 2.0
    expect_kl = (1.5 - 1 - math.log(1.5)) + (0.5 - 1 - math.log(0.5))
    assert m["approx_kl"].item() == pytest.approx(expect_kl, abs=1e-12)
    # inside the trust region the gradient is -A * ratio
    lp2 = T([[0.05]]).requires_grad_()
    loss, _ = policy_loss(lp2, T([[0.0]]), T([[2.0]]), T([[1]]))
    loss.sum().backward()
    assert lp2.grad.item() == pytest.approx(-2.0 * math.exp(0.05), abs=1e-12)


def test_value_loss_clipped():
    v, old, ret = T([[1.0, 0.0]]), T([[0.0, 0.0]]), T([[2.0, 0.1]])
    losses, m = value_loss(v, old, ret, T([[1, 1]]), clip=0.2)
    # token 0: plain (1-2)^2=1, clipped (0.2-2)^2=3.24 -> 0.5*3.24; token 1: both 0.01 -> 0.005
    torch.testing.assert_close(losses, T([[1.62, 0.005]]))
    assert m["vf_clipped"].item() == 1.0
    plain, _ = value_loss(v, old, ret, T([[1, 1]]), clip=0.0)
    torch.testing.assert_close(plain, T([[0.5, 0.005]]))


def test_whiten_and_entropy():
    x, m = T([[1.0, 3.0, 100.0]]), T([[1, 1, 0]])
    w = whiten(x, m, eps=0.0)
    torch.testing.assert_close(w, T([[-1.0, 1.0, 0.0]]))
    ent = entropy_from_logits(T([[0.0, 0.0, 0.0, 0.0], [0.0, -1e9, -1e9, -1e9]]))
    torch.testing.assert_close(ent, T([math.log(4.0), 0.0]))


def test_adaptive_kl_controller():
    assert adaptive_kl_coef(0.1, 0.12, 0.1, 100, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, 1.0, 0.1, 100, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # clipped at +0.2
    assert adaptive_kl_coef(0.1, 0.0, 0.1, 100, 10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
