"""Tests for alignforge.data.convert."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from alignforge.data.convert import convert_file, record_to_trl, write_jsonl
from alignforge.data.readers import read_pointwise, read_preference, read_sft
from alignforge.data.records import PreferenceRecord, SFTRecord
from alignforge.errors import DataError

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


def lines(path):
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return [json.loads(x) for x in data.decode().splitlines()]


def test_preference_to_pointwise_standard(jl, tmp_path):
    src = jl([{"prompt": "q", "chosen": "good", "rejected": "bad", "category": "c"}])
    out = tmp_path / "o.jsonl"
    rep = convert_file(src, out, "pointwise")
    assert lines(out) == [
        {"prompt": "q", "completion": "good", "label": True, "category": "c"},
        {"prompt": "q", "completion": "bad", "label": False, "category": "c"},
    ]
    assert (rep.n_in, rep.n_valid, rep.n_out, rep.n_dropped) == (1, 1, 2, 0)
    assert rep.from_kind == "preference" and "wrote 2" in rep.summary()


def test_preference_to_sft_conversational_gz(jl, tmp_path):
    src = jl([{"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]}])
    out = tmp_path / "sub" / "o.jsonl.gz"
    convert_file(src, out, "sft")
    assert lines(out) == [{"messages": [U("q"), A("good")]}]
    assert read_sft(out).records[0].messages == [U("q"), A("good")]


def test_preference_to_sft_standard_keeps_style(jl, tmp_path):
    out = tmp_path / "o.jsonl"
    convert_file(jl([{"prompt": "q", "chosen": "good", "rejected": "bad"}]), out, "sft")
    assert lines(out) == [{"prompt": "q", "completion": "good"}]


def test_raw_hh_to_preference_is_conversational(jl, tmp_path):
    src = jl(
        [
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: yo\n\nHuman: and?\n\nAssistant: good",
                "rejected": "\n\nHuman: Hi\n\nAssistant: yo\n\nHuman: and?\n\nAssistant: bad",
            }
        ]
    )
    out = tmp_path / "o.jsonl"
    convert_file(src, out, "preference")
    assert lines(out) == [{"prompt": [U("Hi"), A("yo"), U("and?")], "chosen": [A("good")], "rejected": [A("bad")]}]


def test_pointwise_to_sft_positives_only(jl, tmp_path):
    src = jl(
        [
            {"prompt": "q", "completion": "a", "label": True},
            {"prompt": "q", "completion": "b", "label": False},
            {"prompt": "q", "completion": "c", "label": 1.0},
            {"prompt": "q", "completion": "d", "label": 0.7},
        ]
    )
    out = tmp_path / "o.jsonl"
    rep = convert_file(src, out, "sft")
    assert lines(out) == [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "c"}]
    assert rep.n_out == 2


def test_pointwise_to_preference_pairs_all_combinations(jl, tmp_path):
    src = jl(
        [
            {"prompt": "q1", "completion": "p1", "label": True},
            {"prompt": "q2", "completion": "n", "label": False},
            {"prompt": "q1", "completion": "n1", "label": 0},
            {"prompt": "q1", "completion": "p2", "label": 1},
            {"prompt": "q1", "completion": "n2", "label": False},
            {"prompt": "q3", "completion": "x", "label": True},
        ]
    )
    out = tmp_path / "o.jsonl"
    rep = convert_file(src, out, "preference")
    got = [(d["prompt"], d["chosen"], d["rejected"]) for d in lines(out)]
    assert got == [("q1", "p1", "n1"), ("q1", "p1", "n2"), ("q1", "p2", "n1"), ("q1", "p2", "n2")]
    assert rep.n_out == 4 and rep.n_valid == 6


def test_pointwise_to_preference_conversational(jl, tmp_path):
    src = jl(
        [
            {"prompt": [U("q")], "completion": [A("y")], "label": True},
            {"prompt": [U("q")], "completion": [A("n")], "label": False},
        ]
    )
    out = tmp_path / "o.jsonl"
    convert_file(src, out, "preference")
    assert lines(out) == [{"prompt": [U("q")], "chosen": [A("y")], "rejected": [A("n")]}]


def test_roundtrip_preference_pointwise_preference(jl, tmp_path):
    objs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    mid, back = tmp_path / "m.jsonl", tmp_path / "b.jsonl"
    convert_file(jl(objs), mid, "pointwise")
    convert_file(mid, back, "preference")
    assert lines(back) == objs


@pytest.mark.parametrize("to", ["preference", "pointwise"])
def test_sft_cannot_become_pairs(jl, tmp_path, to):
    out = tmp_path / "o.jsonl"
    with pytest.raises(DataError, match=f"cannot convert sft data to {to}"):
        convert_file(jl([{"messages": [U("q"), A("a")]}]), out, to)
    assert not out.exists()


def test_unknown_target(jl, tmp_path):
    with pytest.raises(DataError, match="unknown target kind"):
        convert_file(jl([{"prompt": "q", "chosen": "a", "rejected": "b"}]), tmp_path / "o.jsonl", "dpo")


def test_error_leaves_no_output_and_keeps_old_file(jl, tmp_path):
    src = jl([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "a"}])
    out = tmp_path / "o.jsonl"
    with pytest.raises(DataError, match=":2: field 'rejected'"):
        convert_file(src, out, "pointwise")
    assert not out.exists()
    out.write_text("old\n")
    with pytest.raises(DataError):
        convert_file(src, out, "pointwise")
    assert out.read_text() == "old\n"
    assert set(os.listdir(tmp_path)) == {"d.jsonl", "o.jsonl"}  # no temp file left
    rep = convert_file(src, out, "pointwise", on_error="skip")
    assert rep.n_dropped == 1 and rep.n_out == 2 and "1× chosen identical to rejected" in rep.summary()


def test_write_jsonl_atomic_on_midway_failure(tmp_path):
    out = tmp_path / "x.jsonl.gz"

    def gen():
        yield {"a": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(gen(), out)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):  # NaN is not JSON
        write_jsonl([{"a": float("nan")}], tmp_path / "y.jsonl")
    assert os.listdir(tmp_path) == []
    assert write_jsonl([{"a": "é"}, {"b": 2}], out) == 2
    assert lines(out) == [{"a": "é"}, {"b": 2}]


def test_record_to_trl_styles():
    r = PreferenceRecord([U("q")], [A("a")], [A("b")], conversational=False)
    assert record_to_trl(r) == {"prompt": "q", "chosen": "a", "rejected": "b"}
    r2 = PreferenceRecord([U("q"), A("x"), U("y")], [A("a")], [A("b")], conversational=False)
    assert record_to_trl(r2)["prompt"] == [U("q"), A("x"), U("y")]  # cannot be a plain string
    assert record_to_trl(SFTRecord([U("q"), A("a"), U("r"), A("b")], conversational=False)) == {
        "messages": [U("q"), A("a"), U("r"), A("b")]
    }
    with pytest.raises(TypeError):
        record_to_trl({"prompt": "x"})


def test_real_hh_to_preference(hh_dir, tmp_path):
    out = tmp_path / "hh.jsonl.gz"
    rep = convert_file(hh_dir / "helpful-base" / "test.jsonl.gz", out, "preference", on_error="skip")
    assert rep.n_in == 2354 and rep.n_out == rep.n_valid == 2354 - rep.n_dropped
    back = read_preference(out)
    assert len(back.records) == rep.n_out and back.records[0].conversational
    pw = tmp_path / "pw.jsonl"
    convert_file(out, pw, "pointwise")
    assert len(read_pointwise(pw).records) == 2 * rep.n_out
