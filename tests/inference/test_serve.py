"""`alignforge serve`: the real uvicorn server in a thread on a free loopback port, called with httpx.

The tiny model runs in float64; the server's log-probs come from generate's float32 logits, so they agree
with a direct float64 forward to float32 rounding.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from alignforge.inference.generate import GenerationConfig, HFBackend
from alignforge.inference.serve import BackgroundServer, ChatEngine, build_app, token_bytes
from alignforge.models.loading import load_model, load_tokenizer

pytestmark = pytest.mark.timeout(120)

MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def lm_tok(tiny_model_dir):
    model = load_model(tiny_model_dir).double().eval()
    return model, load_tokenizer(tiny_model_dir, padding_side="left")


@pytest.fixture(scope="module")
def server(lm_tok):
    model, tok = lm_tok
    with BackgroundServer(build_app(ChatEngine(model, tok, "tiny"))) as srv:
        yield srv


def chat(srv, **body):
    body = {"model": "tiny", "messages": MSGS, **body}
    return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)


def direct(lm_tok, max_new_tokens, temperature=0.0, seed=0):
    model, tok = lm_tok
    backend = HFBackend(model, tok)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=1)
    return backend.generate_ids([MSGS], cfg)[0]


def test_models_endpoint(server):
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["tiny"]


def test_response_shape_and_usage_match_direct_generation(server, lm_tok):
    r = chat(server, max_tokens=12, temperature=0)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    (choice,) = body["choices"]
    g = direct(lm_tok, 12)
    assert choice["message"] == {"role": "assistant", "content": g.text}
    assert choice["finish_reason"] == ("stop" if g.finished else "length")
    assert choice["logprobs"] is None
    assert body["usage"] == {
        "prompt_tokens": len(g.prompt_ids),
        "completion_tokens": len(g.response_ids),
        "total_tokens": len(g.prompt_ids) + len(g.response_ids),
    }


def test_greedy_is_deterministic_and_max_completion_tokens_wins(server):
    a = chat(server, max_tokens=3, max_completion_tokens=10, temperature=0).json()
    b = chat(server, max_completion_tokens=10, temperature=0, seed=123).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"] == b["usage"]
    assert a["usage"]["completion_tokens"] == 10  # the tiny random model does not stop early
    assert a["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_the_raw_log_softmax_of_a_forward(server, lm_tok, temperature):
    model, tok = lm_tok
    r = chat(server, max_tokens=8, temperature=temperature, seed=5, logprobs=True, top_logprobs=5)
    assert r.status_code == 200
    content = r.json()["choices"][0]["logprobs"]["content"]
    g = direct(lm_tok, 8, temperature=temperature, seed=5)  # same seed: the same sample
    assert [c["token"] for c in content] == [tok.decode([t]) for t in g.response_ids]
    ids = torch.tensor([g.prompt_ids + g.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(g.prompt_ids) - 1 : -1]
    ref = torch.log_softmax(logits, dim=-1)  # temperature 1, whatever the sampling temperature
    got = torch.tensor([c["logprob"] for c in content], dtype=torch.float64)
    want = ref[torch.arange(len(g.response_ids)), torch.tensor(g.response_ids)]
    tol = 1e-6 * max(1.0, float(want.abs().max()))  # generate keeps its logits in float32
    assert torch.allclose(got, want, atol=tol, rtol=0)
    for j, c in enumerate(content):
        top = torch.topk(ref[j], 5)
        assert [t["logprob"] for t in c["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=tol)
        assert [t["token"] for t in c["top_logprobs"]] == [tok.decode([i]) for i in top.indices.tolist()]
        assert c["bytes"] == list(token_bytes(tok.convert_ids_to_tokens(g.response_ids[j])) or c["token"].encode())
    if temperature == 0:  # greedy picks the top token at every step
        assert all(c["logprob"] == c["top_logprobs"][0]["logprob"] for c in content)


def test_continue_final_message_continues_the_prefill(server, lm_tok):
    """vLLM's `continue_final_message`: the assistant pre-fill is left open and continued."""
    model, tok = lm_tok
    msgs = MSGS + [{"role": "assistant", "content": "Rating: [["}]
    r = chat(
        server, messages=msgs, continue_final_message=True, add_generation_prompt=False, max_tokens=4, temperature=0
    )
    assert r.status_code == 200, r.text
    body = r.json()
    backend = HFBackend(model, tok)
    ids = backend.render(msgs, continue_final_message=True)
    assert tok.decode(ids).endswith("Rating: [[")  # no end-of-turn after the pre-fill
    assert ids[: len(backend.render(MSGS))] == backend.render(MSGS)  # the user turn and the assistant header
    g = backend.generate_from_ids([ids], GenerationConfig(max_new_tokens=4, temperature=0, batch_size=1))[0]
    assert body["choices"][0]["message"]["content"] == g.text  # only the continuation
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_top_logprobs_zero_gives_empty_lists(server):
    content = chat(server, max_tokens=2, temperature=0, logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and all(c["top_logprobs"] == [] for c in content)


def test_stop_string_cuts_text_tokens_and_usage(server, lm_tok):
    g = direct(lm_tok, 16, temperature=1.0, seed=3)  # greedy repeats one token; a seeded sample varies
    full = g.text
    assert len(full.strip()) >= 6, f"the tiny model's answer is too short for this test: {full!r}"
    i = len(full) // 2
    stop = full[i : i + 2]
    cut = full.index(stop)
    body = chat(server, max_tokens=16, temperature=1.0, seed=3, stop=["never-appears", stop], logprobs=True).json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == full[:cut]
    assert choice["finish_reason"] == "stop"
    n = body["usage"]["completion_tokens"]
    assert n < len(g.response_ids)
    _, tok = lm_tok
    kept = tok.decode(g.response_ids[:n], skip_special_tokens=True)
    assert stop in kept and stop not in tok.decode(g.response_ids[: n - 1], skip_special_tokens=True)
    assert len(choice["logprobs"]["content"]) == n
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + n


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"n": 2}, 400, "n"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user"}]}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"temperature": "hot"}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"stop": [1]}, 400, "stop"),
        ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ({"top_logprobs": 3}, 400, "top_logprobs"),
        ({"stream": True}, 400, "stream"),
        ({"max_tokens": 5000}, 400, "messages"),  # past the tiny model's 1024-token context
        ({"model": "gpt-4"}, 404, "model"),
        ({"continue_final_message": "yes"}, 400, "continue_final_message"),
        ({"continue_final_message": True}, 400, "continue_final_message"),  # add_generation_prompt defaults to true
        ({"continue_final_message": True, "add_generation_prompt": False}, 400, "messages"),  # the last is a user turn
        ({"add_generation_prompt": False}, 400, "add_generation_prompt"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = chat(server, **body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_bad_json_is_a_400(server, raw):
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_is_json(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_api_key(lm_tok):
    model, tok = lm_tok
    with BackgroundServer(build_app(ChatEngine(model, tok, "tiny"), api_key="s3cret")) as srv:
        url = srv.url + "/v1/chat/completions"
        body = {"messages": MSGS, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(url, json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        ok = httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_internal_error_is_a_json_500_and_the_server_survives(lm_tok):
    model, tok = lm_tok

    class Broken(ChatEngine):
        def complete(self, body):
            if body.get("boom"):
                raise RuntimeError("kaput")
            return super().complete(body)

    with BackgroundServer(build_app(Broken(model, tok, "tiny"))) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSGS, "boom": True})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1})
        assert r.status_code == 200


def test_token_bytes():
    assert token_bytes("<0xE2>") == b"\xe2"
    assert token_bytes("âĢ") == "\u2014".encode()[:2]  # byte-level BPE for the first two bytes of an em dash
    assert token_bytes("Ġthe") == b" the"
    assert token_bytes("日本") is None  # not byte-level pieces (only used when decoding gave U+FFFD)


def test_cli_serve_missing_key_env_fails_cleanly(tiny_model_dir, monkeypatch, capsys):
    from alignforge.cli import main

    monkeypatch.delenv("AF_TEST_NO_SUCH_KEY", raising=False)
    assert main(["serve", str(tiny_model_dir), "--api-key-env", "AF_TEST_NO_SUCH_KEY"]) == 2
    assert "AF_TEST_NO_SUCH_KEY" in capsys.readouterr().err


def test_cli_serve_subprocess(tiny_model_dir, tmp_path):
    """`alignforge serve` as a real process: loads the model dir, binds loopback, needs the key."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AF_TEST_SERVE_KEY": "k-9", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "alignforge.cli", "serve", str(tiny_model_dir), "--port", str(port)]
    cmd += ["--api-key-env", "AF_TEST_SERVE_KEY", "--served-model-name", "judge-tiny", "--device", "cpu"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url, auth = f"http://127.0.0.1:{port}/v1", {"Authorization": "Bearer k-9"}
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                r = httpx.get(url + "/models", headers=auth, timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "judge-tiny"
        assert httpx.get(url + "/models").status_code == 401
        body = {"model": "judge-tiny", "messages": MSGS, "max_tokens": 3, "temperature": 0}
        r = httpx.post(url + "/chat/completions", json=body, headers=auth, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_requests_are_served_one_at_a_time(lm_tok):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    model, tok = lm_tok
    state = {"now": 0, "max": 0}
    guard = threading.Lock()

    class Tracking(ChatEngine):
        def complete(self, body):
            with guard:
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
            try:
                time.sleep(0.05)  # widen the window in which a second request could overlap
                return super().complete(body)
            finally:
                with guard:
                    state["now"] -= 1

    with BackgroundServer(build_app(Tracking(model, tok, "tiny"))) as srv:
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda i: chat(srv, max_tokens=2, seed=i).status_code, range(8)))
    assert codes == [200] * 8
    assert state["max"] == 1
