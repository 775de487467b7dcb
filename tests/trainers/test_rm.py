"""Reward-model training on a tiny model: it learns, packing equals unpacked, LoRA, save/load, CLI."""

import json
import random
import subprocess
import sys

import torch

from alignforge.config import load_config
from alignforge.trainers.rm import RMConfig, collate_unpacked, make_loss, train_rm

GOOD = [
    "Sure, here is a clear and helpful answer.",
    "Here is a short helpful explanation.",
    "Happy to help: the answer is below.",
]
BAD = ["No.", "I do not care.", "Go away, I will not help you."]


def _write_pairs(path, n=24, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Question {i}: tell me about topic {rng.randint(0, 99)}."}]
        if i % 4 == 0:  # multi-turn prompts
            prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}] + prompt
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": rng.choice(GOOD)}],
                "rejected": [{"role": "assistant", "content": rng.choice(BAD)}],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, model_dir, *extra):
    data = _write_pairs(tmp_path / "pairs.jsonl")
    return load_config(
        RMConfig,
        None,
        [
            f"model.name_or_path={model_dir}",
            f"data.train_files={data}",
            f"train.output_dir={tmp_path / 'rm'}",
            "train.epochs=4",
            "train.per_device_batch_size=4",
            "train.lr=3e-3",
            "train.progress=false",
            "reward.length_balance=false",
            "data.max_length=256",
            *extra,
        ],
    )


def test_rm_learns_and_saves(tmp_path, tiny_model_dir):
    from alignforge.models.reward import load_reward_model

    summary = train_rm(_cfg(tmp_path, tiny_model_dir))
    hist = summary["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert sum(h["accuracy"] for h in hist[-3:]) / 3 > 0.9
    rm, tok, stats = load_reward_model(summary["final_dir"])
    assert set(stats) >= {"mean", "std", "n_scores"} and stats["n_scores"] == 48
    # the saved model ranks a held-out good answer above a bad one
    from alignforge.data.records import PreferenceRecord
    from alignforge.data.tokenize import tokenize_preference
    from alignforge.models.packing import pack_pairs

    rec = PreferenceRecord(
        [{"role": "user", "content": "Question 7: tell me about topic 3."}],
        [{"role": "assistant", "content": GOOD[0]}],
        [{"role": "assistant", "content": BAD[2]}],
    )
    pair, _ = tokenize_preference(rec, tok, 256)
    with torch.no_grad():
        rc, rr = rm(pack_pairs([pair], tok.pad_token_id))
    assert rc.item() > rr.item()


def test_overlong_pairs_are_dropped_not_cut_by_default(tmp_path, tiny_model_dir):
    """RM default (data.overlong=truncate_prompt): the prompt is cut from the left, a pair whose response
    would still be cut is dropped; data.overlong=truncate keeps it with a cut response. Both are counted."""
    data = _write_pairs(tmp_path / "pairs.jsonl", n=8)
    long_row = {"prompt": "Hi", "chosen": " ".join([GOOD[0]] * 12), "rejected": BAD[0]}
    data.write_text(data.read_text() + json.dumps(long_row) + "\n")
    base = [
        f"model.name_or_path={tiny_model_dir}",
        f"data.train_files={data}",
        "train.max_steps=1",
        "train.per_device_batch_size=4",
        "train.progress=false",
        "reward.length_balance=false",
        "data.max_length=96",
    ]
    assert load_config(RMConfig, None, []).data.overlong == "truncate_prompt"
    s = train_rm(load_config(RMConfig, None, base + [f"train.output_dir={tmp_path / 'a'}"]))
    assert "8 examples from 9 records" in s["data_report"] and "; 0 truncated" in s["data_report"]
    assert "1 dropped: a response would not fit in max_length 96 even with the prompt cut" in s["data_report"]
    assert s["data_report"] in (tmp_path / "a" / "data_report.txt").read_text()
    s = train_rm(load_config(RMConfig, None, base + [f"train.output_dir={tmp_path / 'b'}", "data.overlong=truncate"]))
    assert "9 examples from 9 records" in s["data_report"]
    assert "1 truncated to max_length 96 (1 with a response cut)" in s["data_report"]


def test_packed_and_unpacked_losses_agree(tmp_path, tiny_model_dir):
    from alignforge.data.tokenize import load_preference_dataset
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.packing import pack_pairs
    from alignforge.models.reward import RewardModel, load_reward_backbone

    cfg = _cfg(tmp_path, tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_preference_dataset(cfg.data.train_files, tok, 256)
    torch.manual_seed(0)
    rm = RewardModel(load_reward_backbone(str(tiny_model_dir))).eval()
    with torch.no_grad():
        for p in rm.parameters():
            p.mul_(4.0)
    loss_fn = make_loss(cfg.reward)
    a, ma = loss_fn(rm, pack_pairs(pairs[:6], tok.pad_token_id), 6.0)
    b, mb = loss_fn(rm, collate_unpacked(pairs[:6], tok.pad_token_id), 6.0)
    assert abs(a.item() - b.item()) < 1e-5
    assert abs(ma["reward_chosen"].item() - mb["reward_chosen"].item()) < 1e-4


def test_length_balancing_is_applied_and_reported(tmp_path, tiny_model_dir):
    cfg = _cfg(
        tmp_path, tiny_model_dir, "reward.length_balance=true", "train.epochs=1", "reward.bucket_edges=[0,4,1000]"
    )
    train_rm(cfg)
    rep = json.loads((tmp_path / "rm" / "length_balance.json").read_text())
    # chosen (GOOD) answers are always longer than rejected ones here: balancing keeps none of them
    assert rep["n_before"] == 24 and rep["n_after"] < 24
    assert all(b["longer_won_after"] == b["shorter_won_after"] for b in rep["buckets"])
    assert "length balancing: 24 ->" in (tmp_path / "rm" / "data_report.txt").read_text()


def test_lora_reward_model(tmp_path, tiny_model_dir):
    from alignforge.models.reward import load_reward_model

    summary = train_rm(_cfg(tmp_path, tiny_model_dir, "lora.enabled=true", "lora.r=4", "train.epochs=2"))
    rm, _, stats = load_reward_model(summary["final_dir"])  # merged into a plain HF model
    assert "mean" in stats
    assert not any("lora" in n for n, _ in rm.named_parameters())


def test_cli_rm_train_bad_pair(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "same", "rejected": "same"}) + "\n")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignforge.cli",
            "rm",
            "train",
            f"model.name_or_path={tiny_model_dir}",
            f"data.train_files={data}",
            f"train.output_dir={tmp_path / 'o'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and f"{data}:1: field 'rejected': chosen identical to rejected" in p.stderr
