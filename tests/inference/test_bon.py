"""Tests for alignforge.inference.bon (Best-of-N) on the tiny model."""

from __future__ import annotations

import pytest
import torch

from alignforge.errors import ConfigError, DataError
from alignforge.inference.bon import best_of_n
from alignforge.inference.evaluators import SelfJudge
from alignforge.inference.generate import GenerationConfig, HFBackend
from alignforge.models.loading import load_model, load_tokenizer

CONVS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is the capital of France? Tell me about the sea."}],
    "Write a function in Python that returns the sum of a list.",
]
CFG = GenerationConfig(max_new_tokens=12, temperature=1.0)


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    """The tiny model with larger random weights, so samples vary, and a larger EOS row of the (tied)
    output embedding, so that samples end at different lengths."""
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.get_output_embeddings().weight[tok.eos_token_id] *= 6
    return model, tok


class FakeEvaluator:
    """A deterministic evaluator: ``fn(ids)``; records every call."""

    def __init__(self, fn):
        self.fn = fn
        self.started: list = []
        self.scored: list[list[int]] = []

    def start(self, conversation, policy_tokenizer):
        self.started.append((conversation, policy_tokenizer))

    def commit(self, ids):  # pragma: no cover - Best-of-N never commits
        raise AssertionError("best_of_n must not commit")

    def score(self, new_ids):
        self.scored.append(list(new_ids))
        return self.fn(list(new_ids))


def _samples(model, tok, conv, n, seed):
    """The N samples Best-of-N should draw for one prompt: one batch of N, seed ``seed``."""
    cfg = GenerationConfig(max_new_tokens=CFG.max_new_tokens, temperature=1.0, batch_size=n, seed=seed)
    conv = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
    return HFBackend(model, tok).generate_ids([conv] * n, cfg)


@pytest.mark.parametrize("sign", [1, -1], ids=["longest", "shortest"])
def test_returns_argmax_of_the_evaluator(model_tok, sign):
    model, tok = model_tok
    ev = FakeEvaluator(lambda ids: sign * len(ids))
    res = best_of_n(model, tok, CONVS, 6, ev, CFG, seed=3)
    assert len(res) == len(CONVS)
    eos = tok.eos_token_id
    varied = 0
    for i, (conv, r) in enumerate(zip(CONVS, res, strict=True)):
        gens = _samples(model, tok, conv, 6, seed=3 + i)
        assert r["samples"] == [g.text for g in gens]
        # Scored ids: each sample's response without its trailing EOS.
        want_ids = [g.response_ids[:-1] if g.finished else g.response_ids for g in gens]
        assert ev.scored[6 * i : 6 * i + 6] == want_ids
        scores = [sign * len(x) for x in want_ids]
        assert r["scores"] == scores
        best = scores.index(max(scores))  # first argmax
        assert r["best"] == best and r["score"] == max(scores)
        assert r["response"] == gens[best].text and r["response_ids"] == gens[best].response_ids
        assert r["finished"] == gens[best].finished and r["n"] == 6
        assert r["wall_s"] >= r["gen_s"] >= 0 and r["score_s"] >= 0
        varied += len(set(scores)) > 1
        assert all(eos not in x for x in want_ids)
    # the third prompt ends at once with EOS in most samples (15 of 16 in two batches of 8), so all 6 of them
    # are often the same empty answer; the other two must vary for the argmax to mean anything
    assert varied >= 2, "samples too uniform for the test to mean anything"
    assert any(g.finished for g in _samples(model, tok, CONVS[0], 6, seed=3)), "no sample ended with EOS"
    # start() once per prompt, with the conversation (a str becomes a user turn) and the tokenizer.
    assert [c for c, _ in ev.started] == [CONVS[0], CONVS[1], [{"role": "user", "content": CONVS[2]}]]
    assert all(t is tok for _, t in ev.started)


def test_token_presence_and_ties_go_to_the_first(model_tok):
    model, tok = model_tok
    gens = _samples(model, tok, CONVS[1], 8, seed=0)
    # A token that occurs in some samples but not the first one.
    first = set(gens[0].response_ids)
    target = next(t for g in gens[1:] for t in g.response_ids if t not in first and t != tok.eos_token_id)
    has = [target in g.response_ids for g in gens]
    res = best_of_n(model, tok, [CONVS[1]], 8, FakeEvaluator(lambda ids: float(target in ids)), CFG, seed=0)[0]
    assert res["best"] == has.index(True) > 0
    assert target in res["response_ids"]
    const = best_of_n(model, tok, [CONVS[1]], 8, FakeEvaluator(lambda ids: 0.5), CFG, seed=0)[0]
    assert const["best"] == 0 and const["response"] == gens[0].text


def test_n1_is_plain_sampling_with_the_same_seed(model_tok):
    model, tok = model_tok
    res = best_of_n(model, tok, CONVS, 1, FakeEvaluator(len), CFG, seed=11)
    plain_convs = [[{"role": "user", "content": c}] if isinstance(c, str) else c for c in CONVS]
    plain = HFBackend(model, tok).generate_ids(
        plain_convs, GenerationConfig(max_new_tokens=CFG.max_new_tokens, temperature=1.0, batch_size=1, seed=11)
    )
    assert [r["response_ids"] for r in res] == [g.response_ids for g in plain]
    assert [r["response"] for r in res] == [g.text for g in plain]
    assert all(r["best"] == 0 and len(r["scores"]) == 1 for r in res)


def test_scores_with_the_self_judge(model_tok):
    """A real evaluator: each score equals the self-judge's own score of that sample."""
    model, tok = model_tok
    judge = SelfJudge(model, tok, vote="soft", min_mass=0.0)
    res = best_of_n(model, tok, [CONVS[0]], 3, judge, CFG, seed=5)[0]
    gens = _samples(model, tok, CONVS[0], 3, seed=5)
    fresh = SelfJudge(model, tok, vote="soft", min_mass=0.0)
    fresh.start(CONVS[0], tok)
    want = [fresh.score(g.response_ids[:-1] if g.finished else g.response_ids) for g in gens]
    assert res["scores"] == pytest.approx(want, abs=1e-6)
    assert all(-1 <= s <= 1 for s in res["scores"])
    assert res["best"] == want.index(max(want))


def test_bad_input(model_tok):
    model, tok = model_tok
    ev = FakeEvaluator(len)
    assert best_of_n(model, tok, [], 4, ev, CFG) == []
    for n in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="n must be an integer >= 1"):
            best_of_n(model, tok, CONVS, n, ev, CFG)
    with pytest.raises(ConfigError, match="needs sampling"):
        best_of_n(model, tok, CONVS, 2, ev, GenerationConfig(temperature=0.0))
    with pytest.raises(DataError, match="line 2: field 'prompt': empty prompt"):
        best_of_n(model, tok, [CONVS[0], [{"role": "user", "content": "  "}]], 2, ev, CFG)
    assert ev.started == []  # bad input is caught before any generation
