"""Hand-computed checks of every offline preference loss."""

import math

import pytest
import torch

from alignforge.losses.preference import dpo_loss, kto_loss, kto_reference_point, pointwise_dpo_loss, ulma_loss


def sp(x):  # softplus(x) = -log sigmoid(-x)
    return math.log1p(math.exp(x))


T = torch.tensor
PC, PR, RC, RR = T([-1.0, -3.0]), T([-2.0, -1.0]), T([-1.5, -2.0]), T([-1.5, -2.0])
# h_w = [0.5, -1.0], h_l = [-0.5, 1.0], delta = [1, -2]; beta = 0.5 -> beta*delta = [0.5, -1]


def test_dpo_sigmoid():
    losses, m = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert torch.allclose(losses, T([sp(-0.5), sp(1.0)]), atol=1e-6)
    assert torch.allclose(m["reward_chosen"], T([0.25, -0.5])) and torch.allclose(m["reward_rejected"], T([-0.25, 0.5]))
    assert m["reward_accuracy"].tolist() == [1.0, 0.0]
    assert torch.allclose(m["reward_margin"], T([0.5, -1.0]))


def test_cdpo_label_smoothing():
    losses, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    expected = [0.9 * sp(-0.5) + 0.1 * sp(0.5), 0.9 * sp(1.0) + 0.1 * sp(-1.0)]
    assert torch.allclose(losses, T(expected), atol=1e-6)


def test_dpo_simpo_margin():
    # beta*delta = [0.5, -1]; gamma 0.25 -> z = [0.25, -1.25]; loss = softplus(-z)
    losses, m = dpo_loss(PC, PR, RC, RR, beta=0.5, margin=0.25)
    assert torch.allclose(losses, T([sp(-0.25), sp(1.25)]), atol=1e-6)
    assert torch.allclose(m["reward_margin"], T([0.5, -1.0]))  # the logged rewards do not include the margin
    losses, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, margin=0.25, label_smoothing=0.1)
    expected = [0.9 * sp(-0.25) + 0.1 * sp(0.25), 0.9 * sp(1.25) + 0.1 * sp(-1.25)]
    assert torch.allclose(losses, T(expected), atol=1e-6)
    with pytest.raises(ValueError, match="IPO has its own target"):
        dpo_loss(PC, PR, RC, RR, beta=0.5, margin=0.25, loss_type="ipo")


def test_ipo():
    losses, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")  # (delta - 1/(2*0.5))^2
    assert torch.allclose(losses, T([0.0, 9.0]), atol=1e-6)


def test_dpo_gradient_direction():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    losses, _ = dpo_loss(pc, pr, T([-1.0]), T([-1.0]), beta=0.1)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)  # beta*sigma(0)


def test_unknown_loss_type():
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge")


def test_pointwise_binary_and_continuous():
    pol, ref = T([-1.0, -2.0]), T([-2.0, -1.0])  # h = [1, -1]; beta=0.5 -> a = [0.5, -0.5]
    losses, m = pointwise_dpo_loss(pol, ref, T([1.0, 0.0]), beta=0.5)
    assert torch.allclose(losses, T([sp(-0.5), sp(-0.5)]), atol=1e-6)
    assert torch.allclose(m["sigmoid_reward"], torch.sigmoid(T([0.5, -0.5])))
    losses, _ = pointwise_dpo_loss(pol, ref, T([1.0, 0.0]), beta=0.5, c=0.1)  # a = [0.6, -0.4]
    assert torch.allclose(losses, T([sp(-0.6), sp(-0.4)]), atol=1e-6)
    losses, _ = pointwise_dpo_loss(pol, ref, T([0.8, 0.2]), beta=0.5, continuous=True)
    assert torch.allclose(losses, T([0.09, 0.49]), atol=1e-6)


def test_ulma_binary():
    pol, ref, z = T([-1.0, -2.0, -0.5]), T([-1.2, -1.0, -0.5]), T([1.0, 0.0, 0.0])
    loss, m = ulma_loss(pol, ref, z, beta=0.5)
    # positives: -logp = 1.0; negatives: a = [-0.5, 0] and -log sigmoid(-a) = softplus(a)
    expected = 1.0 + (sp(-0.5) + sp(0.0)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["n_pos"].item() == 1 and m["n_neg"].item() == 2
    # global normalisers: the same terms divided by the whole batch's counts
    loss_g, _ = ulma_loss(pol, ref, z, beta=0.5, n_pos=2, n_neg=4)
    assert loss_g.item() == pytest.approx(1.0 / 2 + (sp(-0.5) + sp(0.0)) / 4, abs=1e-6)


def test_ulma_continuous():
    loss, _ = ulma_loss(T([-1.0, -2.0]), T([-1.0, -1.0]), T([1.0, 0.3]), beta=0.5, continuous=True)
    assert loss.item() == pytest.approx(1.0 + (0.3 + 0.5) ** 2, abs=1e-6)


def test_ulma_batch_without_positives_or_negatives_is_finite():
    only_pos, _ = ulma_loss(T([-1.0, -3.0]), T([-1.0, -1.0]), T([1.0, 1.0]))
    assert only_pos.item() == pytest.approx(2.0)
    only_neg, _ = ulma_loss(T([-1.0]), T([-1.0]), T([0.0]))
    assert only_neg.item() == pytest.approx(math.log(2.0))
    pol = torch.tensor([-1.0], requires_grad=True)
    empty, _ = ulma_loss(pol, T([-1.0]), T([1.0]), n_neg=0)
    empty.backward()
    assert torch.isfinite(pol.grad).all()


def test_kto():
    pol, ref, d = T([-1.0, -1.0]), T([-1.5, -0.5]), T([1, 0])  # h = [0.5, -0.5]
    losses, m = kto_loss(pol, ref, d, 0.2, beta=1.0)
    expected = [1 - 1 / (1 + math.exp(-0.3)), 1 - 1 / (1 + math.exp(-0.7))]
    assert torch.allclose(losses, T(expected), atol=1e-6)
    losses, m = kto_loss(pol, ref, d, -0.3, beta=1.0)  # z0 = max(0, KL) = 0
    assert torch.allclose(losses, T([1 - 1 / (1 + math.exp(-0.5))] * 2), atol=1e-6)
    assert m["z0"].item() == 0.0


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_reference_point_from_mismatched_pairs():
    # log-probs of three mismatched pairs (prompt k, completion k+1) under the policy and the reference
    pol = torch.tensor([-3.0, -2.0, -4.0], requires_grad=True)
    ref = T([-3.5, -2.5, -3.4])  # differences 0.5, 0.5, -0.6: KL estimate 0.4 / 3
    z0 = kto_reference_point(pol, ref)
    assert z0.item() == pytest.approx(0.4 / 3, abs=1e-7) and not z0.requires_grad
    assert kto_reference_point(ref, pol).item() == 0.0  # estimate -0.4/3, clamped at 0
    # split over two processes: each holds its share and the all-reduce adds the other's partial sum
    rank0 = kto_reference_point(pol[:2], ref[:2], n_total=3, all_reduce=lambda t: t + (-4.0 + 3.4))
    rank1 = kto_reference_point(pol[2:], ref[2:], n_total=3, all_reduce=lambda t: t + (0.5 + 0.5))
    assert rank0.item() == pytest.approx(0.4 / 3, abs=1e-7) and rank1.item() == pytest.approx(0.4 / 3, abs=1e-7)
    # a process with no pair of its own still takes part in the all-reduce
    empty = kto_reference_point(T([]), T([]), n_total=3, all_reduce=lambda t: t + 0.4)
    assert empty.item() == pytest.approx(0.4 / 3, abs=1e-7)
    with pytest.raises(ValueError):
        kto_reference_point(T([]), T([]))


def test_kto_loss_with_mismatched_reference_point():
    z0 = kto_reference_point(T([-3.0, -2.0, -4.0]), T([-3.5, -2.5, -3.4]))  # 0.4 / 3
    pol, ref, d = T([-1.0, -1.0, -2.0]), T([-1.5, -0.5, -2.0]), T([1, 0, 1])  # h = [0.5, -0.5, 0]
    losses, m = kto_loss(pol, ref, d, z0, beta=0.5, lambda_d=2.0, lambda_u=1.5)
    z = 0.4 / 3
    expected = [2.0 * (1 - sig(0.5 * (0.5 - z))), 1.5 * (1 - sig(0.5 * (z + 0.5))), 2.0 * (1 - sig(0.5 * (0 - z)))]
    assert torch.allclose(losses, T(expected), atol=1e-6)
    assert m["z0"].item() == pytest.approx(z, abs=1e-7)
    assert torch.allclose(m["reward"], T([0.25, -0.25, 0.0]))
