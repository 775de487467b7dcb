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


def _lora_policy(tiny_model_dir):
    from alignforge.models.loading import load_model
    from alignforge.models.lora import LoraSettings, apply_lora

    torch.manual_seed(0)
    return apply_lora(load_model(str(tiny_model_dir)), LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))


def test_shared_critic_is_a_second_adapter_on_the_actors_base(tiny_model_dir):
    from alignforge.models.value import SharedValueModel

    policy = _lora_policy(tiny_model_dir)
    ids, att = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        for n, p in policy.named_parameters():  # a non-trivial actor adapter
            if "lora_B" in n:
                p.normal_(std=0.5)
        before = policy(input_ids=ids, attention_mask=att).logits
    n_params = sum(p.numel() for p in policy.parameters())
    critic = SharedValueModel(policy)
    # no copy of the base: only the critic adapter's LoRA weights (+ a head) are new
    added = sum(p.numel() for p in policy.parameters()) - n_params
    assert 0 < added < n_params / 4 and [n for n, _ in critic.named_parameters()] == ["head.weight"]
    with torch.no_grad():
        v0 = critic(ids, att)
        assert torch.equal(v0, torch.zeros(1, 4))  # zero head: V = 0 at the start
        critic.head.weight.normal_()
        for n, p in policy.named_parameters():
            if "lora_B.critic" in n:
                p.normal_(std=0.5)
        v = critic(ids, att)
        # the value reads base + *critic* adapter: not the actor's adapter, not the bare base
        hidden = lambda: policy.get_base_model().get_decoder()(input_ids=ids, attention_mask=att).last_hidden_state  # noqa: E731
        policy.set_adapter("critic")
        want = critic.head(hidden()).squeeze(-1)
        policy.set_adapter("default")
        torch.testing.assert_close(v, want, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(v, critic.head(hidden()).squeeze(-1))
        # the actor is unchanged by the critic's adapter and forward
        assert policy.active_adapter == "default"
        torch.testing.assert_close(policy(input_ids=ids, attention_mask=att).logits, before, atol=1e-6, rtol=1e-5)


def test_shared_critic_one_backward_trains_both_adapters_and_the_head(tiny_model_dir):
    from alignforge.models.value import SharedValueModel

    policy = _lora_policy(tiny_model_dir)
    critic = SharedValueModel(policy)
    with torch.no_grad():
        critic.head.weight.normal_()
    ids, att = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    loss = policy(input_ids=ids, attention_mask=att).logits.logsumexp(-1).mean() + critic(ids, att).pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if "lora_B" in n}
    assert any(".default." in n for n in grads) and any(".critic." in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert critic.head.weight.grad is not None
