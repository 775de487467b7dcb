"""DPO and ULMA trainers on a tiny model: they learn the preference, the reference cache works,
LoRA uses the adapter-disabled base, and a batch without positives stays finite."""

import json
import math
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
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Question {i}: tell me about topic {rng.randint(0, 99)}."}],
                "chosen": [{"role": "assistant", "content": rng.choice(GOOD)}],
                "rejected": [{"role": "assistant", "content": rng.choice(BAD)}],
            }
        )
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))


def _common(tmp_path, model_dir, data, out):
    return [
        f"model.name_or_path={model_dir}",
        f"data.train_files={data}",
        f"train.output_dir={tmp_path / out}",
        "train.per_device_batch_size=4",
        "train.progress=false",
        "data.max_length=256",
        "train.seed=1",
    ]


def _logps(model_dir_or_lm, tok, prompt, response):
    from alignforge.data.tokenize import tokenize_prompt_completion
    from alignforge.models.loading import load_model

    lm = load_model(str(model_dir_or_lm)) if not isinstance(model_dir_or_lm, torch.nn.Module) else model_dir_or_lm
    p, c = tokenize_prompt_completion(
        [{"role": "user", "content": prompt}], [{"role": "assistant", "content": response}], tok
    )
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
    train_dpo(
        load_config(
            DPOConfig, None, args + ["train.max_steps=1", "data.max_length=24", f"train.output_dir={tmp_path / 'dpo3'}"]
        )
    )
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


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """A second tiny model (same tokenizer, other random weights): as ``ref_model`` it makes the
    step-1 log-ratios non-zero, so a step-1 loss depends on every term of the formula."""
    from alignforge.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)


def direct_logp(lm, prompt_ids, response_ids) -> float:
    """Summed log-prob of ``response_ids`` after ``prompt_ids``: one unpadded float64 forward, full log-softmax
    (an independent path from the trainers' packed / masked one)."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        lp = torch.log_softmax(lm(input_ids=ids).logits[0].double(), -1)
    P = len(prompt_ids)
    return sum(lp[P - 1 + k, t].item() for k, t in enumerate(response_ids))


def load_f64(model_dir):
    from alignforge.models.loading import load_model

    return load_model(str(model_dir)).double().eval()


def first_batch(n: int, global_batch: int, seed: int) -> list[int]:
    from alignforge.trainers.common import step_indices

    return step_indices(0, n, global_batch, seed)


def _hand_dpo_loss(pairs, idx, pol, ref, *, beta, eps=0.0, alpha=0.0, how="sum", ipo=False, gamma=0.0):
    """The DPO / cDPO / IPO (+ alpha * mean-token NLL of the chosen) step-1 loss over the batch ``idx``, by hand."""
    total, scale = 0.0, 0.0
    for i in idx:
        p = pairs[i]
        nc, nr = len(p.chosen_ids), len(p.rejected_ids)
        pc, pr = direct_logp(pol, p.prompt_ids, p.chosen_ids), direct_logp(pol, p.prompt_ids, p.rejected_ids)
        rc, rr = direct_logp(ref, p.prompt_ids, p.chosen_ids), direct_logp(ref, p.prompt_ids, p.rejected_ids)
        scale = max(scale, abs(pc), abs(pr), abs(rc), abs(rr))
        if how == "mean":
            h_w, h_l = (pc - rc) / nc, (pr - rr) / nr
        else:
            h_w, h_l = pc - rc, pr - rr
        delta = h_w - h_l
        if ipo:
            loss = (delta - 1 / (2 * beta)) ** 2
        else:
            z = beta * delta - gamma
            loss = (1 - eps) * math.log1p(math.exp(-z)) + eps * math.log1p(math.exp(z))
        total += loss + alpha * (-pc / nc)
    return total / len(idx), scale


@pytest.mark.parametrize(
    "extra,hand",
    [
        (["dpo.loss_type=ipo"], dict(ipo=True, how="mean")),  # IPO: per-token means by default
        (["dpo.loss_type=ipo", "dpo.logp_reduction=sum"], dict(ipo=True, how="sum")),  # an explicit setting wins
        (["dpo.label_smoothing=0.1", "dpo.ntp_coef=0.5"], dict(eps=0.1, alpha=0.5)),  # cDPO + NTP, summed log-probs
        (["lora.enabled=true", "lora.r=4", "dpo.logp_reduction=mean"], dict(how="mean")),  # length-normalised DPO
        (["dpo.simpo_gamma=0.3"], dict(gamma=0.3)),  # a SimPO-style target margin on summed log-ratios
        (["dpo.logp_reduction=mean", "dpo.simpo_gamma=0.3"], dict(how="mean", gamma=0.3)),  # both length levers
    ],
)
def test_dpo_variants_step1_loss_equals_hand_computation(
    tmp_path, tiny_model_dir, other_model_dir, pairs_file, extra, hand
):
    """Against another model as reference, the step-1 loss is the formula of the variant on the batch's
    log-probs (LoRA starts as the base model: B = 0)."""
    from alignforge.data.tokenize import load_preference_dataset
    from alignforge.models.loading import load_tokenizer

    beta = 0.5
    args = _common(tmp_path, tiny_model_dir, pairs_file, "v") + [
        "train.max_steps=1",
        "train.group_by_length=false",
        f"dpo.beta={beta}",
        f"dpo.ref_model={other_model_dir}",
        *extra,
    ]
    hist = train_dpo(load_config(DPOConfig, None, args))["history"]
    pairs, _ = load_preference_dataset(pairs_file, load_tokenizer(str(tiny_model_dir)), 256)
    idx = first_batch(len(pairs), 4, seed=1)
    expected, scale = _hand_dpo_loss(pairs, idx, load_f64(tiny_model_dir), load_f64(other_model_dir), beta=beta, **hand)
    # fp32 forward in the trainer vs float64 here: rounding of log-probs of magnitude `scale`
    assert hist[0]["loss"] == pytest.approx(expected, abs=1e-5 * scale)
    if hand.get("alpha"):  # the NTP term adds exactly alpha * the logged mean-token NLL of the chosen
        base, _ = _hand_dpo_loss(
            pairs, idx, load_f64(tiny_model_dir), load_f64(other_model_dir), beta=beta, eps=hand["eps"]
        )
        assert hist[0]["loss"] - base == pytest.approx(hand["alpha"] * hist[0]["nll_chosen"], abs=1e-5 * scale)


def test_simpo_gamma_with_ipo_is_a_config_error(tmp_path, tiny_model_dir, pairs_file):
    from alignforge.errors import ConfigError

    args = _common(tmp_path, tiny_model_dir, pairs_file, "g") + ["dpo.loss_type=ipo", "dpo.simpo_gamma=0.5"]
    with pytest.raises(ConfigError, match="dpo.simpo_gamma is a margin of the sigmoid loss"):
        train_dpo(load_config(DPOConfig, None, args))


@pytest.mark.parametrize("loss", ["ulma", "pointwise_dpo", "kto"])
def test_pointwise_trainers_learn(tmp_path, tiny_model_dir, pairs_file, loss):
    args = _common(tmp_path, tiny_model_dir, pairs_file, loss) + [
        "train.epochs=4",
        "train.lr=5e-3",
        f"ulma.loss={loss}",
        "ulma.beta=0.5",
    ]
    summary = train_ulma(load_config(ULMAConfig, None, args))
    hist = summary["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    if loss != "kto":  # the last step that had both positives and negatives (length grouping can split them)
        last = [h for h in hist if "sigmoid_reward_pos" in h and "sigmoid_reward_neg" in h][-1]
        assert last["step"] > len(hist) // 2 and last["sigmoid_reward_pos"] > last["sigmoid_reward_neg"]
    assert "binary labels, 16 positive, 16 other" in (tmp_path / loss / "data_report.txt").read_text()


def test_ulma_continuous_labels_and_no_negatives(tmp_path, tiny_model_dir, other_model_dir):
    """Step-1 losses against another model as reference equal the ULMA formulas by hand: SFT on the
    positives plus ``(z - βh - c)²`` on the others (continuous), and pure SFT with positives only."""
    from alignforge.data.tokenize import load_pointwise_dataset
    from alignforge.models.loading import load_tokenizer

    beta, c = 0.5, 0.1
    rows = [
        {"prompt": f"q{i}", "completion": GOOD[i % 2] if i < 8 else BAD[i % 2], "label": 1.0 if i < 8 else 0.7}
        for i in range(12)
    ]
    p = tmp_path / "pw.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _common(tmp_path, tiny_model_dir, p, "u") + [
        "train.max_steps=1",
        "train.group_by_length=false",
        f"ulma.beta={beta}",
        f"ulma.c={c}",
        f"ulma.ref_model={other_model_dir}",
    ]
    s = train_ulma(load_config(ULMAConfig, None, args))
    assert "continuous labels, 8 positive, 4 other" in (tmp_path / "u" / "data_report.txt").read_text()
    tok = load_tokenizer(str(tiny_model_dir))
    pol, ref = load_f64(tiny_model_dir), load_f64(other_model_dir)

    def mean_logps(e):
        n = len(e.completion_ids)
        x, y = e.prompt_ids, e.completion_ids
        return direct_logp(pol, x, y) / n, direct_logp(ref, x, y) / n

    points, _ = load_pointwise_dataset(p, tok, 256)
    batch = [points[i] for i in first_batch(len(points), 4, seed=1)]
    pos = [e for e in batch if e.label == 1.0]
    neg = [e for e in batch if e.label != 1.0]
    assert pos and neg  # the batch has both parts, so both terms are checked
    sft = sum(-mean_logps(e)[0] for e in pos) / len(pos)
    reg = sum((e.label - beta * (lp - lr) - c) ** 2 for e in neg for lp, lr in [mean_logps(e)]) / len(neg)
    # per-token means are of magnitude ~10: fp32 rounding in the trainer is far below 1e-4
    assert s["history"][0]["loss"] == pytest.approx(sft + reg, abs=1e-4)
    assert s["history"][0]["pos_nll"] == pytest.approx(sft, abs=1e-4)

    # only positives: pure SFT on the per-token mean log-probs, no reference term
    p.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "completion": GOOD[i % 2], "label": True}) + "\n" for i in range(8))
    )
    s = train_ulma(load_config(ULMAConfig, None, args + [f"train.output_dir={tmp_path / 'u2'}"]))
    points, _ = load_pointwise_dataset(p, tok, 256)
    batch = [points[i] for i in first_batch(len(points), 4, seed=1)]
    sft = sum(-mean_logps(e)[0] for e in batch) / len(batch)
    assert s["history"][0]["loss"] == pytest.approx(sft, abs=1e-4)


def test_bad_pointwise_label_names_file_and_line(tmp_path, tiny_model_dir):
    from alignforge.errors import DataError

    p = tmp_path / "pw.jsonl"
    p.write_text(
        json.dumps({"prompt": "q", "completion": "a", "label": 1})
        + "\n"
        + json.dumps({"prompt": "q", "completion": "b", "label": 1.5})
        + "\n"
    )
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


def write_pairs(path, n: int):
    rng = random.Random(3)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Question {i}: tell me about topic {rng.randint(0, 99)}."}],
            "chosen": [{"role": "assistant", "content": rng.choice(GOOD)}],
            "rejected": [{"role": "assistant", "content": rng.choice(BAD)}],
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def preference_config(tmp_path, model_dir, data, out: str, section: str, extra: str = ""):
    """A DPO/ULMA YAML: global batch 2 x accum 2 = 4, two epochs, lr high enough that every step moves the weights."""
    cfg = tmp_path / f"{out}.yaml"
    cfg.write_text(f"""
model: {{name_or_path: {model_dir}}}
data: {{train_files: [{data}], max_length: 256}}
train:
  output_dir: {tmp_path / out}
  epochs: 2
  per_device_batch_size: 2
  grad_accum: 2
  lr: 0.01
  warmup_steps: 2
  seed: 5
  progress: false
  save_every: 2
{section}
{extra}
""")
    return cfg


def kill_resume_and_compare(tmp_path, command: str, cfg_uninterrupted, cfg_killed, kill_after: int, steps: int):
    """Run uninterrupted; run again, SIGKILLed after ``kill_after``; resume it: the final weights are equal."""
    import signal

    from safetensors.torch import load_file

    from .test_sft import _run

    done = _run([command, str(cfg_uninterrupted)])
    assert f"done: {steps} steps" in done.stdout
    killed = _run([command, str(cfg_killed)], {"ALIGNFORGE_FAULT_AFTER_STEP": f"{kill_after}:KILL"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = tmp_path / "run"
    assert not (run / "final").exists()
    resumed = _run([command, str(cfg_killed), "--resume"])
    assert "resumed from" in resumed.stdout and f"done: {steps} steps" in resumed.stdout
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diffs, f"weights differ after resume: {diffs}"
    return a


def test_dpo_sigkill_then_resume_gives_identical_weights(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    data = write_pairs(tmp_path / "pairs.jsonl", 12)  # 3 steps per epoch, 6 in all
    section = "dpo: {beta: 0.5}"
    ref = preference_config(tmp_path, tiny_model_dir, data, "ref", section)
    run = preference_config(tmp_path, tiny_model_dir, data, "run", section)
    final = kill_resume_and_compare(tmp_path, "dpo", ref, run, kill_after=3, steps=6)  # checkpoint at 2; 3 redone
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max((final[k] - init[k]).abs().max().item() for k in final if k in init) > 1e-3  # training moved them
