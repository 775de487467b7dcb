"""The generation probe: answers fixed prompts greedily, logs their length, keeps samples.jsonl
consistent across a resume, and does not change training (weights equal to a run without it)."""

import json

import pytest
import torch

from alignforge.inference.generate import GenerationConfig, HFBackend
from alignforge.inference.probe import GenerationProbe, probe_prompt_ids


def _prompts(tok, texts):
    from alignforge.data.tokenize import tokenize_prompt

    return [tokenize_prompt([{"role": "user", "content": t}], tok) for t in texts]


def test_probe_metrics_equal_direct_generation_and_samples_are_written(tmp_path, tiny_model_dir, tiny_tokenizer):
    from alignforge.models.loading import load_model

    model = load_model(str(tiny_model_dir))
    prompts = _prompts(tiny_tokenizer, ["hello there", "what is two plus two?", "name a colour"])
    probe = GenerationProbe(tiny_tokenizer, prompts, max_new_tokens=6, samples_path=tmp_path / "samples.jsonl")
    m = probe(model, 0)
    direct = HFBackend(model, tiny_tokenizer).generate_from_ids(prompts, GenerationConfig(max_new_tokens=6))
    lens = [len(g.response_ids) for g in direct]
    assert m["gen_len_mean"] == pytest.approx(sum(lens) / 3)
    assert m["gen_finished"] == pytest.approx(sum(g.finished for g in direct) / 3)
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["n_tokens"] for r in rows] == lens and {r["step"] for r in rows} == {0}
    assert rows[0]["response"] == direct[0].text and "hello there" in rows[0]["prompt"]


def test_samples_of_later_steps_are_dropped_on_resume(tmp_path, tiny_model_dir, tiny_tokenizer):
    from alignforge.models.loading import load_model

    model = load_model(str(tiny_model_dir))
    path = tmp_path / "samples.jsonl"
    probe = GenerationProbe(tiny_tokenizer, _prompts(tiny_tokenizer, ["a", "b"]), max_new_tokens=3, samples_path=path)
    for step in (0, 10, 20):
        probe(model, step)
    with open(path, "a") as f:
        f.write('{"step": 30, "prom')  # a line cut by a kill
    probe(model, 20)  # resumed from a checkpoint before step 20: the old 20 (and the cut line) go
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines()]
    assert steps == [0, 0, 10, 10, 20, 20]
    probe(model, 0)  # a fresh run in the same dir starts the file again
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 0]


def test_probe_prompt_ids_distinct_training_prompts_or_file(tmp_path, tiny_tokenizer):
    assert probe_prompt_ids([[1, 2], [1, 2], [3], [4], [5]], 3) == [[1, 2], [3], [4]]
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "first"}\n{"prompt": [{"role": "user", "content": "second"}]}\n')
    ids = probe_prompt_ids([[9]], 8, tokenizer=tiny_tokenizer, probe_file=str(f))
    assert ids == _prompts(tiny_tokenizer, ["first", "second"])


def test_dpo_with_probe_logs_lengths_and_trains_identically(tmp_path, tiny_model_dir, monkeypatch):
    from alignforge.config import load_config
    from alignforge.models.loading import load_model
    from alignforge.trainers.dpo import DPOConfig, train_dpo

    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))
    rows = [
        {
            "prompt": [{"role": "user", "content": f"question {i}"}],
            "chosen": [{"role": "assistant", "content": "a helpful answer"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for i in range(8)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [
        f"model.name_or_path={tiny_model_dir}",
        f"data.train_files=[{data}]",
        "train.per_device_batch_size=2",
        "train.progress=false",
        "train.max_steps=4",
        "train.lr=1e-3",
        "train.log_every=3",
    ]
    plain = train_dpo(load_config(DPOConfig, None, base + [f"train.output_dir={tmp_path / 'plain'}"]))
    probed = train_dpo(
        load_config(
            DPOConfig,
            None,
            base
            + [
                f"train.output_dir={tmp_path / 'probe'}",
                "train.probe_every=2",
                "train.probe_prompts=3",
                "train.probe_max_new_tokens=5",
            ],
        )
    )
    hist = probed["history"]
    assert hist[0]["step"] == 0 and "loss" not in hist[0]  # the baseline, before any update
    probed_steps = [r["step"] for r in hist if "gen_len_mean" in r]
    assert probed_steps == [0, 2, 4]  # every 2 steps, although logging is every 3
    assert all(0 < r["gen_len_mean"] <= 5 for r in hist if "gen_len_mean" in r)
    samples = [json.loads(x) for x in (tmp_path / "probe" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0] * 3 + [2] * 3 + [4] * 3
    a, b = load_model(plain["final_dir"]), load_model(probed["final_dir"])
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=False):
        assert torch.equal(p, q), n


def test_reward_model_rejects_the_probe(tmp_path, tiny_model_dir):
    from alignforge.config import load_config
    from alignforge.errors import ConfigError
    from alignforge.trainers.rm import RMConfig, train_rm

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "good answer", "rejected": "bad"}) + "\n")
    cfg = load_config(
        RMConfig,
        None,
        [
            f"model.name_or_path={tiny_model_dir}",
            f"data.train_files=[{data}]",
            f"train.output_dir={tmp_path / 'rm'}",
            "train.probe_every=1",
            "train.progress=false",
            "reward.length_balance=false",
        ],
    )
    with pytest.raises(ConfigError, match="probe_every"):
        train_rm(cfg)


def _train_cfg(tmp_path, **kw):
    from alignforge.config import TrainConfig

    return TrainConfig(output_dir=str(tmp_path / "out"), probe_every=1, **kw)


def test_probe_settings_errors_name_the_key_or_file(tmp_path, tiny_tokenizer):
    from alignforge.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match=r"train\.probe_prompts must be >= 1"):
        GenerationProbe.from_config(_train_cfg(tmp_path, probe_prompts=0), tiny_tokenizer, [[1, 2]])
    with pytest.raises(ConfigError, match=r"train\.probe_max_new_tokens must be >= 1"):
        GenerationProbe.from_config(_train_cfg(tmp_path, probe_max_new_tokens=0), tiny_tokenizer, [[1, 2]])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="no prompts in train.probe_file .*empty.jsonl"):
        GenerationProbe.from_config(_train_cfg(tmp_path, probe_file=str(empty)), tiny_tokenizer, [[1, 2]])
    with pytest.raises(ConfigError, match="no prompts in the training data"):
        GenerationProbe.from_config(_train_cfg(tmp_path), tiny_tokenizer, [])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        GenerationProbe.from_config(_train_cfg(tmp_path, probe_file=str(bad)), tiny_tokenizer, [[1, 2]])


def test_generation_from_an_empty_prompt_is_an_error(tiny_model_dir, tiny_tokenizer):
    from alignforge.errors import ModelError
    from alignforge.models.loading import load_model

    backend = HFBackend(load_model(str(tiny_model_dir)), tiny_tokenizer)
    with pytest.raises(ModelError, match="empty prompt"):
        backend.generate_from_ids([[1, 2], []], GenerationConfig(max_new_tokens=2))
