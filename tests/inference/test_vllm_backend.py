"""The vLLM backend's adapter logic against a stand-in of vLLM's offline API (vLLM itself needs a GPU).

What these tests cover: the mapping of our decoding settings to ``SamplingParams`` (one per request,
each with its own seed), token-id prompts, the conversion of vLLM's outputs, the missing-extra error,
and the weight sync (names of the plain HF model, LoRA merged in and unmerged again). What they cannot
cover: vLLM's own sampling and kernels.
"""

import sys
import types

import pytest
import torch

from alignforge.errors import ModelError
from alignforge.inference.generate import GenerationConfig


class _Params:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Completion:
    def __init__(self, ids, reason):
        self.token_ids, self.finish_reason = ids, reason


class _Out:
    def __init__(self, c):
        self.outputs = [c]


class _Target:
    def __init__(self):
        self.loaded = {}

    def load_weights(self, weights):
        for name, t in weights:
            self.loaded[name] = t.detach().clone()


class _LLM:
    """Answers request i with tokens derived from its seed; stops on EOS unless ignore_eos."""

    def __init__(self, eos):
        self.eos, self.calls, self.resets = eos, [], 0
        self.target = _Target()
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=self.target))
            )
        )

    def generate(self, prompts, sampling_params, use_tqdm):
        self.calls.append((prompts, sampling_params))
        outs = []
        for _p, sp in zip(prompts, sampling_params, strict=True):
            body = [5 + (sp.seed + k) % 7 for k in range(min(3, sp.max_tokens))]
            if sp.ignore_eos or sp.max_tokens <= 3:
                outs.append(_Out(_Completion((body + [9] * sp.max_tokens)[: sp.max_tokens], "length")))
            else:
                outs.append(_Out(_Completion(body + [self.eos], "stop")))
        return outs

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.SamplingParams = _Params
    mod.LLM = None
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    mod.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return mod


def _backend(tok):
    from alignforge.inference.vllm_backend import VLLMBackend

    return VLLMBackend("unused", tok, llm=_LLM(tok.eos_token_id))


def test_missing_extra_names_it(monkeypatch, tiny_tokenizer):
    from alignforge.inference.vllm_backend import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ModelError, match=r"alignforge\[vllm\]"):
        VLLMBackend("x", tiny_tokenizer)


def test_settings_prompts_and_outputs(fake_vllm, tiny_tokenizer):
    tok = tiny_tokenizer
    b = _backend(tok)
    rows = [[1, 2, 3], [4, 5]]
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=20, seed=100)
    gens = b.generate_from_ids(rows, cfg)
    prompts, params = b.llm.calls[-1]
    assert [p["prompt_token_ids"] for p in prompts] == rows
    assert [sp.seed for sp in params] == [100, 101]  # one seed per request
    sp = params[0]
    assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.ignore_eos) == (0.7, 0.9, 20, 8, False)
    assert sp.stop_token_ids == [tok.eos_token_id] and sp.n == 1
    assert gens[0].prompt_ids == rows[0] and gens[0].response_ids[-1] == tok.eos_token_id and gens[0].finished
    assert gens[0].text == tok.decode(gens[0].response_ids, skip_special_tokens=True)
    # greedy, and EOS ignored: fixed-length answers that are not "finished"
    gens = b.generate_from_ids(rows, GenerationConfig(max_new_tokens=6, temperature=0.0, stop_on_eos=False))
    sp = b.llm.calls[-1][1][0]
    assert sp.temperature == 0.0 and sp.ignore_eos and sp.stop_token_ids == []
    assert all(len(g.response_ids) == 6 and not g.finished for g in gens)
    # conversations are rendered as the HF backend renders them
    from alignforge.inference.generate import HFBackend

    conv = [{"role": "user", "content": "hello"}]
    assert b.render(conv) == HFBackend(torch.nn.Linear(1, 1), tok).render(conv)
    with pytest.raises(ModelError, match="empty prompt"):
        b.generate_from_ids([[]], cfg)


def test_sync_weights_pushes_merged_lora_weights_under_hf_names(fake_vllm, tiny_model_dir, tiny_tokenizer):
    from alignforge.models.loading import load_model
    from alignforge.models.lora import LoraSettings, apply_lora

    model = apply_lora(load_model(tiny_model_dir), LoraSettings(enabled=True, r=4, dropout=0.0)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits
    b = _backend(tiny_tokenizer)
    n = b.sync_weights(model)
    plain = load_model(tiny_model_dir)
    names = {k for k, _ in plain.named_parameters()}
    assert set(b.llm.target.loaded) == names and n == len(names)
    merged = apply_lora(load_model(tiny_model_dir), LoraSettings(enabled=True, r=4, dropout=0.0))
    merged.load_state_dict(model.state_dict())
    merged = merged.merge_and_unload()
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(b.llm.target.loaded[q], dict(merged.named_parameters())[q])
    assert not torch.equal(b.llm.target.loaded[q], dict(plain.named_parameters())[q])  # the adapter is in it
    with torch.no_grad():  # unmerged again (W + BA - BA: fp32 rounding, so a tolerance scaled to the logits)
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))
    assert b.llm.resets == 1
