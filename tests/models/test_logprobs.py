"""alignforge.models.logprobs: per-token log-probs and entropies, with hand-computed numbers."""

import math

import pytest
import torch

from alignforge.models.logprobs import logprobs_from_logits


def test_logprobs_and_entropy_by_hand():
    # row 0: probabilities (1/4, 3/4); row 1: uniform over 2
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, 5.0]], dtype=torch.float64)
    lp, ent = logprobs_from_logits(logits, torch.tensor([1, 0]), with_entropy=True)
    assert lp.tolist() == pytest.approx([math.log(0.75), math.log(0.5)], abs=1e-12)
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert ent.tolist() == pytest.approx([h0, math.log(2.0)], abs=1e-12)


def test_temperature_and_softcap_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    # temperature 2: probabilities proportional to (1, sqrt(3))
    lp = logprobs_from_logits(logits, torch.tensor([1]), temperature=2.0)
    assert lp.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-12)
    # softcap c: tanh(x / c) * c before the softmax
    c = 0.5
    capped = [math.tanh(x / c) * c for x in (0.0, math.log(3.0))]
    want = capped[0] - math.log(sum(math.exp(x) for x in capped))
    assert logprobs_from_logits(logits, torch.tensor([0]), softcap=c).item() == pytest.approx(want, abs=1e-12)


def test_float32_logits_come_back_in_float32_and_bf16_is_upcast():
    lp = logprobs_from_logits(torch.zeros(3, 4, dtype=torch.bfloat16), torch.tensor([0, 1, 2]))
    assert lp.dtype == torch.float32 and lp.tolist() == pytest.approx([math.log(0.25)] * 3, abs=1e-6)


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_entropy_grad_switch(entropy_grad):
    """``entropy_grad=False`` gives the same entropy with no graph; the log-probs keep theirs."""
    logits = torch.tensor([[0.3, -1.2, 2.0]], requires_grad=True)
    lp, ent = logprobs_from_logits(logits, torch.tensor([2]), with_entropy=True, entropy_grad=entropy_grad)
    assert lp.requires_grad and ent.requires_grad is entropy_grad
    p = torch.softmax(logits.detach(), -1)
    assert ent.item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)
    if entropy_grad:  # dH/dz_i = -p_i (log p_i + H)
        (g,) = torch.autograd.grad(ent.sum(), logits)
        torch.testing.assert_close(g, -p * (p.log() + ent.detach()), rtol=1e-5, atol=1e-6)
