"""``alignforge demo``: the whole loop (``alignforge pipeline``) on the embedded model and shipped data.

The demo is the pipeline config ``resources/demo/pipeline.yaml`` (``alignforge pipeline demo:pipeline.yaml``
runs the same thing), on data the project wrote itself (``resources/demo``; nothing from ``../shared``):

1. **sft**: the embedded SmolLM2-135M-Instruct on ``sft_demos.jsonl`` (helpful answers to benign requests);
2. **pairs**: off (the labels exist already);
3. **label**: ``preferences.jsonl``, the stand-in for the annotation app's export (chosen: a refusal for a
   harmful request, a helpful answer for a benign one);
4. **rm**: a reward model (LoRA on the SFT model) on those pairs, with held-out pairs for its accuracy;
5. **align**: DPO with ChatGLM-RLHF's next-token (NTP) term, LoRA on the SFT model, on the labelled pairs
   (``align.pairs=sampled``, the paper's RM-labelled samples of the SFT policy, gives this demo nothing to
   learn: its SFT model never samples a refusal);
6. **rain**: RAIN answers of the SFT model (no training) on the held-out harmful prompts, the reward model
   as its evaluator;
7. **eval**: greedy answers of SFT and the aligned policy on the held-out harmful and benign prompt sets
   (``harmful_heldout.jsonl``, ``benign_heldout.jsonl``: never trained on): the refusal rate on the
   harmful set and the answered rate on the benign one (llm-attacks refusal strings), and the reward
   model's mean score and win rate of the aligned policy against SFT on the held-out prompts;
8. **report**: one HTML page (RM accuracy, curves, the tables, examples side by side).

It ends by printing what the aligned policy gained over SFT and the report's path.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

DEMO_CONFIG = "demo:pipeline.yaml"


def gains(status: dict, run_dir: str) -> dict[str, Any]:
    """The eval stage's numbers per policy (refusal rate, answered rate, RM mean, win rate vs SFT)."""
    import json
    from pathlib import Path

    rec = json.loads((Path(run_dir) / "eval" / "stage.json").read_text(encoding="utf-8"))
    out = rec["outputs"]
    per: dict[str, dict] = {}
    for row in out.get("refusal", []):
        per.setdefault(row["policy"], {}).update(
            {k: row[k] for k in ("refusal_rate", "answered_rate") if row.get(k) is not None}
        )
    for row in out.get("rm", []):
        per.setdefault(row["policy"], {})["rm_mean"] = row["rm_mean"]
    for row in out.get("winrate", []):
        pol = row["policy"].split(" vs ")[0]
        per.setdefault(pol, {}).update(win_rate_vs_sft=row["win_rate"], lc_win_rate_vs_sft=row["length_controlled"])
    return per


def run_demo(
    output_dir: str = "outputs/demo",
    model: str = "embedded",
    overrides: Sequence[str] = (),
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the demo pipeline into ``output_dir``; returns the pipeline's status plus ``gains``."""
    from alignforge.pipeline import load_pipeline_config, resolve_path, run_pipeline

    cfg = load_pipeline_config(resolve_path(DEMO_CONFIG), [f"run_dir={output_dir}", f"model={model}", *overrides])
    echo(f"alignforge demo: {DEMO_CONFIG} -> {output_dir} (model: {model})")
    status = run_pipeline(cfg, echo=echo, print_report=False)
    per = gains(status, output_dir)
    echo("held-out results (harmful: refusal rate; benign: answered rate; RM: mean score, win rate vs SFT):")
    for pol, v in per.items():
        parts = [f"{k} {v[k]:.3f}" for k in ("refusal_rate", "answered_rate", "rm_mean", "win_rate_vs_sft") if k in v]
        echo(f"  {pol:8s} " + ", ".join(parts))
    if "report_path" in status:
        echo(f"report: {status['report_path']}")
    return {**status, "gains": per}
