"""Mixing data files with a seeded held-out split of each (data/mix.py, `alignforge data mix`)."""

from __future__ import annotations

import json

import pytest

from alignforge.data.mix import allocate, load_spec, mix_files, parse_spec
from alignforge.data.split import holdout_split
from alignforge.errors import ConfigError, DataError


def _pref(tag, i, standard=False):
    if standard:
        return {"prompt": f"{tag} q{i}", "chosen": f"{tag} good {i}", "rejected": f"{tag} bad {i}"}
    return {
        "prompt": [{"role": "user", "content": f"{tag} q{i}"}],
        "chosen": [{"role": "assistant", "content": f"{tag} good {i}"}],
        "rejected": [{"role": "assistant", "content": f"{tag} bad {i}"}],
    }


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _tag(row):
    return row["prompt"][0]["content"].split()[0]


@pytest.fixture
def two_files(jl):
    a = jl([_pref("A", i) for i in range(40)], name="a.jsonl")
    b = jl([_pref("B", i, standard=True) for i in range(30)], name="b.jsonl")
    return a, b


def _spec(a, b, **kw):
    return parse_spec(
        {
            "n_train": kw.get("n_train", 30),
            "seed": kw.get("seed", 42),
            "sources": [
                {"file": str(a), "weight": 2, "heldout": 5, "split_seed": 0},
                {"file": str(b), "weight": 1, "heldout": 4, "split_seed": 1},
            ],
        }
    )


def test_allocate_largest_remainder():
    # 10·[1,1,1]/3 = 3.33 each: floors 3,3,3, the one left goes to the earliest tie
    assert allocate(10, [1, 1, 1]) == [4, 3, 3]
    # 7·[0.5, 0.3, 0.2] = 3.5, 2.1, 1.4: floors 3,2,1, one left -> largest fraction (0.5, the first)
    assert allocate(7, [0.5, 0.3, 0.2]) == [4, 2, 1]
    assert allocate(600, [1, 1]) == [300, 300]
    assert sum(allocate(601, [3, 2, 5])) == 601


def test_mix_respects_ratio_and_holdout(two_files, tmp_path):
    a, b = two_files
    rep = mix_files(_spec(a, b), tmp_path / "mix")
    rows = _rows(tmp_path / "mix" / "train.jsonl")
    # 30 · 2/3 = 20 from A, 10 from B
    assert [r["train"] for r in rep["sources"]] == [20, 10]
    assert len(rows) == 30 and sum(_tag(r) == "A" for r in rows) == 20 and sum(_tag(r) == "B" for r in rows) == 10
    assert [r["share"] for r in rep["sources"]] == pytest.approx([2 / 3, 1 / 3])
    # held out: exactly holdout_split's picks on each file, never in the mix
    held_a = _rows(tmp_path / "mix" / "heldout" / "a.jsonl")
    want = [f"A q{i}" for i in holdout_split(40, 5, seed=0)[1]]
    assert [r["prompt"][0]["content"] for r in held_a] == want
    held_b = _rows(tmp_path / "mix" / "heldout" / "b.jsonl")
    assert [r["prompt"][0]["content"] for r in held_b] == [f"B q{i}" for i in holdout_split(30, 4, seed=1)[1]]
    used = {r["prompt"][0]["content"] for r in rows}
    assert not used & set(want) and not used & {r["prompt"][0]["content"] for r in held_b}
    assert len(used) == 30  # sampled without replacement
    # one (conversational) style for the whole mix, though b.jsonl was standard
    assert all(isinstance(r["prompt"], list) for r in rows)
    saved = json.loads((tmp_path / "mix" / "mix_report.json").read_text())
    assert [(s["read"], s["heldout"], s["pool"], s["train"]) for s in saved["sources"]] == [
        (40, 5, 35, 20),
        (30, 4, 26, 10),
    ]
    # mixed, not concatenated: the first 20 rows are not all from A
    assert {_tag(r) for r in rows[:20]} == {"A", "B"}


def test_mix_is_deterministic_per_seed(two_files, tmp_path):
    a, b = two_files
    mix_files(_spec(a, b), tmp_path / "m1")
    mix_files(_spec(a, b), tmp_path / "m2")
    mix_files(_spec(a, b, seed=7), tmp_path / "m3")
    t1, t2, t3 = ((tmp_path / m / "train.jsonl").read_bytes() for m in ("m1", "m2", "m3"))
    assert t1 == t2
    assert t1 != t3
    # the held-out part depends on split_seed only, not on the mix seed
    assert (tmp_path / "m1/heldout/a.jsonl").read_bytes() == (tmp_path / "m3/heldout/a.jsonl").read_bytes()


def test_mix_with_n_per_source(two_files, tmp_path):
    a, b = two_files
    spec = parse_spec({"sources": [{"file": str(a), "n": 3}, {"file": str(b), "n": 26, "heldout": 4}]})
    rep = mix_files(spec, tmp_path / "m")
    assert [r["train"] for r in rep["sources"]] == [3, 26]
    assert not (tmp_path / "m" / "heldout" / "a.jsonl").exists()  # heldout 0: nothing held out
    spec.sources[1].n = 27  # one more than b's pool (30 - 4)
    with pytest.raises(ConfigError, match=r"sources\[1\].*asked for 27 records but its training pool holds 26"):
        mix_files(spec, tmp_path / "m")


def test_missing_file_is_a_clear_error(two_files, tmp_path):
    a, _ = two_files
    spec_path = tmp_path / "mix.yaml"
    spec_path.write_text(
        f"n_train: 10\nsources:\n  - {{file: {a}, weight: 1}}\n  - {{file: nowhere/missing.jsonl, weight: 1}}\n"
    )
    spec = load_spec(spec_path)
    with pytest.raises(ConfigError, match=r"mix\.yaml: sources\[1\]\.file: file not found: .*nowhere/missing\.jsonl"):
        mix_files(spec, tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing written


def test_empty_split_is_a_clear_error(jl, two_files, tmp_path):
    a, _ = two_files
    empty = jl([], name="empty.jsonl")
    spec = parse_spec({"n_train": 10, "sources": [{"file": str(a), "weight": 1}, {"file": str(empty), "weight": 1}]})
    with pytest.raises(DataError, match=r"empty\.jsonl: empty split: no preference records"):
        mix_files(spec, tmp_path / "m")
    # holding out every record leaves an empty training pool
    small = jl([_pref("C", i) for i in range(3)], name="small.jsonl")
    spec = parse_spec(
        {"n_train": 4, "sources": [{"file": str(a), "weight": 1}, {"file": str(small), "weight": 1, "heldout": 3}]}
    )
    with pytest.raises(ConfigError, match=r"sources\[1\]\.heldout .*small\.jsonl.*empty training pool"):
        mix_files(spec, tmp_path / "m")
    # a share that rounds to 0 records
    spec = parse_spec({"n_train": 2, "sources": [{"file": str(a), "weight": 100}, {"file": str(small), "weight": 1}]})
    with pytest.raises(ConfigError, match=r"sources\[1\].*rounds to 0 records \(empty split\)"):
        mix_files(spec, tmp_path / "m")


def test_files_of_different_formats_each_get_file_line_errors(jl, tmp_path):
    good = jl([_pref("A", i) for i in range(5)], name="good.jsonl")
    # a point-wise file where a preference file is expected: its own file and line
    pointwise = jl([{"prompt": "q", "completion": "c", "label": True}] * 3, name="pw.jsonl")
    # a preference file with one bad record on line 3
    bad3 = jl([_pref("B", 0), _pref("B", 1), {"prompt": "q", "chosen": "x", "rejected": 7}], name="bad3.jsonl")
    spec = parse_spec(
        {"n_train": 4, "sources": [{"file": str(good), "weight": 1}, {"file": str(pointwise), "weight": 1}]}
    )
    with pytest.raises(DataError) as e:
        mix_files(spec, tmp_path / "m")
    assert e.value.file == str(pointwise) and e.value.line == 1 and e.value.field == "chosen"
    spec = parse_spec({"n_train": 4, "sources": [{"file": str(bad3), "weight": 1}, {"file": str(good), "weight": 1}]})
    with pytest.raises(DataError) as e:
        mix_files(spec, tmp_path / "m")
    assert str(e.value).startswith(f"{bad3}:3: field 'rejected'")
    # on_error=skip: bad records are dropped and counted, but a file with none readable is still an error
    spec = parse_spec(
        {
            "n_train": 4,
            "on_error": "skip",
            "sources": [{"file": str(bad3), "weight": 1}, {"file": str(good), "weight": 1}],
        }
    )
    rep = mix_files(spec, tmp_path / "m")
    assert [(s["read"], s["dropped"]) for s in rep["sources"]] == [(2, 1), (5, 0)]
    spec.sources[1].file = str(pointwise)
    with pytest.raises(DataError) as e:
        mix_files(spec, tmp_path / "m")
    assert e.value.file == str(pointwise) and e.value.line == 1 and "no readable preference record" in str(e.value)


def test_spec_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"sources\[0\]: give exactly one of 'weight' and 'n'"):
        parse_spec({"n_train": 3, "sources": [{"file": "x", "weight": 1, "n": 3}]})
    with pytest.raises(ConfigError, match=r"'n_train' .* is required"):
        parse_spec({"sources": [{"file": "x", "weight": 1}]})
    with pytest.raises(ConfigError, match=r"sources\[1\]\.weight: expected a number > 0"):
        parse_spec({"n_train": 3, "sources": [{"file": "x", "weight": 1}, {"file": "y", "weight": -1}]})
    with pytest.raises(ConfigError, match=r"sources\[0\]\.wieght: unknown key"):
        parse_spec({"n_train": 3, "sources": [{"file": "x", "wieght": 1}]})
    with pytest.raises(ConfigError, match="either every source gives 'n' or every source gives 'weight'"):
        parse_spec({"n_train": 3, "sources": [{"file": "x", "weight": 1}, {"file": "y", "n": 2}]})


def test_cli_data_mix(two_files, tmp_path, capsys):
    from alignforge.cli import main

    a, b = two_files
    spec = tmp_path / "mix.yaml"
    spec.write_text(
        f"n_train: 12\nseed: 3\nsources:\n  - {{file: {a}, weight: 1, heldout: 2}}\n  - {{file: {b}, weight: 1}}\n"
    )
    assert main(["data", "mix", str(spec), "--out", str(tmp_path / "o"), "--n-train", "8"]) == 0
    rep = json.loads((tmp_path / "o" / "mix_report.json").read_text())
    assert [s["train"] for s in rep["sources"]] == [4, 4] and rep["seed"] == 3
    assert "mixed 8 preference records" in capsys.readouterr().out
    assert main(["data", "mix", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")]) == 2


def test_hh_helpful_and_harmless_mix(hh_dir, tmp_path):
    """The real files: raw HH transcripts of both splits, the held-out protocol of the RM/DPO results."""
    spec = parse_spec(
        {
            "n_train": 60,
            "on_error": "skip",
            "sources": [
                {"file": str(hh_dir / "helpful-base/test.jsonl.gz"), "weight": 1, "heldout": 300},
                {"file": str(hh_dir / "harmless-base/test.jsonl.gz"), "weight": 1, "heldout": 300},
            ],
        }
    )
    rep = mix_files(spec, tmp_path / "hh")
    assert [s["name"] for s in rep["sources"]] == ["helpful-base-test", "harmless-base-test"]
    assert [s["train"] for s in rep["sources"]] == [30, 30]
    assert rep["sources"][1]["read"] == 2308  # harmless-base: 2312 records, 4 with an empty chosen response
