"""LLM judges: an OpenAI-compatible HTTP client, an in-process local judge, and verdict parsers.

:class:`JudgeClient` sends OpenAI chat-completion requests (to OpenAI, ``vllm serve``, or
``alignforge serve``) over httpx, at most ``concurrency`` at a time. Timeouts, connection errors,
HTTP 429 and 5xx, and a 200 whose body is not JSON with a ``choices[0].message.content`` string are
retried with exponential backoff (``backoff * 2**attempt`` seconds, or the server's ``Retry-After``
for a 429, at most 60 s); other 4xx are not retried. After the last retry an item is a *failure*
(:attr:`JudgeResult.error` says why): it is returned in its place, never raised and never dropped.

Every success is cached on disk as soon as it returns (one file per request, written atomically),
keyed by the sha256 of the judge model's name and the full request JSON, not the server's address:
a rerun of the same requests makes no HTTP calls, and a run killed midway resumes.

:class:`LocalJudge` has the same ``complete`` interface on a local HF model, without a server.

The parsers follow METHODS.md §5c and return ``None`` for an answer they cannot parse, so that the
caller counts unparsable answers instead of scoring them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignforge.errors import ConfigError

USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass
class JudgeResult:
    """One request's outcome: ``text`` (the judge's answer) or ``error`` (why it failed)."""

    request: dict[str, Any]
    text: str | None = None
    response: dict[str, Any] | None = None  # the full response body of a success
    error: str | None = None
    cached: bool = False
    attempts: int = 0  # HTTP calls made for this item (0 when cached)
    usage: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def summarize(results: Sequence[JudgeResult]) -> dict[str, Any]:
    """Counts over a run: ``n``, ``ok``, ``failed``, ``cached``, failure ``reasons`` and token ``usage``
    (summed over the calls that were made, i.e. not over cached results)."""
    usage = dict.fromkeys(USAGE_KEYS, 0)
    for r in results:
        if not r.cached:
            for k in USAGE_KEYS:
                usage[k] += int(r.usage.get(k, 0) or 0)
    reasons = Counter(r.error for r in results if r.error is not None)
    return {
        "n": len(results),
        "ok": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "cached": sum(r.cached for r in results),
        "reasons": dict(reasons),
        "usage": usage,
    }


def response_text(body: Any) -> str | None:
    """``choices[0].message.content`` of a chat-completion body, or ``None`` when it has none."""
    try:
        text = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


def request_key(model: str, request: dict[str, Any]) -> str:
    """The cache key: sha256 of the judge model name and the full request JSON (keys sorted)."""
    blob = json.dumps({"model": model, "request": request}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class _Retry(Exception):
    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


class _Fail(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class JudgeClient:
    """A concurrent, retrying, caching client for an OpenAI-compatible ``/chat/completions`` endpoint.

    ``base_url`` is the API root (``http://127.0.0.1:8000/v1``; a missing ``/v1`` is added).
    ``api_key_env`` names the environment variable holding the key; it must be set (else
    :class:`ConfigError`, before any request). ``max_retries`` retries follow the first attempt.
    ``cache_dir``: ``None`` means ``<alignforge cache>/judge``; ``False`` turns the cache off.
    ``usage`` sums token usage over the calls this client made (cached results cost nothing).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        concurrency: int = 4,
        timeout: float = 60,
        max_retries: int = 4,
        backoff: float = 0.5,
        cache_dir: str | os.PathLike | None | bool = None,
    ):
        if concurrency < 1:
            raise ConfigError(f"judge concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ConfigError(f"judge max_retries must be >= 0, got {max_retries}")
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ConfigError(f"judge api_key_env {api_key_env!r}: the environment variable is unset or empty")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        if cache_dir is None or cache_dir is True:
            from alignforge.models.loading import cache_dir as alignforge_cache

            cache_dir = alignforge_cache() / "judge"
        self.cache_dir = Path(cache_dir) if cache_dir is not False else None
        self.usage = dict.fromkeys(USAGE_KEYS, 0)
        self.http_calls = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ cache
    def _cache_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> dict[str, Any] | None:
        if self.cache_dir is None:
            return None
        p = self._cache_path(key)
        try:
            entry = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        body = entry.get("response") if isinstance(entry, dict) else None
        return body if response_text(body) is not None else None

    def _cache_put(self, key: str, request: dict[str, Any], body: dict[str, Any]) -> None:
        if self.cache_dir is None:
            return
        p = self._cache_path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(
            json.dumps({"model": self.model, "request": request, "response": body}, ensure_ascii=False),
            encoding="utf-8",
        )
        os.replace(tmp, p)

    # ------------------------------------------------------------------ calls
    def full_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """The body sent for ``request``: ``model`` filled in with the judge model when absent."""
        return {"model": self.model, **request}

    def _call(self, http: Any, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with self._lock:
            self.http_calls += 1
        try:
            r = http.post(f"{self.base_url}/chat/completions", json=body, headers=headers, timeout=self.timeout)
        except httpx.TimeoutException as e:
            raise _Retry(f"timeout ({type(e).__name__})") from e
        except httpx.TransportError as e:
            raise _Retry(f"connection error ({type(e).__name__})") from e
        if r.status_code == 429 or r.status_code >= 500:
            wait = None
            if r.status_code == 429:
                try:
                    wait = min(float(r.headers.get("retry-after", "")), 60.0)
                except ValueError:
                    wait = None
            raise _Retry(f"HTTP {r.status_code}", wait)
        if r.status_code != 200:
            raise _Fail(f"HTTP {r.status_code}: {_error_message(r)}")
        try:
            data = r.json()
        except ValueError as e:
            raise _Retry("invalid JSON in a 200 response") from e
        if response_text(data) is None:
            raise _Retry("a 200 response without choices[0].message.content")
        return data

    def _one(self, http: Any, request: dict[str, Any]) -> JudgeResult:
        body = self.full_request(request)
        key = request_key(self.model, body)
        cached = self._cache_get(key)
        if cached is not None:
            return JudgeResult(request, response_text(cached), cached, cached=True, usage=_usage(cached))
        attempts, reason = 0, "no attempt"
        for attempt in range(self.max_retries + 1):
            attempts += 1
            try:
                data = self._call(http, body)
            except _Fail as e:
                return JudgeResult(request, error=e.reason, attempts=attempts)
            except _Retry as e:
                reason = e.reason
                if attempt < self.max_retries:
                    time.sleep(e.wait if e.wait is not None else self.backoff * 2**attempt)
                continue
            usage = _usage(data)
            with self._lock:
                for k in USAGE_KEYS:
                    self.usage[k] += usage.get(k, 0)
            self._cache_put(key, body, data)
            return JudgeResult(request, response_text(data), data, attempts=attempts, usage=usage)
        return JudgeResult(request, error=f"{reason} (after {attempts} attempts)", attempts=attempts)

    def complete(self, requests: Sequence[dict[str, Any]]) -> list[JudgeResult]:
        """One :class:`JudgeResult` per request, in order; at most ``concurrency`` calls in flight."""
        import httpx

        for i, r in enumerate(requests):
            if not isinstance(r, dict) or not isinstance(r.get("messages"), list):
                raise ConfigError(f"judge request {i}: expected a dict with a 'messages' list")
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        with httpx.Client(limits=limits) as http, ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda r: self._one(http, r), requests))


def _usage(body: Any) -> dict[str, int]:
    u = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(u, dict):
        return dict.fromkeys(USAGE_KEYS, 0)
    return {k: int(u[k]) if isinstance(u.get(k), (int, float)) else 0 for k in USAGE_KEYS}


def _error_message(r: Any) -> str:
    try:
        msg = r.json()["error"]["message"]
        if isinstance(msg, str):
            return msg
    except (ValueError, KeyError, TypeError):
        pass
    return r.text[:200]


class LocalJudge:
    """A judge on a local HF model in this process, with :class:`JudgeClient`'s ``complete``.

    Requests are OpenAI chat-completion bodies, answered by the same engine as ``alignforge serve``
    (:class:`~alignforge.inference.serve.ChatEngine`), one at a time; a bad request is a failure.
    No cache: every call runs the model.
    """

    def __init__(self, model: Any, tokenizer: Any, model_name: str = "local", default_max_tokens: int = 256):
        from alignforge.inference.serve import ChatEngine

        self.engine = ChatEngine(model, tokenizer, model_name, default_max_tokens)
        self.model = model_name
        self.usage = dict.fromkeys(USAGE_KEYS, 0)

    def complete(self, requests: Sequence[dict[str, Any]]) -> list[JudgeResult]:
        from alignforge.inference.serve import RequestError

        out = []
        for req in requests:
            try:
                data = self.engine.complete({**req, "model": self.model})
            except RequestError as e:
                out.append(JudgeResult(req, error=f"bad request: {e.message}", attempts=1))
                continue
            usage = _usage(data)
            for k in USAGE_KEYS:
                self.usage[k] += usage[k]
            out.append(JudgeResult(req, response_text(data), data, attempts=1, usage=usage))
        return out


# ----------------------------------------------------------------------------- parsers (METHODS.md §5c)
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(text: str | None, bounds: tuple[float, float] | None = None) -> float | None:
    """MT-Bench single grading: the first ``[[x]]`` (FastChat's pattern), else the first ``[x]``;
    ``None`` when there is none, or when ``bounds`` is given and ``x`` lies outside it."""
    if not text:
        return None
    m = _RATING.search(text) or _RATING_BACKUP.search(text)
    if m is None:
        return None
    x = float(m.group(1))
    if bounds is not None and not bounds[0] <= x <= bounds[1]:
        return None
    return x


def logprob_content(response: dict | None) -> list[dict] | None:
    """``choices[0].logprobs.content`` of a chat-completion body (one entry per returned token, each
    with its ``top_logprobs``), or ``None`` when the body has none or it is empty."""
    try:
        content = response["choices"][0]["logprobs"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, list) and content else None


RATING_PREFILL = "Rating: [["  # the answer a --rating-logprobs request pre-fills, as FastChat's judges end


def rating_probs(response: dict | None, lo: int = 1, hi: int = 10) -> dict[str, Any] | None:
    """A rating read from the probabilities of its first token (G-Eval style), for a request whose
    answer was pre-filled with :data:`RATING_PREFILL` and that asked for ``top_logprobs``.

    The candidates of the first returned token whose text is an integer in ``[lo, hi]`` give P(r).
    Where the tokenizer splits ``10`` into ``1`` + ``0`` and the returned first token is ``1``, the
    second token's candidates split P(``1``) into P(10) = P(``1``)·P(``0`` next) and P(1) (when the
    first token is not ``1``, P(10) is not observable and ``1`` counts as 1). Returns
    ``{"probs": {r: p}, "mass": Σ raw p, "expected": Σ r·p}`` with ``probs`` renormalised over the
    ratings, or ``None`` when the response has no logprobs or no rating among the candidates.
    """
    content = logprob_content(response)
    if content is None:
        return None
    raw: dict[int, float] = {}
    for cand in content[0].get("top_logprobs") or []:
        t = str(cand.get("token", "")).strip()
        if t.isdigit() and lo <= int(t) <= hi and int(t) not in raw:
            raw[int(t)] = math.exp(float(cand["logprob"]))
    if not raw:
        return None
    if 1 in raw and lo <= 10 <= hi and 10 not in raw and len(content) > 1:
        if str(content[0].get("token", "")).strip() == "1":
            q0 = sum(
                math.exp(float(c["logprob"]))
                for c in content[1].get("top_logprobs") or []
                if str(c.get("token", "")).startswith("0")
            )
            raw[10], raw[1] = raw[1] * q0, raw[1] * (1.0 - q0)
    mass = sum(raw.values())
    probs = {r: p / mass for r, p in sorted(raw.items())}
    return {"probs": probs, "mass": mass, "expected": sum(r * p for r, p in probs.items())}


_VERDICTS = {"[[A]]": "A", "[[B]]": "B", "[[C]]": "tie"}


def parse_pairwise(text: str | None) -> str | None:
    """A pairwise verdict: ``"A"``, ``"B"`` or ``"tie"`` for ``[[A]]``/``[[B]]``/``[[C]]``.

    ``None`` when there is none, or when several different verdicts appear (FastChat would take the
    first in A, B, C order; an answer that names two verdicts is counted as unparsable here).
    """
    if not text:
        return None
    found = {v for tag, v in _VERDICTS.items() if tag in text}
    return found.pop() if len(found) == 1 else None


def combine_swapped(first: str | None, second: str | None) -> str | None:
    """The outcome for the model shown as A in the ``first`` judgment and as B in the ``second``
    (positions swapped): ``"win"``/``"loss"`` when both agree, else ``"tie"``; ``None`` if either
    verdict is unparsable."""
    if first is None or second is None:
        return None
    if first == "A" and second == "B":
        return "win"
    if first == "B" and second == "A":
        return "loss"
    return "tie"


_DICT = re.compile(r"\{[^{}]*\}", re.S)
_KV = re.compile(r"[\"'\u201c\u2018]([^\"'\u201d\u2019]+)[\"'\u201d\u2019]\s*[:\uff1a]\s*(-?\d+(?:\.\d+)?)")


def parse_score_dict(text: str | None) -> dict[str, float] | None:
    """AlignBench style: the last ``{...}`` in the answer as ``{dimension: score}`` (JSON or a Python
    dict literal, else its ``'key': number`` pairs). ``None`` when there is no such dict or it holds
    no numeric score."""
    if not text:
        return None
    blocks = _DICT.findall(text)
    if not blocks:
        return None
    raw = blocks[-1]
    parsed: Any = None
    for loader in (json.loads, ast.literal_eval):
        try:
            parsed = loader(raw)
            break
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    out: dict[str, float] = {}
    if isinstance(parsed, dict):
        for k, v in parsed.items():
            if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
    else:
        out = {k: float(v) for k, v in _KV.findall(raw)}
    return out or None
