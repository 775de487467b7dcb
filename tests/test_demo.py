"""The demo's whole path (SFT -> answers -> reward model -> rewards) on a tiny model."""

import json


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir):
    from alignforge.demo import DEMO_PROMPTS, run_demo

    lines = []
    res = run_demo(output_dir=str(tmp_path / "demo"), epochs=1, rm_epochs=1, echo=lines.append,
                   model=str(tiny_model_dir))
    assert res["steps"] == 4 and len(res["samples"]) == len(DEMO_PROMPTS)
    assert all(isinstance(s["reward_after"], float) for s in res["samples"])
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["reward_model"].endswith("final") and (tmp_path / "demo" / "rm" / "loss.png").is_file()
    assert any("demo finished" in l for l in lines)
