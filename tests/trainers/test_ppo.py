"""`alignforge ppo` on tiny models: the algorithm's parts, exact resume, two processes, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignforge.config import load_config
from alignforge.errors import ConfigError, TrainingError
from alignforge.trainers.ppo import (
    PPOConfig,
    iteration_prompts,
    response_logps,
    right_pad,
    share_prompts,
    train_ppo,
)

PROMPTS = [f"Tell me something about topic {i}." for i in range(8)]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_model_dir):
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.reward import RewardModel, load_reward_backbone, save_reward_model

    torch.manual_seed(0)
    rm = RewardModel(load_reward_backbone(str(tiny_model_dir)))
    with torch.no_grad():
        rm.model.score.weight.normal_(std=5.0)  # spread the scores
    return save_reward_model(
        rm, load_tokenizer(str(tiny_model_dir)), tmp_path_factory.mktemp("rm") / "rm", {"mean": 0.0, "std": 1.0}
    )


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": t}]}) + "\n" for t in PROMPTS))
    return p


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"The answer is {i}."},
            ]
        }
        for i in range(6)
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))


def _args(tmp_path, tiny_model_dir, rm_dir, prompts_file, out="ppo", *extra):
    return [
        f"model.name_or_path={tiny_model_dir}",
        f"ppo.reward_model={rm_dir}",
        f"data.train_files=[{prompts_file}]",
        f"train.output_dir={tmp_path / out}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.lr=1e-3",
        "train.seed=5",
        "ppo.iterations=2",
        "ppo.prompts_per_iteration=4",
        "ppo.gen_batch_prompts=2",
        "ppo.samples_per_prompt=2",
        "ppo.max_new_tokens=6",
        "ppo.minibatches=2",
        "ppo.ppo_epochs=2",
        "ppo.forward_batch_size=3",
        *extra,
    ]


def _run(args):
    return train_ppo(load_config(PPOConfig, None, args))


def test_iteration_prompts_are_exact_slices_of_seeded_epochs():
    seen = [iteration_prompts(i, 5, 2, seed=3) for i in range(5)]
    assert all(len(x) == 2 for x in seen)
    flat = [j for x in seen for j in x]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))  # two whole epochs
    assert iteration_prompts(3, 5, 2, seed=3) == seen[3]  # a pure function of the iteration


def test_right_pad_aligns_responses():
    b = right_pad([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert b["resp_pos"].tolist() == [[3, 4, 4], [1, 2, 3]]
    assert b["resp_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_ppo_gae_trains_logs_and_saves(tmp_path, tiny_model_dir, rm_dir, prompts_file):
    res = _run(_args(tmp_path, tiny_model_dir, rm_dir, prompts_file, "ppo", "ppo.snapshot_every=1"))
    hist = res["history"]
    assert [h["step"] for h in hist] == [1, 2]
    for key in (
        "reward_raw",
        "reward",
        "kl_ref",
        "entropy",
        "policy_loss",
        "value_loss",
        "clip_frac",
        "approx_kl",
        "response_len",
        "cut_share",
        "gen_s",
        "score_s",
        "train_s",
        "kl_coef",
    ):
        assert key in hist[0] and torch.isfinite(torch.tensor(hist[0][key])), key
    assert 0 < hist[0]["response_len"] <= 6
    assert hist[0]["kl_ref"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference policy's
    out = tmp_path / "ppo"
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all("response" in s and "reward" in s for s in samples)
    final = load_file(str(out / "final" / "model.safetensors"))
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max((final[k] - init[k]).abs().max().item() for k in init) > 1e-4  # it trained
    assert "prompts: 8 read" in (out / "data_report.txt").read_text()
    # ppo.snapshot_every=1: the policy after each iteration, as `final` holds it; the last one is `final`
    snaps = sorted(p.name for p in (out / "snapshots").iterdir())
    assert snaps == ["iter-00000001", "iter-00000002"]
    s1, s2 = (load_file(str(out / "snapshots" / n / "model.safetensors")) for n in snaps)
    assert all(torch.equal(s2[k], final[k]) for k in final)
    assert max((s1[k] - final[k]).abs().max().item() for k in final) > 1e-6
    assert max((s1[k] - init[k]).abs().max().item() for k in init) > 1e-6


def test_reference_reward_is_zero_when_the_policy_answers_as_the_reference(
    tmp_path, tiny_model_dir, rm_dir, prompts_file
):
    """Greedy rollouts of the untrained policy are the reference answers, so r(x,y) - r(x,y_ref) = 0."""
    base = _args(tmp_path, tiny_model_dir, rm_dir, prompts_file, "greedy", "ppo.temperature=0", "ppo.iterations=1")
    row = _run(base)["history"][0]
    scale = max(1.0, abs(row["reward_raw"]))
    assert abs(row["reward_raw"]) > 1e-3
    assert abs(row["reward"]) < 1e-5 * scale
    cached = list((tmp_path / "cache" / "ppo_ref").glob("*.pt"))
    assert len(cached) == 1
    data = torch.load(cached[0])
    assert len(data["responses"]) == len(PROMPTS) and data["rewards"].shape == (len(PROMPTS),)
    # the ablation: no baseline, reward == raw reward
    row = _run(
        _args(
            tmp_path,
            tiny_model_dir,
            rm_dir,
            prompts_file,
            "nobase",
            "ppo.temperature=0",
            "ppo.iterations=1",
            "ppo.reference_reward=false",
        )
    )["history"][0]
    assert row["reward"] == row["reward_raw"]


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_forward_equals_the_row_by_row_pass(tiny_model_dir, lora):
    """In float64, the shared-prompt pass gives the row-by-row log-probs, entropies and gradients."""
    from alignforge.models.loading import load_model

    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir)).double()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.data.normal_(std=0.1)  # a non-zero adapter
    a, b, c = [5, 6, 7, 8, 9], [10, 11], [12, 13, 14]
    prompts = [a, b, a, a, c, b]  # a three times, b twice, out of order; different lengths
    responses = [[20, 21, 22], [23], [24, 25, 26, 27], [], [28, 29], [30, 31, 32]]
    plain = right_pad(prompts, responses, pad_id=0)
    shared = share_prompts(plain, prompts, pad_id=0)
    assert shared["prompt_index"].tolist() == [0, 1, 0, 0, 2, 1] and shared["prompt_ids"].shape == (3, 5)
    assert shared["resp_ids"][2].tolist() == [24, 25, 26, 27] and shared["resp_ids"][3].tolist() == [0] * 4
    params = [q for q in model.parameters() if q.requires_grad]
    out = {}
    for name, batch in (("plain", plain), ("shared", shared)):
        lp, ent = response_logps(model, batch, temperature=0.7, with_entropy=True)
        grads = torch.autograd.grad((lp * torch.arange(1.0, 5.0, dtype=lp.dtype)).sum() + ent.sum(), params)
        out[name] = (lp, ent, grads)
    (lp0, e0, g0), (lp1, e1, g1) = out["plain"], out["shared"]
    assert lp0.dtype == torch.float64 and (lp0 != 0).sum() == sum(len(r) for r in responses)
    # Llama's RMSNorm normalises in float32 even in a float64 model: a float32 tolerance, scaled to the values
    # (here the two paths agree to 1e-12; a wrong position or cache row is off by O(1))
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-6 * float(lp0.abs().max()))
    torch.testing.assert_close(e1, e0, rtol=0, atol=1e-6 * float(e0.abs().max()))
    # gradients: Llama's RMSNorm runs in float32 even in a float64 model, so its backward sums in float32
    # in a different order on the two paths; the tolerance is float32's, scaled to the values
    for x, y in zip(g1, g0, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()))
    # all prompts distinct: nothing to share, the batch is returned as it is
    assert share_prompts(plain, [a, b, c, [1], [2], [3]], pad_id=0) is plain


@pytest.mark.parametrize("share", [True, False])
def test_share_prompt_forward_switch(tmp_path, tiny_model_dir, rm_dir, prompts_file, monkeypatch, share):
    """The update's micro-batches hold a prompt's K rows together and run the prompt once, unless
    ``ppo.share_prompt_forward=false``; both give the same weights (fp32 rounding apart)."""
    from alignforge.trainers import ppo

    calls = []
    real = ppo.shared_prompt_logps
    monkeypatch.setattr(
        ppo,
        "shared_prompt_logps",
        lambda lm, b, *a, **k: calls.append(b["prompt_ids"].shape[0]) or real(lm, b, *a, **k),
    )
    extra = ("ppo.iterations=1", "ppo.reference_reward=false", "ppo.minibatches=1", "ppo.ppo_epochs=1")
    extra += ("ppo.forward_batch_size=4", "ppo.kl_coef=0", "ppo.advantage=grpo", "train.save_every=0")
    s = _run(
        _args(
            tmp_path,
            tiny_model_dir,
            rm_dir,
            prompts_file,
            f"fwd{share}",
            *extra,
            f"ppo.share_prompt_forward={str(share).lower()}",
        )
    )
    assert calls == ([2, 2] if share else [])  # 4 prompts x K=2 -> two micro-batches of 2 prompts x 2 rows
    w = load_file(str(Path(s["final_dir"]) / "model.safetensors"))
    if share:
        ref = _run(
            _args(tmp_path, tiny_model_dir, rm_dir, prompts_file, "fwd_ref", *extra, "ppo.share_prompt_forward=false")
        )
        w0 = load_file(str(Path(ref["final_dir"]) / "model.safetensors"))
        for k in w:
            torch.testing.assert_close(w[k], w0[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adv", ["grpo", "rloo", "remax"])
def test_critic_free_estimators_run(tmp_path, tiny_model_dir, rm_dir, prompts_file, adv):
    hist = _run(_args(tmp_path, tiny_model_dir, rm_dir, prompts_file, adv, f"ppo.advantage={adv}", "ppo.iterations=1"))[
        "history"
    ]
    assert "value_loss" not in hist[0] and torch.isfinite(torch.tensor(hist[0]["policy_loss"]))


@pytest.mark.parametrize("share", [True, False])
def test_share_prompt_prefill_switch(tmp_path, tiny_model_dir, rm_dir, prompts_file, monkeypatch, share):
    """The K samples of a prompt share one prompt prefill unless ``ppo.share_prompt_prefill=false``."""
    from alignforge.inference.generate import HFBackend

    calls = []
    real = HFBackend._prefilled_cache
    monkeypatch.setattr(
        HFBackend, "_prefilled_cache", lambda self, rows, k, dev: calls.append(k) or real(self, rows, k, dev)
    )
    _run(
        _args(
            tmp_path,
            tiny_model_dir,
            rm_dir,
            prompts_file,
            f"share{share}",
            "ppo.iterations=1",
            "ppo.reference_reward=false",
            f"ppo.share_prompt_prefill={str(share).lower()}",
        )
    )
    assert calls == ([2, 2] if share else [])  # two generation blocks of 2 prompts x K=2


def test_ntp_term_is_the_policy_nll_on_the_sft_batch(tmp_path, tiny_model_dir, rm_dir, prompts_file, sft_file):
    from alignforge.data.collate import collate_sft
    from alignforge.data.tokenize import load_sft_dataset
    from alignforge.models.loading import load_model, load_tokenizer
    from alignforge.models.logprobs import target_logprobs
    from alignforge.trainers.common import micro_slice, step_indices

    row = _run(
        _args(
            tmp_path,
            tiny_model_dir,
            rm_dir,
            prompts_file,
            "ntp",
            "ppo.iterations=1",
            "ppo.ppo_epochs=1",
            "ppo.minibatches=1",
            "ppo.ntp_coef=0.5",
            f"ppo.ntp_file={sft_file}",
            "ppo.ntp_batch_size=2",
        )
    )
    row = row["history"][0]
    tok = load_tokenizer(str(tiny_model_dir))
    ex, _ = load_sft_dataset(str(sft_file), tok, 512)
    idx = micro_slice(step_indices(0, len(ex), 2, 5), 0, 0, 1, 2)
    b = collate_sft([ex[i] for i in idx], tok.pad_token_id)
    with torch.no_grad():
        lp = target_logprobs(load_model(str(tiny_model_dir)), b["input_ids"], b["attention_mask"], b["target_mask"])
    nll = float(-(lp * b["target_mask"]).sum() / b["target_mask"].sum())
    assert row["ntp_loss"] == pytest.approx(nll, rel=1e-5)


def test_rm_with_another_tokenizer_scores_the_text(tmp_path, tiny_model_dir):
    """A reward model whose tokenizer differs from the policy's gets the responses re-tokenised."""
    from alignforge.data.tokenize import tokenize_prompt, tokenize_prompt_completion
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.reward import RewardModel, load_reward_backbone, load_reward_model, save_reward_model
    from alignforge.models.tiny import build_tiny_model
    from alignforge.trainers.ppo import Prompt, RewardScorer

    other = build_tiny_model(tmp_path / "other", vocab_size=300, seed=3)
    rm = RewardModel(load_reward_backbone(str(other)))
    with torch.no_grad():
        rm.model.score.weight.normal_(std=5.0)
    rm_dir = save_reward_model(rm, load_tokenizer(str(other)), tmp_path / "rm_other", {})
    ptok = load_tokenizer(str(tiny_model_dir))
    scorer = RewardScorer(str(rm_dir), ptok, torch.device("cpu"), batch_size=2)
    assert not scorer.same
    msgs = [[{"role": "user", "content": t}] for t in PROMPTS[:3]]
    prompts = [Prompt(m, tokenize_prompt(m, ptok)) for m in msgs]
    texts = ["Paris is the capital of France.", "I'm sorry, but I cannot help.", "Hello!"]
    responses = [ptok(t, add_special_tokens=False)["input_ids"] + [ptok.eos_token_id] for t in texts]
    got = scorer(prompts, responses)
    model, rtok, _ = load_reward_model(str(rm_dir))
    for m, t, g in zip(msgs, texts, got, strict=False):
        p, c = tokenize_prompt_completion(m, [{"role": "assistant", "content": t}], rtok, full_render=True)
        ids = torch.tensor([p + c])
        with torch.no_grad():
            direct = model({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).item()
        assert float(g) == pytest.approx(direct, rel=1e-5, abs=1e-5)


@pytest.fixture(scope="module")
def safety_rm_dir(tmp_path_factory, tiny_model_dir):
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.reward import RewardModel, load_reward_backbone, save_reward_model

    torch.manual_seed(1)
    rm = RewardModel(load_reward_backbone(str(tiny_model_dir)))
    with torch.no_grad():
        rm.model.score.weight.normal_(std=5.0)
    return save_reward_model(
        rm, load_tokenizer(str(tiny_model_dir)), tmp_path_factory.mktemp("srm") / "srm", {"mean": 0.5, "std": 2.0}
    )


def test_combined_scorer_is_llama2s_rule(tiny_model_dir, rm_dir, safety_rm_dir):
    """Safety prompts get the safety RM's z-score, other prompts the helpful RM's unless the safety RM's
    sigmoid(z) is under the threshold; z from each model's saved mean and std."""
    from alignforge.data.tokenize import tokenize_prompt
    from alignforge.models.loading import load_tokenizer
    from alignforge.trainers.ppo import CombinedScorer, Prompt, RewardScorer

    tok = load_tokenizer(str(tiny_model_dir))
    cpu = torch.device("cpu")
    h = RewardScorer(str(rm_dir), tok, cpu, batch_size=4)
    sa = RewardScorer(str(safety_rm_dir), tok, cpu, batch_size=4)
    msgs = [[{"role": "user", "content": t}] for t in PROMPTS]
    prompts = [Prompt(m, tokenize_prompt(m, tok), safety=i < 2) for i, m in enumerate(msgs)]
    torch.manual_seed(0)
    responses = [torch.randint(5, 200, (4 + i,)).tolist() for i in range(len(prompts))]
    zh = h(prompts, responses).double()  # helpful stats: mean 0, std 1
    zs = (sa(prompts, responses).double() - 0.5) / 2.0
    thr = float(torch.sigmoid(zs[2:]).median())  # some unflagged rows fall under it, some not
    got = CombinedScorer(h, sa, thr)
    out = got(prompts, responses).double()
    use = [i < 2 or float(torch.sigmoid(zs[i])) < thr for i in range(len(prompts))]
    assert 2 < sum(use) < len(prompts)
    want = torch.where(torch.tensor(use), zs, zh)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert got.last_safety.tolist() == use
    assert got.fingerprint() != CombinedScorer(h, sa, thr / 2).fingerprint()


def test_ppo_with_a_safety_reward_model(tmp_path, tiny_model_dir, rm_dir, safety_rm_dir, prompts_file):
    """The safety prompt file's prompts are flagged and always go to the safety RM; with threshold 0 only
    they do, so the logged share is the share of safety prompts in each iteration."""
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.reward import RewardModel, load_reward_backbone, save_reward_model

    safe = tmp_path / "safety_prompts.jsonl"
    safe.write_text(
        "".join(json.dumps({"prompt": [{"role": "user", "content": f"How do I harm {i}?"}]}) + "\n" for i in range(8))
    )
    args = _args(
        tmp_path,
        tiny_model_dir,
        rm_dir,
        prompts_file,
        "two_rms",
        f"ppo.safety_reward_model={safety_rm_dir}",
        f"ppo.safety_prompt_files=[{safe}]",
        "ppo.safety_threshold=0",
    )
    hist = _run(args)["history"]
    for it, row in enumerate(hist):
        glob = iteration_prompts(it, 16, 4, seed=5)
        assert row["safety_share"] == pytest.approx(sum(j >= 8 for j in glob) / 4)
    samples = [json.loads(x) for x in (tmp_path / "two_rms" / "samples.jsonl").read_text().splitlines()]
    assert all(s["safety_rm"] == ("harm" in s["prompt"]) for s in samples)
    assert "prompts: 16 read" in (tmp_path / "two_rms" / "data_report.txt").read_text()
    with pytest.raises(ConfigError, match="needs ppo.safety_reward_model"):
        _run(_args(tmp_path, tiny_model_dir, rm_dir, prompts_file, "x1", f"ppo.safety_prompt_files=[{safe}]"))
    with pytest.raises(ConfigError, match="safety_threshold is a probability"):
        _run([*args[:-1], "ppo.safety_threshold=2"])
    # a reward model without saved statistics cannot be put on the other's scale
    rm = RewardModel(load_reward_backbone(str(tiny_model_dir)))
    bare = save_reward_model(rm, load_tokenizer(str(tiny_model_dir)), tmp_path / "bare", {})
    with pytest.raises(ConfigError, match="no mean/std"):
        _run([*args, f"ppo.safety_reward_model={bare}", f"train.output_dir={tmp_path / 'x2'}"])


def test_prompt_filter_overlong_prompts_and_empty_sets(tmp_path, tiny_model_dir, rm_dir, prompts_file):
    args = _args(
        tmp_path,
        tiny_model_dir,
        rm_dir,
        prompts_file,
        "filt",
        "ppo.iterations=1",
        "ppo.filter_samples=2",
        "ppo.filter_eps=0",
    )
    _run(args)
    kept = (tmp_path / "filt" / "kept_prompts.jsonl").read_text().splitlines()
    assert len(kept) == len(PROMPTS)
    with pytest.raises(ConfigError, match="no prompts left.*8 dropped by the reward-variance filter"):
        _run(
            _args(
                tmp_path, tiny_model_dir, rm_dir, prompts_file, "filt2", "ppo.filter_samples=2", "ppo.filter_eps=1e12"
            )
        )
    _run(
        _args(tmp_path, tiny_model_dir, rm_dir, prompts_file, "trunc", "ppo.iterations=1", "data.max_prompt_length=12")
    )
    assert "8 truncated from the left" in (tmp_path / "trunc" / "data_report.txt").read_text()
    with pytest.raises(ConfigError, match="8 dropped as over-long"):
        _run(
            _args(
                tmp_path,
                tiny_model_dir,
                rm_dir,
                prompts_file,
                "drop",
                "data.max_prompt_length=12",
                "data.overlong=drop",
            )
        )


def test_nan_reward_stops_the_run(tmp_path, tiny_model_dir, rm_dir, prompts_file, monkeypatch):
    from alignforge.trainers import ppo

    real = ppo.RewardScorer.__call__
    calls = {"n": 0}

    def nan_later(self, prompts, responses):
        calls["n"] += 1
        out = real(self, prompts, responses)
        return out * float("nan") if calls["n"] > 4 else out  # 4 reference blocks, then the rollouts

    monkeypatch.setattr(ppo.RewardScorer, "__call__", nan_later)
    with pytest.raises(TrainingError, match="non-finite reward at iteration 1"):
        _run(_args(tmp_path, tiny_model_dir, rm_dir, prompts_file, "nan"))


def test_bad_config_is_named():
    with pytest.raises(ConfigError, match="ppo.kl_coef"):
        load_config(PPOConfig, None, ["ppo.kl_cof=0.1"])
    with pytest.raises(ConfigError, match="ppo.snapshot_every must be >= 0"):
        train_ppo(load_config(PPOConfig, None, ["ppo.reward_model=x", "data.train_files=[x]", "ppo.snapshot_every=-1"]))
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        train_ppo(load_config(PPOConfig, None, ["ppo.reward_model=x", "data.train_files=[x]", "ppo.advantage=grpo"]))
    with pytest.raises(ConfigError, match="multiple of"):
        train_ppo(
            load_config(
                PPOConfig,
                None,
                [
                    "ppo.reward_model=x",
                    "data.train_files=[x]",
                    "ppo.prompts_per_iteration=6",
                    "ppo.gen_batch_prompts=4",
                ],
            )
        )


# --------------------------------------------------------------------------- real processes


def _cli(args, env_extra=None, check=True):
    env = {**os.environ, "ALIGNFORGE_FAULT_AFTER_STEP": "", "ALIGNFORGE_FAULT_AFTER_ROLLOUT": "", **(env_extra or {})}
    p = subprocess.run(
        [sys.executable, "-m", "alignforge.cli", "ppo", *args], capture_output=True, text=True, env=env, timeout=600
    )
    if check and p.returncode != 0:
        raise AssertionError(f"rc={p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


def _weights(out: Path) -> dict:
    return load_file(str(out / "final" / "model.safetensors"))


def test_killed_runs_resume_to_identical_weights(tmp_path, tiny_model_dir, rm_dir, prompts_file):
    """SIGKILL after the rollout of iteration 2, and in the middle of iteration 2's updates: each resumed
    run ends with bit-identical weights to an uninterrupted one (rollout = f(seed, iteration, weights))."""

    def base(out):
        return _args(tmp_path, tiny_model_dir, rm_dir, prompts_file, out, "ppo.iterations=3", "train.save_every=1")

    _cli(base("full"))
    ref = _weights(tmp_path / "full")
    for out, env in (
        ("killgen", {"ALIGNFORGE_FAULT_AFTER_ROLLOUT": "2"}),
        ("killupd", {"ALIGNFORGE_FAULT_AFTER_STEP": "6:KILL"}),
    ):  # 4 updates per iteration
        p = _cli(base(out), env, check=False)
        assert p.returncode == -9, p.stderr
        assert not (tmp_path / out / "final").exists()
        p = _cli(base(out) + ["train.resume=true"])
        assert "resumed from" in p.stdout and "step-00000001" in p.stdout
        got = _weights(tmp_path / out)
        assert all(torch.equal(ref[k], got[k]) for k in ref), out
        rows = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]


def test_resume_refuses_a_changed_rollout_shape(tmp_path, tiny_model_dir, rm_dir, prompts_file):
    args = _args(tmp_path, tiny_model_dir, rm_dir, prompts_file, "shape", "ppo.iterations=1")
    _run(args)
    with pytest.raises(ConfigError, match="samples_per_prompt: 2 → 4"):
        _run(args + ["ppo.samples_per_prompt=4", "train.resume=true"])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_model_dir, rm_dir, prompts_file):
    from .test_distributed import _launch_two

    def base(out):
        return _args(tmp_path, tiny_model_dir, rm_dir, prompts_file, out, "ppo.iterations=2")

    _cli(base("one"))
    _launch_two(["ppo", *base("two")])
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    moved = max((a[k] - init[k]).abs().max().item() for k in init)
    print(f"max |one - two| = {worst:.3g}; training moved the weights by up to {moved:.3g}")
    assert worst < 1e-5 and moved > 1e-4


def test_one_update_without_kl_skips_the_old_and_reference_passes(
    tmp_path, tiny_model_dir, rm_dir, prompts_file, monkeypatch
):
    """kl_coef=0, one update per rollout, no dropout: no reference model is loaded, the rollout makes no
    log-prob pass (the update's detached log-probs are π_old), and the weights match the run that makes it."""
    import alignforge.trainers.ppo as ppo

    calls, refs = {"n": 0}, []
    real_lp, real_setup = ppo.response_logps, ppo._Trainer.setup

    def counting(*a, **kw):
        calls["n"] += 1
        return real_lp(*a, **kw)

    def setup(self):
        real_setup(self)
        refs.append(self.ref)

    monkeypatch.setattr(ppo, "response_logps", counting)
    monkeypatch.setattr(ppo._Trainer, "setup", setup)
    extra = ["ppo.advantage=grpo", "ppo.kl_coef=0", "ppo.reference_reward=false", "ppo.ppo_epochs=1"]
    extra += ["ppo.minibatches=1", "ppo.iterations=1"]
    fast = _run(_args(tmp_path, tiny_model_dir, rm_dir, prompts_file, "fast", *extra))
    n_fast, calls["n"] = calls["n"], 0
    monkeypatch.setattr(ppo._Trainer, "reuses_update_logps", lambda self, model: False)
    slow = _run(_args(tmp_path, tiny_model_dir, rm_dir, prompts_file, "slow", *extra))
    assert refs == [None, None]  # full fine-tuning, but nothing needs the reference
    assert (n_fast, calls["n"]) == (3, 6)  # 8 rows in chunks of 3: the update's 3 passes (+ the rollout's 3)
    assert "kl_ref" not in fast["history"][0] and "kl_ref" not in slow["history"][0]
    a, b = _weights(tmp_path / "fast"), _weights(tmp_path / "slow")
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max((a[k] - init[k]).abs().max().item() for k in init) > 1e-4  # it trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6  # the same update, up to rounding
    # with dropout the train-mode log-probs are not π_old's: the pass stays
    monkeypatch.undo()
    tr = ppo._Trainer.__new__(ppo._Trainer)
    tr.p, tr.use_kl = load_config(PPOConfig, None, ["ppo.ppo_epochs=1", "ppo.minibatches=1"]).ppo, False
    assert tr.reuses_update_logps(torch.nn.Linear(2, 2))
    assert not tr.reuses_update_logps(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    tr.use_kl = True
    assert not tr.reuses_update_logps(torch.nn.Linear(2, 2))


def test_vllm_backend_rolls_out_and_gets_the_weights_after_each_update(
    tmp_path, tiny_model_dir, rm_dir, prompts_file, monkeypatch
):
    """ppo.backend=vllm against a stand-in of vLLM's offline API (vLLM itself needs a GPU): the rollouts come
    from the engine, and the engine gets the policy's weights at the start and after every iteration."""
    import types

    syncs = []

    class Params:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class Target:
        def load_weights(self, weights):
            for name, t in weights:
                syncs[-1][name] = t.detach().clone()

    class LLM:
        def __init__(self, **kw):
            self.kw = kw
            runner = types.SimpleNamespace(model=Target())
            self.llm_engine = types.SimpleNamespace(
                model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
            )

        def generate(self, prompts, sampling_params, use_tqdm):
            eos = sampling_params[0].stop_token_ids[0]
            outs = []
            for sp in sampling_params:
                ids = [20 + (sp.seed + k) % 50 for k in range(3)] + [eos]
                outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids, finish_reason="stop")]))
            return outs

        def reset_prefix_cache(self):
            syncs.append({})

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = LLM, Params
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    syncs.append({})
    res = _run(_args(tmp_path, tiny_model_dir, rm_dir, prompts_file, "vllm", "ppo.backend=vllm"))
    pushed = [s for s in syncs if s]
    assert len(pushed) == 3  # the initial weights, then after iterations 1 and 2
    from alignforge.models.loading import load_model

    names = {n for n, _ in load_model(str(tiny_model_dir)).named_parameters()}
    assert set(pushed[0]) == names
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(pushed[0][q], pushed[1][q])  # trained weights reach the engine
    final = load_file(str(tmp_path / "vllm" / "final" / "model.safetensors"))
    assert torch.equal(final[q], pushed[2][q])
    samples = [json.loads(x) for x in (tmp_path / "vllm" / "samples.jsonl").read_text().splitlines()]
    assert all(s["n_tokens"] == 4 and s["finished"] for s in samples)  # the engine's answers
    assert res["history"][0]["response_len"] == 4


def test_ctrl_c_saves_at_the_end_of_the_iteration(tmp_path, tiny_model_dir, rm_dir, prompts_file):
    """SIGINT in the middle of iteration 1's updates: the iteration finishes, a checkpoint is saved, rc 130."""
    args = _args(tmp_path, tiny_model_dir, rm_dir, prompts_file, "int", "ppo.iterations=3", "train.save_every=0")
    p = _cli(args, {"ALIGNFORGE_FAULT_AFTER_STEP": "2:INT"}, check=False)  # 4 updates per iteration
    assert p.returncode == 130, p.stderr
    assert (tmp_path / "int" / "checkpoints" / "step-00000001").is_dir()
    assert not (tmp_path / "int" / "final").exists()
    assert "train.resume=true" in p.stdout + p.stderr


def test_shared_critic_adapter_trains_saves_only_the_actor_and_resumes_exactly(
    tmp_path, tiny_model_dir, rm_dir, prompts_file
):
    """``ppo.critic_shared=true``: the critic is a second LoRA adapter on the actor's base."""
    lora = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "ppo.critic_shared=true"]

    def base(out):
        return _args(
            tmp_path, tiny_model_dir, rm_dir, prompts_file, out, "ppo.iterations=3", "train.save_every=1", *lora
        )

    _cli(base("full"))
    final = tmp_path / "full" / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "critic").exists()
    ref = load_file(str(final / "adapter_model.safetensors"))
    assert ref and not any("critic" in k for k in ref)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["value_loss"] > 0 for r in rows) and rows[0]["value_loss"] != rows[-1]["value_loss"]
    ck = sorted((tmp_path / "full" / "checkpoints").glob("step-*"))[-1]
    state = torch.load(ck / "pytorch_model.bin", weights_only=True)
    assert any(".critic." in k for k in state) and "critic.head.weight" in state  # checkpointed
    # the critic adapter trained (its lora_B starts at zero), though the reference pass ran in between
    assert any(state[k].abs().sum() > 0 for k in state if "lora_B.critic" in k)
    p = _cli(base("kill"), {"ALIGNFORGE_FAULT_AFTER_ROLLOUT": "2"}, check=False)
    assert p.returncode == -9, p.stderr
    _cli(base("kill") + ["train.resume=true"])
    got = load_file(str(tmp_path / "kill" / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_shared_critic_needs_lora_gae_and_no_checkpointing():
    common = ["ppo.reward_model=x", "data.train_files=[x]", "ppo.critic_shared=true"]
    with pytest.raises(ConfigError, match="needs a LoRA policy"):
        train_ppo(load_config(PPOConfig, None, common))
    with pytest.raises(ConfigError, match="is for ppo.advantage=gae"):
        train_ppo(load_config(PPOConfig, None, common + ["lora.enabled=true", "ppo.advantage=rloo"]))
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        train_ppo(load_config(PPOConfig, None, common + ["lora.enabled=true", "model.gradient_checkpointing=true"]))
