"""RAIN's search: candidate sets, PUCT, backup with the similarity update, stop rules, KV reuse,
the alignment effect of the evaluator, and bad input."""

import math
from pathlib import Path

import pytest
import torch

from alignforge.config import load_config
from alignforge.errors import ConfigError, DataError
from alignforge.inference.generate import render_prompt
from alignforge.inference.rain import Node, RainConfig, RainSearch, rain_generate

REPO = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "Hello! How can I help you today?"}]


class Const:
    """An evaluator with a fixed score; records what it was asked."""

    def __init__(self, value=1.0):
        self.value, self.seen, self.committed = value, [], []

    def start(self, conversation, policy_tokenizer):
        self.committed = []

    def commit(self, ids):
        self.committed += list(ids)

    def score(self, new_ids):
        self.seen.append(self.committed + list(new_ids))
        return self.value


class AvoidFirstToken(Const):
    """-1 for any response that starts with ``token``, else +1."""

    def __init__(self, token):
        super().__init__()
        self.token = token

    def score(self, new_ids):
        ids = self.committed + list(new_ids)
        return -1.0 if ids and ids[0] == self.token else 1.0


class FixedEmbedder:
    def embed_ids(self, rows):
        return torch.nn.functional.normalize(torch.ones(len(rows), 4), dim=-1)


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()


def small(**kw):
    base = dict(max_new_tokens=24, max_iterations=10, iterations_after_cap=3, max_simulation_tokens=6)
    base.update(kw)
    return RainConfig(**base)


def greedy_ids(model, tok, n):
    ids = render_prompt(tok, PROMPT)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(t)
    return out


def test_first_expansion_is_the_top_tokens_and_deeper_sets_start_greedy(model64, tiny_tokenizer):
    ids = render_prompt(tiny_tokenizer, PROMPT)
    with torch.no_grad():
        probs = torch.softmax(model64(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    top = torch.topk(probs, 10)
    search = RainSearch(model64, tiny_tokenizer, small(), evaluator=Const(), embedder=FixedEmbedder())
    with torch.inference_mode():
        root = search.begin(PROMPT)
        search._expand(root)
    # depth 0: single tokens, the top 10, priors renormalised over them
    assert [c.tokens[0] for c in root.children] == top.indices.tolist()
    assert [c.prior for c in root.children] == pytest.approx((top.values / top.values.sum()).tolist(), rel=1e-9)
    # depth 1 sets have 2 tokens, depth 2 four; the first child is the greedy continuation
    with torch.inference_mode():
        search._expand(root.children[0])
        search._expand(root.children[0].children[0])
    kid = root.children[0].children[0]
    grand = kid.children[0]
    g = greedy_ids(model64, tiny_tokenizer, 7)
    assert len(kid.tokens) == 2 and len(grand.tokens) == 4
    assert list(root.children[0].tokens + kid.tokens + grand.tokens) == g
    sibs = root.children[0].children
    assert 1 < len(sibs) <= 10 and len({c.tokens for c in sibs}) == len(sibs)  # distinct sets
    assert sum(c.prior for c in sibs) == pytest.approx(1.0)
    # the children's KV is cached: each state equals a forward over the whole path
    layers, logits = search._state(grand)
    with torch.no_grad():
        full = model64(input_ids=torch.tensor([ids + g])).logits[0, -1]
    torch.testing.assert_close(logits, full, atol=1e-10, rtol=0)
    assert search.kv.misses == 0


def test_default_embedding_is_the_in_context_mean_hidden_state(model64, tiny_tokenizer):
    search = RainSearch(model64, tiny_tokenizer, small(), evaluator=Const())  # embedder: in-context LM states
    assert search.hidden
    with torch.inference_mode():
        root = search.begin(PROMPT)
        search._expand(root)
        a = root.children[0]
        search._expand(a)
        b = a.children[1]
    ids = render_prompt(tiny_tokenizer, PROMPT)
    path = ids + list(a.tokens) + list(b.tokens)
    with torch.no_grad():
        h = model64(input_ids=torch.tensor([path]), output_hidden_states=True).hidden_states[-1][0]
    n = len(ids)
    torch.testing.assert_close(a.hsum, h[n], atol=1e-10, rtol=0)
    torch.testing.assert_close(b.hsum, h[n + 1 : n + 3].sum(0), atol=1e-10, rtol=0)
    cont_h = torch.zeros_like(a.hsum)  # a one-token continuation: its hidden state is never computed
    embs = search._path_embeddings([root, a, b], [7], cont_h)
    want_a = torch.nn.functional.normalize(h[n : n + 3].mean(0), dim=0).float()
    want_b = torch.nn.functional.normalize(h[n + 1 : n + 3].mean(0), dim=0).float()
    torch.testing.assert_close(embs[1], want_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(embs[2], want_b, atol=1e-6, rtol=0)


def test_simulated_continuation_stops_at_punctuation_and_its_hidden_states_are_in_context(model64, tiny_tokenizer):
    from alignforge.inference.rain import PUNCTUATION

    search = RainSearch(model64, tiny_tokenizer, small(max_simulation_tokens=12), evaluator=Const())
    eos = tiny_tokenizer.eos_token_id
    lengths = set()
    with torch.inference_mode():
        for seed in range(6):
            search.cfg.seed = seed
            root = search.begin(PROMPT)
            first = root
            for node in (root, None):  # the root (sets of 1 token), then a child (sets of 2: batched steps)
                ends = [tiny_tokenizer.decode([c.tokens[-1]]).endswith(PUNCTUATION) for c in first.children]
                node = node or first.children[ends.index(False)]  # (after punctuation nothing is simulated)
                cont, cont_h = search._expand(node, simulate=True)
                assert len(node.children) >= 2 and 1 <= len(cont) <= 12
                stops = [t == eos or tiny_tokenizer.decode([t]).endswith(PUNCTUATION) for t in cont]
                assert not any(stops[:-1]) and (stops[-1] or len(cont) == 12)
                lengths.add(len(cont))
                if len(cont) > 1:
                    path = list(node.key)
                    with torch.no_grad():
                        out = model64(input_ids=torch.tensor([path + cont]), output_hidden_states=True)
                    h = out.hidden_states[-1][0]
                    want = h[len(path) : len(path) + len(cont) - 1].sum(0)  # every fed token: all but the last
                    torch.testing.assert_close(cont_h, want, atol=1e-10, rtol=0)
    assert len(lengths) > 1  # sampled: the continuation length varies with the seed


def test_committed_set_lengths_follow_depth(model64, tiny_tokenizer):
    cfg = small(max_new_tokens=30)
    [r] = rain_generate(model64, tiny_tokenizer, [PROMPT], cfg, evaluator=Const(), embedder=FixedEmbedder())
    lengths = [s["tokens"] for s in r.steps]
    expected = [1, 2, 4, 10, 10, 3]
    if r.finished:  # an EOS inside a set cuts that set short
        assert lengths[:-1] == expected[: len(lengths) - 1] and lengths[-1] <= expected[len(lengths) - 1]
    else:
        assert lengths == expected and len(r.response_ids) == 30


def test_puct_selection_by_hand(model64, tiny_tokenizer):
    s = RainSearch(model64, tiny_tokenizer, small(), evaluator=Const(), embedder=FixedEmbedder())
    root = Node((), (1,), -1, n=9)
    a = Node((2,), (1, 2), 0, prior=0.5, parent=root, n=4, q=0.5)
    b = Node((3,), (1, 3), 0, prior=0.3, parent=root, n=1, q=0.9)
    c = Node((4,), (1, 4), 0, prior=0.2, parent=root, n=0, q=0.0)
    root.children = [a, b, c]
    s.qmin, s.qmax = -1.0, 1.0
    inner = Node((), (0,), -1)
    s.root = inner  # not the root: no prior smoothing

    def score(x):
        qh = 0.0 if x.n == 0 else (x.q + 1) / (2 + 1e-5)
        return qh + 2.0 * x.prior * 3.0 / (1 + x.n)

    # a: 0.75 + 0.6 = 1.35 ; b: 0.95 + 0.9 = 1.85 ; c: 0 + 1.2
    assert max(root.children, key=score) is b
    assert s._select_child(root) is b
    # at the root, priors are smoothed 0.75 p + 0.25 / 3: c gets 0.2333 -> u = 1.4 (< b's 1.85)
    s.root = root
    assert s._select_child(root) is b
    b.q = 0.1  # b: 0.55 + 2*(0.75*0.3+0.25/3)*3/2 = 0.55 + 0.925 = 1.475 ; c: 2*(0.15+0.0833)*3 = 1.4
    assert s._select_child(root) is b
    b.q = -0.2  # b: 0.4 + 0.925 = 1.325 ; a: 0.75 + 2*(0.375+0.0833)*3/5 = 1.3 ; c: 1.4
    assert s._select_child(root) is c


def test_backup_updates_the_path_and_similar_siblings_by_eq_2(model64, tiny_tokenizer):
    s = RainSearch(model64, tiny_tokenizer, small(), evaluator=Const(), embedder=FixedEmbedder())
    s.qmin, s.qmax = -1.0, 1.0
    root = Node((), (1,), -1, n=3, fn=3, q=0.2)
    a = Node((2,), (1, 2), 0, prior=0.5, parent=root, n=2, fn=2, q=0.5, emb=torch.tensor([1.0, 0.0]), emb_n=2)
    b = Node((3,), (1, 3), 0, prior=0.3, parent=root, n=1, fn=1, q=-0.5, emb=torch.tensor([1.0, 0.1]), emb_n=1)
    far = Node((4,), (1, 4), 0, prior=0.2, parent=root, n=1, fn=1, q=0.0, emb=torch.tensor([0.0, 1.0]), emb_n=1)
    root.children = [a, b, far]
    new_emb = torch.tensor([1.0, 0.0])
    s._backup([root, a], 1.0, torch.stack([torch.zeros(2), new_emb]))
    assert (a.n, a.fn) == (3, 3) and a.q == pytest.approx(0.5 + (1.0 - 0.5) / 3)
    assert (root.n, root.fn) == (4, 4) and root.q == pytest.approx(0.2 + (1.0 - 0.2) / 4)
    sim = 1.0 / math.sqrt(1.01)  # cos(a.emb, b.emb) >= 0.95
    w = 0.2 * sim
    assert b.q == pytest.approx((-0.5 * 1 + w * 1.0) / (1 + w)) and b.n == pytest.approx(1 + w) and b.fn == 1
    assert (far.q, far.n) == (0.0, 1)  # cosine 0: untouched
    torch.testing.assert_close(a.emb, torch.tensor([1.0, 0.0]))


def test_stop_rules_and_the_iteration_cap(model64, tiny_tokenizer):
    sure = small(max_iterations=10, min_visits=3, value_threshold=0.8)
    [r] = rain_generate(model64, tiny_tokenizer, [PROMPT], sure, evaluator=Const(1.0), embedder=FixedEmbedder())
    assert r.steps[0]["iterations"] < 10  # stopped early: the best child has fn > 3 and q = 1 > 0.8
    assert r.steps[0]["visits"] > 3 and r.steps[0]["value"] == 1.0
    [r0] = rain_generate(model64, tiny_tokenizer, [PROMPT], sure, evaluator=Const(0.0), embedder=FixedEmbedder())
    assert r0.steps[0]["iterations"] == 10  # q = 0 never passes V: the cap T_m
    for step in r0.steps[1:]:
        # a later step starts from the committed child's visits fn: range(fn, max(T_m, fn + 3))
        start = step["root_visits"] - step["iterations"]
        assert start > 0 and step["iterations"] == max(10 - start, 3)
    assert r0.iterations == sum(s["iterations"] for s in r0.steps)


def test_the_evaluator_steers_the_response(model64, tiny_tokenizer):
    g0 = greedy_ids(model64, tiny_tokenizer, 1)[0]
    ev = AvoidFirstToken(g0)
    [r] = rain_generate(
        model64, tiny_tokenizer, [PROMPT], small(max_new_tokens=6), evaluator=ev, embedder=FixedEmbedder()
    )
    assert r.response_ids[0] != g0
    [plain] = rain_generate(
        model64, tiny_tokenizer, [PROMPT], small(max_new_tokens=6), evaluator=Const(1.0), embedder=FixedEmbedder()
    )
    assert plain.response_ids[0] == g0  # with a neutral evaluator the greedy child wins


def test_kv_reuse_and_eviction_do_not_change_the_result(model64, tiny_tokenizer):
    ids = render_prompt(tiny_tokenizer, PROMPT)
    per_token = 2 * 2 * 2 * 8 * 8  # layers * (k, v) * kv_heads * head_dim * 8 bytes (float64)
    tight = (len(ids) + 40) * per_token / 2**20 + 0.05  # the context plus a little: forces evictions
    big = RainSearch(model64, tiny_tokenizer, small(cache_mb=512), evaluator=Const(0.0), embedder=FixedEmbedder())
    small_c = RainSearch(model64, tiny_tokenizer, small(cache_mb=tight), evaluator=Const(0.0), embedder=FixedEmbedder())
    with torch.inference_mode():
        r1, r2 = big.generate(PROMPT), small_c.generate(PROMPT)
    assert small_c.kv.evictions > 0 and big.kv.evictions == 0
    assert r1.response_ids == r2.response_ids and r1.steps == r2.steps
    assert r1.cache_hits / r1.cache_lookups > r2.cache_hits / r2.cache_lookups


def test_the_judge_sees_committed_path_and_continuation_without_eos(model64, tiny_tokenizer):
    ev = Const(0.0)
    [r] = rain_generate(
        model64, tiny_tokenizer, [PROMPT], small(max_new_tokens=8), evaluator=ev, embedder=FixedEmbedder()
    )
    eos = tiny_tokenizer.eos_token_id
    assert all(eos not in s for s in ev.seen)
    assert r.response_ids[: len(ev.committed)] == ev.committed or r.finished
    assert r.evaluations == len(ev.seen)


def test_self_judge_with_no_mass_on_the_letters_counts_neither(model64, tiny_tokenizer):
    from alignforge.inference.evaluators import SelfJudge

    judge = SelfJudge(model64, tiny_tokenizer, min_mass=0.99)
    [r] = rain_generate(
        model64, tiny_tokenizer, [PROMPT], small(max_new_tokens=3), evaluator=judge, embedder=FixedEmbedder()
    )
    assert judge.calls > 0 and r.judge_neither == 2 * judge.calls  # both A/B prompts, every call
    assert all(s["value"] == 0.0 for s in r.steps)


def test_rm_evaluator_runs_through_the_config(tmp_path, tiny_model_dir, tiny_tokenizer):
    from alignforge.models.loading import load_model
    from alignforge.models.reward import RewardModel, load_reward_backbone, save_reward_model

    rm = RewardModel(load_reward_backbone(str(tiny_model_dir)))
    rm_dir = save_reward_model(rm, tiny_tokenizer, tmp_path / "rm", {"mean": 0.0, "std": 1.0})
    cfg = small(max_new_tokens=4, evaluator="rm", reward_model=str(rm_dir))
    [r] = rain_generate(load_model(str(tiny_model_dir)), tiny_tokenizer, [PROMPT], cfg)
    assert r.evaluations > 0 and len(r.response_ids) >= 1 and all(-1 <= s["value"] <= 1 for s in r.steps)


def test_bad_input(model64, tiny_tokenizer):
    def run(p, **kw):
        return rain_generate(
            model64,
            tiny_tokenizer,
            [p],
            small(**kw),
            evaluator=Const(),
            embedder=FixedEmbedder(),
        )

    with pytest.raises(DataError, match="line 1: field 'prompt': empty prompt"):
        run([{"role": "user", "content": "  "}])
    with pytest.raises(DataError, match="longer than the context"):
        run("word " * 200, max_length=64)
    with pytest.raises(ConfigError, match="too small for one path"):
        run(PROMPT, cache_mb=1e-4)
    with pytest.raises(ConfigError, match="evaluator=rm needs reward_model"):
        RainConfig(evaluator="rm")
    with pytest.raises(ConfigError, match="gamma_sim"):
        RainConfig(gamma_sim=0)
    with pytest.raises(ConfigError, match="set_lengths"):
        RainConfig(set_lengths=[])
    with pytest.raises(ConfigError, match="embedder must be 'lm' or 'minilm'"):
        RainConfig(embedder="bert")
    with pytest.raises(ConfigError, match="cache_mb must be > 0"):
        RainConfig(cache_mb=0)
    with pytest.raises(ConfigError, match="unknown config key 'cpuct'.*c_puct"):
        load_config(RainConfig, None, ["cpuct=2"])
    assert load_config(RainConfig, None, ["c_puct=1.5", "set_lengths=[1,3]"]).set_lengths == [1, 3]


def test_cli_writes_one_line_per_prompt_and_resumes(tmp_path, tiny_model_dir, capsys):
    import json

    from alignforge.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["Hello!", "Tell me a joke.", "What is 2+2?"]))
    out = tmp_path / "out.jsonl"
    args = ["rain", "generate", str(prompts), "--out", str(out), "--model", str(tiny_model_dir)]
    knobs = ["max_new_tokens=5", "max_iterations=3", "iterations_after_cap=2", "max_simulation_tokens=3"]
    assert main(args + knobs) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    first = rows[0]
    assert first["prompt"] == [{"role": "user", "content": "Hello!"}] and first["wall_s"] > 0
    assert 1 <= len(first["response_ids"]) <= 5 and first["steps"] and "cache_hit_rate" in first
    # a kill mid-line: the torn line is dropped and that prompt redone; the others are kept
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    capsys.readouterr()
    assert main(args + knobs) == 0
    assert "3 prompts (1 resumed)" in capsys.readouterr().out
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in again] == [0, 1, 2] and again[1]["response_ids"] == rows[1]["response_ids"]
    # other settings on the same output are refused
    assert main(args + knobs[:-1] + ["max_simulation_tokens=4"]) == 2
    assert "written with other settings" in capsys.readouterr().err
    # a bad prompt names its file and line
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "word " * 2000}) + "\n")
    assert main(args[:3] + ["--out", str(tmp_path / "o2.jsonl")] + args[5:] + knobs) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:2: field 'prompt':" in err and "longer than the context" in err


def test_shipped_config_is_the_paper_defaults():
    from alignforge.config import load_config

    cfg = load_config(RainConfig, REPO / "configs" / "rain_hh.yaml")
    assert cfg == RainConfig()
