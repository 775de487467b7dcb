"""``alignforge pipeline`` on a tiny model: every stage, stage.json bookkeeping (skip, rerun, resume),
the three labelling sources, and bad input.

The tests share one run dir (module fixture) and run in file order: each later test starts from the
state the earlier ones left (that is what a user's reruns do too)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from fastapi import FastAPI, Request  # module level: the app's annotations are resolved in this module

from alignforge.cli import main
from alignforge.errors import ConfigError, DataError, TrainingError, TrainingInterrupted
from alignforge.pipeline import STAGES, load_pipeline_config, plan_stage, run_pipeline

TINY = """
run_dir: {run}
model: {model}
sft:
  data: demo:sft_demos.jsonl
  trainer:
    data: {{max_length: 64}}
    train: {{max_steps: 2, per_device_batch_size: 4, progress: false, tensorboard: false}}
pairs: {{prompts: {prompts}, max_new_tokens: 6}}
label: {{source: file, path: {labels}}}
rm:
  heldout_fraction: 0.25
  trainer:
    data: {{max_length: 64}}
    train: {{per_device_batch_size: 4, lr: 1.0e-3, progress: false, tensorboard: false}}
align:
  method: dpo
  limit: 3
  k: 3
  max_new_tokens: 6
  dpo:
    lora: {{enabled: true, r: 4, alpha: 8}}
    data: {{max_length: 64}}
    train: {{per_device_batch_size: 4, progress: false, tensorboard: false}}
rain:
  sets: [harmful]
  search: {{max_new_tokens: 2, max_iterations: 1, iterations_after_cap: 1, n_candidates: 2, min_visits: 1,
           set_lengths: [1], max_simulation_tokens: 1, add_max_children: 2}}
eval:
  harmful: {{path: demo:preferences.jsonl, categories: [harmless], n: 2}}
  benign: {{path: demo:preferences.jsonl, categories: [helpful], n: 2}}
  heldout: {{path: {prompts}, n: 2}}
  max_new_tokens: 6
  n_resamples: 50
"""


def _pref(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


LABELS = [_pref(f"Question {i}?", f"A helpful answer number {i}.", f"No {i}.") for i in range(8)]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("pipe")
    prompts = _write_jsonl(d / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(3)])
    labels = _write_jsonl(d / "labels.jsonl", LABELS)
    cfg = d / "pipe.yaml"
    cfg.write_text(TINY.format(run=d / "run", model=tiny_model_dir, prompts=prompts, labels=labels))
    mp = pytest.MonkeyPatch()
    mp.setenv("ALIGNFORGE_CACHE", str(d / "cache"))  # reference log-probs, judge cache
    lines: list[str] = []
    status = run_pipeline(load_pipeline_config(cfg), echo=lines.append)
    yield {"dir": d, "cfg": cfg, "run": d / "run", "labels": labels, "status": status, "lines": lines}
    mp.undo()


def _run(env, *overrides, **kw):
    lines: list[str] = []
    status = run_pipeline(load_pipeline_config(env["cfg"], list(overrides)), echo=lines.append, **kw)
    return status, lines


def _stage(env, name):
    return json.loads((env["run"] / name / "stage.json").read_text())


def test_full_run_writes_every_stage_and_the_report(env):
    run, status, lines = env["run"], env["status"], env["lines"]
    assert [status[s] for s in STAGES] == ["done"] * len(STAGES)
    for i, s in enumerate(STAGES):
        rec = _stage(env, s)
        assert rec["stage"] == s and set(rec) >= {"config", "inputs", "outputs", "started_at", "finished_at", "seconds"}
        assert re.fullmatch(rf"\[{i + 1}/8\] {s}( \(.*\))? \.\.\. done in \d+\.\ds", lines[i]), lines[i]
        assert not (run / s / "stage.pending.json").exists()
    assert lines[2].startswith("[3/8] label (source=file)")
    # inputs: the label file's content digest; the upstream stages' stage.json digests
    import hashlib

    assert _stage(env, "label")["inputs"] == {
        "labels": "sha256:" + hashlib.sha256(env["labels"].read_bytes()).hexdigest()
    }
    rm_inputs = _stage(env, "rm")["inputs"]
    assert rm_inputs["stage:sft"] == "sha256:" + hashlib.sha256((run / "sft" / "stage.json").read_bytes()).hexdigest()
    assert set(rm_inputs) == {"stage:sft", "stage:label"}
    # the models exist, and the trainers' checkpoints were dropped at the end
    for s in ("sft", "rm", "align"):
        assert (run / s / "final").is_dir() and not (run / s / "checkpoints").exists()
    rm = _stage(env, "rm")["outputs"]
    assert rm["heldout_pairs"] == 2 and 0.0 <= rm["heldout_accuracy"] <= 1.0
    assert json.loads((run / "rm" / "heldout_accuracy.json").read_text())["n_pairs"] == 2
    pairs = [json.loads(x) for x in (run / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == _stage(env, "pairs")["outputs"]["written"] > 0
    assert all(p["response_a"].strip() != p["response_b"].strip() for p in pairs)
    # RAIN on the harmful set only; eval: sft, aligned and RAIN rows, RM scores and the win rate
    rain = _stage(env, "rain")["outputs"]["responses"]
    assert list(rain) == ["harmful"] and len((run / "rain" / "harmful.jsonl").read_text().splitlines()) == 2
    ev = _stage(env, "eval")["outputs"]
    refusal = {r["policy"]: r for r in ev["refusal"]}
    assert set(refusal) == {"sft", "aligned", "rain"}
    assert refusal["sft"]["harmful_n"] == 2 and refusal["sft"]["benign_n"] == 2 and "benign_n" not in refusal["rain"]
    for r in refusal.values():
        assert 0 <= r["refusal_rate"] <= 1
    assert [r["policy"] for r in ev["rm"]] == ["sft", "aligned"] and ev["winrate"][0]["n"] == 2
    win = ev["winrate"][0]
    assert win["win"] + win["tie"] + win["loss"] == 2
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert len(summary["tables"]) == 3
    from alignforge.eval.report import read_eval_file

    for f in ev["eval_files"]:
        assert read_eval_file(f)  # every eval JSON is one the report reads
    page = (run / "report" / "report.html").read_text()
    assert "refusal (harmful set)" in page and "Training curves" in page
    assert _stage(env, "report")["outputs"]["report"] == str(run / "report" / "report.html")


def test_rerun_skips_every_stage(env):
    before = {s: _stage(env, s)["finished_at"] for s in STAGES}
    status, lines = _run(env)
    assert [status[s] for s in STAGES] == ["skipped"] * len(STAGES)
    assert all(x.endswith("... skipped (unchanged)") for x in lines[:-1]) and lines[-1].startswith("report: ")
    assert {s: _stage(env, s)["finished_at"] for s in STAGES} == before


def test_changed_label_file_reruns_label_and_downstream_only(env):
    """A stage whose input changed is rerun, not reused; the stages after it see a new stage.json digest."""
    old_rm = _stage(env, "rm")
    _write_jsonl(env["labels"], LABELS[:4] + LABELS[5:])  # one pair fewer
    status, _ = _run(env, until_stage="rm")
    assert status == {"sft": "skipped", "pairs": "skipped", "label": "done", "rm": "done"}
    assert _stage(env, "label")["outputs"]["n"] == 7
    assert _stage(env, "rm")["inputs"]["stage:label"] != old_rm["inputs"]["stage:label"]
    # align's stored inputs no longer match: it would rerun, and so would eval and report after it
    cfg = load_pipeline_config(env["cfg"])
    dirs = {s: env["run"] / s for s in STAGES}
    assert plan_stage("align", cfg, dirs).inputs != _stage(env, "align")["inputs"]
    assert plan_stage("rain", cfg, dirs).inputs == _stage(env, "rain")["inputs"]  # RAIN needs only the SFT model


def test_interrupted_stage_resumes_from_its_checkpoint(env, monkeypatch):
    over = ["rm.trainer.train.save_every=1", "rm.trainer.train.keep_last=3"]
    monkeypatch.setenv("ALIGNFORGE_FAULT_AFTER_STEP", "1:INT")  # SIGINT after step 1: checkpoint, then stop
    with pytest.raises(TrainingInterrupted):
        _run(env, *over, from_stage="rm", until_stage="rm")
    rm = env["run"] / "rm"
    assert not (rm / "stage.json").exists() and (rm / "stage.pending.json").is_file()
    assert (rm / "checkpoints" / "step-00000001").is_dir()
    monkeypatch.delenv("ALIGNFORGE_FAULT_AFTER_STEP")
    status, lines = _run(env, *over, from_stage="rm", until_stage="rm")
    assert status["rm"] == "resumed" and lines[-1].startswith("[4/8] rm ... resumed, done in ")
    rec = _stage(env, "rm")
    assert rec["resumed"] is True and rec["outputs"]["resumed_from"].endswith("step-00000001")
    assert rec["outputs"]["steps"] == 2  # 7 pairs, 2 held out: 5 -> 2 steps of 4
    # a pending stage whose config changed meanwhile is started afresh, not resumed
    monkeypatch.setenv("ALIGNFORGE_FAULT_AFTER_STEP", "1:INT")
    with pytest.raises(TrainingInterrupted):
        _run(env, *over, "rm.trainer.train.lr=2e-3", from_stage="rm", until_stage="rm")
    monkeypatch.delenv("ALIGNFORGE_FAULT_AFTER_STEP")
    status, _ = _run(env, *over, "rm.trainer.train.lr=3e-3", from_stage="rm", until_stage="rm")
    assert status["rm"] == "done" and _stage(env, "rm")["outputs"]["resumed_from"] is None


def test_until_pairs_then_human_labels_from_the_annotation_app(env, tmp_path, monkeypatch):
    from alignforge.annotate import export as ex
    from alignforge.annotate import service as svc
    from alignforge.annotate.db import Item, open_db

    status, _ = _run(env, until_stage="pairs")
    assert list(status) == ["sft", "pairs"]
    engine, S = open_db(f"sqlite:///{tmp_path / 'a.db'}")
    svc.import_pairs(S, env["run"] / "pairs" / "pairs.jsonl")
    svc.create_user(S, "ann", "password-123", hasher=svc.password_hasher(fast=True))
    uid = next(u.id for u in svc.list_users(S) if u.username == "ann")
    while (a := svc.claim_next(S, uid, k=1, lease_seconds=60)) is not None:
        shown = "b1" if a.swapped else "a1"  # the annotator always prefers response_a
        assert svc.submit(S, uid, a.id, a.submission_token, svc.JudgmentForm(shown, "clear"), k=1).status == "ok"
    with S() as s:
        n_items = s.query(Item).count()
    export = tmp_path / "export.jsonl"
    assert ex.export_trl(S, export)["pairs"] == n_items
    engine.dispose()

    status, lines = _run(env, "label.source=human", f"label.path={export}", from_stage="label", until_stage="rm")
    assert status == {"sft": "kept", "pairs": "kept", "label": "done", "rm": "done"}
    assert lines[0] == "[1/8] sft ... kept (before --from)" and lines[2].startswith("[3/8] label (source=human)")
    out = _stage(env, "label")["outputs"]
    assert out["by_source"] == {"human": n_items}
    pairs = {json.dumps(p["prompt"]): p for p in map(json.loads, (env["run"] / "pairs" / "pairs.jsonl").open())}
    for lab in map(json.loads, open(out["labels"])):
        assert lab["source"] == "human"
        assert lab["chosen"][0]["content"] == pairs[json.dumps(lab["prompt"])]["response_a"]


def test_ai_labels_carry_their_source_and_stats_count_them(env, capsys, tiny_model_dir):
    from alignforge.inference.serve import BackgroundServer

    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # prefers the longer answer, whatever its position
        req = json.loads(await request.body())
        text = req["messages"][-1]["content"]
        a = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End of Assistant A's Answer]")[0]
        b = text.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End of Assistant B's Answer]")[0]
        seen.append(req)
        verdict = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"
        msg = {"role": "assistant", "content": f"Verdict: [[{verdict}]]"}
        return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": msg}], "usage": {}}

    pairs = [json.loads(x) for x in (env["run"] / "pairs" / "pairs.jsonl").read_text().splitlines()]
    unequal = [p for p in pairs if len(p["response_a"]) != len(p["response_b"])]
    with BackgroundServer(app) as srv:
        status, lines = _run(
            env, "label.source=ai", f"label.judge={srv.url}/v1", "label.judge_model=scripted",
            from_stage="label", until_stage="label",
        )  # fmt: skip
    assert lines[2].startswith("[3/8] label (source=ai, judge=http") and len(seen) == 2 * len(pairs)
    out = _stage(env, "label")["outputs"]
    assert out["by_source"] == {"ai:scripted": len(unequal)} and out["ties"] == len(pairs) - len(unequal)
    for lab in map(json.loads, open(out["labels"])):
        assert lab["source"] == "ai:scripted"
        assert len(lab["chosen"][0]["content"]) > len(lab["rejected"][0]["content"])
    if unequal:
        assert main(["data", "stats", out["labels"], "--tokenizer", str(tiny_model_dir)]) == 0
        assert f"labelled by: ai:scripted {len(unequal)}" in capsys.readouterr().out

    # the local judge (the tiny random SFT model) answers no verdict: the stage says so instead of training on nothing
    with pytest.raises(TrainingError, match=r"labelled none of the \d+ pairs.*unparsable"):
        _run(env, "label.source=ai", "label.judge=local", "label.max_tokens=4", from_stage="label", until_stage="label")


def test_bad_input(env, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown stage 'train'; the stages are: sft, pairs, label, rm, align, rain"):
        _run(env, from_stage="train")
    with pytest.raises(ConfigError, match="--until: unknown stage 'evaluate'.*report"):
        _run(env, until_stage="evaluate")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text(env["cfg"].read_text() + "dpo: {beta: 0.1}\n")
    with pytest.raises(ConfigError, match="unknown stage or key 'dpo'; the stages are: sft, pairs"):
        load_pipeline_config(bad_cfg)
    with pytest.raises(ConfigError, match="unknown stage or key 'ppo'"):
        load_pipeline_config(env["cfg"], ["ppo.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'rm.trainer.train.lrr'.*rm\.trainer\.train\.lr\b"):
        load_pipeline_config(env["cfg"], ["rm.trainer.train.lrr=1"])
    assert main(["pipeline", str(env["cfg"]), "--from", "nope"]) == 2
    assert "the stages are: sft, pairs, label" in capsys.readouterr().err

    # a stage before --from that never finished
    with pytest.raises(ConfigError, match=r"stage 'sft' has not finished"):
        _run(env, f"run_dir={tmp_path / 'fresh'}", from_stage="rm")

    # the labelling source: missing, then malformed (file:line: field)
    with pytest.raises(DataError, match=r"nothere\.jsonl: file not found"):
        _run(env, f"label.path={tmp_path / 'nothere.jsonl'}", from_stage="label", until_stage="label")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(LABELS[0]) + "\n" + json.dumps({"prompt": "hi", "chosen": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'rejected': missing field"):
        _run(env, f"label.path={bad}", from_stage="label", until_stage="label")
    bad.write_text(json.dumps({**LABELS[0], "source": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'source': wrong type"):
        _run(env, f"label.path={bad}", "label.source=human", from_stage="label", until_stage="label")
    assert not (env["run"] / "label" / "stage.json").exists()  # the failed stage did not finish
    shutil.rmtree(tmp_path / "fresh", ignore_errors=True)

    # no sampled pairs for a source that labels them
    with pytest.raises(ConfigError, match=r"pairs.enabled=false: label.source=ai labels the sampled pairs"):
        _run(env, "pairs.enabled=false", "label.source=ai", until_stage="pairs")
