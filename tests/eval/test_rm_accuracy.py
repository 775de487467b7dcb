"""``eval rm-accuracy``: accuracy against preference labels per category equals a direct computation from
``rm eval``'s own scores; ties count 0.5; groups from ``category`` or ``metadata``; the CLI writes the JSON."""

import json

import numpy as np
import pytest

from alignforge.errors import DataError
from alignforge.eval.rm_accuracy import accuracy_by_group, rm_accuracy
from alignforge.eval.rm_eval import run_rm_eval
from alignforge.eval.stats import bootstrap_ci

GOOD = ["Sure, here is a clear and helpful answer about it.", "Happy to help: the answer is below, step by step."]
BAD = ["No.", "Go away.", "I will not."]


def _labels(path):
    """18 hand-made labels; returns the file and the expected group of every line (1-based)."""
    rows, groups = [], {}
    for i in range(18):
        chosen, rejected = GOOD[i % 2] + f" ({i})", BAD[i % 3]
        if i % 4 == 3:  # some pairs with the human's choice flipped
            chosen, rejected = rejected, chosen
        if i < 6:  # annotation-export / TRL form with a top-level category
            row = {
                "prompt": [{"role": "user", "content": f"Question {i}?"}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "category": "safety",
            }
            groups[i + 1] = "safety"
        elif i < 12:  # category only in metadata
            row = {"prompt": f"Question {i}?", "chosen": chosen, "rejected": rejected, "metadata": {"category": "code"}}
            groups[i + 1] = "code"
        elif i < 16:  # raw HH with a category
            row = {
                "chosen": f"\n\nHuman: Question {i}?\n\nAssistant: {chosen}",
                "rejected": f"\n\nHuman: Question {i}?\n\nAssistant: {rejected}",
                "category": "chat",
            }
            groups[i + 1] = "chat"
        else:  # no category at all
            row = {"prompt": f"Question {i}?", "chosen": chosen, "rejected": rejected}
            groups[i + 1] = "(none)"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, groups


def _outcome(c, r):
    return 1.0 if c > r else (0.5 if c == r else 0.0)


def test_accuracy_by_group_hand_computed_with_ties():
    res = accuracy_by_group([1.0, 2.0, 2.0, 0.0], [0.0, 2.0, 3.0, 1.0], ["a", "a", "b", None], n_boot=100)
    assert res["accuracy"] == pytest.approx(1.5 / 4) and res["n_ties"] == 1
    g = res["by_group"]
    assert set(g) == {"a", "b", "(none)"}
    assert g["a"]["accuracy"] == pytest.approx(0.75) and g["a"]["n"] == 2 and g["a"]["n_ties"] == 1
    assert g["b"]["accuracy"] == 0.0 and g["(none)"]["accuracy"] == 0.0
    assert g["b"]["ci95"] == [0.0, 0.0]  # one value: a degenerate CI
    rows = res["table"]["rows"]
    assert [r["category"] for r in rows] == ["(none)", "a", "b", "all"]
    assert rows[-1]["accuracy"] == pytest.approx(0.375)
    # no groups at all: only the overall row
    flat = accuracy_by_group([1.0, 0.0], [0.0, 1.0], [None, None])
    assert flat["by_group"] == {} and [r["category"] for r in flat["table"]["rows"]] == ["all"]


def test_rm_accuracy_equals_direct_computation_from_rm_eval_scores(tmp_path, tiny_rm_dir):
    labels, groups = _labels(tmp_path / "labels.jsonl")
    n_boot, seed = 300, 3
    run_rm_eval(tiny_rm_dir, labels, tmp_path / "rm_eval", plots=False, progress=False, n_boot=n_boot, seed=seed)
    scores = [json.loads(x) for x in (tmp_path / "rm_eval" / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 18
    expected: dict[str, list[float]] = {}
    for s in scores:
        expected.setdefault(groups[s["line"]], []).append(_outcome(s["chosen"], s["rejected"]))
    all_out = [o for v in expected.values() for o in v]
    assert 0.0 < np.mean(all_out) < 1.0  # the tiny RM gets some right and some wrong: a real test of grouping

    out = tmp_path / "acc.json"
    res = rm_accuracy(tiny_rm_dir, labels, n_boot=n_boot, seed=seed, progress=False, out_path=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["n_pairs"] == 18
    assert res["accuracy"] == pytest.approx(np.mean(all_out), abs=1e-12)
    assert res["accuracy_ci95"] == pytest.approx(list(bootstrap_ci(all_out, n_resamples=n_boot, seed=seed)))
    assert set(res["by_group"]) == {"safety", "code", "chat", "(none)"}
    for name, outs in expected.items():
        g = res["by_group"][name]
        assert g["n"] == len(outs), name
        assert g["accuracy"] == pytest.approx(np.mean(outs), abs=1e-12), name
        assert g["ci95"] == pytest.approx(list(bootstrap_ci(outs, n_resamples=n_boot, seed=seed))), name
        assert g["ci95"][0] <= g["accuracy"] <= g["ci95"][1]
    rows = {r["category"]: r for r in res["table"]["rows"]}
    assert rows["code"]["accuracy"] == res["by_group"]["code"]["accuracy"] and rows["all"]["n"] == 18


def test_group_by_another_field(tmp_path, tiny_rm_dir):
    labels = tmp_path / "l.jsonl"
    rows = [
        {"prompt": f"Q{i}?", "chosen": GOOD[0] + str(i), "rejected": BAD[0], "metadata": {"annotator": f"u{i % 2}"}}
        for i in range(4)
    ]
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = rm_accuracy(tiny_rm_dir, labels, by="annotator", n_boot=50, progress=False)
    assert {k: v["n"] for k, v in res["by_group"].items()} == {"u0": 2, "u1": 2}
    assert res["table"]["columns"][0] == "annotator"


def test_cli_writes_json_and_bad_labels_name_the_line(tmp_path, tiny_rm_dir, capsys):
    from alignforge.cli import main

    labels, _ = _labels(tmp_path / "labels.jsonl")
    out = tmp_path / "sub" / "acc.json"
    rc = main(["eval", "rm-accuracy", str(tiny_rm_dir), str(labels), "--out", str(out), "--n-boot", "50"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "rm_accuracy" and set(res["by_group"]) == {"safety", "code", "chat", "(none)"}
    printed = capsys.readouterr().out
    assert "safety" in printed and "all" in printed

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q?", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "Q?"}))
    with pytest.raises(DataError, match=r"bad.jsonl:2.*chosen"):
        rm_accuracy(tiny_rm_dir, bad, on_error="raise", progress=False)
