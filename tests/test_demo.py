"""The demo's whole path (SFT -> answers -> reward model -> rewards -> RM-labelled DPO -> PPO) on a tiny model."""

import json

import pytest
import torch


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    from alignforge.demo import DEMO_PROMPTS, run_demo

    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))  # PPO caches its reference answers there

    lines = []
    res = run_demo(
        output_dir=str(tmp_path / "demo"),
        epochs=1,
        rm_epochs=1,
        echo=lines.append,
        model=str(tiny_model_dir),
        dpo_prompts=6,
        dpo_epochs=1,
        dpo_min_gap=0.0,
        ppo_iterations=2,
        ppo_lr=2e-2,
    )
    assert res["steps"] == 4 and len(res["samples"]) == len(DEMO_PROMPTS)
    assert all(isinstance(s["reward_after"], float) for s in res["samples"])
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["reward_model"].endswith("final") and (tmp_path / "demo" / "rm" / "loss.png").is_file()
    assert any("demo finished" in x for x in lines)
    dpo = summary["dpo"]
    pairs = [json.loads(x) for x in (tmp_path / "demo" / "dpo_pairs.jsonl").read_text().splitlines()]
    assert dpo["pairs"] == len(pairs) > 0 and dpo["prompts"] == 6
    assert all(p["score_chosen"] >= p["score_rejected"] for p in pairs)  # the RM labelled them
    assert dpo["steps"] == -(-len(pairs) // 4) and len(dpo["samples"]) == 6
    assert (tmp_path / "demo" / "dpo" / "samples.jsonl").is_file()  # the generation probe ran

    _check_ppo_stage(tmp_path / "demo", summary, lines)


def _check_ppo_stage(out, summary, lines):
    """PPO ran on the DPO stage's prompts, and its rewards are the reward model's scores of the greedy answers."""
    from safetensors.torch import load_file

    from alignforge.data.tokenize import tokenize_prompt_completion
    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.models.loading import load_model, load_tokenizer
    from alignforge.models.reward import load_reward_model

    ppo, dpo = summary["ppo"], summary["dpo"]
    assert ppo["iterations"] == 2 and [h["step"] for h in ppo["history"]] == [1, 2]
    assert ppo["prompts"] == 6 and ppo["rollouts_per_iteration"] == 8
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("value_loss" in r for r in rows)  # GAE with a critic
    assert ppo["kl_start"] == rows[0]["kl_ref"] and abs(ppo["kl_start"]) < 1e-4  # first rollout = the SFT policy
    assert ppo["reward_raw_end"] == rows[-1]["reward_raw"] and 0 < ppo["response_len_end"] <= 40
    assert (out / "ppo" / "loss.png").is_file() and (out / "ppo" / "samples.jsonl").is_file()
    assert not (out / "ppo" / "checkpoints").exists()  # the critic's resume state is not left on disk
    prompts = [json.loads(x)["prompt"] for x in (out / "ppo_prompts.jsonl").read_text().splitlines()]
    assert prompts == [json.loads(x)["prompt"] for x in (out / "dpo_prompts.jsonl").read_text().splitlines()]
    adapter = load_file(str(out / "ppo" / "final" / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0  # the LoRA trained
    # the answers are the PPO policy's greedy answers
    tok = load_tokenizer(summary["sft_model"], padding_side="left")
    again = HFBackend(load_model(ppo["model"]), tok).generate(prompts, GenerationConfig(max_new_tokens=40))
    assert [s["ppo"] for s in ppo["samples"]] == again
    assert [s["sft"] for s in ppo["samples"]] == [s["sft"] for s in dpo["samples"]]
    assert any(s["ppo"] != s["sft"] for s in ppo["samples"])  # PPO moved them: the scores below tell
    # and each reward is the reward model's score of (prompt, answer), scored here directly
    rm, rtok, _ = load_reward_model(summary["reward_model"])
    for chat, s in zip(prompts, ppo["samples"], strict=True):
        for who in ("sft", "ppo"):
            answer = [{"role": "assistant", "content": s[who] or " "}]
            p, c = tokenize_prompt_completion(chat, answer, rtok, full_render=True)
            ids = torch.tensor([p + c])
            with torch.no_grad():
                direct = rm({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).item()
            assert s[f"reward_{who}"] == pytest.approx(direct, rel=1e-4, abs=1e-4), who
    mean = sum(s["reward_ppo"] for s in ppo["samples"]) / len(ppo["samples"])
    assert ppo["reward_ppo"] == pytest.approx(mean)
    assert any(x.startswith("PPO: 2 iterations") for x in lines)
