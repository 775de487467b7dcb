"""The evaluation commands on the embedded SmolLM2-135M-Instruct, with `alignforge serve`'s app as the judge.

Small sizes (1 MT-Bench question, 2 AdvBench behaviours, a few tokens): this checks that every command
runs on the real model and real data and that its counts add up, not the judge's quality.
"""

import json

import pytest

from alignforge.cli import main

pytestmark = [pytest.mark.embedded, pytest.mark.slow]


@pytest.fixture(scope="module")
def judge_url():
    from alignforge.inference.serve import BackgroundServer, ChatEngine, build_app
    from alignforge.models.loading import ensure_embedded, load_model, load_tokenizer

    path = ensure_embedded()
    engine = ChatEngine(load_model(path).eval(), load_tokenizer(path), "embedded")
    with BackgroundServer(build_app(engine)) as srv:
        yield srv.url + "/v1"


def run(*args):
    assert main([str(a) for a in args]) == 0, args


def test_every_eval_command_on_the_embedded_model(tmp_path, shared_data, judge_url):
    mt, adv = shared_data / "mt-bench", shared_data / "advbench" / "harmful_behaviors.csv"
    gen = ["--model", "embedded", "--max-new-tokens", "8", "--no-progress"]
    run("eval", "generate", "--set", "mtbench", "--data", mt, "--n", 1, "--out", tmp_path / "a.jsonl", *gen)
    run(
        "eval",
        "generate",
        "--set",
        "mtbench",
        "--data",
        mt,
        "--n",
        1,
        "--out",
        tmp_path / "b.jsonl",
        "--temperature",
        "1.0",
        "--seed",
        "3",
        *gen,
    )
    run("eval", "generate", "--set", "advbench", "--data", adv, "--n", 2, "--out", tmp_path / "adv.jsonl", *gen)
    row = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
    assert len(row["responses"]) == 2  # both MT-Bench turns

    judge = ["--judge-url", judge_url, "--judge-model", "embedded", "--max-tokens", "16", "--cache", tmp_path / "c"]
    run(
        "eval",
        "judge",
        tmp_path / "a.jsonl",
        "--mode",
        "mtbench",
        "--data",
        mt,
        "--out",
        tmp_path / "j.json",
        "--n-resamples",
        "200",
        *judge,
    )
    rep = json.loads((tmp_path / "j.json").read_text())
    statuses = [it["status"] for it in rep["items"]]
    assert len(statuses) == 2 and set(statuses) <= {"ok", "unparsable"}  # the server answered every call
    # the rating read from the embedded judge's logprobs after "Rating: [[": every item scored
    run("eval", "judge", tmp_path / "a.jsonl", "--mode", "mtbench", "--data", mt, "--out", tmp_path / "jl.json",
        "--n-resamples", "200", "--rating-logprobs", *judge)  # fmt: skip
    rl = json.loads((tmp_path / "jl.json").read_text())
    assert [it["status"] for it in rl["items"]] == ["ok", "ok"]
    assert all(1 <= it["score"] <= 10 and it["rating_probs"]["mass"] > 0.1 for it in rl["items"])
    assert rl["overall"]["mean"] == sum(it["score"] for it in rl["items"]) / 2

    run(
        "eval",
        "winrate",
        tmp_path / "a.jsonl",
        tmp_path / "b.jsonl",
        "--data",
        mt,
        "--out",
        tmp_path / "w.json",
        "--n-resamples",
        "200",
        *judge,
    )
    w = json.loads((tmp_path / "w.json").read_text())
    assert "overall" in json.dumps(w) and w

    run("eval", "harm", tmp_path / "adv.jsonl", "--out", tmp_path / "h.json", "--n-resamples", "200")
    h = json.loads((tmp_path / "h.json").read_text())
    assert "attack_success_rate" in json.dumps(h)
    run(
        "eval",
        "lengths",
        tmp_path / "a.jsonl",
        tmp_path / "adv.jsonl",
        "--tokenizer",
        "embedded",
        "--out",
        tmp_path / "l.json",
    )
    assert (tmp_path / "l.json").is_file()
