"""A tiny scripted judge: a real FastAPI app (served over HTTP in a thread) whose answers are chosen
by tags in the request, so that scores can be checked by hand. Shared by test_grading and test_winrate."""

from __future__ import annotations

import json
import math
import re

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

TAG = re.compile(r"ANS-([\w-]+)")


def body(text: str, logprobs=None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [choice],
        "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105},
    }


def single_answer(prompt: str):
    """MT-Bench / AlignBench: the LAST tag in the prompt picks the answer (the graded answer is last)."""
    tags = TAG.findall(prompt)
    tag = tags[-1] if tags else ""
    if tag == "fail":
        return JSONResponse({"error": {"message": "scripted failure"}}, status_code=400)
    if tag == "bad":
        return body("I cannot decide on a rating.")
    if tag == "abnone":
        return body('{"事实正确性": 3}')  # no overall score: unparsable
    if tag.startswith("ab-"):  # AlignBench: ab-<score>
        s = int(tag.split("-")[1])
        return body(f'很好。\n{{"事实正确性": {s}, "满足用户需求": {s}, "综合得分": {s}}}')
    return body(f"The answer is fine. Rating: [[{tag}]]")


def rating_answer(prompt: str):
    """``--rating-logprobs`` requests (the answer pre-filled with "Rating: [["): the last tag picks
    the next tokens' probabilities. ``<r>``: P(r)=.6, P(r+1)=.2, P(r-1)=.1 and .1 on a non-rating
    token; ``ten``: the first token "1" (.8, with "9" .2) followed by "0" (.75) or "]]" (.25);
    ``bad``: no rating token among the candidates."""
    tags = TAG.findall(prompt)
    tag = tags[-1] if tags else ""

    def cands(probs):
        return [{"token": k, "logprob": math.log(v), "bytes": []} for k, v in probs.items()]

    if tag == "bad":
        lp = [{"token": "I", "logprob": math.log(0.9), "top_logprobs": cands({"I": 0.9, "The": 0.1})}]
        return body("I", lp)
    if tag == "ten":
        lp = [
            {"token": "1", "logprob": math.log(0.8), "top_logprobs": cands({"1": 0.8, "9": 0.2})},
            {"token": "0", "logprob": math.log(0.75), "top_logprobs": cands({"0": 0.75, "]]": 0.25})},
        ]
        return body("10", lp)
    r = int(tag)
    probs = {str(r): 0.6, str(r + 1): 0.2, str(r - 1): 0.1, "x": 0.1}
    lp = [
        {"token": str(r), "logprob": math.log(0.6), "top_logprobs": cands(probs)},
        {"token": "]]", "logprob": -0.1, "top_logprobs": []},
    ]
    return body(f"{r}]]", lp)


def pair_answer(prompt: str, with_logprobs: bool):
    """Pairwise: the tags of assistant A's and B's answers, in order."""
    a, b = TAG.findall(prompt)[-2:]
    if "unparse" in (a, b):
        return body("Both are answers.")
    if a.startswith("posbias"):
        verdict = "A"  # always the first position: inconsistent under swapping
    elif a.startswith("good") and b.startswith("bad"):
        verdict = "A"
    elif a.startswith("bad") and b.startswith("good"):
        verdict = "B"
    else:
        verdict = "C"
    lp = None
    if with_logprobs:
        probs = {"A": 0.7, "B": 0.2, "C": 0.1} if verdict == "A" else {"A": 0.2, "B": 0.7, "C": 0.1}
        if verdict == "C":
            probs = {"A": 0.1, "B": 0.1, "C": 0.8}
        tops = [{"token": k, "logprob": math.log(v), "bytes": []} for k, v in probs.items()]
        lp = [
            {"token": "Verdict: ", "logprob": -0.1, "top_logprobs": []},
            {"token": "[[", "logprob": -0.1, "top_logprobs": []},
            {"token": verdict, "logprob": math.log(probs[verdict]), "top_logprobs": tops},
            {"token": "]]", "logprob": -0.1, "top_logprobs": []},
        ]
    return body(f"Verdict: [[{verdict}]]", lp)


def scripted_app(log: list) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = json.loads(await request.body())
        log.append(req)
        if req.get("continue_final_message"):
            return rating_answer(req["messages"][-2]["content"])
        prompt = req["messages"][-1]["content"]
        if "Assistant A's Answer" in prompt or "Assistant B's Conversation" in prompt:
            return pair_answer(prompt, bool(req.get("logprobs")))
        return single_answer(prompt)

    return app


def write_rows(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def row(id_, category, *turns, responses, **extra) -> dict:
    return {
        "id": str(id_),
        "set": "x",
        "category": category,
        "prompt": [{"role": "user", "content": turns[0]}],
        "followups": list(turns[1:]),
        "responses": list(responses),
        "response": responses[-1],
        **extra,
    }
