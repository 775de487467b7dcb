"""An OpenAI-compatible chat server over any model alignforge loads (``alignforge serve``).

:class:`ChatEngine` turns an OpenAI ``/v1/chat/completions`` request body into a response body on
an :class:`~alignforge.inference.generate.HFBackend` (chat template, greedy when ``temperature`` is
0); it needs no web stack, so the in-process judge (``eval.judge.LocalJudge``) uses it too.
:func:`build_app` puts it behind FastAPI (the ``serve`` extra), one request at a time.

Conventions (where OpenAI leaves room):

* ``logprobs`` are the log-softmax of the model's raw scores (temperature 1, no top-p) at each
  returned token, whatever the sampling settings, kept from the generation's own forwards
  (``output_logits``, which transformers keeps in float32), so a logprobs request costs no extra
  forward.
* ``stop`` strings are applied after generation: the text is cut before the first stop string, and
  the returned tokens (usage, logprobs) end with the token in which that string completed.
* A response that ends with EOS has ``finish_reason`` ``"stop"``; the EOS token is counted in
  ``usage.completion_tokens`` and listed in ``logprobs`` (its text is not in ``content``).
* ``n`` must be 1; ``stream`` and non-zero penalties are not supported; a ``model`` other than the
  served name is a 404 (a request without ``model`` is served). Roles: system, user, assistant, and
  developer (rendered as system); content is a string or a list of text parts.
* vLLM's extra parameters ``continue_final_message: true`` with ``add_generation_prompt: false``
  continue the last message, which must be an assistant one (a pre-filled answer such as
  ``"Rating: [["``, used by ``eval judge --rating-logprobs``); the returned ``content`` is only the
  continuation, as in vLLM.
"""

import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from alignforge.errors import AlignforgeError, ConfigError

MAX_TOP_LOGPROBS = 20


class RequestError(AlignforgeError):
    """A request the server refuses: ``status`` (400, 401, 404) and an OpenAI error ``type``."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


# ----------------------------------------------------------------------------- request parsing
@dataclass
class ChatRequest:
    """A validated chat-completion request."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    logprobs: bool
    top_logprobs: int
    continue_final_message: bool = False  # vLLM's extra parameter: continue the last (assistant) message


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"'{key}' must be a number, got {v!r}", param=key)
    if v < lo or v > hi or (lo_open and v == lo):
        raise RequestError(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", param=key)
    return float(v)


def _integer(body: dict, key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"'{key}' must be an integer, got {v!r}", param=key)
    return v


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # OpenAI content parts: only text parts are served
        parts = []
        for p in c:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise RequestError(f"messages[{i}].content: only text parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string, got {type(c).__name__}", param="messages")


def parse_request(body: Any, default_max_tokens: int = 256) -> ChatRequest:
    """Validate an OpenAI chat-completion body; raises :class:`RequestError` (400) naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
        if m["role"] not in ("system", "user", "assistant", "developer"):
            raise RequestError(f"messages[{i}].role {m['role']!r} is not supported", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        messages.append({"role": role, "content": _content(m, i)})
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise RequestError(f"only n=1 is supported, got n={n}", param="n")
    if body.get("stream"):
        raise RequestError("streaming is not supported", param="stream")
    mt = _integer(body, "max_completion_tokens")
    mt = _integer(body, "max_tokens") if mt is None else mt
    mt = default_max_tokens if mt is None else mt
    if mt < 1:
        raise RequestError(f"max_tokens must be >= 1, got {mt}", param="max_tokens")
    seed = _integer(body, "seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    lp = body.get("logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise RequestError(f"'logprobs' must be a boolean, got {lp!r}", param="logprobs")
    top = _integer(body, "top_logprobs")
    if top is not None:
        if not lp:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise RequestError(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs")
    cont = body.get("continue_final_message", False)
    agp = body.get("add_generation_prompt", True)
    for key, v in (("continue_final_message", cont), ("add_generation_prompt", agp)):
        if not isinstance(v, bool):
            raise RequestError(f"'{key}' must be a boolean, got {v!r}", param=key)
    if cont and agp:  # vLLM's rule
        raise RequestError(
            "'continue_final_message' needs 'add_generation_prompt': false", param="continue_final_message"
        )
    if not agp and not cont:
        raise RequestError(
            "'add_generation_prompt': false is only supported with 'continue_final_message': true",
            param="add_generation_prompt",
        )
    if cont and messages[-1]["role"] != "assistant":
        raise RequestError(
            f"'continue_final_message' needs an assistant message last, got {messages[-1]['role']!r}",
            param="messages",
        )
    for pen in ("presence_penalty", "frequency_penalty"):
        if _number(body, pen, 0.0, -2.0, 2.0) != 0:
            raise RequestError(f"'{pen}' is not supported (only 0)", param=pen)
    return ChatRequest(
        messages=messages,
        max_tokens=mt,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=0 if seed is None else seed,
        stop=stop,
        logprobs=bool(lp),
        top_logprobs=top or 0,
        continue_final_message=cont,
    )


# ----------------------------------------------------------------------------- the engine
class ChatEngine:
    """OpenAI chat completions on a local model. ``complete`` is not thread-safe (the server locks)."""

    def __init__(self, model: Any, tokenizer: Any, model_name: str, default_max_tokens: int = 256):
        from alignforge.inference.generate import HFBackend

        self.backend = HFBackend(model, tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.max_context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.created = int(time.time())

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "alignforge"}],
        }

    def complete(self, body: Any) -> dict[str, Any]:
        """A response body for a request body (a dict); raises :class:`RequestError` on a bad request."""
        from alignforge.inference.generate import GenerationConfig

        req = parse_request(body, self.default_max_tokens)
        name = body.get("model")
        if name is not None and name != self.model_name:
            raise RequestError(
                f"model {name!r} is not served here (this server serves {self.model_name!r})", status=404, param="model"
            )
        prompt = self.backend.render(req.messages, req.continue_final_message)
        if self.max_context and len(prompt) + req.max_tokens > self.max_context:
            raise RequestError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({req.max_tokens}) exceeds the model's "
                f"context of {self.max_context} tokens",
                param="messages",
            )
        cfg = GenerationConfig(
            max_new_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            batch_size=1,
            return_logits=req.logprobs,
        )
        g = self.backend.generate_from_ids([prompt], cfg)[0]
        ids, text = list(g.response_ids), g.text
        finish = "stop" if g.finished else "length"
        if req.stop:
            cut = self._apply_stop(ids, req.stop)
            if cut is not None:
                ids, text = cut
                finish = "stop"
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        if req.logprobs:
            choice["logprobs"] = {"content": self.token_logprobs(prompt, ids, req.top_logprobs, g.logits)}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(ids),
                "total_tokens": len(prompt) + len(ids),
            },
        }

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _apply_stop(self, ids: list[int], stops: list[str]) -> tuple[list[int], str] | None:
        """The shortest token prefix whose text holds a stop string, and the text cut before it."""
        full = self._decode(ids)
        if not any(s in full for s in stops):
            return None
        for k in range(1, len(ids) + 1):
            text = self._decode(ids[:k])
            hits = [text.find(s) for s in stops if s in text]
            if hits:
                return ids[:k], text[: min(hits)]
        return None  # pragma: no cover - the full text held a stop string

    def token_logprobs(self, prompt: list[int], ids: list[int], top: int, logits: Any = None) -> list[dict[str, Any]]:
        """OpenAI ``logprobs.content`` for ``ids`` after ``prompt``: the log-softmax of the model's raw
        logits at each token, ``logits`` ([>= len(ids), vocab], kept by the generation itself), else
        from one forward over prompt + ids."""
        import torch

        from alignforge.inference.kvcache import model_device

        if not ids:
            return []
        if logits is not None:
            logits = logits[: len(ids)]
        else:
            device = model_device(self.model)
            x = torch.tensor([prompt + ids], dtype=torch.long, device=device)
            was_training = getattr(self.model, "training", False)
            self.model.eval()
            try:
                with torch.no_grad():
                    logits = self.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]
            finally:
                self.model.train(was_training)
            logits = logits[len(prompt) - 1 : len(prompt) + len(ids) - 1]
        if logits.dtype != torch.float64:
            logits = logits.float()
        lp = torch.log_softmax(logits, dim=-1)
        chosen = lp[torch.arange(len(ids), device=lp.device), torch.tensor(ids, device=lp.device)].tolist()
        tops = torch.topk(lp, top, dim=-1) if top else None
        out = []
        for j, t in enumerate(ids):
            entry = self._token_entry(t, chosen[j])
            entry["top_logprobs"] = (
                [
                    self._token_entry(int(i), float(v))
                    for v, i in zip(tops.values[j].tolist(), tops.indices[j].tolist(), strict=True)
                ]
                if tops is not None
                else []
            )
            out.append(entry)
        return out

    def _token_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        s = self.tokenizer.decode([token_id])
        raw = token_bytes(self.tokenizer.convert_ids_to_tokens(token_id)) if "\ufffd" in s else None
        return {"token": s, "logprob": logprob, "bytes": list(raw if raw is not None else s.encode("utf-8"))}


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
    bs += list(range(ord("\xae"), ord("\xff") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_LEVEL = _byte_level_table()


def token_bytes(piece: str) -> bytes | None:
    """The raw bytes of a token that is only part of a UTF-8 character: a SentencePiece byte token
    (``<0xE2>``) or a byte-level BPE piece (``âĢ``); ``None`` when ``piece`` is neither."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    if piece and all(ch in _BYTE_LEVEL for ch in piece):
        return bytes(_BYTE_LEVEL[ch] for ch in piece)
    return None


# ----------------------------------------------------------------------------- the web app
def _web() -> tuple[Any, Any]:
    try:
        import fastapi
        import uvicorn
    except ImportError as e:  # pragma: no cover - the extra is installed in dev
        raise ConfigError("alignforge serve needs FastAPI and uvicorn: pip install 'alignforge[serve]'") from e
    return fastapi, uvicorn


def build_app(engine: ChatEngine, api_key: str | None = None) -> Any:
    """A FastAPI app with ``GET /v1/models`` and ``POST /v1/chat/completions`` over ``engine``.

    Requests run one at a time (a lock around the model). With ``api_key``, every request needs
    ``Authorization: Bearer <api_key>`` (else 401). Errors are OpenAI-style JSON, never a traceback.
    """
    fastapi, _ = _web()
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    # No ``from __future__ import annotations`` in this module: FastAPI reads the ``Request``
    # annotations below at runtime, and fastapi is imported lazily.
    app = fastapi.FastAPI(title="alignforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()

    def error(e: RequestError) -> Any:
        return JSONResponse(e.body(), status_code=e.status)

    def check_key(request: Any) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise RequestError(
                "invalid or missing API key (Authorization: Bearer ...)", status=401, type="authentication_error"
            )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Any, exc: Any) -> Any:  # unknown routes, wrong methods
        return error(RequestError(str(exc.detail), status=exc.status_code))

    @app.exception_handler(Exception)
    async def server_error(request: Any, exc: Exception) -> Any:
        return JSONResponse(
            {
                "error": {
                    "message": f"internal error: {type(exc).__name__}: {exc}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
            status_code=500,
        )

    @app.get("/v1/models")
    def models(request: fastapi.Request) -> Any:
        try:
            check_key(request)
        except RequestError as e:
            return error(e)
        return engine.models()

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request) -> Any:
        try:
            check_key(request)
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise RequestError(f"the request body is not valid JSON: {e}") from e
            from starlette.concurrency import run_in_threadpool

            return await run_in_threadpool(_locked_complete, lock, engine, body)
        except RequestError as e:
            return error(e)

    return app


def _locked_complete(lock: threading.Lock, engine: ChatEngine, body: Any) -> dict[str, Any]:
    with lock:
        return engine.complete(body)


class BackgroundServer:
    """Run an ASGI ``app`` with uvicorn in a daemon thread on ``host`` (a free port when ``port`` is 0).

    ``with BackgroundServer(app) as srv: httpx.get(srv.url + "/v1/models")``.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import socket

        _, uvicorn = _web()
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    device: str | None = None,
    served_model_name: str | None = None,
    echo: Any = print,
) -> None:
    """Load ``model`` (any name :func:`~alignforge.models.loading.load_model` takes) and serve it until
    interrupted. ``api_key_env`` names an environment variable holding the bearer key clients must send."""
    import os

    _, uvicorn = _web()
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {api_key_env}: the environment variable is unset or empty")
    from alignforge.models.loading import load_model, load_tokenizer, resolve_device

    tok = load_tokenizer(model, padding_side="left")
    lm = load_model(model).to(resolve_device(device))
    engine = ChatEngine(lm, tok, served_model_name or model)
    app = build_app(engine, api_key)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        echo(f"warning: serving on {host} without an API key: anyone who can reach it can use the model")
    echo(f"serving {engine.model_name!r} at http://{host}:{port}/v1 (POST /v1/chat/completions, GET /v1/models)")
    uvicorn.run(app, host=host, port=port, log_level="info")
