import math

import torch

from alignforge.losses.sft import nll_loss


def test_nll_hand_computed():
    # log-probs of 4 target candidates; only mask==1 count
    lp = torch.tensor([[0.0, math.log(0.5), math.log(0.25), -9.0], [0.0, math.log(0.1), -7.0, -7.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    loss, m = nll_loss(lp, mask)
    expected = (math.log(2) + math.log(4) + math.log(10)) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert m["n_tokens"].item() == 3
    assert math.isclose(m["nll_sum"].item(), expected * 3, rel_tol=1e-6)


def test_nll_external_normalizer_adds_up_over_microbatches():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.2], [0.9, 0.3, 0.6]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    full, _ = nll_loss(lp, mask)
    a, _ = nll_loss(lp[:1], mask[:1], normalizer=5.0)
    b, _ = nll_loss(lp[1:], mask[1:], normalizer=5.0)
    assert torch.allclose(a + b, full)


def test_nll_empty_mask_is_zero_not_nan():
    loss, _ = nll_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0
