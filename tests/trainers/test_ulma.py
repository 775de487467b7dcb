"""ULMA trainer: KTO's reference point from mismatched pairs (values by hand), and resume after SIGKILL."""

import pytest

from alignforge.config import load_config
from alignforge.trainers.ulma import ULMAConfig, planned_mismatched_pairs, train_ulma

from .test_dpo import (
    _common,
    direct_logp,
    first_batch,
    kill_resume_and_compare,
    load_f64,
    preference_config,
    write_pairs,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def distinct_model_dir(tmp_path_factory):
    """A tiny model whose weights are redrawn with std 0.1: its answers depend on the prompt more than the
    default init's do, so KL estimates on matched and on mismatched pairs differ clearly (by about 0.05
    here, against fp32 rounding of about 1e-5 in the trainer)."""
    import torch

    from alignforge.models.loading import load_model
    from alignforge.models.tiny import build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("distinct") / "model", seed=1)
    model = load_model(str(out))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out)
    return out


def _sig(x: float) -> float:
    import math

    return 1 / (1 + math.exp(-x))


def _hand_kto(points, idx, pol, ref, *, beta, lambda_d, lambda_u):
    """KTO's step-1 z0 and loss over the global batch ``idx`` by hand (summed log-probs): z0 from prompt k
    with the completion of example k+1 (the last with the first's), clamped at 0."""
    kl = []
    for k, i in enumerate(idx):
        j = idx[(k + 1) % len(idx)]
        x, y = points[i].prompt_ids, points[j].completion_ids
        kl.append(direct_logp(pol, x, y) - direct_logp(ref, x, y))
    estimate = sum(kl) / len(kl)
    z0 = max(0.0, estimate)
    losses, scale = [], 0.0
    for i in idx:
        e = points[i]
        lp, lr = direct_logp(pol, e.prompt_ids, e.completion_ids), direct_logp(ref, e.prompt_ids, e.completion_ids)
        scale = max(scale, abs(lp), abs(lr))
        h = lp - lr
        if e.label >= 0.5:
            losses.append(lambda_d - lambda_d * _sig(beta * (h - z0)))
        else:
            losses.append(lambda_u - lambda_u * _sig(beta * (z0 - h)))
    return estimate, z0, sum(losses) / len(losses), scale


def test_kto_step1_reference_point_and_loss_equal_hand_computation(tmp_path, tiny_model_dir, distinct_model_dir):
    """With another model as reference, step 1's logged z0 and loss are KTO's formulas on the first global
    batch; grad_accum=2 (z0 is one value for the global batch). Swapping policy and reference flips the sign
    of the KL estimate, so one order checks the value of z0 and the other its clamp at 0."""
    from alignforge.data.tokenize import load_pointwise_dataset
    from alignforge.models.loading import load_tokenizer

    data = write_pairs(tmp_path / "pairs.jsonl", 8)  # 16 points: chosen 1, rejected 0
    beta, lambda_d, lambda_u = 0.5, 1.0, 1.5
    points, _ = load_pointwise_dataset(data, load_tokenizer(str(tiny_model_dir)), 256)
    idx = first_batch(len(points), 4, seed=1)
    estimates = []
    for name, (policy_dir, ref_dir) in {
        "a": (tiny_model_dir, distinct_model_dir),
        "b": (distinct_model_dir, tiny_model_dir),
    }.items():
        args = _common(tmp_path, policy_dir, data, name) + [
            "train.max_steps=1",
            "train.group_by_length=false",
            "train.per_device_batch_size=2",
            "train.grad_accum=2",
            "ulma.loss=kto",
            f"ulma.beta={beta}",
            f"ulma.kto_lambda_d={lambda_d}",
            f"ulma.kto_lambda_u={lambda_u}",
            f"ulma.ref_model={ref_dir}",
        ]
        hist = train_ulma(load_config(ULMAConfig, None, args))["history"]
        estimate, z0, loss, scale = _hand_kto(
            points, idx, load_f64(policy_dir), load_f64(ref_dir), beta=beta, lambda_d=lambda_d, lambda_u=lambda_u
        )
        estimates.append(estimate)
        # fp32 forward in the trainer vs float64 here: rounding of summed log-probs of magnitude `scale`
        assert hist[0]["kto_z0"] == pytest.approx(z0, abs=1e-5 * scale)
        assert hist[0]["loss"] == pytest.approx(loss, abs=1e-5 * scale)
    assert estimates[0] == pytest.approx(-estimates[1], rel=1e-9)
    assert max(estimates) > 0.05  # one order checked a clearly positive z0, the other the clamp


def test_planned_mismatched_pairs_cover_the_loop(tmp_path):
    from alignforge.config import TrainConfig
    from alignforge.trainers.common import step_indices

    cfg = TrainConfig(per_device_batch_size=3, grad_accum=1, epochs=2, seed=4)
    lengths = [(7 * i) % 5 for i in range(10)]
    planned = set(planned_mismatched_pairs(10, cfg, 1, lengths))
    seen = set()
    for step in range(8):  # 4 steps per epoch (the last batch holds one example and pairs it with itself)
        idx = step_indices(step, 10, 3, 4, lengths)
        seen.update((idx[k], idx[(k + 1) % len(idx)]) for k in range(len(idx)))
    assert planned == seen
    assert set(planned_mismatched_pairs(10, TrainConfig(per_device_batch_size=3, max_steps=2, seed=4), 1, lengths)) == {
        pr
        for s in range(2)
        for idx in [step_indices(s, 10, 3, 4, lengths)]
        for pr in zip(idx, idx[1:] + idx[:1], strict=True)
    }


def test_kto_needs_a_global_batch_of_two(tmp_path, tiny_model_dir):
    from alignforge.errors import ConfigError

    data = write_pairs(tmp_path / "pairs.jsonl", 2)
    args = _common(tmp_path, tiny_model_dir, data, "k") + ["ulma.loss=kto", "train.per_device_batch_size=1"]
    with pytest.raises(ConfigError, match="global batch"):
        train_ulma(load_config(ULMAConfig, None, args))


@pytest.mark.parametrize("loss", ["ulma", "kto"])
def test_ulma_sigkill_then_resume_gives_identical_weights(tmp_path, tiny_model_dir, loss):
    data = write_pairs(tmp_path / "pairs.jsonl", 6)  # 12 points: 3 steps per epoch, 6 in all
    section = f"ulma: {{loss: {loss}, beta: 0.5}}"
    ref = preference_config(tmp_path, tiny_model_dir, data, "ref", section)
    run = preference_config(tmp_path, tiny_model_dir, data, "run", section)
    kill_resume_and_compare(tmp_path, "ulma", ref, run, kill_after=3, steps=6)  # checkpoint at 2; step 3 redone
