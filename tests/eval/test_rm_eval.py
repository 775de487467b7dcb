"""``rm eval`` / ``rm score``: hand-checked statistics, plots, order-preserving batched scoring,
file scoring round trip, input errors, the CLI, and a smoke run on real HH data."""

import gzip
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from alignforge.data.records import TokenizedPair
from alignforge.errors import DataError, ModelError
from alignforge.eval.rm_eval import (
    bootstrap_ci,
    evaluate_pairs,
    pearson,
    plot_eval,
    rankdata,
    read_unlabeled,
    run_rm_eval,
    score_file,
    score_pairs,
    score_sequences,
    spearman,
)

GOOD = [
    "Sure, here is a clear and helpful answer.",
    "Here is a short helpful explanation.",
    "Happy to help: the answer is below.",
]
BAD = ["No.", "I do not care.", "Go away, I will not help you."]


def _pair(lc, lr, category=None, lp=3):
    return TokenizedPair(list(range(1, lp + 1)), [7] * lc, [8] * lr, category)


def _write_pairs(path, n=24, seed=0, category=False):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Question {i}: tell me about topic {rng.randint(0, 99)}."}]
        row = {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": rng.choice(GOOD)}],
            "rejected": [{"role": "assistant", "content": rng.choice(BAD)}],
        }
        if category:
            row["category"] = ["chat", "code"][i % 2]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny_model_dir):
    """A tiny RM trained for a few seconds to prefer GOOD over BAD answers."""
    from alignforge.config import load_config
    from alignforge.trainers.rm import RMConfig, train_rm

    d = tmp_path_factory.mktemp("rm")
    data = _write_pairs(d / "train.jsonl")
    cfg = load_config(
        RMConfig,
        None,
        [
            f"model.name_or_path={tiny_model_dir}",
            f"data.train_files={data}",
            f"train.output_dir={d / 'rm'}",
            "train.epochs=4",
            "train.per_device_batch_size=4",
            "train.lr=3e-3",
            "train.progress=false",
            "reward.length_balance=false",
            "data.max_length=256",
        ],
    )
    return train_rm(cfg)["final_dir"]


@pytest.fixture(scope="module")
def random_rm(tiny_model_dir):
    """An untrained tiny RM with enlarged weights, so scores differ clearly between inputs."""
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.reward import RewardModel, load_reward_backbone

    torch.manual_seed(0)
    rm = RewardModel(load_reward_backbone(str(tiny_model_dir))).eval()
    with torch.no_grad():
        for p in rm.parameters():
            p.mul_(4.0)
    return rm, load_tokenizer(str(tiny_model_dir))


# --------------------------------------------------------------------------- statistics


def test_accuracy_ties_buckets_and_length_split():
    # (len chosen, len rejected, score chosen, score rejected)
    rows = [
        (5, 5, 1.0, 0.0),  # equal length, correct
        (11, 3, 2.0, 2.0),  # d=+8 -> bucket 1-8 (upper edge inclusive), tie = 0.5
        (3, 12, 0.0, 1.0),  # d=-9 -> bucket 9-16, wrong; the RM prefers the longer
        (40, 4, 3.0, 1.0),  # d=+36 -> bucket 33-64, correct
        (300, 2, -1.0, 0.0),
    ]  # d=+298 -> bucket >256, wrong
    pairs = [_pair(a, b) for a, b, _, _ in rows]
    res = evaluate_pairs([x[2] for x in rows], [x[3] for x in rows], pairs, n_boot=200)
    assert res["n_pairs"] == 5 and res["n_ties"] == 1
    assert res["accuracy"] == pytest.approx((1 + 0.5 + 0 + 1 + 0) / 5)
    by = {b["bucket"]: b for b in res["accuracy_by_length_bucket"]}
    assert [b["bucket"] for b in res["accuracy_by_length_bucket"]] == [
        "equal",
        "1-8",
        "9-16",
        "17-32",
        "33-64",
        "65-128",
        "129-256",
        ">256",
    ]
    assert {k: v["n"] for k, v in by.items() if v["n"]} == {"equal": 1, "1-8": 1, "9-16": 1, "33-64": 1, ">256": 1}
    assert by["1-8"]["accuracy"] == 0.5 and by["9-16"]["accuracy"] == 0.0 and by["33-64"]["accuracy"] == 1.0
    assert by["9-16"]["n_shorter_won"] == 1 and by["9-16"]["n_longer_won"] == 0
    assert by["9-16"]["accuracy_longer_won"] is None and by["9-16"]["rm_prefers_longer"] == 1.0
    assert by["17-32"]["accuracy"] is None
    assert res["accuracy_longer_won"] == pytest.approx(0.5)  # (0.5 + 1 + 0) / 3
    assert res["accuracy_shorter_won"] == 0.0
    assert res["rm_prefers_longer"] == pytest.approx(2.5 / 4)  # 0.5, 1, 1, 0 over unequal pairs
    assert res["longer_chosen_share"] == pytest.approx(0.6) and res["equal_length_share"] == pytest.approx(0.2)
    assert res["score_chosen"]["mean"] == pytest.approx(1.0)
    assert res["score_chosen"]["std"] == pytest.approx(math.sqrt(2.5))  # ddof=1: (0+1+1+4+4)/4
    assert res["margin_mean"] == pytest.approx((1 + 0 - 1 + 2 - 1) / 5)
    assert "by_category" not in res
    json.dumps(res, allow_nan=False)  # JSON-serialisable, no NaN


def test_correlations_by_hand():
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert rankdata([3, 1, 2, 2]).tolist() == [4.0, 1.0, 2.5, 2.5]
    # ranks x = 1, 2.5, 2.5, 4 vs 1..4: cov 4.5, var 4.5 and 5 -> 4.5 / sqrt(22.5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearman([10, 20, 30, 40], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert pearson([10, 20, 30, 40], [1, 4, 9, 100]) < 0.95
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [2]) is None
    # inside evaluate_pairs: over all responses, score against response length
    pairs = [_pair(2, 5), _pair(7, 3), _pair(4, 4)]
    lens = np.array([2, 7, 4, 5, 3, 4], dtype=float)
    s = -(lens**3)
    res = evaluate_pairs(s[:3], s[3:], pairs, n_boot=10)
    assert res["length_correlation"]["n"] == 6
    assert res["length_correlation"]["spearman"] == pytest.approx(spearman(s, lens))
    assert res["length_correlation"]["spearman"] == pytest.approx(-1.0)
    assert res["length_correlation"]["pearson"] == pytest.approx(pearson(s, lens))
    assert -1.0 < res["length_correlation"]["pearson"] < -0.8


def test_bootstrap_ci():
    rng = np.random.default_rng(123)
    out = (rng.random(400) < 0.7).astype(float)
    a = bootstrap_ci(out, n_boot=1000, seed=5)
    assert a == bootstrap_ci(out, n_boot=1000, seed=5)  # reproducible
    assert a != bootstrap_ci(out, n_boot=1000, seed=6)
    assert a[0] <= out.mean() <= a[1]
    se = math.sqrt(out.mean() * (1 - out.mean()) / len(out))  # normal approximation
    assert 0.75 * 3.92 * se < a[1] - a[0] < 1.25 * 3.92 * se
    assert bootstrap_ci(np.ones(30), n_boot=100) == [1.0, 1.0]
    pairs = [_pair(3, 2)] * 400
    res = evaluate_pairs(out, np.zeros(400) + 0.5, pairs, n_boot=1000, seed=5)
    assert res["accuracy_ci95"] == a and res["accuracy"] == pytest.approx(out.mean())


def test_categories():
    pairs = [_pair(3, 2, "a"), _pair(3, 2, "a"), _pair(3, 2, "b"), _pair(2, 2, None)]
    res = evaluate_pairs([1.0, 0.0, 5.0, 2.0], [0.0, 1.0, 4.0, 2.0], pairs, n_boot=10)
    cats = res["by_category"]
    assert set(cats) == {"a", "b", "(none)"}
    assert cats["a"]["n"] == 2 and cats["a"]["accuracy"] == 0.5
    assert cats["b"]["accuracy"] == 1.0 and cats["(none)"]["accuracy"] == 0.5
    assert cats["b"]["score_all"]["mean"] == pytest.approx(4.5)
    assert cats["a"]["score_all"]["quantiles"]["0.5"] == pytest.approx(0.5)


def test_evaluate_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one chosen and one rejected score per pair"):
        evaluate_pairs([1.0], [0.0, 1.0], [_pair(1, 1)])


def test_plots_written(tmp_path):
    rng = np.random.default_rng(0)
    pairs = [
        _pair(int(rng.integers(1, 80)), int(rng.integers(1, 80)), ["chat", "code", None][i % 3]) for i in range(60)
    ]
    c, r = rng.normal(1, 1, 60), rng.normal(0, 1, 60)
    paths = plot_eval(evaluate_pairs(c, r, pairs, n_boot=50), c, r, pairs, tmp_path)
    assert {p.name for p in paths} == {
        "score_hist.png",
        "accuracy_by_length.png",
        "score_vs_length.png",
        "score_by_category.png",
    }
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    plain = [_pair(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    assert len(plot_eval(evaluate_pairs(c, r, plain, n_boot=50), c, r, plain, tmp_path / "p")) == 3


# --------------------------------------------------------------------------- scoring


def test_score_pairs_keeps_order_and_matches_unbatched(random_rm):
    from alignforge.models.packing import pack_pairs

    rm, tok = random_rm
    rng = random.Random(1)
    V = rm.model.config.vocab_size
    pairs = [
        TokenizedPair(
            [rng.randrange(3, V) for _ in range(rng.randint(2, 9))],
            [rng.randrange(3, V) for _ in range(rng.randint(1, 12))],
            [rng.randrange(3, V) for _ in range(rng.randint(1, 12))],
        )
        for _ in range(11)
    ]
    c, r = score_pairs(rm, pairs, tok.pad_token_id, batch_size=4, progress=False)
    with torch.no_grad():
        one = [rm(pack_pairs([p], tok.pad_token_id)) for p in pairs]
    # batched vs one at a time: other padded shapes, so fp32 rounding; tolerance scaled to the scores
    tol = dict(rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(c).max())))
    np.testing.assert_allclose(c, [x[0].item() for x in one], **tol)
    np.testing.assert_allclose(r, [x[1].item() for x in one], **tol)
    assert np.std(c) > 1e-3  # scores really differ, so a permutation would be caught
    # the same responses scored as plain unpacked sequences
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs]
    np.testing.assert_allclose(score_sequences(rm, seqs, tok.pad_token_id, batch_size=3, progress=False), c, **tol)


def test_score_file_round_trip(tmp_path, trained_rm):
    from alignforge.data.tokenize import tokenize_prompt_completion
    from alignforge.models.reward import load_reward_model

    src = tmp_path / "in.jsonl"
    recs = [
        {"prompt": "Question 1: tell me about topic 5.", "completion": GOOD[0], "id": "a", "meta": {"k": 1}},
        {
            "prompt": [{"role": "user", "content": "Question 2: tell me about topic 9."}],
            "response": [{"role": "assistant", "content": BAD[1]}],
            "id": "b",
        },
        {
            "completion": [
                {"role": "user", "content": "Question 3: tell me about topic 1."},
                {"role": "assistant", "content": GOOD[1]},
            ],
            "id": "c",
        },
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out.jsonl.gz"
    rep = score_file(trained_rm, src, out, batch_size=2, normalize=True, progress=False)
    rows = [json.loads(x) for x in gzip.decompress(out.read_bytes()).decode().splitlines()]
    assert rep["n"] == 3 and [r["id"] for r in rows] == ["a", "b", "c"]
    assert rep["n_truncated"] == rep["n_response_truncated"] == 0
    for r, orig in zip(rows, recs, strict=False):
        assert {k: v for k, v in r.items() if not k.startswith("score")} == orig
    rm, tok, stats = load_reward_model(trained_rm)
    expect = []
    for _, _, prompt, completion in read_unlabeled(src):
        p, c = tokenize_prompt_completion(prompt, completion, tok, full_render=True)  # the RM's convention
        expect.append(score_sequences(rm, [p + c], tok.pad_token_id, progress=False)[0])
    np.testing.assert_allclose(
        [r["score"] for r in rows], expect, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(expect).max()))
    )
    for r in rows:
        assert r["score_normalized"] == pytest.approx((r["score"] - stats["mean"]) / stats["std"])
    assert rows[0]["score"] > rows[1]["score"]  # the trained RM prefers the good answer


def test_score_file_bad_input(tmp_path, trained_rm, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "completion": "ok"}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(DataError) as e:
        score_file(trained_rm, bad, tmp_path / "o.jsonl", progress=False)
    assert str(e.value) == f"{bad}:2: field 'completion': missing field"
    bad.write_text(json.dumps({"prompt": [{"role": "bot", "content": "hi"}], "response": []}) + "\n{oops\n")
    with pytest.raises(DataError, match=rf"{bad}:1: field 'prompt\[0\].role': unknown role"):
        score_file(trained_rm, bad, tmp_path / "o.jsonl", progress=False)
    bad.write_text(json.dumps({"prompt": "hi", "completion": "ok"}) + "\n{oops\n")
    with pytest.raises(DataError, match=rf"{bad}:2: invalid JSON"):
        score_file(trained_rm, bad, tmp_path / "o.jsonl", progress=False)
    assert not (tmp_path / "o.jsonl").exists()
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "hi", "completion": "ok"}) + "\n")
    with pytest.raises(ModelError, match="cannot normalise"):  # a bare backbone has no reward_stats.json
        score_file(tiny_model_dir, good, tmp_path / "o.jsonl", normalize=True, progress=False)


def test_run_rm_eval_raise_on_bad_pair(tmp_path, trained_rm):
    data = _write_pairs(tmp_path / "d.jsonl", n=3)
    data.write_text(data.read_text() + json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(DataError, match=rf"{data}:4: field 'rejected': chosen identical to rejected"):
        run_rm_eval(trained_rm, data, tmp_path / "o", on_error="raise", plots=False, progress=False)
    s = run_rm_eval(trained_rm, data, tmp_path / "o", on_error="skip", plots=False, progress=False)
    assert s["n_pairs"] == 3 and s["data_report"]["n_dropped"] == 1


def test_rm_eval_cuts_the_prompt_and_drops_pairs_whose_response_would_be_cut(tmp_path, trained_rm):
    from alignforge.data.readers import read_preference
    from alignforge.data.tokenize import tokenize_preference
    from alignforge.models.reward import load_reward_model

    long_prompt = "Question 1: tell me about topic 5. " * 8
    rows = [
        {"prompt": "Question 2: tell me about topic 3.", "chosen": GOOD[0], "rejected": BAD[0]},  # fits
        {"prompt": long_prompt, "chosen": GOOD[1], "rejected": BAD[1]},  # fits once the prompt is cut
        {"prompt": "Question 4: tell me about topic 8.", "chosen": GOOD[2] * 6, "rejected": BAD[2]},
    ]  # too long
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, tok, _ = load_reward_model(trained_rm)
    L = 96
    full = [tokenize_preference(r, tok, 4096, full_render=True)[0] for r in read_preference(data).records]
    assert [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) > L for p in full] == [False, True, True]
    assert len(full[1].chosen_ids) <= L // 2 < len(full[2].chosen_ids)
    for limit in (None, 10):  # both loading paths
        s = run_rm_eval(trained_rm, data, tmp_path / "o", max_length=L, limit=limit, plots=False, progress=False)
        r = s["data_report"]
        assert (s["n_pairs"], r["n_out"], r["n_truncated"], r["n_response_truncated"], r["n_overlong_dropped"]) == (
            2,
            2,
            1,
            0,
            1,
        )
        assert "1 dropped: a response would not fit in max_length 96 even with the prompt cut" in r["summary"]
        scores = [json.loads(x) for x in (tmp_path / "o" / "scores.jsonl").read_text().splitlines()]
        assert [x["line"] for x in scores] == [1, 2]
        assert scores[1]["len_chosen"] == len(full[1].chosen_ids)  # the response kept whole
        assert scores[1]["len_prompt"] == L - len(full[1].chosen_ids)  # the prompt cut from the left
    s = run_rm_eval(trained_rm, data, tmp_path / "o", max_length=L, plots=False, progress=False, overlong="truncate")
    r = s["data_report"]
    assert (s["n_pairs"], r["n_truncated"], r["n_response_truncated"], r["n_overlong_dropped"]) == (3, 2, 1, 0)
    assert s["config"]["overlong"] == "truncate"


# --------------------------------------------------------------------------- CLI and real data


def test_cli_rm_eval_and_score(tmp_path, trained_rm):
    from alignforge.cli import main

    data = _write_pairs(tmp_path / "heldout.jsonl", n=20, seed=7, category=True)
    out = tmp_path / "eval"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignforge.cli",
            "rm",
            "eval",
            str(trained_rm),
            str(data),
            "--out",
            str(out),
            "--batch-size",
            "3",
            "--n-boot",
            "200",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["n_pairs"] == 20 and s["accuracy"] > 0.8  # held-out pairs of the training distribution
    assert s["accuracy_ci95"][0] <= s["accuracy"] <= s["accuracy_ci95"][1]
    assert set(s["by_category"]) == {"chat", "code"} and "mean" in s["rm_stats"]
    assert "accuracy:" in p.stdout and str(out / "summary.json") in p.stdout
    assert len(s["files"]["plots"]) == 4 and all((out / f).exists() for f in ("scores.jsonl", "score_hist.png"))
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [x["line"] for x in scores] == list(range(1, 21))
    assert np.mean([x["chosen"] > x["rejected"] for x in scores]) == pytest.approx(s["accuracy"])

    src = tmp_path / "gen.jsonl"
    src.write_text(json.dumps({"prompt": "Question 3: tell me about topic 4.", "completion": GOOD[2]}) + "\n")
    assert main(["rm", "score", str(trained_rm), str(src), str(tmp_path / "scored.jsonl"), "--normalize"]) == 0
    row = json.loads((tmp_path / "scored.jsonl").read_text())
    assert set(row) == {"prompt", "completion", "score", "score_normalized"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    assert main(["rm", "score", str(trained_rm), str(bad), str(tmp_path / "x.jsonl")]) == 2


def test_hh_untrained_rm_limit(tmp_path, shared_data, tiny_model_dir):
    from alignforge.cli import main

    hh = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    out = tmp_path / "hh"
    assert (
        main(
            [
                "rm",
                "eval",
                str(tiny_model_dir),
                str(hh),
                "--out",
                str(out),
                "--limit",
                "50",
                "--n-boot",
                "200",
                "--no-plots",
            ]
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["n_pairs"] == 50 and s["data_report"]["n_out"] == 50 and s["rm_stats"] == {}
    assert 0.0 <= s["accuracy"] <= 1.0 and s["accuracy_ci95"][0] <= s["accuracy"] <= s["accuracy_ci95"][1]
    assert sum(b["n"] for b in s["accuracy_by_length_bucket"]) == 50
    assert -1.0 <= s["length_correlation"]["spearman"] <= 1.0
    assert s["score_chosen"]["std"] > 0 and s["files"]["plots"] == []
