"""The DPO/ULMA reference pass: sharded over processes and gathered, keyed by the content of the
reference weights, and the model as loaded when the policy starts from a LoRA adapter dir."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignforge.config import load_config
from alignforge.trainers.dpo import DPOConfig, train_dpo
from alignforge.trainers.ulma import ULMAConfig, train_ulma

from .test_distributed import _launch_two
from .test_dpo import BAD, GOOD, _common


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def pairs_file(tmp_path):
    """16 preference pairs: a helpful answer chosen over a curt one."""
    rng = random.Random(0)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Question {i}: tell me about topic {rng.randint(0, 99)}."}],
            "chosen": [{"role": "assistant", "content": rng.choice(GOOD)}],
            "rejected": [{"role": "assistant", "content": rng.choice(BAD)}],
        }
        for i in range(16)
    ]
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _entries(tmp_path, cache="cache") -> list[Path]:
    return sorted((tmp_path / cache / "reflogps").glob("*.pt"))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to float32 rounding at the values' magnitude."""
    scale = max(1.0, a.abs().max().item())
    return (a - b).abs().max().item() <= rel * scale


def _seq_logp(lm, prompt_ids, response_ids) -> float:
    """Summed log-prob of ``response_ids`` after ``prompt_ids``, by a plain forward pass."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        lp = torch.log_softmax(lm(input_ids=ids).logits[0].float(), -1)
    P = len(prompt_ids)
    return sum(lp[P - 1 + k, t].item() for k, t in enumerate(response_ids))


# --------------------------------------------------------------------------- several processes


def test_two_process_reference_pass_equals_one_process(tmp_path, tiny_model_dir):
    rng = random.Random(3)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Question {i}: topic {rng.randint(0, 99)}?"}],
            "chosen": [{"role": "assistant", "content": rng.choice(GOOD)}],
            "rejected": [{"role": "assistant", "content": rng.choice(BAD)}],
        }
        for i in range(15)
    ]
    data = tmp_path / "pairs15.jsonl"  # 15 pairs: shares of 8 and 7
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _common(tmp_path, tiny_model_dir, data, "one") + [
        "train.max_steps=1",
        "train.per_device_batch_size=2",
        "dpo.ref_batch_size=3",
    ]
    train_dpo(load_config(DPOConfig, None, args))
    (one_path,) = _entries(tmp_path)

    def launch(out_dir: str) -> str:
        p = _launch_two(
            ["dpo", *args, f"train.output_dir={tmp_path / out_dir}"], {"ALIGNFORGE_CACHE": str(tmp_path / "cache2")}
        )
        return p.stdout + p.stderr

    out = launch("two")
    # each rank computed its own share (no rank computing alone while the other waits)
    assert "process 0/2 computed 8 of 15" in out and "process 1/2 computed 7 of 15" in out, out
    (two_path,) = _entries(tmp_path, "cache2")
    assert two_path.name == one_path.name  # same key: the number of processes does not change the values
    one, two = torch.load(one_path), torch.load(two_path)
    assert one.keys() == two.keys() and all(len(v) == 15 for v in two.values())
    for k in one:
        assert one[k].dtype == two[k].dtype
        if k.endswith("tokens"):
            assert torch.equal(one[k], two[k]), k
        else:
            print(f"{k}: max |1 process - 2 processes| = {(one[k] - two[k]).abs().max().item():.3g}")
            assert _close(one[k], two[k]), (k, (one[k] - two[k]).abs().max().item())
    assert one["chosen_logps"].std() > 0.1  # distinct values: a misplaced share would show
    # a second 2-process run: both ranks read the cache, none computes
    out = launch("two_again")
    assert "reference log-probs from cache" in out and "computed" not in out, out


# --------------------------------------------------------------------------- the cache key


def test_named_reference_is_keyed_by_its_weights_not_its_path(tmp_path, tiny_model_dir, pairs_file):
    from alignforge.models.tiny import build_tiny_model

    ref_a = build_tiny_model(tmp_path / "ref_a", seed=1)
    base = _common(tmp_path, tiny_model_dir, pairs_file, "r") + ["train.max_steps=1"]

    def run(ref, out):
        train_dpo(load_config(DPOConfig, None, base + [f"dpo.ref_model={ref}", f"train.output_dir={tmp_path / out}"]))

    run(ref_a, "r1")
    (first,) = _entries(tmp_path)
    shutil.copytree(ref_a, tmp_path / "ref_copy")  # the same weights at another path: a hit
    run(tmp_path / "ref_copy", "r2")
    assert _entries(tmp_path) == [first]
    build_tiny_model(ref_a, seed=2)  # retrained in place: same path, new weights, a new entry
    run(ref_a, "r3")
    entries = _entries(tmp_path)
    assert len(entries) == 2
    new = next(e for e in entries if e != first)
    assert not _close(torch.load(first)["chosen_logps"], torch.load(new)["chosen_logps"], rel=1e-3)


def test_lora_key_covers_the_base_weights_only(tmp_path, tiny_model_dir, pairs_file):
    base = _common(tmp_path, tiny_model_dir, pairs_file, "l") + ["train.max_steps=1", "lora.enabled=true"]
    # two seeds: two different random adapters on the same base, so the same reference
    train_dpo(load_config(DPOConfig, None, base + ["train.seed=1", f"train.output_dir={tmp_path / 'l1'}"]))
    (first,) = _entries(tmp_path)
    train_dpo(load_config(DPOConfig, None, base + ["train.seed=2", f"train.output_dir={tmp_path / 'l2'}"]))
    assert _entries(tmp_path) == [first]
    # the base trained in full has the same reference, too
    train_dpo(load_config(DPOConfig, None, base + ["lora.enabled=false", f"train.output_dir={tmp_path / 'l3'}"]))
    assert _entries(tmp_path) == [first]


# --------------------------------------------------------------------------- a LoRA adapter as the model


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter (r=4, no dropout) with large random B, so it clearly changes the model."""
    from alignforge.models.loading import load_model, load_tokenizer
    from alignforge.models.lora import LoraSettings, apply_lora, save_trained

    torch.manual_seed(0)
    model = apply_lora(load_model(str(tiny_model_dir)), LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    return save_trained(model, load_tokenizer(str(tiny_model_dir)), tmp_path_factory.mktemp("adapter") / "adapter")


def _check_reference_is_model_as_loaded(tmp_path, adapter_dir, tiny_model_dir, pairs_file, kind: str):
    """The cached reference values are those of base + adapter (adapter on), not of the base."""
    from alignforge.data.tokenize import load_pointwise_dataset, load_preference_dataset
    from alignforge.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(adapter_dir))
    loaded, bare = load_model(str(adapter_dir)).eval(), load_model(str(tiny_model_dir)).eval()
    for path in _entries(tmp_path):
        values = torch.load(path)
        if kind == "pairs" and "chosen_logps" in values:
            ex, _ = load_preference_dataset(pairs_file, tok, 256)
            got, want = values["chosen_logps"][:3], [(e.prompt_ids, e.chosen_ids) for e in ex[:3]]
        elif kind == "pointwise" and "logps" in values:
            ex, _ = load_pointwise_dataset(pairs_file, tok, 256)
            got, want = values["logps"][:3], [(e.prompt_ids, e.completion_ids) for e in ex[:3]]
        else:
            continue
        as_loaded = torch.tensor([_seq_logp(loaded, p, r) for p, r in want])
        of_base = torch.tensor([_seq_logp(bare, p, r) for p, r in want])
        assert _close(got, as_loaded, rel=1e-4), (got, as_loaded)
        assert (as_loaded - of_base).abs().min() > 0.1  # the adapter matters: a base reference would fail
        return
    raise AssertionError(f"no {kind} cache entry")


def test_lora_enabled_continues_the_adapter_and_its_reference_is_the_adapter(
    tmp_path, tiny_model_dir, adapter_dir, pairs_file
):
    args = _common(tmp_path, tiny_model_dir, pairs_file, "a") + [
        f"model.name_or_path={adapter_dir}",
        "lora.enabled=true",
        "lora.r=16",
        "train.max_steps=1",
        "train.lr=1e-3",
        "dpo.beta=1.0",
    ]
    s = train_dpo(load_config(DPOConfig, None, args))
    # policy == reference (both the model as loaded) at the first step: every log-ratio 0, loss log 2
    assert s["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    _check_reference_is_model_as_loaded(tmp_path, adapter_dir, tiny_model_dir, pairs_file, "pairs")
    final = Path(s["final_dir"])
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4  # the adapter's own r, not lora.r
    before = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    after = load_file(str(final / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0 < moved < 0.01  # one small step from the loaded adapter (a fresh one has B = 0, far from std 0.5)
    # ULMA's reference is the model as loaded too
    train_ulma(load_config(ULMAConfig, None, args[:-1] + [f"train.output_dir={tmp_path / 'u'}"]))
    _check_reference_is_model_as_loaded(tmp_path, adapter_dir, tiny_model_dir, pairs_file, "pointwise")


def test_lora_disabled_trains_the_merged_model_in_full(tmp_path, tiny_model_dir, adapter_dir, pairs_file):
    from alignforge.models.loading import load_model

    args = _common(tmp_path, tiny_model_dir, pairs_file, "m") + [
        f"model.name_or_path={adapter_dir}",
        "lora.enabled=false",
        "train.max_steps=1",
        "train.lr=1e-3",
        "dpo.beta=1.0",
    ]
    s = train_dpo(load_config(DPOConfig, None, args))
    assert s["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    _check_reference_is_model_as_loaded(tmp_path, adapter_dir, tiny_model_dir, pairs_file, "pairs")
    final = Path(s["final_dir"])
    assert not (final / "adapter_config.json").exists()
    after = load_file(str(final / "model.safetensors"))
    merged = load_model(str(adapter_dir)).merge_and_unload().state_dict()
    bare = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - bare[q]).abs().max() > 0.1  # the merge changed q_proj ...
    assert (after[q] - merged[q]).abs().max() < 0.01  # ... and training started from the merged weights
    # every weight was trained (in full), the embeddings too, which the adapter does not touch
    emb = "model.embed_tokens.weight"
    assert torch.equal(merged[emb], bare[emb]) and 0 < (after[emb] - merged[emb]).abs().max() < 0.01
