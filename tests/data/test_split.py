"""Seeded held-out splits (data/split.py)."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from alignforge.data.split import holdout_split, split_file
from alignforge.errors import ConfigError


def _read(path):
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return [json.loads(line) for line in raw.decode().splitlines()]


def test_holdout_split_partitions_sorted_and_deterministic():
    train, held = holdout_split(10, 3, seed=0)
    # hand check: the held-out set is exactly random.Random(0).sample(range(10), 3), sorted
    assert held == sorted(random.Random(0).sample(range(10), 3))
    assert held == [0, 6, 9]
    assert train == [1, 2, 3, 4, 5, 7, 8]
    assert holdout_split(10, 3, seed=0) == (train, held)
    assert sorted(train + held) == list(range(10)) and not set(train) & set(held)
    assert holdout_split(10, 3, seed=1)[1] != held  # the seed matters


def test_holdout_split_edges():
    assert holdout_split(5, 0) == ([0, 1, 2, 3, 4], [])
    assert holdout_split(5, 5) == ([], [0, 1, 2, 3, 4])
    assert holdout_split(0, 0) == ([], [])
    tr, he = holdout_split(2308, 300, seed=0)
    assert len(he) == 300 and len(tr) == 2008 and he == sorted(he)
    # a larger k keeps nothing stable by design, but the same call is stable
    assert holdout_split(2308, 300, seed=0)[1] == he
    for bad in [(3, 4), (3, -1), (-1, 0)]:
        with pytest.raises(ConfigError):
            holdout_split(*bad)


def _pref(i):
    return {
        "prompt": [{"role": "user", "content": f"q{i}"}],
        "chosen": [{"role": "assistant", "content": f"good {i}"}],
        "rejected": [{"role": "assistant", "content": f"bad {i}"}],
    }


def test_split_file_writes_trl_jsonl(jl, tmp_path):
    src = jl([_pref(i) for i in range(8)] + [{"prompt": "x", "chosen": 3}] + [_pref(8), _pref(9)])
    # 10 readable preference records (the stray record is unreadable as a pair and skipped)
    rep = split_file(src, tmp_path / "tr.jsonl", tmp_path / "ho.jsonl.gz", k=3, seed=0)
    assert (rep.n_read, rep.n_dropped, rep.n_train, rep.n_heldout, rep.kind) == (10, 1, 7, 3, "preference")
    held = _read(tmp_path / "ho.jsonl.gz")
    train = _read(tmp_path / "tr.jsonl")
    assert [r["prompt"][0]["content"] for r in held] == ["q0", "q6", "q9"]  # indices [0, 6, 9], see above
    assert [r["prompt"][0]["content"] for r in train] == ["q1", "q2", "q3", "q4", "q5", "q7", "q8"]
    assert train[0] == _pref(1)  # conversational records stay conversational, fields intact
    assert "3 held out" in rep.summary() and "1 unreadable" in rep.summary()


def test_split_file_standard_records_and_kind(jl, tmp_path):
    src = jl([{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(4)])
    split_file(src, tmp_path / "a.jsonl", tmp_path / "b.jsonl", k=1, seed=3, kind="preference")
    held = _read(tmp_path / "b.jsonl")
    want = holdout_split(4, 1, seed=3)[1]
    assert held == [{"prompt": f"p{want[0]}", "chosen": "a", "rejected": "b"}]
    assert len(_read(tmp_path / "a.jsonl")) == 3


def test_split_file_refuses_same_output_and_too_large_k(jl, tmp_path):
    src = jl([_pref(i) for i in range(3)])
    with pytest.raises(ConfigError):
        split_file(src, tmp_path / "x.jsonl", tmp_path / "x.jsonl", k=1)
    with pytest.raises(ConfigError):
        split_file(src, tmp_path / "a.jsonl", tmp_path / "b.jsonl", k=4)
    assert not (tmp_path / "a.jsonl").exists()


def test_experiment_split_subsamples_the_pool_and_keeps_heldout_out(tmp_path):
    import json

    from alignforge.data.readers import read_preference
    from alignforge.data.split import experiment_split

    src = tmp_path / "pairs.jsonl"
    src.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n" for i in range(10)
        )
    )
    lines = []
    rep, n = experiment_split(src, tmp_path / "d", heldout=3, split_seed=0, n_train=4, seed=1, echo=lines.append)
    assert n == 4 and "training on 4 of 7 pool pairs (seed 1)" in lines
    train = [r.prompt[0]["content"] for r in read_preference(tmp_path / "d" / "train.jsonl").records]
    held = [r.prompt[0]["content"] for r in read_preference(tmp_path / "d" / "heldout.jsonl").records]
    assert len(train) == 4 and len(held) == 3 and not set(train) & set(held)
    again = tmp_path / "e"
    experiment_split(src, again, heldout=3, split_seed=0, n_train=4, seed=1, echo=lambda s: None)
    assert (again / "train.jsonl").read_text() == (tmp_path / "d" / "train.jsonl").read_text()
    _, n_all = experiment_split(src, tmp_path / "f", heldout=3, n_train=0, echo=lambda s: None)
    assert n_all == 7
