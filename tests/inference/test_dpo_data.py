import json

import pytest
import torch

from alignforge.data.readers import read_preference
from alignforge.errors import ConfigError
from alignforge.inference.dpo_data import build_dpo_pairs


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(5)))
    return p


def test_best_and_worst_of_k_by_reward(tmp_path, tiny_model_dir, tiny_rm_dir, prompts):
    out = tmp_path / "dpo.jsonl"
    rep = build_dpo_pairs(
        prompts, out, str(tiny_rm_dir), policy=str(tiny_model_dir), k=3, temperature=1.5, max_new_tokens=12, min_gap=0.0
    )
    assert rep.prompts == 5 and rep.written + rep.skipped_identical == 5 and rep.written >= 3
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(r["score_chosen"] >= r["score_rejected"] for r in rows)
    recs = read_preference(out).records  # a valid TRL conversational preference file
    assert len(recs) == rep.written and recs[0].prompt[-1]["role"] == "user"
    # the written chosen score is what the RM gives that response
    from alignforge.data.tokenize import tokenize_prompt_completion
    from alignforge.models.reward import load_reward_model

    rm, tok, _ = load_reward_model(str(tiny_rm_dir))
    p, c = tokenize_prompt_completion(recs[0].prompt, recs[0].chosen, tok, full_render=True)  # the RM's convention
    ids = torch.tensor([p + c])
    with torch.no_grad():
        s = rm({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).item()
    assert s == pytest.approx(rows[0]["score_chosen"], rel=1e-5, abs=1e-5)  # other batch shape: fp32 rounding


def test_min_gap_skips_flat_prompts(tmp_path, tiny_model_dir, tiny_rm_dir, prompts):
    rep = build_dpo_pairs(
        prompts,
        tmp_path / "o.jsonl",
        str(tiny_rm_dir),
        policy=str(tiny_model_dir),
        k=2,
        temperature=1.5,
        max_new_tokens=8,
        min_gap=1e9,
    )
    assert rep.written == 0 and rep.skipped_small_gap == 5
    assert "skipped 5 with a reward gap below min_gap" in rep.summary()


def test_bad_arguments(tmp_path, tiny_rm_dir, prompts):
    with pytest.raises(ConfigError, match="k must be >= 2"):
        build_dpo_pairs(prompts, tmp_path / "o.jsonl", str(tiny_rm_dir), k=1)
    with pytest.raises(ConfigError, match="temperature"):
        build_dpo_pairs(prompts, tmp_path / "o.jsonl", str(tiny_rm_dir), temperature=0.0)
