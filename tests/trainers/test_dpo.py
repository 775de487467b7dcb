"""DPO and ULMA trainers on a tiny model: they learn the preference, the reference cache works,
LoRA uses the adapter-disabled base, and a batch without positives stays finite."""

import json
import random

import pytest
import torch

from alignforge.config import load_config
from alignforge.trainers.dpo import DPOConfig, train_dpo
from alignforge.trainers.ulma import ULMAConfig, train_ulma

GOOD = ["Sure, here is a clear and helpful answer.", "Here is a short helpful explanation."]
BAD = ["No.", "Go away, I will not help you."]


@pytest.fixture
def pairs_file(tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(16):
        rows.append({"prompt": [{"role": "user", "content": f"Question {i}: tell me about topic {rng.randint(0, 99)}."}],
                     "chosen": [{"role": "assistant", "content": rng.choice(GOOD)}],
                     "rejected": [{"role": "assistant", "content": rng.choice(BAD)}]})
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))


def _common(tmp_path, model_dir, data, out):
    return [f"model.name_or_path={model_dir}", f"data.train_files={data}", f"train.output_dir={tmp_path / out}",
            "train.per_device_batch_size=4", "train.progress=false", "data.max_length=256", "train.seed=1"]


def _logps(model_dir_or_lm, tok, prompt, response):
    from alignforge.data.tokenize import tokenize_prompt_completion
    from alignforge.models.loading import load_model

    lm = load_model(str(model_dir_or_lm)) if not isinstance(model_dir_or_lm, torch.nn.Module) else model_dir_or_lm
    p, c = tokenize_prompt_completion([{"role": "user", "content": prompt}], [{"role": "assistant", "content": response}], tok)
    ids = torch.tensor([p + c])
    with torch.no_grad():
        lp = torch.log_softmax(lm(input_ids=ids).logits[0].float(), -1)
    return sum(lp[len(p) - 1 + k, t].item() for k, t in enumerate(c))


def test_dpo_learns_preference_and_caches_reference(tmp_path, tiny_model_dir, pairs_file):
    from alignforge.models.loading import load_tokenizer

    args = _common(tmp_path, tiny_model_dir, pairs_file, "dpo") + ["train.epochs=6", "train.lr=5e-3", "dpo.beta=0.5"]
    summary = train_dpo(load_config(DPOConfig, None, args))
    hist = summary["history"]
    assert hist[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: -log sigmoid(0)
    assert hist[-1]["loss"] < 0.5 and hist[-1]["reward_accuracy"] > 0.9 and hist[-1]["reward_margin"] > 0
    tok = load_tokenizer(str(tiny_model_dir))
    q = "Question 99: tell me about topic 5."
    margin_before = _logps(tiny_model_dir, tok, q, GOOD[0]) - _logps(tiny_model_dir, tok, q, BAD[1])
    margin_after = _logps(summary["final_dir"], tok, q, GOOD[0]) - _logps(summary["final_dir"], tok, q, BAD[1])
    assert margin_after > margin_before + 1.0  # held-out prompt: chosen style became relatively likelier
    cached = list((tmp_path / "cache" / "reflogps").glob("*.pt"))
    assert len(cached) == 1
    # a second run reuses the cache; changing max_length (tokenisation) makes a new entry
    train_dpo(load_config(DPOConfig, None, args + ["train.max_steps=1", f"train.output_dir={tmp_path / 'dpo2'}"]))
    assert len(list((tmp_path / "cache" / "reflogps").glob("*.pt"))) == 1
    train_dpo(load_config(DPOConfig, None, args + ["train.max_steps=1", "data.max_length=24",
                                                   f"train.output_dir={tmp_path / 'dpo3'}"]))
    assert len(list((tmp_path / "cache" / "reflogps").glob("*.pt"))) == 2


def test_reference_values_match_a_direct_computation(tmp_path, tiny_model_dir, pairs_file):
    from alignforge.data.tokenize import load_preference_dataset
    from alignforge.models.loading import load_tokenizer

    args = _common(tmp_path, tiny_model_dir, pairs_file, "dpo") + ["train.max_steps=1"]
    train_dpo(load_config(DPOConfig, None, args))
    (path,) = (tmp_path / "cache" / "reflogps").glob("*.pt")
    ref = torch.load(path)
    tok = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_preference_dataset(pairs_file, tok, 256)
    from alignforge.models.loading import load_model

    lm = load_model(str(tiny_model_dir))
    for i in (0, 5):
        p = pairs[i]
        ids = torch.tensor([p.prompt_ids + p.chosen_ids])
        with torch.no_grad():
            lp = torch.log_softmax(lm(input_ids=ids).logits[0].double(), -1)
        P = len(p.prompt_ids)
        direct = sum(lp[P - 1 + k, t].item() for k, t in enumerate(p.chosen_ids))
        # packed fp32 vs unpacked: rounding grows with the summed magnitude
        assert ref["chosen_logps"][i].item() == pytest.approx(direct, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("extra", [["dpo.loss_type=ipo"], ["dpo.label_smoothing=0.1", "dpo.ntp_coef=0.5"],
                                   ["lora.enabled=true", "lora.r=4", "dpo.logp_reduction=mean"]])
def test_dpo_variants_run(tmp_path, tiny_model_dir, pairs_file, extra):
    args = _common(tmp_path, tiny_model_dir, pairs_file, "v") + ["train.epochs=1", "train.lr=1e-3", *extra]
    hist = train_dpo(load_config(DPOConfig, None, args))["history"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    if "dpo.loss_type=ipo" in extra:  # (0 - 1/(2*0.1))^2 = 25 at the start
        assert hist[0]["loss"] == pytest.approx(25.0, abs=1e-2)


@pytest.mark.parametrize("loss", ["ulma", "pointwise_dpo", "kto"])
def test_pointwise_trainers_learn(tmp_path, tiny_model_dir, pairs_file, loss):
    args = _common(tmp_path, tiny_model_dir, pairs_file, loss) + ["train.epochs=4", "train.lr=5e-3",
                                                                   f"ulma.loss={loss}", "ulma.beta=0.5"]
    summary = train_ulma(load_config(ULMAConfig, None, args))
    hist = summary["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    if loss != "kto":
        assert hist[-1]["sigmoid_reward_pos"] > hist[-1]["sigmoid_reward_neg"]
    assert "binary labels, 16 positive, 16 other" in (tmp_path / loss / "data_report.txt").read_text()


def test_ulma_continuous_labels_and_no_negatives(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"q{i}", "completion": GOOD[i % 2], "label": 1.0 if i < 8 else 0.7} for i in range(12)]
    p = tmp_path / "pw.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _common(tmp_path, tiny_model_dir, p, "u") + ["train.epochs=1", "train.lr=1e-3"]
    s = train_ulma(load_config(ULMAConfig, None, args))
    assert "continuous labels, 8 positive, 4 other" in (tmp_path / "u" / "data_report.txt").read_text()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in s["history"])
    # only positives: pure SFT, finite
    p.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": GOOD[0], "label": True}) + "\n" for i in range(8)))
    s = train_ulma(load_config(ULMAConfig, None, args + [f"train.output_dir={tmp_path / 'u2'}"]))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in s["history"])


def test_bad_pointwise_label_names_file_and_line(tmp_path, tiny_model_dir):
    from alignforge.errors import DataError

    p = tmp_path / "pw.jsonl"
    p.write_text(json.dumps({"prompt": "q", "completion": "a", "label": 1}) + "\n"
                 + json.dumps({"prompt": "q", "completion": "b", "label": 1.5}) + "\n")
    with pytest.raises(DataError, match=r"pw.jsonl:2: field 'label'"):
        train_ulma(load_config(ULMAConfig, None, _common(tmp_path, tiny_model_dir, p, "x")))
    p.write_text(json.dumps({"prompt": "q", "completion": "b", "label": float("nan")}).replace("NaN", "NaN") + "\n")
    with pytest.raises(DataError, match=r"pw.jsonl:1: field 'label'"):
        train_ulma(load_config(ULMAConfig, None, _common(tmp_path, tiny_model_dir, p, "x")))


def test_bf16_reference_is_computed_in_the_training_precision(tmp_path, tiny_model_dir, pairs_file):
    import math

    base = _common(tmp_path, tiny_model_dir, pairs_file, "dpo") + ["train.max_steps=1", "dpo.beta=1.0"]
    s16 = train_dpo(load_config(DPOConfig, None, base + ["train.precision=bf16", f"train.output_dir={tmp_path / 'b'}"]))
    # policy == reference at step 1, both under the same autocast (and, on this tiny data, the same
    # bf16 rounding whatever the padded shape): log-ratios 0, loss = log 2
    # (with an fp32 reference under a bf16 policy these were off by ~3e-5 and ~4e-4)
    assert abs(s16["history"][0]["loss"] - math.log(2)) < 1e-6
    assert abs(s16["history"][0]["kl_data"]) < 1e-5
    train_dpo(load_config(DPOConfig, None, base + [f"train.output_dir={tmp_path / 'f'}"]))
    # one cache entry per precision: a bf16 reference is never reused for an fp32 run
    assert len(list((tmp_path / "cache" / "reflogps").glob("*.pt"))) == 2
