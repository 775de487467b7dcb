"""Import (file:line errors), export (TRL / raw / point-wise), and the CLI commands."""

from __future__ import annotations

import gzip
import json

import pytest
from typer.testing import CliRunner

from alignforge.annotate import export as ex
from alignforge.annotate import service as svc
from alignforge.annotate.cli import annotate_app
from alignforge.data.readers import read_pointwise, read_preference
from alignforge.data.stats import compute_stats

runner = CliRunner()


def cli(*args, env=None):
    return runner.invoke(annotate_app, list(args), env=env)


def test_import_pairs_multiturn_and_formats(db, tmp_path):
    p = tmp_path / "pairs.jsonl"
    recs = [
        {
            "id": "m1",
            "prompt": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "tell me a joke"},
            ],
            "response_a": "joke A",
            "response_b": "joke B",
            "category": "fun",
        },
        {"prompt": "plain string prompt", "response_a": "x", "response_b": "y", "gold": "b"},
        {"prompt": "trl style", "chosen": "good", "rejected": "bad"},
        {"chosen": "\n\nHuman: hh?\n\nAssistant: yes", "rejected": "\n\nHuman: hh?\n\nAssistant: no"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    rep = svc.import_pairs(db, p)
    assert (rep.read, rep.added, rep.gold) == (4, 4, 1)
    assert svc.import_pairs(db, p).added == 0  # re-import is harmless
    pairs = svc.read_pairs(p)
    assert pairs[0].prompt[1] == {"role": "assistant", "content": "hello"} and pairs[0].category == "fun"
    assert pairs[1].gold_overall == -1 and pairs[1].prompt == [{"role": "user", "content": "plain string prompt"}]
    assert (pairs[3].prompt, pairs[3].response_a, pairs[3].response_b) == (
        [{"role": "user", "content": "hh?"}],
        "yes",
        "no",
    )


def test_malformed_import_lists_file_line_errors(db, tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"prompt": "ok", "response_a": "a", "response_b": "b"}),
        "{not json",
        json.dumps({"prompt": "p", "response_a": "same", "response_b": "same"}),
        json.dumps({"prompt": "p", "response_a": 3, "response_b": "b"}),
        json.dumps([1, 2]),
        json.dumps({"prompt": [{"role": "assistant", "content": "x"}], "response_a": "a", "response_b": "b"}),
        json.dumps({"prompt": "p", "response_a": "a", "response_b": "b", "gold": "maybe"}),
    ]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(svc.ImportFileError) as ei:
        svc.import_pairs(db, p)
    msg = str(ei.value)
    assert len(ei.value.errors) == 6
    for line, frag in [
        (2, "invalid JSON"),
        (3, "field 'response_b': identical responses"),
        (4, "field 'response_a': wrong type"),
        (5, "not a JSON object"),
        (6, "field 'prompt[0].role'"),
        (7, "field 'gold': unknown value"),
    ]:
        assert f"{p}:{line}: " in msg and frag in msg, (line, frag, msg)
    assert svc.all_progress(db, 1)["items"] == 0  # nothing imported
    # the CLI prints the same and exits 2
    r = cli("import", str(p), "--db", f"sqlite:///{tmp_path / 'c.db'}")
    assert r.exit_code == 2 and f"{p}:4: field 'response_a'" in r.output
    r = cli("import", str(p), "--skip-invalid", "--db", f"sqlite:///{tmp_path / 'c.db'}")
    assert r.exit_code == 0 and "1 added" in r.output and "6 invalid records skipped" in r.output


def test_import_real_hh_rlhf(shared_data, tmp_path):
    path = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    db = f"sqlite:///{tmp_path / 'hh.db'}"
    r = cli("import", str(path), "--db", db)
    assert r.exit_code == 2 and f"{path}:87: field 'chosen': empty response" in r.output
    r = cli("import", str(path), "--db", db, "--skip-invalid")
    assert r.exit_code == 0, r.output
    n_lines = sum(1 for line in gzip.open(path, "rt") if line.strip())
    assert f"{n_lines - 4} added" in r.output


@pytest.fixture
def judged(db, tmp_path, pairs_writer, fast_hasher):
    """4 items judged by 3 annotators with known outcomes (display order undone)."""
    S = db
    pairs_writer(tmp_path / "p.jsonl", 4)
    svc.import_pairs(S, tmp_path / "p.jsonl")
    # item -> canonical overall per annotator (None = both bad)
    plan = {
        "item-0": [2, 1, -1],  # majority A; BT: A
        "item-1": [-2, -1, 0],  # B
        "item-2": [1, -1, 0],  # majority: 3-way draw -> tie; BT: wa=2, wb=2 -> tie
        "item-3": [None, None, 1],
    }  # both bad
    ids = {}
    for i in range(3):
        svc.create_user(S, f"a{i}", "password-123", hasher=fast_hasher)
        ids[i] = next(u.id for u in svc.list_users(S) if u.username == f"a{i}")
    inv = {2: "a2", 1: "a1", 0: "tie", -1: "b1", -2: "b2"}
    for i in range(3):
        while (a := svc.claim_next(S, ids[i], k=3, lease_seconds=60)) is not None:
            with S() as s:
                from alignforge.annotate.db import Item

                uid = s.get(Item, a.item_id).uid
            v = plan[uid][i]
            shown = "both_bad" if v is None else inv[-v if a.swapped else v]
            res = svc.submit(S, ids[i], a.id, a.submission_token, svc.JudgmentForm(shown, "clear"), k=3)
            assert res.status == "ok"
    return S


def test_aggregation(judged):
    maj = {a["item"].uid: a["outcome"] for a in ex.aggregate(judged, "majority")}
    assert maj == {"item-0": "a", "item-1": "b", "item-2": "tie", "item-3": "both_bad"}
    bt = {a["item"].uid: (a["outcome"], a["margin"]) for a in ex.aggregate(judged, "bt")}
    assert bt["item-0"][0] == "a" and bt["item-0"][1] == pytest.approx(__import__("math").log(3.5 / 1.5))
    assert bt["item-1"][0] == "b" and bt["item-2"][0] == "tie" and bt["item-3"][0] == "both_bad"
    assert ex.majority([(1, False), (-1, False)]) == "tie"
    assert ex.bradley_terry([(2, False), (-1, False)])[0] == "a"


def test_exports_are_readable_and_stats_work(judged, tmp_path):
    out, ties = tmp_path / "prefs.jsonl", tmp_path / "ties.jsonl"
    r = ex.export_trl(judged, out, "majority", ties)
    assert (r["pairs"], r["ties"], r["both_bad"]) == (2, 1, 1)
    recs = read_preference(out).records
    assert [x.chosen[0]["content"] for x in recs] == ["short answer 0", "a much longer answer number 1"]
    assert all(x.conversational and x.prompt[0]["role"] == "user" for x in recs)
    st = compute_stats(out, None)
    assert st["kind"] == "preference" and st["pairs"] == 2 and st["longer_chosen_share"] == 0.5
    tl = [json.loads(x) for x in ties.read_text().splitlines()]
    assert sorted(t["label"] for t in tl) == ["both_bad", "tie"]
    # without a ties file they are left out
    assert ex.export_trl(judged, tmp_path / "p2.jsonl", "bt")["ties_written"] == 0
    assert "margin" in json.loads((tmp_path / "p2.jsonl").read_text().splitlines()[0])
    # point-wise: winner true, loser false, both-bad both false, tie left out
    pw = tmp_path / "pw.jsonl"
    ex.export_pointwise(judged, pw)
    recs = read_pointwise(pw).records
    assert [r.label for r in recs] == [True, False, False, True, False, False]
    assert compute_stats(pw, None)["labels"] == {"positive": 2, "negative": 4, "other": 0}
    raw = tmp_path / "raw.jsonl"
    assert ex.export_raw(judged, raw) == 12
    rows = [json.loads(x) for x in raw.read_text().splitlines()]
    assert {r["annotator"] for r in rows} == {"a0", "a1", "a2"}
    assert all(r["overall"] == (None if r["both_bad"] else r["overall"]) for r in rows)
    assert sum(r["both_bad"] for r in rows) == 2


def test_cli_users_export_agree(tmp_path, pairs_writer):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {"ALIGNFORGE_ANNOTATE_PASSWORD": "secret-pass-1"}
    assert cli("users", "add", "boss", "--role", "admin", "--db", db, env=env).exit_code == 0
    r = cli("users", "add", "boss", "--db", db, env=env)
    assert r.exit_code == 2 and "already exists" in r.output
    r = cli("users", "add", "x", "--role", "king", "--db", db, env=env)
    assert r.exit_code == 2 and "unknown role" in r.output
    assert cli("users", "add", "ann", "--db", db, env=env).exit_code == 0
    assert cli("users", "set", "ann", "--inactive", "--db", db).exit_code == 0
    r = cli("users", "list", "--db", db)
    assert "boss\tadmin\tactive" in r.output and "ann\tannotator\tinactive" in r.output
    pairs_writer(tmp_path / "p.jsonl", 3)
    assert "3 added" in cli("import", str(tmp_path / "p.jsonl"), "--db", db).output
    r = cli("export", "--out", str(tmp_path / "e.jsonl"), "--db", db)
    assert r.exit_code == 0 and "wrote 0 pairs" in r.output
    r = cli("export", "--format", "nope", "--out", str(tmp_path / "e.jsonl"), "--db", db)
    assert r.exit_code == 2 and "unknown format" in r.output
    r = cli("agree", "--db", db, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["judgments"] == 0
