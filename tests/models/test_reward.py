import json

import torch

from alignforge.models.reward import RewardModel, last_token_index, load_reward_backbone, load_reward_model, save_reward_model


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4]


def test_score_is_read_at_last_real_token_not_pad_id(tiny_model_dir, tiny_tokenizer):
    """SmolLM2-style: pad id == end-of-turn id, so a multi-turn sequence contains 'pad' tokens early on."""
    hf = load_reward_backbone(str(tiny_model_dir))
    rm = RewardModel(hf).eval()
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    seq = [5, 6, eot, 7, 8, 9, eot]
    pad = eot
    right = {"input_ids": torch.tensor([seq + [pad, pad]]), "attention_mask": torch.tensor([[1] * 7 + [0, 0]])}
    left = {"input_ids": torch.tensor([[pad, pad] + seq]), "attention_mask": torch.tensor([[0, 0] + [1] * 7]),
            "position_ids": torch.tensor([[0, 0] + list(range(7))])}
    alone = {"input_ids": torch.tensor([seq]), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    with torch.no_grad():
        s_alone, s_right, s_left = rm(alone), rm(right), rm(left)
        h = hf.model(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]
        expected = hf.score(h).item()
    assert abs(s_alone.item() - expected) < 1e-6
    assert abs(s_right.item() - expected) < 1e-5 and abs(s_left.item() - expected) < 1e-5
    # HF's own pooling stops at the first pad-id token here: a different number
    hf.config.pad_token_id = pad
    with torch.no_grad():
        hf_score = hf(**right).logits.item()
    assert abs(hf_score - expected) > 1e-4


def test_save_and_load_roundtrip(tmp_path, tiny_model_dir, tiny_tokenizer):
    rm = RewardModel(load_reward_backbone(str(tiny_model_dir))).eval()
    with torch.no_grad():
        rm.model.score.weight.normal_()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        before = rm(batch)
    save_reward_model(rm, tiny_tokenizer, tmp_path / "rm", {"mean": 0.5, "std": 2.0})
    loaded, tok, stats = load_reward_model(str(tmp_path / "rm"))
    with torch.no_grad():
        after = loaded(batch)
    assert torch.equal(before, after)  # same weights, same kernels: bit-identical
    assert stats == {"mean": 0.5, "std": 2.0}
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and len(cfg["id2label"]) == 1
