"""PPO's critic: the reward model's head applied at every position."""

import torch

from alignforge.models.value import load_value_model


def test_critic_from_a_reward_model_reads_the_rm_score_at_the_last_token(tmp_path, tiny_model_dir, tiny_tokenizer):
    from alignforge.models.reward import RewardModel, load_reward_backbone, save_reward_model

    torch.manual_seed(0)
    rm = RewardModel(load_reward_backbone(str(tiny_model_dir)))
    with torch.no_grad():
        rm.model.score.weight.normal_(std=5.0)
    rm_dir = save_reward_model(rm, tiny_tokenizer, tmp_path / "rm", {})
    critic = load_value_model(str(rm_dir)).eval()
    assert all(p.requires_grad for p in critic.parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    att = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        v = critic(ids, att)
        scores = rm.eval()({"input_ids": ids, "attention_mask": att})
    assert v.shape == (2, 5)
    torch.testing.assert_close(v[0, 4], scores[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v[1, 2], scores[1], rtol=1e-5, atol=1e-5)
    assert v[0].std() > 1e-3  # one value per position, not one per sequence


def test_critic_from_the_policy_starts_at_zero(tiny_model_dir):
    critic = load_value_model(str(tiny_model_dir))
    with torch.no_grad():
        v = critic(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    assert torch.equal(v, torch.zeros(1, 3))
