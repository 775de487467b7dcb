"""The demo's whole path (SFT -> answers -> reward model -> rewards -> RM-labelled DPO) on a tiny model."""

import json


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir):
    from alignforge.demo import DEMO_PROMPTS, run_demo

    lines = []
    res = run_demo(
        output_dir=str(tmp_path / "demo"),
        epochs=1,
        rm_epochs=1,
        echo=lines.append,
        model=str(tiny_model_dir),
        dpo_prompts=6,
        dpo_epochs=1,
        dpo_min_gap=0.0,
    )
    assert res["steps"] == 4 and len(res["samples"]) == len(DEMO_PROMPTS)
    assert all(isinstance(s["reward_after"], float) for s in res["samples"])
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["reward_model"].endswith("final") and (tmp_path / "demo" / "rm" / "loss.png").is_file()
    assert any("demo finished" in x for x in lines)
    dpo = summary["dpo"]
    pairs = [json.loads(x) for x in (tmp_path / "demo" / "dpo_pairs.jsonl").read_text().splitlines()]
    assert dpo["pairs"] == len(pairs) > 0 and dpo["prompts"] == 6
    assert all(p["score_chosen"] >= p["score_rejected"] for p in pairs)  # the RM labelled them
    assert dpo["steps"] == -(-len(pairs) // 4) and len(dpo["samples"]) == 6
    assert (tmp_path / "demo" / "dpo" / "samples.jsonl").is_file()  # the generation probe ran
