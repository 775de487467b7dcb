"""Every model pass runs on the device it was given: the DPO/ULMA reference pass (also with a named
``ref_model``) and the probe on ``accelerator.device``; ``pairs generate``, ``dpo-data``, ``rm eval`` and
``rm score`` on their ``device`` argument.

On a CPU-only machine every tensor is on the CPU anyway, so checking ``p.device`` alone could not fail.
A spy on ``nn.Module.to`` records, for each parameter, the device it was last moved to; inside each
pass the model's parameters must all have been moved to the given device. The inference commands are
given ``cpu:0``, a device string distinct from the default ``cpu``, so a command that ignores its
``device`` argument fails too.
"""

import json
import random

import pytest
import torch

from alignforge.config import load_config

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


class DeviceSpy:
    def __init__(self, monkeypatch):
        self.moved: dict[int, torch.device] = {}
        self.seen: list[str] = []
        real_to = torch.nn.Module.to

        def to(module, *args, **kwargs):
            out = real_to(module, *args, **kwargs)
            dev = kwargs.get("device", args[0] if args else None)
            if isinstance(dev, (str, torch.device)):
                for p in module.parameters():
                    self.moved[id(p)] = torch.device(dev)
            return out

        monkeypatch.setattr(torch.nn.Module, "to", to)

    def check(self, what: str, model, device) -> None:
        device = torch.device(device)
        params = list(model.parameters())
        assert params, what
        wrong = [p for p in params if self.moved.get(id(p)) != device or p.device.type != device.type]
        assert not wrong, f"{what}: {len(wrong)} of {len(params)} parameters were not moved to {device}"
        self.seen.append(what)

    def wrap(self, monkeypatch, owner, name: str, what: str, model_of, device_of) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            self.check(what, model_of(*args, **kwargs), device_of())
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


@pytest.fixture
def spy(monkeypatch):
    return DeviceSpy(monkeypatch)


@pytest.fixture
def accelerator_device(monkeypatch):
    """The device of the accelerator each trainer makes (recorded when it is made)."""
    import alignforge.trainers.common as common

    made = {}
    real = common.make_accelerator

    def make(cfg):
        acc = real(cfg)
        made["device"] = acc.device
        return acc

    monkeypatch.setattr(common, "make_accelerator", make)
    return lambda: made["device"]


def _first(*args, **kwargs):
    return args[0]


def test_training_passes_use_the_accelerator_device(
    tmp_path, tiny_model_dir, pairs_file, spy, accelerator_device, monkeypatch
):
    import alignforge.trainers.dpo as dpo
    import alignforge.trainers.ulma as ulma
    from alignforge.inference.probe import GenerationProbe

    spy.wrap(monkeypatch, dpo, "pair_logps", "dpo reference", _first, accelerator_device)
    spy.wrap(monkeypatch, ulma, "point_logps", "ulma reference", _first, accelerator_device)
    spy.wrap(monkeypatch, GenerationProbe, "__call__", "probe", lambda self, model, step: model, accelerator_device)
    base = ["train.max_steps=1", "train.probe_every=1", "train.probe_prompts=2", "train.probe_max_new_tokens=3"]
    dpo.train_dpo(load_config(dpo.DPOConfig, None, _common(tmp_path, tiny_model_dir, pairs_file, "d") + base))
    # a named reference model (other weights, so not a cache hit) is loaded for the pass and moved there too
    from alignforge.models.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    dpo.train_dpo(
        load_config(
            dpo.DPOConfig,
            None,
            _common(tmp_path, tiny_model_dir, pairs_file, "r") + base + [f"dpo.ref_model={other}", "lora.enabled=true"],
        )
    )
    ulma.train_ulma(load_config(ulma.ULMAConfig, None, _common(tmp_path, tiny_model_dir, pairs_file, "u") + base))
    assert spy.seen.count("dpo reference") == 2 and "ulma reference" in spy.seen and "probe" in spy.seen


GIVEN = "cpu:0"  # not the default torch.device("cpu"): a command that ignores its device argument fails


def test_inference_commands_use_the_given_device(tmp_path, tiny_model_dir, tiny_rm_dir, pairs_file, spy, monkeypatch):
    import alignforge.eval.rm_eval as rm_eval
    import alignforge.models.reward as reward
    from alignforge.inference.dpo_data import build_dpo_pairs
    from alignforge.inference.generate import HFBackend
    from alignforge.inference.pairs import generate_pairs

    spy.wrap(monkeypatch, HFBackend, "generate_from_ids", "generation", lambda self, *a, **k: self.model, lambda: GIVEN)
    spy.wrap(monkeypatch, reward, "score_sequences", "dpo-data scoring", _first, lambda: GIVEN)
    spy.wrap(monkeypatch, rm_eval, "score_pairs", "rm eval", _first, lambda: GIVEN)
    spy.wrap(monkeypatch, rm_eval, "score_sequences", "rm score", _first, lambda: GIVEN)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(2)))

    generate_pairs(
        prompts, tmp_path / "to_annotate.jsonl", model=str(tiny_model_dir), max_new_tokens=4, max_tries=1, device=GIVEN
    )
    assert spy.seen == ["generation", "generation"]
    build_dpo_pairs(
        prompts,
        tmp_path / "dpo.jsonl",
        str(tiny_rm_dir),
        policy=str(tiny_model_dir),
        k=2,
        max_new_tokens=4,
        progress=False,
        device=GIVEN,
    )
    assert spy.seen[-1] == "dpo-data scoring" and spy.seen.count("generation") == 4
    rm_eval.run_rm_eval(
        tiny_rm_dir, pairs_file, tmp_path / "eval", n_boot=10, plots=False, progress=False, device=GIVEN
    )
    scored = tmp_path / "to_score.jsonl"
    scored.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    rm_eval.score_file(tiny_rm_dir, scored, tmp_path / "scored.jsonl", progress=False, device=GIVEN)
    assert spy.seen[-2:] == ["rm eval", "rm score"]


def test_resolve_device():
    from alignforge.errors import ModelError
    from alignforge.models.loading import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda")
