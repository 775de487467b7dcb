"""The demo's whole path (SFT -> answers -> reward model -> rewards -> RM-labelled DPO -> PPO -> RAIN -> held-out
evaluation) on a tiny model, and the shipped demo data."""

import json

import pytest
import torch


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    from alignforge.demo import DEMO_PROMPTS, demo_data_path, run_demo

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
        eval_prompts=3,
        eval_max_new_tokens=8,
        rain_prompts=2,
        rain_max_new_tokens=4,
        rain_max_iterations=1,
    )
    n_demos = len(demo_data_path().read_text().splitlines())
    assert res["steps"] == -(-n_demos // 4) and len(res["samples"]) == len(DEMO_PROMPTS)  # 1 epoch, batch 4
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
    _check_rain_and_eval(summary, lines)
    assert {"sft", "rm", "dpo", "ppo", "rain", "eval"} <= set(summary["timings"])
    assert all(t["wall_s"] >= 0 and t["cpu_s"] >= 0 for t in summary["timings"].values())


def _check_rain_and_eval(summary, lines):
    """The held-out numbers are the refusal rule and the reward model applied to each policy's greedy answers."""
    from alignforge.demo import BENIGN_HELDOUT, HARMFUL_HELDOUT, heldout_prompts, score_answers
    from alignforge.eval.refusal import is_refusal
    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.models.loading import load_model, load_tokenizer
    from alignforge.models.reward import load_reward_model

    ev, rain = summary["eval"], summary["rain"]
    assert set(ev["models"]) == {"sft", "dpo", "ppo"} and ev["harmful_n"] == ev["benign_n"] == 3
    harmful, benign = heldout_prompts(HARMFUL_HELDOUT, 3), heldout_prompts(BENIGN_HELDOUT, 3)
    tok = load_tokenizer(summary["sft_model"], padding_side="left")
    rm, rtok, _ = load_reward_model(summary["reward_model"])
    for name, path in (("sft", summary["sft_model"]), ("ppo", summary["ppo"]["model"])):
        row = ev["models"][name]
        again = HFBackend(load_model(path), tok).generate(harmful + benign, GenerationConfig(max_new_tokens=8))
        assert row["harmful_answers"] + row["benign_answers"] == again, name
        assert row["harmful_refusal_rate"] == sum(map(is_refusal, again[:3])) / 3
        assert row["benign_answered_rate"] == sum(not is_refusal(a) for a in again[3:]) / 3
        rewards = score_answers(rm, rtok, benign, again[3:])
        assert row["reward_benign"] == pytest.approx(sum(rewards) / 3, rel=1e-4, abs=1e-4)
    assert rain["prompts"] == 2 and [s["prompt"] for s in rain["samples"]] == [c[-1]["content"] for c in harmful[:2]]
    assert rain["n_refused"] == sum(is_refusal(s["rain"]) for s in rain["samples"])
    assert ev["rain"]["harmful_refused"] == rain["n_refused"] and rain["seconds_per_prompt"] > 0
    assert any(x.startswith("held-out: 3 harmful, 3 benign") for x in lines)


def test_shipped_demo_data_is_valid_and_held_out():
    """Every demo file reads; the held-out prompts are in no training file; the SFT demonstrations never refuse
    (the refusals must come from the preference stage); chosen refuses harmful prompts and answers benign ones."""
    from alignforge.data.readers import read_any
    from alignforge.demo import demo_data_path
    from alignforge.eval.refusal import is_refusal

    def read(name, kind):
        return read_any(demo_data_path(name), kind).records

    def text(prompt):
        return prompt[-1]["content"].strip().lower()

    sft, prefs = read("sft_demos.jsonl", "sft"), read("preferences.jsonl", "preference")
    sets = {
        n: read(f"{n}.jsonl", "prompt") for n in ("harmful_train", "harmful_heldout", "benign_train", "benign_heldout")
    }
    assert len(sets["harmful_heldout"]) >= 16 and len(sets["benign_heldout"]) >= 16 and len(prefs) >= 48
    train = {text(r.prompt) for n in ("harmful_train", "benign_train") for r in sets[n]} | {
        text(r.prompt) for r in prefs
    }
    train |= {m["content"].strip().lower() for r in sft for m in r.messages if m["role"] == "user"}
    for n in ("harmful_heldout", "benign_heldout"):
        assert not {text(r.prompt) for r in sets[n]} & train, n
    assert not any(is_refusal(m["content"]) for r in sft for m in r.messages if m["role"] == "assistant")
    harmful = {text(r.prompt) for r in sets["harmful_train"]}
    for r in prefs:  # harmful: a refusal over a compliance; benign: an answer over a refusal or a bad answer
        if text(r.prompt) in harmful:
            assert is_refusal(r.chosen[-1]["content"]) and not is_refusal(r.rejected[-1]["content"]), r.source
        else:
            assert not is_refusal(r.chosen[-1]["content"]), r.source
    assert {text(r.prompt) for r in prefs} == harmful | {text(r.prompt) for r in sets["benign_train"]}


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
