"""The demo: its shipped data, and its pipeline config run end to end on a tiny model."""

import json

from alignforge.demo import DEMO_CONFIG

# the demo's settings cut to a tiny model's seconds (the stages, files and routes stay the demo's)
TINY = [
    "sft.trainer.train.epochs=1",
    "rm.trainer.train.epochs=1",
    "align.limit=4",
    "align.k=2",
    "align.max_new_tokens=6",
    "align.min_gap=0.0",
    "align.dpo.train.epochs=1",
    "rain.search.max_new_tokens=3",
    "rain.search.max_iterations=2",
    "rain.search.max_simulation_tokens=3",
    "eval.harmful.n=4",
    "eval.benign.n=4",
    "eval.max_new_tokens=6",
    "eval.n_resamples=50",
]


def test_demo_runs_its_pipeline_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    from alignforge.demo import run_demo
    from alignforge.pipeline import STAGES

    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))
    lines: list[str] = []
    out = tmp_path / "demo"
    res = run_demo(output_dir=str(out), model=str(tiny_model_dir), overrides=TINY, echo=lines.append)
    assert lines[0].startswith(f"alignforge demo: {DEMO_CONFIG}")
    for s in STAGES:  # every stage ran (pairs is off in the demo: its labels exist)
        assert json.loads((out / s / "stage.json").read_text())["stage"] == s
    assert res["pairs"] == "done" and json.loads((out / "pairs" / "stage.json").read_text())["outputs"] == {
        "enabled": False
    }
    report = out / "report" / "report.html"
    assert lines[-1] == f"report: {report}" and report.is_file()
    page = report.read_text()
    assert "refusal (harmful set) and answered rate (benign set)" in page and "win rate against SFT" in page
    g = res["gains"]
    assert set(g) == {"sft", "aligned", "rain"}
    for pol in ("sft", "aligned"):
        assert 0 <= g[pol]["refusal_rate"] <= 1 and 0 <= g[pol]["answered_rate"] <= 1
        assert isinstance(g[pol]["rm_mean"], float)
    assert 0 <= g["aligned"]["win_rate_vs_sft"] <= 1 and 0 <= g["rain"]["refusal_rate"] <= 1
    # the gains are the eval stage's tables: SFT's refusal rate is its refusals of the held-out harmful set
    from alignforge.eval.refusal import is_refusal

    rows = [json.loads(x) for x in (out / "eval" / "responses" / "sft_harmful.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert g["sft"]["refusal_rate"] == sum(is_refusal(r["response"]) for r in rows) / 4
    # RAIN searched with the rm stage's reward model as its evaluator
    rain = json.loads((out / "rain" / "stage.json").read_text())
    assert "stage:rm" in rain["inputs"] and rain["config"]["evaluator"] == "rm"
    # and a rerun skips every stage
    again: list[str] = []
    run_demo(output_dir=str(out), model=str(tiny_model_dir), overrides=TINY, echo=again.append)
    assert sum("skipped (unchanged)" in x for x in again) == len(STAGES)


def test_shipped_demo_data_is_valid_and_held_out():
    """Every demo file reads; the held-out prompts are in no training file; the SFT demonstrations never refuse
    (the refusals must come from the preference stage); chosen refuses harmful prompts and answers benign ones."""
    from alignforge.data.readers import read_any
    from alignforge.eval.refusal import is_refusal
    from alignforge.pipeline import resolve_path

    def read(name, kind):
        return read_any(resolve_path(f"demo:{name}"), kind).records

    def text(prompt):
        return prompt[-1]["content"].strip().lower()

    sft, prefs = read("sft_demos.jsonl", "sft"), read("preferences.jsonl", "preference")
    sets = {
        n: read(f"{n}.jsonl", "prompt") for n in ("harmful_train", "harmful_heldout", "benign_train", "benign_heldout")
    }
    assert len(sets["harmful_heldout"]) >= 16 and len(sets["benign_heldout"]) >= 16 and len(prefs) >= 48
    train = {text(r.prompt) for n in ("harmful_train", "benign_train") for r in sets[n]} | {
        text(r.prompt) for r in prefs
    }
    train |= {m["content"].strip().lower() for r in sft for m in r.messages if m["role"] == "user"}
    for n in ("harmful_heldout", "benign_heldout"):
        assert not {text(r.prompt) for r in sets[n]} & train, n
    assert not any(is_refusal(m["content"]) for r in sft for m in r.messages if m["role"] == "assistant")
    harmful = {text(r.prompt) for r in sets["harmful_train"]}
    for r in prefs:  # harmful: a refusal over a compliance; benign: an answer over a refusal or a bad answer
        if text(r.prompt) in harmful:
            assert is_refusal(r.chosen[-1]["content"]) and not is_refusal(r.rejected[-1]["content"]), r.source
        else:
            assert not is_refusal(r.chosen[-1]["content"]), r.source
    assert {text(r.prompt) for r in prefs} == harmful | {text(r.prompt) for r in sets["benign_train"]}
