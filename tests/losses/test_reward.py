import math

import pytest
import torch

from alignforge.losses.reward import bradley_terry_loss

RC = torch.tensor([1.0, -1.0])
RR = torch.tensor([0.5, 2.0])
# -log sigmoid(0.5) = log(1 + e^-0.5); -log sigmoid(-3) = log(1 + e^3)
BT = [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(3.0))]


def test_plain_bradley_terry():
    losses, m = bradley_terry_loss(RC, RR, regularizer="none")
    assert torch.allclose(losses, torch.tensor(BT), atol=1e-6)
    assert m["accuracy"].tolist() == [1.0, 0.0]
    assert torch.allclose(m["margin"], torch.tensor([0.5, -3.0]))


def test_gaussian_prior_penalises_each_score():
    losses, m = bradley_terry_loss(RC, RR, regularizer="gaussian", reg_coef=0.1)
    # r_w^2 + r_l^2 = 1 + 0.25 and 1 + 4
    assert torch.allclose(losses, torch.tensor([BT[0] + 0.125, BT[1] + 0.5]), atol=1e-6)
    assert torch.allclose(m["reg"], torch.tensor([1.25, 5.0]))


def test_trl_centering_penalises_the_sum():
    losses, _ = bradley_terry_loss(RC, RR, regularizer="center", reg_coef=0.1)
    # (r_w + r_l)^2 = 2.25 and 1
    assert torch.allclose(losses, torch.tensor([BT[0] + 0.225, BT[1] + 0.1]), atol=1e-6)


def test_margin():
    losses, _ = bradley_terry_loss(RC, RR, margin=0.5, regularizer="none")
    assert torch.allclose(losses, torch.tensor([math.log(2.0), math.log(1 + math.exp(3.5))]), atol=1e-6)


def test_gradient_pushes_scores_apart():
    rc = torch.tensor([0.0], requires_grad=True)
    rr = torch.tensor([0.0], requires_grad=True)
    losses, _ = bradley_terry_loss(rc, rr, regularizer="none")
    losses.sum().backward()
    assert rc.grad.item() == pytest.approx(-0.5) and rr.grad.item() == pytest.approx(0.5)


def test_unknown_regularizer():
    with pytest.raises(ValueError, match="unknown regularizer"):
        bradley_terry_loss(RC, RR, regularizer="l2")
