"""`pairs generate`: two different sampled responses per prompt (tiny random model)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from alignforge.annotate import service as svc
from alignforge.annotate.cli import pairs_app
from alignforge.inference.pairs import generate_pairs


def test_generate_pairs_tiny_model_and_import(tiny_model_dir, tmp_path, db):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "hello there"},
        {
            "prompt": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c?"},
            ]
        },
        {"prompt": "hello there"},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "pairs.jsonl"
    rep = generate_pairs(prompts, out, model=str(tiny_model_dir), temperature=1.5, top_p=1.0, max_new_tokens=8, seed=1)
    assert rep.written == 3 and not rep.failed
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    for r in recs:
        assert r["response_a"].strip() != r["response_b"].strip()
    assert recs[1]["prompt"][1] == {"role": "assistant", "content": "b"}
    assert len({r["id"] for r in recs}) == 3  # a repeated prompt still gets its own item
    assert svc.import_pairs(db, out).added == 3


class _SameBackend:
    def generate(self, prompts, cfg):
        return ["always the same"] * len(prompts)


def test_generate_pairs_gives_up_after_max_tries(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "x"}) + "\n")
    rep = generate_pairs(prompts, tmp_path / "o.jsonl", backend=_SameBackend(), max_tries=3)
    assert rep.written == 0 and len(rep.failed) == 1 and rep.rounds == 4


def test_pairs_cli(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    r = CliRunner().invoke(
        pairs_app,
        [
            "generate",
            str(prompts),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--model",
            str(tiny_model_dir),
            "--temperature",
            "1.5",
            "--max-new-tokens",
            "6",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "wrote 1 pairs" in r.output
    r = CliRunner().invoke(
        pairs_app,
        [
            "generate",
            str(prompts),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--model",
            str(tiny_model_dir),
            "--temperature",
            "0",
        ],
    )
    assert r.exit_code == 2 and "temperature must be > 0" in r.output
