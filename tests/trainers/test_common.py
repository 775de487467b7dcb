"""The shared loop: batching plan, schedule, checkpoints, NaN guard, logging outputs."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from alignforge.config import TrainConfig
from alignforge.data.records import TokenizedSFT
from alignforge.errors import TrainingError, TrainingInterrupted
from alignforge.trainers.common import (
    Task,
    latest_checkpoint,
    list_checkpoints,
    lr_lambda,
    micro_slice,
    run_training,
    step_indices,
    steps_per_epoch,
)


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
        win = [lengths[i] for i in order[k : k + w]]
        assert win == sorted(win, reverse=True)
    plain = epoch_order(0, n, G, seed=1)

    def spread(o):
        return sum(
            max(lengths[i] for i in o[k : k + G]) - min(lengths[i] for i in o[k : k + G]) for k in range(0, n, G)
        )

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
    return Task(
        module=TokenLogProbs(lm),
        examples=_examples(tok, n),
        collate=lambda ex: collate_sft(ex, tok.pad_token_id),
        normalizer=count_targets,
        loss=sft_step_loss,
        save_model=lambda m, d: m.lm.save_pretrained(d),
    )


def _cfg(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        per_device_batch_size=2,
        grad_accum=2,
        epochs=2,
        lr=1e-2,
        save_every=2,
        keep_last=2,
        progress=False,
        seed=3,
    )
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
    with pytest.raises(
        TrainingError, match=r"non-finite loss \(nan\) at step 5.*last good checkpoint: .*step-00000004"
    ):
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


def _final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def _crash_during_step(task, step, grad_accum=2):
    """Make ``task.loss`` raise inside global step ``step`` (1-based), as a killed process would stop."""
    real, calls = task.loss, {"n": 0}

    def crashing(module, batch, norm):
        calls["n"] += 1
        if calls["n"] > (step - 1) * grad_accum:
            raise RuntimeError("simulated crash")
        return real(module, batch, norm)

    task.loss = crashing
    return task


def _counting(task):
    real, calls = task.loss, {"n": 0}

    def counted(module, batch, norm):
        calls["n"] += 1
        return real(module, batch, norm)

    task.loss = counted
    return task, calls


@pytest.fixture
def crashed_run(tmp_path, tiny_model_dir, tiny_tokenizer):
    """An uninterrupted run, and a run with the same config that crashed in step 4 (checkpoints at 2, 4, 6)."""
    ref = run_training(_task(tiny_model_dir, tiny_tokenizer), _cfg(tmp_path / "ref"))
    cfg = _cfg(tmp_path, resume=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(_crash_during_step(_task(tiny_model_dir, tiny_tokenizer), step=4), cfg)
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"
    return ref, cfg


def test_resume_after_a_crash_mid_run_gives_identical_weights(tmp_path, tiny_model_dir, tiny_tokenizer, crashed_run):
    """Resume from the checkpoint at step 2 after a crash in step 4: steps 3-6 are trained again and the final
    weights equal those of the uninterrupted run (optimizer moments, schedule and data position restored)."""
    ref, cfg = crashed_run
    task, calls = _counting(_task(tiny_model_dir, tiny_tokenizer))
    s = run_training(task, cfg)
    assert s["resumed_from"].endswith("step-00000002") and s["step"] == 6
    assert calls["n"] == 4 * 2  # steps 3..6, grad_accum 2: it resumed, it did not start over
    a, b = _final_weights(tmp_path / "ref" / "run"), _final_weights(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["step"] for h in s["history"]] == list(range(1, 7))
    assert [h["loss"] for h in s["history"]] == [h["loss"] for h in ref["history"]]
    # resuming a finished run trains nothing further
    task, calls = _counting(_task(tiny_model_dir, tiny_tokenizer))
    s2 = run_training(task, cfg)
    assert s2["resumed_from"].endswith("step-00000006") and s2["step"] == 6 and calls["n"] == 0


def test_resume_with_no_checkpoint_starts_fresh(tmp_path, tiny_model_dir, tiny_tokenizer):
    s = run_training(_task(tiny_model_dir, tiny_tokenizer), _cfg(tmp_path, resume=True, epochs=1))
    assert s["resumed_from"] is None and s["step"] == 3


def test_resume_refuses_a_changed_run_and_names_each_difference(tmp_path, tiny_model_dir, tiny_tokenizer, crashed_run):
    from alignforge.errors import ConfigError

    _, cfg = crashed_run
    changed = dataclasses.replace(cfg, per_device_batch_size=1, seed=4, epochs=3, group_by_length=True)
    task = _task(tiny_model_dir, tiny_tokenizer)
    task.lengths = [len(e.input_ids) for e in task.examples]
    with pytest.raises(ConfigError) as e:
        run_training(task, changed)
    msg = str(e.value)
    assert "step-00000002" in msg and "resume_force" in msg
    for line in (
        "train.per_device_batch_size: 2 → 1",
        "train.seed: 3 → 4",
        "train.group_by_length: False → True",
        "total steps (train.epochs / train.max_steps): 6 → 18",
    ):
        assert line in msg
    assert "grad_accum" not in msg and "world size" not in msg and "examples" not in msg  # only what changed

    # other training examples (same count, one token changed): the digest names it
    task = _task(tiny_model_dir, tiny_tokenizer)
    task.examples[5].input_ids[-1] += 1
    digest_line = r"training examples \(digest of their token ids\): [0-9a-f]{12} → [0-9a-f]{12}"
    with pytest.raises(ConfigError, match=digest_line):
        run_training(task, cfg)
    with pytest.raises(ConfigError, match="number of training examples: 12 → 11"):
        run_training(_task(tiny_model_dir, tiny_tokenizer, n=11), cfg)
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"  # nothing was trained or written

    # resume_force resumes anyway
    task, calls = _counting(_task(tiny_model_dir, tiny_tokenizer))
    s = run_training(task, dataclasses.replace(cfg, seed=4, resume_force=True))
    assert s["resumed_from"].endswith("step-00000002") and s["step"] == 6 and calls["n"] == 8


def test_resume_from_a_checkpoint_without_signature(tmp_path, tiny_model_dir, tiny_tokenizer, crashed_run, capsys):
    """Checkpoints written before the check have no "run" entry: they resume (unchecked) with a note."""
    ref, cfg = crashed_run
    state_file = latest_checkpoint(tmp_path / "run") / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["run"]["examples_digest"] and state["run"]["world_size"] == 1
    del state["run"]
    state_file.write_text(json.dumps(state))
    s = run_training(_task(tiny_model_dir, tiny_tokenizer), cfg)
    assert s["resumed_from"].endswith("step-00000002")
    assert "without checking" in capsys.readouterr().out
    a, b = _final_weights(tmp_path / "ref" / "run"), _final_weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_examples_digest_covers_token_ids_only():
    from alignforge.data.records import Source, TokenizedPair
    from alignforge.trainers.common import examples_digest

    exs = [TokenizedSFT([1, 2, 3], [0, 1, 1]), TokenizedSFT([4, 5], [1, 1])]
    d = examples_digest(exs)
    elsewhere = [TokenizedSFT([1, 2, 3], [0, 1, 1], Source("x.jsonl", 9)), TokenizedSFT([4, 5], [1, 1])]
    assert d == examples_digest(elsewhere)  # where a record came from does not count
    assert d != examples_digest([TokenizedSFT([1, 2, 4], [0, 1, 1]), exs[1]])  # a token
    assert d != examples_digest([TokenizedSFT([1, 2, 3], [0, 0, 1]), exs[1]])  # a mask
    assert d != examples_digest(exs[::-1]) and d != examples_digest(exs[:1])  # order, count
    assert d != examples_digest([TokenizedSFT([1, 2], [0, 1]), TokenizedSFT([3, 4, 5], [1, 1, 1])])  # boundaries

    @dataclasses.dataclass
    class WithRef:  # a trainer's wrapper: nested ids count, computed floats do not
        pair: TokenizedPair
        ref: float

    p = TokenizedPair([1], [2, 3], [4])
    assert examples_digest([WithRef(p, -1.0)]) == examples_digest([WithRef(p, -1.0000001)])
    assert examples_digest([WithRef(p, -1.0)]) != examples_digest([WithRef(TokenizedPair([1], [2, 3], [5]), -1.0)])


def test_logged_rows_average_the_window(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    """log_every=4 logs steps 4 and 6; each row averages the steps since the previous row (also when the
    run was interrupted mid-window and resumed)."""
    from alignforge.trainers.sft import count_targets

    def with_metric(task):  # a task metric: the summed NLL, so its per-item value is the token-mean NLL
        real = task.loss

        def loss(module, batch, norm):
            lv, m = real(module, batch, norm)
            return lv, {**m, "nll_sum": lv.detach() * norm}

        task.loss = loss
        return task

    every = run_training(with_metric(_task(tiny_model_dir, tiny_tokenizer)), _cfg(tmp_path / "a"))["history"]
    task = with_metric(_task(tiny_model_dir, tiny_tokenizer))
    windowed = run_training(task, _cfg(tmp_path / "b", log_every=4))["history"]
    assert [h["step"] for h in windowed] == [4, 6]
    items = [count_targets([task.examples[i] for i in step_indices(s, 12, 4, seed=3)]) for s in range(6)]
    assert len(set(items)) > 1  # steps hold different token counts: a pooled mean differs from a mean of means
    for row, (lo, hi) in zip(windowed, [(0, 4), (4, 6)], strict=False):
        win = every[lo:hi]
        assert row["loss"] == pytest.approx(sum(h["loss"] for h in win) / len(win), rel=1e-12)
        assert row["grad_norm"] == pytest.approx(sum(h["grad_norm"] for h in win) / len(win), rel=1e-12)
        pooled = sum(h["nll_sum"] * n for h, n in zip(win, items[lo:hi], strict=False)) / sum(items[lo:hi])
        assert row["nll_sum"] == pytest.approx(pooled, rel=1e-5)
        assert row["lr"] == win[-1]["lr"]
    # interrupted at step 3 (mid-window, checkpoint written there), resumed: the same rows
    cfg = _cfg(tmp_path / "c", log_every=4, save_every=0, resume=True)
    monkeypatch.setenv("ALIGNFORGE_FAULT_AFTER_STEP", "3:INT")
    with pytest.raises(TrainingInterrupted):
        run_training(with_metric(_task(tiny_model_dir, tiny_tokenizer)), cfg)
    monkeypatch.delenv("ALIGNFORGE_FAULT_AFTER_STEP")
    resumed = run_training(with_metric(_task(tiny_model_dir, tiny_tokenizer)), cfg)
    assert resumed["resumed_from"].endswith("step-00000003")
    assert [h["step"] for h in resumed["history"]] == [4, 6]
    for a, b in zip(resumed["history"], windowed, strict=False):
        for k in ("loss", "grad_norm", "nll_sum"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), k


def test_bf16_mixed_precision_runs(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = _cfg(tmp_path, precision="bf16", epochs=1, save_every=0)
    hist = run_training(_task(tiny_model_dir, tiny_tokenizer), cfg)["history"]
    assert len(hist) == 3 and all(math.isfinite(h["loss"]) for h in hist)
    # the master weights stay fp32 under mixed precision
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in sd.values())


_FAULTS = """
import resource, sys, torch
from alignforge.trainers.common import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
n = 64 * 2**20  # 256 MB of float32: far above glibc's mmap threshold
torch.empty(n).fill_(1.0)  # allocate, touch, free
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(n // 2).fill_(2.0)  # half of it again: fits in the freed block
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, n * 2 // 4096)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options")
def test_keep_freed_memory_stops_a_freed_block_being_faulted_in_again():
    def run(mode: str) -> tuple[str, int, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        applied, faults, pages = out.stdout.split()
        return applied, int(faults), int(pages)

    applied, faults, pages = run("default")
    assert applied == "None" and faults > pages // 2  # unmapped when freed: every page faults in again
    applied, faults, pages = run("keep")
    assert applied == "True" and faults < pages // 20  # kept in the heap: reused without faults


def test_keep_freed_memory_is_a_no_op_off_linux(monkeypatch):
    from alignforge.trainers.common import keep_freed_memory

    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False


def test_make_accelerator_keeps_freed_memory_on_cpu_unless_turned_off(monkeypatch):
    import alignforge.trainers.common as common

    calls = []
    monkeypatch.setattr(common, "keep_freed_memory", lambda: calls.append(1) or True)
    common.make_accelerator(TrainConfig())
    assert calls == [1]
    common.make_accelerator(TrainConfig(keep_freed_memory=False))
    assert calls == [1]


@pytest.mark.parametrize(
    ("machine", "cap", "native"),
    [("x86_64", "AVX2", False), ("x86_64", "DEFAULT", False), ("x86_64", "AVX512", True), ("aarch64", "DEFAULT", True)],
)
def test_cpu_has_native_bf16_reads_torch_cpu_capability(monkeypatch, machine, cap, native):
    import platform

    from alignforge.trainers.common import cpu_has_native_bf16

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
    assert cpu_has_native_bf16() is native


def test_make_accelerator_warns_for_bf16_on_a_cpu_without_native_bf16(monkeypatch, recwarn):
    import alignforge.trainers.common as common

    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match=r"train\.precision=bf16 .* train\.precision=fp32"):
        common.make_accelerator(TrainConfig(precision="bf16"))
    recwarn.clear()
    common.make_accelerator(TrainConfig(precision="fp32"))
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: True)
    common.make_accelerator(TrainConfig(precision="bf16"))
    assert not [w for w in recwarn if "precision=bf16" in str(w.message)]
