"""Packing [prompt | chosen | rejected] with a block mask gives exactly the unpacked hidden states."""

import pytest
import torch

from alignforge.data.records import TokenizedPair
from alignforge.models.packing import CHOSEN, PAD, PROMPT, REJECTED, block_mask, pack_pairs, packed_hidden_states

PAIRS = [TokenizedPair([1, 5, 6, 7], [8, 9, 2], [10, 11, 12, 13, 2]), TokenizedPair([1, 5], [30, 2], [40, 41, 2])]


def test_layout():
    b = pack_pairs(PAIRS, pad_id=0)
    assert b["input_ids"].shape == (2, 12)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]
    assert b["segment_ids"][1].tolist() == [PROMPT] * 2 + [CHOSEN] * 2 + [REJECTED] * 3 + [PAD] * 5
    assert b["chosen_last"].tolist() == [6, 3] and b["rejected_last"].tolist() == [11, 6]
    assert b["prompt_last"].tolist() == [3, 1]
    assert b["attention_mask"][1].tolist() == [1] * 7 + [0] * 5


def test_block_mask_rules():
    seg = pack_pairs(PAIRS, 0)["segment_ids"]
    allowed = block_mask(seg, torch.float32)[1, 0] == 0  # pair 1: P=2, C=2, R=3, then 5 pads
    assert allowed[1, 0] and not allowed[0, 1]  # causal within the prompt
    assert allowed[3, 0] and allowed[3, 2] and allowed[3, 3]  # chosen sees prompt and itself
    assert allowed[4, 1] and not allowed[4, 2] and not allowed[4, 3]  # rejected never sees chosen
    assert not allowed[6, 8] and allowed[8, 8] and not allowed[8, 0]  # padding only sees itself


def test_empty_segment_is_an_error():
    with pytest.raises(ValueError):
        pack_pairs([TokenizedPair([1], [], [2])], 0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_unpacked(tiny_model_dir, impl):
    from transformers import AutoModelForCausalLM

    # float64: the packed and unpacked paths run different kernels, so in float32 they differ by ordinary
    # rounding (1e-4 on values of magnitude 25 on an AMD EPYC); in float64 the check is exact and strict
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl, dtype=torch.float64).eval()
    with torch.no_grad():  # make the tiny model's outputs depend strongly on context
        for p in model.parameters():
            p.mul_(8.0)
    b = pack_pairs(PAIRS, 0)
    h = packed_hidden_states(model.model, b)
    for i, p in enumerate(PAIRS):
        P, C = len(p.prompt_ids), len(p.chosen_ids)
        for resp, start in ((p.chosen_ids, P), (p.rejected_ids, P + C)):
            ref = model.model(input_ids=torch.tensor([p.prompt_ids + resp])).last_hidden_state[0]
            # transformers' eager attention takes its softmax in float32 whatever the model's dtype, over rows
            # of another length when packed: float32 rounding (1.9e-6 on values of ~15 on an AVX2-only AMD
            # EPYC), so eager gets a float32 tolerance scaled to the values; SDPA stays float64-exact. A
            # packing error (a response that sees the other) moves the states by O(1), far above either.
            tol = (
                {"atol": 1e-10, "rtol": 1e-12}
                if impl == "sdpa"
                else {"atol": 1e-6 * float(ref.abs().max()), "rtol": 1e-6}
            )
            torch.testing.assert_close(h[i, :P], ref[:P], **tol)
            torch.testing.assert_close(h[i, start : start + len(resp)], ref[P:], **tol)


def test_packed_response_logps_equal_unpacked(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from alignforge.models.packing import packed_response_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
        out = packed_response_logps(model, pack_pairs(PAIRS, 0))
        for i, p in enumerate(PAIRS):
            for resp, key in ((p.chosen_ids, "chosen"), (p.rejected_ids, "rejected")):
                ids = torch.tensor([p.prompt_ids + resp])
                logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
                P = len(p.prompt_ids)
                ref = sum(logp[P - 1 + k, tok].item() for k, tok in enumerate(resp))
                assert out[f"{key}_logps"][i].item() == pytest.approx(ref, abs=1e-9)
                assert out[f"{key}_tokens"][i].item() == len(resp)
