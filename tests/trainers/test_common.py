"""The shared loop: batching plan, schedule, checkpoints, NaN guard, logging outputs."""

import json
import math

import pytest
import torch

from alignforge.config import TrainConfig
from alignforge.data.records import TokenizedSFT
from alignforge.errors import TrainingError
from alignforge.trainers.common import (Task, latest_checkpoint, list_checkpoints, lr_lambda, micro_slice,
                                        run_training, step_indices, steps_per_epoch)


def test_step_indices_cover_each_epoch_once():
    n, G = 10, 4
    spe = steps_per_epoch(n, G)
    assert spe == 3
    for epoch in range(2):
        seen = sum((step_indices(epoch * spe + k, n, G, seed=7) for k in range(spe)), [])
        assert sorted(seen) == list(range(n))
    # a pure function of (step, seed): same call, same answer; new epoch, new order
    assert step_indices(4, n, G, 7) == step_indices(4, n, G, 7)
    assert step_indices(0, n, G, 7) != step_indices(3, n, G, 7)
    assert len(step_indices(2, n, G, 7)) == 2  # short last batch


def test_length_grouping_keeps_epochs_complete_and_batches_homogeneous():
    from alignforge.trainers.common import MEGABATCH, epoch_order

    n, G = 200, 4
    lengths = [(i * 37) % 101 for i in range(n)]
    order = epoch_order(0, n, G, seed=1, lengths=lengths)
    assert sorted(order) == list(range(n))
    w = G * MEGABATCH
    for k in range(0, n, w):  # each window is sorted longest first
        win = [lengths[i] for i in order[k:k + w]]
        assert win == sorted(win, reverse=True)
    plain = epoch_order(0, n, G, seed=1)
    spread = lambda o: sum(max(lengths[i] for i in o[k:k + G]) - min(lengths[i] for i in o[k:k + G])  # noqa: E731
                           for k in range(0, n, G))
    assert spread(order) < spread(plain) / 5  # far less padding per batch
    assert epoch_order(1, n, G, seed=1, lengths=lengths) != order  # a new shuffle each epoch
    assert step_indices(3, n, G, 1, lengths) == order[12:16]


def test_micro_slices_partition_the_global_batch():
    idx = list(range(8))
    parts = [micro_slice(idx, m, r, world=2, batch=2) for m in range(2) for r in range(2)]
    assert sorted(sum(parts, [])) == idx
    assert micro_slice([1, 2, 3], 1, 1, world=2, batch=2) == []  # empty: the loop feeds a zero-weight dummy


def test_lr_schedules():
    f = lr_lambda("cosine", warmup=2, total=10)
    assert f(0) == 0.5 and f(1) == 1.0
    assert math.isclose(f(2), 1.0) and math.isclose(f(6), 0.5) and f(10) == pytest.approx(0.0, abs=1e-12)
    g = lr_lambda("linear", warmup=0, total=4)
    assert [g(i) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_lambda("constant", 0, 5)(3) == 1.0


def _examples(tok, n=12):
    out = []
    for i in range(n):
        ids = tok(f"The quick brown fox {i} jumps over the lazy dog {i * 7}.", add_special_tokens=False).input_ids
        mask = [0] * 4 + [1] * (len(ids) - 4)
        out.append(TokenizedSFT(ids, mask))
    return out


def _task(model_dir, tok, n=12):
    from transformers import AutoModelForCausalLM

    from alignforge.models.logprobs import TokenLogProbs
    from alignforge.trainers.sft import collate_sft, count_targets, sft_step_loss

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    return Task(module=TokenLogProbs(lm), examples=_examples(tok, n),
                collate=lambda ex: collate_sft(ex, tok.pad_token_id), normalizer=count_targets,
                loss=sft_step_loss, save_model=lambda m, d: m.lm.save_pretrained(d))


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), per_device_batch_size=2, grad_accum=2, epochs=2, lr=1e-2,
                save_every=2, keep_last=2, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_loop_trains_and_writes_outputs(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = _cfg(tmp_path)
    summary = run_training(_task(tiny_model_dir, tiny_tokenizer), cfg)
    hist = summary["history"]
    assert summary["step"] == 6 == len(hist)  # 12 examples / (2*2) = 3 steps/epoch, 2 epochs
    assert hist[-1]["loss"] < hist[0]["loss"]
    out = tmp_path / "run"
    assert [p.name for p in list_checkpoints(out)] == ["step-00000004", "step-00000006"]  # keep_last=2
    assert not list((out / "checkpoints").glob(".tmp*"))
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["step"] == 6 and len(state["history"]) == 6
    assert (out / "final" / "config.json").is_file()
    assert (out / "loss.png").stat().st_size > 1000
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6
    assert list((out / "tb").glob("events.out.tfevents*"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir, tiny_tokenizer):
    task = _task(tiny_model_dir, tiny_tokenizer)
    real_loss = task.loss
    calls = {"n": 0}

    def poisoned(module, batch, norm):  # the 5th step's loss is NaN
        calls["n"] += 1
        loss, m = real_loss(module, batch, norm)
        return (loss * float("nan") if calls["n"] > 8 else loss), m

    task.loss = poisoned
    cfg = _cfg(tmp_path, save_every=2)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 5.*last good checkpoint: .*step-00000004"):
        run_training(task, cfg)
    out = tmp_path / "run"
    assert latest_checkpoint(out).name == "step-00000004"
    assert not (out / "final").exists()
    assert (out / "metrics.jsonl").is_file()  # what was logged before the stop is kept


def test_exploding_lr_is_caught_as_non_finite(tmp_path, tiny_model_dir, tiny_tokenizer):
    """A real divergence (absurd learning rate), not an injected NaN."""
    cfg = _cfg(tmp_path, lr=1e12, max_grad_norm=0.0, epochs=20, save_every=1, scheduler="constant")
    with pytest.raises(TrainingError, match="non-finite"):
        run_training(_task(tiny_model_dir, tiny_tokenizer), cfg)
    ck = latest_checkpoint(tmp_path / "run")
    if ck is not None:  # every checkpoint written holds finite weights
        sd = torch.load(ck / "pytorch_model.bin", map_location="cpu")
        assert all(torch.isfinite(v).all() for v in sd.values())


def test_in_process_resume_matches(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Resume with no checkpoint starts fresh; resume from the final checkpoint trains no further.
    (Resume after a real kill is tested in test_sft_resume.py.)"""
    cfg = _cfg(tmp_path, resume=True)
    s1 = run_training(_task(tiny_model_dir, tiny_tokenizer), cfg)
    assert s1["resumed_from"] is None
    s2 = run_training(_task(tiny_model_dir, tiny_tokenizer), cfg)
    assert s2["resumed_from"].endswith("step-00000006") and s2["step"] == 6


def test_bf16_mixed_precision_runs(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = _cfg(tmp_path, precision="bf16", epochs=1, save_every=0)
    hist = run_training(_task(tiny_model_dir, tiny_tokenizer), cfg)["history"]
    assert len(hist) == 3 and all(math.isfinite(h["loss"]) for h in hist)
    # the master weights stay fp32 under mixed precision
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in sd.values())
