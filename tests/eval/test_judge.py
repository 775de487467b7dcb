"""The judge client against real local HTTP servers: `alignforge serve` on the tiny model, and a
misbehaving FastAPI app (500s, 429, timeouts, garbage) that counts every call it gets."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import defaultdict

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from alignforge.errors import ConfigError
from alignforge.eval.judge import (
    JudgeClient,
    LocalJudge,
    combine_swapped,
    parse_pairwise,
    parse_rating,
    parse_score_dict,
    request_key,
    summarize,
)
from alignforge.inference.serve import BackgroundServer, ChatEngine, build_app
from alignforge.models.loading import load_model, load_tokenizer

pytestmark = pytest.mark.timeout(120)


def req(text: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 4, **kw}


class Counting:
    """ASGI wrapper that counts HTTP requests."""

    def __init__(self, app):
        self.app = app
        self.hits = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.hits += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def lm_tok(tiny_model_dir):
    return load_model(tiny_model_dir).double().eval(), load_tokenizer(tiny_model_dir, padding_side="left")


@pytest.fixture(scope="module")
def tiny_server(lm_tok):
    app = Counting(build_app(ChatEngine(*lm_tok, "tiny")))
    with BackgroundServer(app) as srv:
        srv.app = app
        yield srv


# ----------------------------------------------------------------------------- a misbehaving server
def ok_body(text: str) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }


def flaky_app(scripts: dict[str, list[str]], calls: defaultdict, on_call=None) -> FastAPI:
    """Each request's user message picks a script; attempt k plays step k (the last step repeats)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = json.loads(await request.body())
        key = body["messages"][0]["content"]
        k = calls[key]
        calls[key] += 1
        if on_call is not None:
            on_call(key, body)
        script = scripts[key]
        step = script[min(k, len(script) - 1)]
        if step == "ok":
            return ok_body(f"answer to {key}")
        if step == "500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if step == "503-html":
            return PlainTextResponse("<html>bad gateway</html>", status_code=503)
        if step == "429":
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": "0"})
        if step == "400":
            return JSONResponse({"error": {"message": "messages are malformed"}}, status_code=400)
        if step == "sleep":
            await asyncio.sleep(1.5)
            return ok_body("too late")
        if step == "garbage":
            return PlainTextResponse("this is not json {", status_code=200)
        if step == "nochoices":
            return {"id": "x", "object": "chat.completion", "choices": []}
        raise AssertionError(step)

    return app


def test_retries_then_success_or_counted_failure(tmp_path):
    scripts = {
        "two-500s": ["500", "500", "ok"],
        "html-503": ["503-html", "ok"],
        "rate-limited": ["429", "429", "ok"],
        "slow-once": ["sleep", "ok"],
        "always-garbage": ["garbage"],
        "no-choices": ["nochoices"],
        "always-500": ["500"],
        "bad-request": ["400"],
        "fine": ["ok"],
    }
    calls: defaultdict = defaultdict(int)
    with BackgroundServer(flaky_app(scripts, calls)) as srv:
        client = JudgeClient(
            srv.url, "judge", concurrency=3, timeout=0.5, max_retries=3, backoff=0.01, cache_dir=tmp_path / "c"
        )
        results = client.complete([req(k) for k in scripts])
    by = {r.request["messages"][0]["content"]: r for r in results}
    assert list(by) == list(scripts)  # one result per request, in order
    for k in ("two-500s", "html-503", "rate-limited", "slow-once", "fine"):
        assert by[k].ok and by[k].text == f"answer to {k}", (k, by[k].error)
    assert by["two-500s"].attempts == 3 and by["rate-limited"].attempts == 3 and by["slow-once"].attempts == 2
    assert by["always-garbage"].error == "invalid JSON in a 200 response (after 4 attempts)"
    assert by["no-choices"].error == "a 200 response without choices[0].message.content (after 4 attempts)"
    assert by["always-500"].error == "HTTP 500 (after 4 attempts)"
    assert by["bad-request"].error == "HTTP 400: messages are malformed" and by["bad-request"].attempts == 1
    for k, r in by.items():  # the server saw exactly the attempts the client reports
        assert calls[k] == r.attempts, k
    s = summarize(results)
    assert (s["n"], s["ok"], s["failed"], s["cached"]) == (9, 5, 4, 0)
    assert sum(s["reasons"].values()) == 4
    assert s["usage"] == {"prompt_tokens": 50, "completion_tokens": 15, "total_tokens": 65}
    assert client.usage == s["usage"] and client.http_calls == sum(calls.values())
    # Failures are not cached: a rerun retries only them.
    calls.clear()
    with BackgroundServer(flaky_app({**scripts, "always-500": ["ok"]}, calls)) as srv:
        again = JudgeClient(srv.url, "judge", max_retries=0, cache_dir=tmp_path / "c").complete(
            [req(k) for k in scripts]
        )
    assert set(calls) == {"always-garbage", "no-choices", "always-500", "bad-request"}
    assert [r.cached for r in again] == [r.ok for r in results]
    assert again[list(scripts).index("always-500")].ok


def test_connection_refused_is_a_counted_failure(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    client = JudgeClient(f"http://127.0.0.1:{port}", "judge", max_retries=2, backoff=0.01, cache_dir=False)
    (r,) = client.complete([req("hello")])
    assert not r.ok and r.error.startswith("connection error") and r.attempts == 3


def test_cache_entries_are_written_as_each_call_returns(tmp_path):
    cache = tmp_path / "c"
    seen: list[int] = []
    calls: defaultdict = defaultdict(int)

    def on_call(key, body):
        seen.append(sum(1 for p in cache.rglob("*.json")) if cache.exists() else 0)

    keys = ["a", "b", "c"]
    with BackgroundServer(flaky_app(dict.fromkeys(keys, ["ok"]), calls, on_call)) as srv:
        JudgeClient(srv.url, "judge", concurrency=1, cache_dir=cache).complete([req(k) for k in keys])
    assert seen == [0, 1, 2]  # a run killed before the third call keeps the first two
    assert not list(cache.rglob("*.tmp"))
    entry = json.loads(next(cache.rglob(f"{request_key('judge', {'model': 'judge', **req('a')})}.json")).read_text())
    assert entry["response"]["choices"][0]["message"]["content"] == "answer to a"


# ----------------------------------------------------------------------------- against alignforge serve
def test_against_alignforge_serve_and_cache(tiny_server, lm_tok, tmp_path):
    requests = [req(f"question {i}", logprobs=True, top_logprobs=2) for i in range(5)]
    client = JudgeClient(tiny_server.url, "tiny", concurrency=3, cache_dir=tmp_path / "c")
    before = tiny_server.app.hits
    first = client.complete(requests)
    assert tiny_server.app.hits - before == 5
    assert all(r.ok and not r.cached for r in first)
    engine = ChatEngine(*lm_tok, "tiny")
    for r, q in zip(first, requests, strict=True):
        want = engine.complete({"model": "tiny", **q})
        assert r.text == want["choices"][0]["message"]["content"]
        assert r.usage == want["usage"]
        assert r.response["choices"][0]["logprobs"] == want["choices"][0]["logprobs"]
    s1 = summarize(first)
    assert s1["usage"]["total_tokens"] == sum(r.response["usage"]["total_tokens"] for r in first) > 0
    assert client.usage == s1["usage"]

    # Rerun: zero HTTP calls, the same answers, no tokens spent; the cache ignores the server address.
    before = tiny_server.app.hits
    elsewhere = JudgeClient("http://127.0.0.1:9/v1", "tiny", max_retries=0, cache_dir=tmp_path / "c")
    for c in (client, elsewhere):
        again = c.complete(requests)
        assert all(r.cached and r.attempts == 0 for r in again)
        assert [r.text for r in again] == [r.text for r in first]
        assert summarize(again)["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert tiny_server.app.hits == before
    assert client.usage == s1["usage"] and elsewhere.usage["total_tokens"] == 0

    # Another judge model name is another cache key.
    other = JudgeClient(tiny_server.url, "other-judge", max_retries=0, cache_dir=tmp_path / "c")
    (r,) = other.complete(requests[:1])
    assert not r.ok and r.error.startswith("HTTP 404") and tiny_server.app.hits == before + 1


def test_api_key(lm_tok, monkeypatch, tmp_path):
    app = Counting(build_app(ChatEngine(*lm_tok, "tiny"), api_key="k-123"))
    with BackgroundServer(app) as srv:
        monkeypatch.delenv("AF_JUDGE_KEY", raising=False)
        with pytest.raises(ConfigError, match="AF_JUDGE_KEY"):
            JudgeClient(srv.url, "tiny", api_key_env="AF_JUDGE_KEY", cache_dir=False)
        assert app.hits == 0
        monkeypatch.setenv("AF_JUDGE_KEY", "wrong")
        (r,) = JudgeClient(srv.url, "tiny", api_key_env="AF_JUDGE_KEY", cache_dir=False).complete([req("x")])
        assert r.error.startswith("HTTP 401") and r.attempts == 1
        monkeypatch.setenv("AF_JUDGE_KEY", "k-123")
        (r,) = JudgeClient(srv.url, "tiny", api_key_env="AF_JUDGE_KEY", cache_dir=False).complete([req("x")])
        assert r.ok and r.usage["completion_tokens"] == 4


def test_local_judge_matches_the_server(tiny_server, lm_tok):
    requests = [req("question 0"), req("question 1", max_tokens=6), {"messages": [], "max_tokens": 2}]
    local = LocalJudge(*lm_tok, model_name="tiny").complete(requests)
    remote = JudgeClient(tiny_server.url, "tiny", max_retries=0, cache_dir=False).complete(requests)
    assert [r.text for r in local[:2]] == [r.text for r in remote[:2]]
    assert [r.usage for r in local[:2]] == [r.usage for r in remote[:2]]
    assert not local[2].ok and "messages" in local[2].error
    assert not remote[2].ok and remote[2].error.startswith("HTTP 400")


def test_bad_request_list_is_refused_before_any_call(tiny_server):
    before = tiny_server.app.hits
    with pytest.raises(ConfigError, match="judge request 1"):
        JudgeClient(tiny_server.url, "tiny", cache_dir=False).complete([req("a"), {"prompt": "no messages"}])
    assert tiny_server.app.hits == before


# ----------------------------------------------------------------------------- parsers
@pytest.mark.parametrize(
    "text, want",
    [
        ("The answer is helpful and correct. Rating: [[8]]", 8.0),
        ("Rating: [[7.5]]", 7.5),
        ("Rating: [6]", 6.0),  # single-bracket fallback
        ("first [[3]] then [[9]]", 3.0),  # FastChat takes the first match
        ("[2] but finally [[5]]", 5.0),  # a double-bracket match wins over the fallback
        ("Rating: 8/10", None),
        ("Rating: [[eight]]", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_rating(text, want):
    assert parse_rating(text) == want


def test_parse_rating_bounds():
    assert parse_rating("[[11]]", bounds=(1, 10)) is None
    assert parse_rating("[[10]]", bounds=(1, 10)) == 10.0


@pytest.mark.parametrize(
    "text, want",
    [
        ("Assistant A is more accurate. [[A]]", "A"),
        ("Final verdict: [[B]]", "B"),
        ("Both are equally good: [[C]]", "tie"),
        ("[[A]] ... on reflection [[A]]", "A"),
        ("[[A]] or maybe [[B]]", None),  # two different verdicts: unparsable, not the first one
        ("Assistant A is better.", None),
        ("[A]", None),
        (None, None),
    ],
)
def test_parse_pairwise(text, want):
    assert parse_pairwise(text) == want


def test_combine_swapped():
    assert combine_swapped("A", "B") == "win"
    assert combine_swapped("B", "A") == "loss"
    assert combine_swapped("A", "A") == "tie"  # the judge followed the position: disagreement
    assert combine_swapped("tie", "B") == "tie"
    assert combine_swapped("tie", "tie") == "tie"
    assert combine_swapped(None, "B") is None


@pytest.mark.parametrize(
    "text, want",
    [
        (
            "理由……\n{'事实正确性': 7, '满足用户需求': 6, '综合得分': 6}",
            {"事实正确性": 7.0, "满足用户需求": 6.0, "综合得分": 6.0},
        ),
        ('The example {"a": 1} first, then {"clarity": 8, "overall": 7.5}', {"clarity": 8.0, "overall": 7.5}),
        ("{'逻辑连贯性'：8，'综合得分'：7}", {"逻辑连贯性": 8.0, "综合得分": 7.0}),  # full-width colon and comma
        ("{'overall': 'good', 'score': 4}", {"score": 4.0}),
        ("{'overall': 'good'}", None),
        ("no dict here, overall 7", None),
        ("{}", None),
        ("", None),
    ],
)
def test_parse_score_dict(text, want):
    assert parse_score_dict(text) == want
