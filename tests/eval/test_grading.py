"""`eval judge` against real HTTP judges: `alignforge serve` on the tiny model, and a scripted FastAPI
judge (tests/eval/judge_scripted.py) whose answers make the scores checkable by hand."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from alignforge.cli import main
from alignforge.errors import ConfigError, DataError
from alignforge.eval.grading import (
    alignbench_overall,
    make_judge,
    read_judge_rows,
    run_judge,
    verdict_probs,
)
from alignforge.eval.judge import JudgeClient
from alignforge.eval.stats import bootstrap_ci
from alignforge.inference.serve import BackgroundServer, ChatEngine, build_app
from alignforge.models.loading import load_model, load_tokenizer

pytestmark = pytest.mark.timeout(180)

_spec = importlib.util.spec_from_file_location("judge_scripted", Path(__file__).with_name("judge_scripted.py"))
judge_scripted = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(judge_scripted)
row, scripted_app, write_rows = judge_scripted.row, judge_scripted.scripted_app, judge_scripted.write_rows


class Counting:
    def __init__(self, app):
        self.app, self.hits = app, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.hits += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def scripted():
    log: list = []
    app = Counting(scripted_app(log))
    with BackgroundServer(app) as srv:
        srv.app, srv.log = app, log
        yield srv


@pytest.fixture(scope="module")
def mtbench_dir(shared_data):
    d = shared_data / "mt-bench"
    if not (d / "judge_prompts.jsonl").is_file():
        pytest.skip("mt-bench data not present")
    return d


@pytest.fixture(scope="module")
def alignbench_dir(shared_data):
    d = shared_data / "alignbench"
    if not (d / "config" / "dimension_set.json").is_file():
        pytest.skip("alignbench data not present")
    return d


def client(srv, tmp_path, **kw):
    return JudgeClient(srv.url, "scripted", cache_dir=tmp_path / "cache", **kw)


MT_ROWS = [
    row(81, "writing", "Write a poem.", "Now shorter.", responses=["ANS-7", "ANS-9"]),
    row(82, "writing", "Write a story.", "Now longer.", responses=["ANS-5", "ANS-bad"]),
    row(101, "math", "What is 2+2?", "And 3+3?", responses=["ANS-3", "ANS-fail"]),
    row(102, "math", "What is 5*5?", "And 6*6?", responses=["ANS-8", "ANS-4"]),
]


# ----------------------------------------------------------------------------- MT-Bench
def test_mtbench_known_ratings_give_known_means(scripted, mtbench_dir, tmp_path):
    f = write_rows(tmp_path / "a.jsonl", MT_ROWS)
    scripted.log.clear()
    rep = run_judge(f, "mtbench", client(scripted, tmp_path), mtbench_dir, max_tokens=64, n_resamples=999)
    w, m = rep["categories"]["writing"], rep["categories"]["math"]
    # writing: turn 1 of 81 (7), turn 2 of 81 (9), turn 1 of 82 (5); turn 2 of 82 unparsable
    assert (w["n"], w["scored"], w["unparsable"], w["failed"]) == (4, 3, 1, 0)
    assert w["mean"] == pytest.approx(7.0)
    assert w["ci"] == pytest.approx(list(bootstrap_ci([7, 9, 5], n_resamples=999)))
    # math: 3, (failed), 8, 4
    assert (m["n"], m["scored"], m["unparsable"], m["failed"]) == (4, 3, 0, 1)
    assert m["mean"] == pytest.approx(5.0)
    assert rep["overall"]["mean"] == pytest.approx(6.0)
    assert (rep["overall"]["unparsable"], rep["overall"]["failed"]) == (1, 1)
    assert rep["turns"]["1"]["mean"] == pytest.approx((7 + 5 + 3 + 8) / 4)
    assert rep["turns"]["2"]["mean"] == pytest.approx((9 + 4) / 2)
    failed = [it for it in rep["items"] if it["status"] == "failed"]
    assert failed[0]["id"] == "101" and failed[0]["score"] is None and "scripted failure" in failed[0]["error"]
    # usage: 7 successful calls of 105 tokens each (the failure has no usage)
    assert rep["calls"]["usage"]["total_tokens"] == 7 * 105
    # the prompts: math gets the -math- prompt with GPT-4's reference answer; turn 2 the multi-turn one
    refs = {
        json.loads(x)["question_id"]: json.loads(x)["choices"][0]["turns"]
        for x in (mtbench_dir / "mt_bench" / "reference_answer" / "gpt-4.jsonl").read_text().splitlines()
    }
    sent = [r["messages"][-1]["content"] for r in scripted.log]
    math1 = [s for s in sent if "ANS-3" in s and "ANS-fail" not in s]
    assert len(math1) == 1 and refs[101][0] in math1[0] and "[The Start of Reference Answer]" in math1[0]
    math2 = [s for s in sent if "ANS-fail" in s][0]
    assert refs[101][1] in math2 and "### Reference answer:" in math2 and "And 3+3?" in math2
    writing1 = [s for s in sent if "ANS-7" in s and "ANS-9" not in s][0]
    assert "Reference" not in writing1 and "[Question]\nWrite a poem." in writing1
    assert all(r["temperature"] == 0 for r in scripted.log)


def test_mtbench_rating_logprobs_expected_ratings(scripted, mtbench_dir, tmp_path):
    rows = [
        row(81, "writing", "Write a poem.", "Now shorter.", responses=["ANS-7", "ANS-ten"]),
        row(82, "writing", "Write a story.", responses=["ANS-bad"]),
    ]
    f = write_rows(tmp_path / "a.jsonl", rows)
    scripted.log.clear()
    rep = run_judge(
        f, "mtbench", client(scripted, tmp_path), mtbench_dir, max_tokens=64, n_resamples=99, rating_logprobs=True
    )
    sent = scripted.log
    assert len(sent) == 3
    for r in sent:  # the answer is pre-filled and continued, 2 tokens with their candidates
        assert r["messages"][-1] == {"role": "assistant", "content": "Rating: [["}
        assert r["continue_final_message"] is True and r["add_generation_prompt"] is False
        assert (r["max_tokens"], r["logprobs"], r["top_logprobs"]) == (2, True, 20)
    by = {(it["id"], it["turn"]): it for it in rep["items"]}
    # "7": P(7)=.6, P(8)=.2, P(6)=.1 of a .9 rating mass -> (4.2 + 1.6 + .6) / .9
    assert by[("81", 1)]["score"] == pytest.approx(6.4 / 0.9)
    assert by[("81", 1)]["rating_probs"]["mass"] == pytest.approx(0.9)
    # "ten": P("1")=.8 split by P("0" next)=.75 into P(10)=.6, P(1)=.2; P(9)=.2 -> 6 + .2 + 1.8
    assert by[("81", 2)]["score"] == pytest.approx(8.0)
    assert by[("81", 2)]["rating_probs"]["probs"] == pytest.approx({1: 0.2, 9: 0.2, 10: 0.6})
    assert by[("82", 1)]["score"] is None and by[("82", 1)]["status"] == "unparsable"
    assert rep["overall"]["mean"] == pytest.approx((6.4 / 0.9 + 8.0) / 2)
    assert rep["rating_logprobs"] == {"with_rating": 2, "rating_mass": pytest.approx((0.9 + 1.0) / 2)}
    with pytest.raises(ConfigError, match="only for --mode mtbench"):
        run_judge(f, "alignbench", client(scripted, tmp_path), mtbench_dir, rating_logprobs=True)


def test_mtbench_rating_logprobs_through_serve_equal_a_direct_forward(tiny_model_dir, mtbench_dir, tmp_path):
    """A real `alignforge serve` judge: the served probabilities after "Rating: [[" are the tiny
    model's own next-token distribution there, and the score is what rating_probs makes of them."""
    import torch

    from alignforge.eval.grading import load_judge_prompts, load_mtbench_references, mtbench_requests
    from alignforge.eval.judge import rating_probs
    from alignforge.inference.generate import render_prompt

    lm = load_model(tiny_model_dir).double().eval()
    tok = load_tokenizer(tiny_model_dir, padding_side="left")
    f = write_rows(tmp_path / "a.jsonl", [row(1, "writing", "Hi", responses=["Hello there"])])
    with BackgroundServer(build_app(ChatEngine(lm, tok, "tiny"))) as srv:
        judge = JudgeClient(srv.url, "tiny", cache_dir=tmp_path / "c")
        rep = run_judge(f, "mtbench", judge, mtbench_dir, n_resamples=99, rating_logprobs=True)
    (req,) = [
        r
        for _, _, r in mtbench_requests(
            read_judge_rows(f), load_judge_prompts(mtbench_dir), load_mtbench_references(mtbench_dir), 8, True
        )
    ]
    ids = render_prompt(tok, req["messages"], continue_final_message=True)
    assert tok.decode(ids).endswith("Rating: [[")  # the pre-fill is left open, no end of turn after it
    with torch.no_grad():
        lp = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0, -1], dim=-1)
    top = torch.topk(lp, 20)
    served = ChatEngine(lm, tok, "tiny").complete({**req, "model": "tiny"})
    first = served["choices"][0]["logprobs"]["content"][0]
    assert [c["token"] for c in first["top_logprobs"]] == [tok.decode([int(i)]) for i in top.indices]
    assert [c["logprob"] for c in first["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    (it,) = rep["items"]
    want = rating_probs(served)
    if want is None:  # no rating token among the top 20: counted, not scored
        assert it["rating_probs"] is None and it["status"] == "unparsable"
    else:
        got = it["rating_probs"]
        assert got["probs"] == pytest.approx(want["probs"]) and got["mass"] == pytest.approx(want["mass"])
        assert it["status"] == "ok" and it["score"] == pytest.approx(want["expected"])


def test_cache_makes_a_rerun_free(scripted, mtbench_dir, tmp_path):
    f = write_rows(tmp_path / "a.jsonl", MT_ROWS)
    first = run_judge(f, "mtbench", client(scripted, tmp_path), mtbench_dir, max_tokens=64, n_resamples=99)
    hits = scripted.app.hits
    again = run_judge(f, "mtbench", client(scripted, tmp_path), mtbench_dir, max_tokens=64, n_resamples=99)
    # only the failed item is asked again (failures are not cached)
    assert scripted.app.hits == hits + 1
    assert again["calls"]["cached"] == 7 and again["calls"]["usage"]["total_tokens"] == 0
    assert again["categories"] == first["categories"]


def test_failing_endpoint_items_are_counted_not_scored(mtbench_dir, tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    f = write_rows(tmp_path / "a.jsonl", MT_ROWS[:2])
    judge = JudgeClient(f"http://127.0.0.1:{port}", "x", cache_dir=False, max_retries=1, backoff=0.01)
    rep = run_judge(f, "mtbench", judge, mtbench_dir, max_tokens=8, n_resamples=99)
    w = rep["categories"]["writing"]
    assert (w["n"], w["scored"], w["failed"], w["mean"], w["ci"]) == (4, 0, 4, None, None)
    assert rep["overall"]["mean"] is None and rep["calls"]["failed"] == 4
    assert all(it["score"] is None and "connection error" in it["error"] for it in rep["items"])


def test_real_serve_judge_and_cli(tiny_model_dir, mtbench_dir, tmp_path):
    """The judge is the tiny model behind the real `alignforge serve` app; its answers are parsed (a
    135M or tiny judge rarely writes [[x]]: such answers are unparsable, counted, not scored)."""
    lm = load_model(tiny_model_dir).double().eval()
    tok = load_tokenizer(tiny_model_dir, padding_side="left")
    engine = ChatEngine(lm, tok, "tiny")
    app = Counting(build_app(engine))
    rows = [row(1, "writing", "Hi", responses=["Hello there"]), row(2, "stem", "Why?", responses=["Because."])]
    f = write_rows(tmp_path / "a.jsonl", rows)
    out = tmp_path / "rep.json"
    with BackgroundServer(app) as srv:
        argv = [
            "eval",
            "judge",
            f,
            "--mode",
            "mtbench",
            "--data",
            str(mtbench_dir),
            "--judge-url",
            srv.url,
            "--judge-model",
            "tiny",
            "--cache",
            str(tmp_path / "c"),
            "--max-tokens",
            "6",
            "--out",
            str(out),
            "--n-resamples",
            "99",
        ]
        assert main(argv) == 0
        assert app.hits == 2
        rep = json.loads(out.read_text())
        assert rep["calls"]["n"] == 2 and rep["calls"]["failed"] == 0
        assert rep["calls"]["usage"]["completion_tokens"] > 0
        for it in rep["items"]:
            assert it["status"] in ("ok", "unparsable")
            assert (it["score"] is None) == (it["status"] == "unparsable")
        # the judgment is what the served model answers to the same request
        from alignforge.eval.grading import load_judge_prompts, load_mtbench_references, mtbench_requests

        reqs = mtbench_requests(
            read_judge_rows(f), load_judge_prompts(mtbench_dir), load_mtbench_references(mtbench_dir), 6
        )
        direct = engine.complete({**reqs[0][2], "model": "tiny"})["choices"][0]["message"]["content"]
        assert rep["items"][0]["judgment"] == direct
        assert main(argv) == 0  # rerun: all cached
        assert app.hits == 2
        assert json.loads(out.read_text())["calls"]["cached"] == 2


# ----------------------------------------------------------------------------- AlignBench
def test_alignbench_dimensions_and_overall(scripted, alignbench_dir, tmp_path):
    rows = [
        row(1, "专业能力", "q1", responses=["ANS-ab-6"], reference="ref one"),  # 音乐: 事实与解释型回答
        row(2, "专业能力", "q2", responses=["ANS-abnone"], reference="ref two"),  # unparsable
        row(397, "文本写作", "q397", responses=["ANS-ab-8"], reference="r"),  # 创意文体写作: 生成型回答
        row(125, "数学计算", "q125", responses=["ANS-ab-4"], reference="r"),
        row(305, "逻辑推理", "q305", responses=["ANS-ab-2"], reference="r"),
    ]
    f = write_rows(tmp_path / "a.jsonl", rows)
    scripted.log.clear()
    rep = run_judge(f, "alignbench", client(scripted, tmp_path), alignbench_dir, max_tokens=64, n_resamples=99)
    c = rep["categories"]
    assert c["专业能力"]["mean"] == 6 and (c["专业能力"]["scored"], c["专业能力"]["unparsable"]) == (1, 1)
    o = rep["overall"]
    assert o["language"] == pytest.approx(7.0) and o["reasoning"] == pytest.approx(3.0)
    assert o["overall"] == pytest.approx(5.0) and o["unparsable"] == 1
    assert rep["dimensions"]["事实正确性"] == pytest.approx((6 + 8 + 4 + 2) / 4)
    systems = {
        r["messages"][-1]["content"].split("ANS-")[1].split("\n")[0]: r["messages"][0]["content"] for r in scripted.log
    }
    assert "清晰度" in systems["ab-6"] and "创造性" not in systems["ab-6"]  # fact/explanation dimensions
    assert "创造性" in systems["ab-8"] and "丰富度" in systems["ab-8"]  # generation dimensions
    assert "逻辑连贯性" in systems["ab-4"]
    assert (
        "ref one" in [r["messages"][-1]["content"] for r in scripted.log if "ab-6" in r["messages"][-1]["content"]][0]
    )


def test_alignbench_overall_groups():
    assert alignbench_overall({"数学计算": 2.0, "逻辑推理": 4.0, "写作": 9.0}) == {
        "reasoning": 3.0,
        "language": 9.0,
        "overall": 6.0,
    }
    assert alignbench_overall({"写作": 9.0})["overall"] is None


# ----------------------------------------------------------------------------- pairwise
def pair_files(tmp_path):
    a = [
        row(1, "c1", "q", responses=["ANS-good1"]),
        row(2, "c1", "q", responses=["ANS-bad2"]),
        row(3, "c2", "q", responses=["ANS-posbias-a"]),
        row(4, "c2", "q", responses=["ANS-same"]),
        row(5, "c2", "q", responses=["ANS-unparse"]),
    ]
    b = [
        row(5, "c2", "q", responses=["ANS-x5"]),
        row(1, "c1", "q", responses=["ANS-bad1"]),
        row(2, "c1", "q", responses=["ANS-good2"]),
        row(3, "c2", "q", responses=["ANS-posbias-b"]),
        row(4, "c2", "q", responses=["ANS-same"]),
    ]
    return write_rows(tmp_path / "a.jsonl", a), write_rows(tmp_path / "b.jsonl", b)


def test_pairwise_swapped_and_inconsistent_is_tie(scripted, mtbench_dir, tmp_path):
    fa, fb = pair_files(tmp_path)
    rep = run_judge(fa, "pairwise", client(scripted, tmp_path), mtbench_dir, against=fb, n_resamples=99)
    by_id = {it["id"]: it for it in rep["items"]}
    assert by_id["1"]["outcome"] == "win" and by_id["1"]["verdicts"] == ["A", "B"]
    assert by_id["2"]["outcome"] == "loss"
    assert by_id["3"]["outcome"] == "tie" and by_id["3"]["verdicts"] == ["A", "A"]  # position bias
    assert by_id["4"]["outcome"] == "tie"
    assert by_id["5"]["outcome"] is None and by_id["5"]["status"] == "unparsable"
    o = rep["overall"]
    assert (o["win"], o["tie"], o["loss"], o["unparsable"], o["scored"]) == (1, 2, 1, 1, 4)
    assert o["win_rate_adjusted"]["value"] == pytest.approx(0.5)
    assert rep["categories"]["c2"]["unparsable"] == 1 and rep["categories"]["c1"]["tie"] == 0
    assert rep["calls"]["n"] == 10


def test_pairwise_logprob_verdict(scripted, mtbench_dir, tmp_path):
    fa, fb = pair_files(tmp_path)
    rep = run_judge(
        fa, "pairwise", client(scripted, tmp_path), mtbench_dir, against=fb, logprob_verdict=True, n_resamples=99
    )
    by_id = {it["id"]: it for it in rep["items"]}
    # id 1: game 1 P(A)=.7, P(C)=.1; game 2 (swapped) P(B)=.7, P(C)=.1 -> .5*(.7+.05) + .5*(.7+.05)
    assert by_id["1"]["p_a_better"] == pytest.approx(0.75)
    # id 3: both games say A with .7: A's answer is named in game 1 only -> .5*(.75) + .5*(.2+.05)
    assert by_id["3"]["p_a_better"] == pytest.approx(0.5)
    assert by_id["5"]["p_a_better"] is None
    assert rep["logprob_verdict"]["with_logprobs"] == 4 and rep["logprob_verdict"]["without"] == 1
    assert verdict_probs({"choices": [{"message": {"content": "x"}}]}) is None
    p = verdict_probs(
        {
            "choices": [
                {
                    "logprobs": {
                        "content": [
                            {"token": "[", "top_logprobs": []},
                            {"token": "[", "top_logprobs": []},
                            {
                                "token": "B",
                                "top_logprobs": [
                                    {"token": "B", "logprob": math.log(0.3)},
                                    {"token": "A", "logprob": math.log(0.1)},
                                ],
                            },
                        ]
                    }
                }
            ]
        }
    )
    assert p == pytest.approx({"A": 0.25, "B": 0.75, "C": 0.0})


# ----------------------------------------------------------------------------- bad input
def test_bad_input(scripted, mtbench_dir, tmp_path, monkeypatch, capsys):
    fa, fb = pair_files(tmp_path)
    judge = client(scripted, tmp_path)
    with pytest.raises(ConfigError, match="unknown judge mode 'elo'"):
        run_judge(fa, "elo", judge, mtbench_dir)
    assert (
        main(
            [
                "eval",
                "judge",
                fa,
                "--mode",
                "elo",
                "--data",
                str(mtbench_dir),
                "--judge-url",
                scripted.url,
                "--judge-model",
                "s",
                "--out",
                str(tmp_path / "o.json"),
            ]
        )
        == 2
    )
    assert "unknown --mode 'elo'" in capsys.readouterr().err
    # missing ids in B
    short = write_rows(tmp_path / "short.jsonl", [row(1, "c1", "q", responses=["ANS-bad1"])])
    hits = scripted.app.hits
    with pytest.raises(DataError, match=r"short\.jsonl: field 'id': 4 id\(s\) of .*a\.jsonl are not in this file: '2'"):
        run_judge(fa, "pairwise", judge, mtbench_dir, against=short)
    # a malformed file: file:line
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row(1, "c", "q", responses=["x"])) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        run_judge(bad, "mtbench", judge, mtbench_dir)
    bad.write_text(json.dumps(row(1, "c", "q", responses=["x"])) + "\n" + json.dumps({"id": 2, "response": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'response'"):
        run_judge(bad, "mtbench", judge, mtbench_dir)
    bad.write_text(json.dumps(row(1, "c", "q", "q2", responses=["x"])) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'responses': 1 responses for 2 user turns"):
        run_judge(bad, "mtbench", judge, mtbench_dir)
    assert scripted.app.hits == hits
    # an unset API key env var: an error before any request
    monkeypatch.delenv("AF_TEST_NO_KEY", raising=False)
    with pytest.raises(ConfigError, match="AF_TEST_NO_KEY"):
        make_judge(scripted.url, "s", api_key_env="AF_TEST_NO_KEY")
    rc = main(
        [
            "eval",
            "judge",
            fa,
            "--mode",
            "mtbench",
            "--data",
            str(mtbench_dir),
            "--judge-url",
            scripted.url,
            "--judge-model",
            "s",
            "--api-key-env",
            "AF_TEST_NO_KEY",
            "--out",
            str(tmp_path / "o.json"),
        ]
    )
    assert rc == 2 and "AF_TEST_NO_KEY" in capsys.readouterr().err
    assert scripted.app.hits == hits
    with pytest.raises(ConfigError, match="needs --against"):
        run_judge(fa, "pairwise", judge, mtbench_dir)
    with pytest.raises(ConfigError, match="a judge is needed"):
        make_judge(None, None)


def test_local_judge(tiny_model_dir, mtbench_dir, tmp_path):
    from alignforge.eval.judge import LocalJudge

    judge = make_judge(None, None, local_judge=str(tiny_model_dir))
    assert isinstance(judge, LocalJudge)
    f = write_rows(tmp_path / "a.jsonl", [row(1, "writing", "Hi", responses=["Hello there"])])
    rep = run_judge(f, "mtbench", judge, mtbench_dir, max_tokens=4, n_resamples=99)
    assert rep["calls"]["n"] == 1 and rep["calls"]["failed"] == 0 and rep["calls"]["usage"]["completion_tokens"] > 0
    assert rep["items"][0]["status"] in ("ok", "unparsable") and rep["items"][0]["judgment"] is not None
