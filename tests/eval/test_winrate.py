"""`eval winrate`: hand-computed win/tie/loss and CIs, the length-controlled win rate on synthetic
data, reward-model verdicts on a tiny RM, and judge verdicts from a scripted real HTTP judge."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from alignforge.cli import main
from alignforge.errors import ConfigError
from alignforge.eval.grading import PairOutcome, match_rows, read_judge_rows
from alignforge.eval.stats import bootstrap_ci
from alignforge.eval.winrate import length_controlled, rm_outcomes, run_winrate, wtl_summary
from alignforge.inference.serve import BackgroundServer

pytestmark = pytest.mark.timeout(180)

_spec = importlib.util.spec_from_file_location("judge_scripted", Path(__file__).with_name("judge_scripted.py"))
judge_scripted = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(judge_scripted)
row, scripted_app, write_rows = judge_scripted.row, judge_scripted.scripted_app, judge_scripted.write_rows


def outs(*spec):
    return [PairOutcome(str(i), c, o if s == "ok" else None, s) for i, (c, o, s) in enumerate(spec)]


def test_hand_computed_wtl_and_cis():
    o = outs(
        ("x", "win", "ok"),
        ("x", "win", "ok"),
        ("x", "tie", "ok"),
        ("y", "loss", "ok"),
        ("y", None, "unparsable"),
        ("y", None, "failed"),
    )
    s = wtl_summary(o, n_resamples=999)
    assert (s["n"], s["scored"], s["win"], s["tie"], s["loss"], s["unparsable"], s["failed"]) == (6, 4, 2, 1, 1, 1, 1)
    assert s["win_rate"]["value"] == 0.5 and s["tie_rate"]["value"] == 0.25 and s["loss_rate"]["value"] == 0.25
    assert s["win_rate_adjusted"]["value"] == pytest.approx((2 + 0.5) / 4)
    assert s["win_rate"]["ci"] == pytest.approx(list(bootstrap_ci([1, 1, 0, 0], n_resamples=999)))
    assert s["win_rate_adjusted"]["ci"] == pytest.approx(list(bootstrap_ci([1, 1, 0.5, 0], n_resamples=999)))
    lo, hi = s["win_rate_adjusted"]["ci"]
    assert 0 <= lo <= 0.625 <= hi <= 1
    only_y = wtl_summary([x for x in o if x.category == "y"], n_resamples=99)
    assert (only_y["scored"], only_y["loss"], only_y["win_rate"]["value"]) == (1, 1, 0.0)
    assert only_y["win_rate"]["ci"] == [0.0, 0.0]


def test_lc_winner_always_longer():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.integers(20, 200, n).astype(float)
    gap = rng.integers(1, 100, n).astype(float)
    a_longer = rng.random(n) < 0.8
    la = np.where(a_longer, base + gap, base)
    lb = np.where(a_longer, base, base + gap)
    o = ["win" if x else "loss" for x in a_longer]
    lc = length_controlled(o, la, lb)
    assert lc["raw"] == pytest.approx(np.mean(a_longer))
    assert lc["slope"] > 0
    # perfect separation leaves P(win | equal length) open; the fit puts it well below the raw rate
    assert lc["lc_win_rate"] < lc["raw"] - 0.05
    # noisy version: P(A wins) = sigmoid(3 tanh(d / sd)), so at equal length it is exactly 1/2
    d = la - lb
    p = 1 / (1 + np.exp(-3 * np.tanh(d / d.std())))
    o = ["win" if x else "loss" for x in rng.random(n) < p]
    lc = length_controlled(o, la, lb)
    assert lc["raw"] > 0.65 and abs(lc["lc_win_rate"] - 0.5) < 0.08


def test_lc_length_independent():
    rng = np.random.default_rng(1)
    n = 1000
    la, lb = rng.integers(10, 300, n), rng.integers(10, 300, n)
    u = rng.random(n)
    o = ["win" if x < 0.6 else "tie" if x < 0.7 else "loss" for x in u]
    lc = length_controlled(o, la, lb)
    assert lc["raw"] == pytest.approx(np.mean([1 if x == "win" else 0.5 if x == "tie" else 0 for x in o]))
    assert abs(lc["lc_win_rate"] - lc["raw"]) < 0.03


def test_lc_ties_count_half():
    lc = length_controlled(["tie"] * 10, list(range(10)), [5] * 10)
    assert lc["raw"] == 0.5 and lc["lc_win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert length_controlled(["win"] * 3, [1, 2, 3], [3, 2, 1])["lc_win_rate"] == 1.0  # one class: LC = raw


@pytest.fixture(scope="module")
def tiny_rm(tiny_model_dir, tmp_path_factory):
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.reward import RewardModel, load_reward_backbone, save_reward_model

    rm = RewardModel(load_reward_backbone(str(tiny_model_dir)))
    return save_reward_model(rm, load_tokenizer(str(tiny_model_dir)), tmp_path_factory.mktemp("rm") / "rm", {})


def test_rm_verdicts(tiny_rm, tmp_path):
    from alignforge.inference.evaluators import RewardEvaluator

    a = [
        row(1, "c1", "Tell me a joke.", responses=["Why did the chicken cross the road?"]),
        row(2, "c1", "Say hi.", responses=["hi"]),
        row(3, "c2", "Hello", "And now?", responses=["Hello to you", "Now a second answer"]),
        row(4, "c2", "Count.", responses=["one two three"]),
    ]
    b = [
        row(1, "c1", "Tell me a joke.", responses=["No."]),
        row(2, "c1", "Say hi.", responses=["hi"]),  # identical: a tie
        row(3, "c2", "Hello", "And now?", responses=["Hey", "Another one entirely, longer"]),
        row(4, "c2", "Count.", responses=["1 2 3 4 5 6 7"]),
    ]
    fa, fb = write_rows(tmp_path / "a.jsonl", a), write_rows(tmp_path / "b.jsonl", b)
    pairs = match_rows(read_judge_rows(fa), read_judge_rows(fb))
    got = rm_outcomes(pairs, tiny_rm, eps=1e-9, batch_size=3)
    ev = RewardEvaluator(str(tiny_rm))
    for o, (ra, rb) in zip(got, pairs, strict=True):
        scores = []
        for r in (ra, rb):
            conv = [{"role": "user", "content": ra.questions[0]}]
            if len(r.responses) == 2:
                conv += [{"role": "assistant", "content": r.responses[0]}, {"role": "user", "content": ra.questions[1]}]
            ev.start(conv, None)
            scores.append(ev.raw_score(r.responses[-1]))
        assert o.score_a == pytest.approx(scores[0], abs=1e-4) and o.score_b == pytest.approx(scores[1], abs=1e-4)
        d = scores[0] - scores[1]
        if ra.id == "2":
            assert o.outcome == "tie"
        else:
            assert abs(d) > 1e-3  # far from the tie threshold, so the expected verdict is unambiguous
            assert o.outcome == ("win" if d > 0 else "loss")
    # a huge eps makes everything a tie
    assert {o.outcome for o in rm_outcomes(pairs, tiny_rm, eps=1e9)} == {"tie"}
    out = tmp_path / "wr.json"
    assert main(["eval", "winrate", fa, fb, "--rm", str(tiny_rm), "--out", str(out), "--n-resamples", "99"]) == 0
    rep = json.loads(out.read_text())
    assert rep["verdicts"] == "rm" and rep["overall"]["scored"] == 4
    assert [it["outcome"] for it in rep["items"]] == [o.outcome for o in got]
    assert rep["overall"]["tie"] >= 1


def test_judge_verdicts_through_cli(tmp_path, shared_data, capsys):
    mt = shared_data / "mt-bench"
    a = [row(i, "c", "q", responses=[f"ANS-{t}{i}"]) for i, t in enumerate(["good", "good", "bad", "same"])]
    b = [row(i, "c", "q", responses=[f"ANS-{t}{i}"]) for i, t in enumerate(["bad", "bad", "good", "same"])]
    fa, fb = write_rows(tmp_path / "a.jsonl", a), write_rows(tmp_path / "b.jsonl", b)
    out = tmp_path / "wr.json"
    with BackgroundServer(scripted_app([])) as srv:
        rc = main(
            [
                "eval",
                "winrate",
                fa,
                fb,
                "--data",
                str(mt),
                "--judge-url",
                srv.url,
                "--judge-model",
                "s",
                "--cache",
                str(tmp_path / "c"),
                "--out",
                str(out),
                "--n-resamples",
                "99",
            ]
        )
    assert rc == 0
    rep = json.loads(out.read_text())
    o = rep["overall"]
    assert (o["win"], o["tie"], o["loss"]) == (2, 1, 1)
    assert o["win_rate_adjusted"]["value"] == pytest.approx(2.5 / 4)
    printed = capsys.readouterr().out
    assert "win rate (raw) 0.625" in printed and "length-controlled" in printed
    with pytest.raises(ConfigError, match="exactly one verdict source"):
        run_winrate(fa, fb)
