"""The one padding collate (data/collate.py) and the collates built on it."""

import pytest
import torch

from alignforge.data.collate import pad_batch
from alignforge.data.records import TokenizedPair, TokenizedPointwise, TokenizedSFT


def test_right_and_left_padding_with_masks():
    rows = [[5, 6, 7], [8], []]
    b = pad_batch(rows, pad_id=0, masks={"m": [[1, 0, 1], [True], []]})
    assert torch.equal(b["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0], [0, 0, 0]]))
    assert torch.equal(b["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]]))
    assert torch.equal(b["m"], torch.tensor([[True, False, True], [True, False, False], [False] * 3]))
    assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long and b["m"].dtype == torch.bool
    left = pad_batch(rows[:2], pad_id=9, side="left")
    assert torch.equal(left["input_ids"], torch.tensor([[5, 6, 7], [9, 9, 8]]))
    assert torch.equal(left["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1]]))
    with pytest.raises(ValueError, match="mask 'm' row 0 has 1 entries for 3 tokens"):
        pad_batch(rows[:1], 0, masks={"m": [[1]]})
    with pytest.raises(ValueError, match="side"):
        pad_batch(rows, 0, side="middle")


def test_trainer_collates_are_the_shared_one():
    from alignforge.trainers.rm import collate_unpacked
    from alignforge.trainers.sft import collate_sft
    from alignforge.trainers.ulma import PointWithRef, collate_points

    sft = collate_sft([TokenizedSFT([1, 2, 3, 4], [1, 1, 0, 1]), TokenizedSFT([5, 6], [0, 1])], pad_id=0)
    assert torch.equal(sft["input_ids"], torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]]))
    assert torch.equal(sft["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    # column 0 is never a target (nothing predicts it)
    assert torch.equal(sft["target_mask"], torch.tensor([[False, True, False, True], [False, True, False, False]]))

    pts = collate_points(
        [
            PointWithRef(TokenizedPointwise([1, 2], [3], 1.0), -1.5),
            PointWithRef(TokenizedPointwise([4], [5, 6, 7], 0.0), -2.0),
        ],
        pad_id=9,
    )
    assert torch.equal(pts["input_ids"], torch.tensor([[1, 2, 3, 9], [4, 5, 6, 7]]))
    assert torch.equal(pts["attention_mask"], torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert torch.equal(pts["target_mask"], torch.tensor([[False, False, True, False], [False, True, True, True]]))
    assert torch.equal(pts["labels"], torch.tensor([1.0, 0.0]))
    assert torch.equal(pts["ref_logp"], torch.tensor([-1.5, -2.0]))

    rm = collate_unpacked([TokenizedPair([1], [2, 3], [4]), TokenizedPair([5, 6], [7], [8, 9])], pad_id=0)
    assert torch.equal(rm["input_ids"], torch.tensor([[1, 2, 3, 0], [5, 6, 7, 0], [1, 4, 0, 0], [5, 6, 8, 9]]))
    assert torch.equal(rm["attention_mask"], (rm["input_ids"] != 0).long())
