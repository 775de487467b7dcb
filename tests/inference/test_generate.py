"""Tests for alignforge.inference.generate on the tiny model."""

from __future__ import annotations

import pytest
import torch

from alignforge.errors import ConfigError
from alignforge.inference.generate import (
    GenerationBackend,
    GenerationConfig,
    HFBackend,
    InverseCDFSampler,
    prompt_run_length,
)
from alignforge.models.loading import load_model, load_tokenizer

CONVS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France? Tell me about the sea."},
    ],
    [{"role": "user", "content": "Write a function in Python that returns the sum of a list."}],
    [{"role": "user", "content": "x"}],
    [{"role": "user", "content": "Sure, here is a short poem"}],
]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    """The tiny model with larger random weights, so greedy output varies by context."""
    model = load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return HFBackend(model, load_tokenizer(tiny_model_dir))


def _manual_greedy(model, tok, conv, max_new_tokens: int) -> str:
    """Greedy decoding by hand: one unpadded forward per token, argmax, stop after an EOS."""
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return tok.decode(out, skip_special_tokens=True)


def test_backend_satisfies_protocol(backend):
    """The protocol's contract, not only its method names (a ``runtime_checkable`` isinstance check
    passes for any object with a ``generate`` attribute): conversations in, one response string per
    conversation out, in order, equal to greedy decoding done by hand."""

    def respond(b: GenerationBackend, prompts, cfg):  # how callers use a backend
        return b.generate(prompts, cfg)

    assert isinstance(backend, GenerationBackend)
    cfg = GenerationConfig(max_new_tokens=8, batch_size=2)
    out = respond(backend, CONVS, cfg)
    assert isinstance(out, list) and all(isinstance(t, str) for t in out)
    expected = [_manual_greedy(backend.model, backend.tokenizer, c, 8) for c in CONVS]
    assert out == expected
    assert len(set(expected)) > 1  # answers differ by prompt, so order and pairing are checked
    assert respond(backend, CONVS[::-1], cfg) == expected[::-1]


def test_render_uses_chat_template_without_extra_bos(backend):
    tok = backend.tokenizer
    ids = backend.render(CONVS[0])
    text = tok.apply_chat_template(CONVS[0], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] != [tok.bos_token_id, tok.bos_token_id]


def test_bos_added_once_when_tokenizer_wants_one(tiny_model_dir, backend):
    from tokenizers.processors import TemplateProcessing

    tok = load_tokenizer(tiny_model_dir)
    bos = "<|endoftext|>"
    tok.bos_token = bos
    bos_id = tok.convert_tokens_to_ids(bos)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    assert tok("a")["input_ids"][0] == bos_id  # this tokenizer adds a BOS itself
    b = HFBackend(backend.model, tok)
    ids = b.render(CONVS[0])
    assert ids[0] == bos_id and ids[1] != bos_id
    # a template that already emits the BOS does not get a second one
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    ids2 = HFBackend(backend.model, tok).render(CONVS[0])
    assert ids2 == ids


def test_greedy_batch_equals_one_by_one(backend):
    cfg = GenerationConfig(max_new_tokens=10, batch_size=8)
    batched = backend.generate_ids(CONVS, cfg)
    single = [backend.generate_ids([c], cfg)[0] for c in CONVS]
    assert len({len(g.prompt_ids) for g in batched}) > 1  # padding was needed
    assert [g.response_ids for g in batched] == [g.response_ids for g in single]
    assert [g.prompt_ids for g in batched] == [backend.render(c) for c in CONVS]
    # responses differ between prompts, so the comparison above is meaningful
    assert len({tuple(g.response_ids) for g in batched}) > 1
    texts = backend.generate(CONVS, GenerationConfig(max_new_tokens=10, batch_size=2))
    assert texts == [g.text for g in batched]
    assert texts[0] == backend.tokenizer.decode(batched[0].response_ids, skip_special_tokens=True)


def test_sampling_reproducible_per_seed(backend):
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7, batch_size=2)
    before = torch.random.get_rng_state()
    a = backend.generate(CONVS, cfg)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    torch.manual_seed(12345)
    assert backend.generate(CONVS, cfg) == a
    other = backend.generate(CONVS, GenerationConfig(max_new_tokens=12, temperature=1.0, seed=8, batch_size=2))
    assert other != a
    greedy = backend.generate(CONVS, GenerationConfig(max_new_tokens=12, batch_size=2))
    assert greedy != a


def test_prompt_run_length():
    a, b, c = [1, 2], [3], [1, 2, 4]
    assert prompt_run_length([a, a, b, b, c, c]) == 2
    assert prompt_run_length([a, a, a, b, b, b]) == 3
    assert prompt_run_length([a, a, a, a]) == 4  # one prompt: one run
    assert prompt_run_length([a, b, c]) == 1
    assert prompt_run_length([a, a, b]) == 1  # runs of unequal length
    assert prompt_run_length([a, a, b, c]) == 1
    assert prompt_run_length([a]) == 1


@pytest.mark.parametrize("stop_on_eos", [True, False])
def test_shared_prompt_prefill_equals_one_forward_per_row(backend, stop_on_eos, monkeypatch):
    """Runs of k identical prompts (PPO/GRPO samples, Best-of-N): the prompt's KV cache is computed once
    per distinct prompt and repeated k times; in float64 the samples, their logits and the greedy
    answers equal those of the batch run row by row (``share_prompt_prefill=False``), prompts of
    different lengths (left padding) included."""
    calls = []
    real = backend._prefilled_cache
    monkeypatch.setattr(backend, "_prefilled_cache", lambda rows, k, dev: calls.append(k) or real(rows, k, dev))
    model = backend.model.to(torch.float64)
    try:
        rows = [backend.render(c) for c in CONVS[:3] for _ in range(3)]
        assert prompt_run_length(rows) == 3 and len({len(r) for r in rows}) == 3
        for temp in (0.0, 1.0):
            kw = dict(max_new_tokens=9, temperature=temp, seed=3, batch_size=9, stop_on_eos=stop_on_eos)
            shared = backend.generate_from_ids(rows, GenerationConfig(return_logits=True, **kw))
            plain = backend.generate_from_ids(
                rows, GenerationConfig(return_logits=True, share_prompt_prefill=False, **kw)
            )
            assert [g.response_ids for g in shared] == [g.response_ids for g in plain]
            for x, y in zip(shared, plain, strict=True):
                torch.testing.assert_close(x.logits, y.logits, rtol=0, atol=1e-9)
            if temp:  # the k samples of one prompt differ, so the rows are not copies of one answer
                assert len({tuple(g.response_ids) for g in shared[:3]}) > 1
        assert calls == [3, 3]  # the shared path ran (once per call with sharing on), with k = 3
        # batch size below the run: each batch holds whole or partial runs, and still matches
        kw = dict(max_new_tokens=6, temperature=1.0, seed=5, batch_size=2, stop_on_eos=stop_on_eos)
        assert [g.response_ids for g in backend.generate_from_ids(rows, GenerationConfig(**kw))] == [
            g.response_ids for g in backend.generate_from_ids(rows, GenerationConfig(share_prompt_prefill=False, **kw))
        ]
    finally:
        model.to(torch.float32)


def test_top_k_one_is_greedy(backend):
    greedy = backend.generate(CONVS, GenerationConfig(max_new_tokens=8))
    top1 = backend.generate(CONVS, GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=1))
    assert top1 == greedy


def test_max_new_tokens_respected(backend):
    out = backend.generate_ids(CONVS, GenerationConfig(max_new_tokens=5, stop_on_eos=False, temperature=1.0))
    assert [len(g.response_ids) for g in out] == [5] * len(CONVS)
    assert not any(g.finished for g in out)
    out = backend.generate_ids(CONVS, GenerationConfig(max_new_tokens=3))
    assert all(len(g.response_ids) <= 3 for g in out)


def test_stops_at_eos_and_keeps_it(backend):
    cfg = GenerationConfig(max_new_tokens=10, stop_on_eos=False)
    free = backend.generate_ids(CONVS[:1], cfg)[0].response_ids
    stop_tok = free[3]
    first = free.index(stop_tok)
    b = HFBackend(backend.model, backend.tokenizer)
    b.eos_ids = [stop_tok]  # pretend this token is the EOS
    got = b.generate_ids(CONVS[:1], GenerationConfig(max_new_tokens=10))[0]
    assert got.response_ids == free[: first + 1]
    assert got.finished
    # without EOS stopping the same backend runs to max_new_tokens
    assert b.generate_ids(CONVS[:1], cfg)[0].response_ids == free


def test_generation_restores_training_mode(backend):
    backend.model.train()
    try:
        backend.generate(CONVS[:1], GenerationConfig(max_new_tokens=2))
        assert backend.model.training
    finally:
        backend.model.eval()


@pytest.mark.parametrize(
    "kw",
    [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"batch_size": 0}, {"sampler": "x"}],
)
def test_generation_config_validation(kw):
    with pytest.raises(ConfigError):
        GenerationConfig(**kw)


def _chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of ``counts`` against ``probs``; categories expected < 5 times pooled."""
    from scipy.stats import chisquare

    n = float(counts.sum())
    big = probs * n >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp = torch.cat([probs[big].double() * n, probs[~big].double().sum().view(1) * n])
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy() * float(obs[keep].sum() / exp[keep].sum())).pvalue)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8)]
)
def test_inverse_cdf_sampler_draws_the_filtered_distribution(temperature, top_k, top_p):
    """20 000 draws match transformers' own warpers' distribution (chi-square), nothing outside its support."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.5, 0.3, -0.5, 1.0, -2.0, 0.0, 0.8]])
    ref = logits.clone()
    for w in (
        [TemperatureLogitsWarper(temperature)]
        + ([TopKLogitsWarper(top_k)] if top_k else [])
        + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    ):
        ref = w(None, ref)
    probs = torch.softmax(ref, -1)[0]
    torch.manual_seed(0)
    out = InverseCDFSampler(temperature, top_k, top_p)(None, logits.expand(20000, -1).clone())
    assert bool(((out == 0).sum(-1) == 1).all()) and bool(torch.isinf(out).sum(-1).eq(7).all())  # one-hot
    counts = torch.bincount(out.argmax(-1), minlength=8)
    assert bool((counts[probs == 0] == 0).all())  # never outside the support
    assert (probs > 0).sum() < 8 if (top_k or top_p < 1) else (probs > 0).all()
    assert _chi2_p(counts, probs) > 1e-3


@pytest.mark.parametrize("sampler", ["inverse_cdf", "multinomial"])
def test_sampled_first_tokens_follow_the_model(backend, sampler):
    """Both samplers, through ``generate``: 3000 first tokens of one prompt follow softmax(logits / T)."""
    ids = backend.render(CONVS[1])
    with torch.no_grad():
        logits = backend.model(torch.tensor([ids])).logits[0, -1].float()
    probs = torch.softmax(logits / 0.8, -1)
    cfg = GenerationConfig(
        max_new_tokens=1, temperature=0.8, seed=3, batch_size=3000, stop_on_eos=False, sampler=sampler
    )
    first = torch.tensor([g.response_ids[0] for g in backend.generate_from_ids([ids] * 3000, cfg)])
    counts = torch.bincount(first, minlength=probs.shape[0])
    assert int((counts > 0).sum()) > 5  # a spread distribution, not a near-greedy one
    assert _chi2_p(counts, probs) > 1e-3
    again = torch.tensor([g.response_ids[0] for g in backend.generate_from_ids([ids] * 3000, cfg)])
    assert torch.equal(first, again)  # the seed fixes the draws
