"""Tests for alignforge.data.readers."""

from __future__ import annotations

import gzip
import json

import pytest

from alignforge.data.readers import (
    detect_kind,
    iter_json_objects,
    parse_hh,
    read_any,
    read_pointwise,
    read_preference,
    read_prompts,
    read_sft,
)
from alignforge.data.records import PreferenceRecord, Source
from alignforge.errors import DataError

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731

GOOD_STD = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
GOOD_CONV = {"prompt": [S("be nice"), U("Hi?")], "chosen": [A("Hello!")], "rejected": [A("Go away.")]}


# --------------------------------------------------------------------------- containers


def test_iter_jsonl_lines_are_one_based_and_skip_blank(jl):
    p = jl([{"a": 1}, {"a": 2}])
    p.write_text(p.read_text() + "\n\n" + json.dumps({"a": 3}) + "\n")
    assert list(iter_json_objects(p)) == [(1, {"a": 1}), (2, {"a": 2}), (5, {"a": 3})]


def test_iter_gzip_jsonl(jl):
    p = jl([{"a": 1}, {"b": 2}], name="d.jsonl.gz")
    assert gzip.decompress(p.read_bytes())  # really compressed
    assert [o for _, o in iter_json_objects(p)] == [{"a": 1}, {"b": 2}]


def test_iter_json_array_and_json_gz(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"a": 1}, {"a": 2}], indent=2))
    assert list(iter_json_objects(p)) == [(1, {"a": 1}), (2, {"a": 2})]
    g = tmp_path / "d.json.gz"
    g.write_bytes(gzip.compress(json.dumps([{"x": 1}]).encode()))
    assert list(iter_json_objects(g)) == [(1, {"x": 1})]


def test_iter_single_pretty_printed_object(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"prompt": "q"}, indent=2))
    assert list(iter_json_objects(p)) == [(1, {"prompt": "q"})]


def test_iter_jsonl_content_in_json_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('{"a": 1}\n{"a": 2}\n')
    assert list(iter_json_objects(p)) == [(1, {"a": 1}), (2, {"a": 2})]


def test_iter_hf_datasets_dir_and_dict(tmp_path):
    import datasets

    rows = [GOOD_STD, {**GOOD_STD, "chosen": "Hey."}]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    assert list(iter_json_objects(tmp_path / "ds")) == [(1, rows[0]), (2, rows[1])]
    datasets.DatasetDict({"test": ds.select([1]), "train": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert list(iter_json_objects(tmp_path / "dd")) == [(1, rows[0])]
    datasets.DatasetDict({"only": ds}).save_to_disk(str(tmp_path / "d1"))
    assert len(read_preference(tmp_path / "d1").records) == 2
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "d2"))
    with pytest.raises(DataError, match="ambiguous split"):
        list(iter_json_objects(tmp_path / "d2"))


def test_missing_file_and_plain_dir(tmp_path):
    with pytest.raises(DataError) as e:
        list(iter_json_objects(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(e.value) and "not found" in str(e.value)
    with pytest.raises(DataError, match="not a Hugging Face datasets directory"):
        list(iter_json_objects(tmp_path))


def test_invalid_json_line_names_file_and_line(jl):
    p = jl(['{"a": 1}', '{"a": ', '{"a": 3}'], raw=True)
    with pytest.raises(DataError) as e:
        list(iter_json_objects(p))
    assert e.value.line == 2 and str(e.value).startswith(f"{p}:2: invalid JSON")


def test_non_object_line(jl):
    p = jl([{"a": 1}, [1, 2]])
    with pytest.raises(DataError, match=r":2: not a JSON object: got list"):
        list(iter_json_objects(p))


def test_bad_gzip_and_bad_utf8_are_data_errors(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00garbage-not-gzip")
    with pytest.raises(DataError, match="invalid gzip"):
        list(iter_json_objects(p))
    t = tmp_path / "t.jsonl.gz"
    t.write_bytes(gzip.compress(b'{"a": 1}\n' * 50)[:-12])  # truncated stream
    with pytest.raises(DataError, match="invalid gzip"):
        read_preference(t)
    u = tmp_path / "u.jsonl"
    u.write_bytes(b'{"prompt": "x"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError) as e:
        list(iter_json_objects(u))
    assert e.value.line == 2 and "invalid UTF-8" in e.value.reason
    assert len(read_prompts(u, on_error="skip").records) == 1


# --------------------------------------------------------------------------- HH parsing


def test_parse_hh_turns_strip_one_space():
    text = "\n\nHuman: Hi there\n\nAssistant:  Two spaces\n\nHuman: ok\n\nAssistant: Bye."
    assert parse_hh(text) == [U("Hi there"), A(" Two spaces"), U("ok"), A("Bye.")]


def test_hh_pair_prompt_and_responses(jl):
    base = "\n\nHuman: What is 2+2?\n\nAssistant: Four?\n\nHuman: Sure?"
    p = jl([{"chosen": base + "\n\nAssistant: Yes, 4.", "rejected": base + "\n\nAssistant: No, 5."}])
    (r,) = read_preference(p).records
    assert r.prompt == [U("What is 2+2?"), A("Four?"), U("Sure?")]
    assert r.chosen == [A("Yes, 4.")] and r.rejected == [A("No, 5.")]
    assert r.conversational and r.source == Source(str(p), 1)


def test_hh_empty_final_response(jl):
    p = jl([{"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: yo"}])
    with pytest.raises(DataError) as e:
        read_preference(p)
    assert str(e.value) == f"{p}:1: field 'chosen': empty response"


def test_hh_diverging_transcripts_follow_trl_convention(jl):
    """Corrupted HH records diverge before the last turn: the prompt is the common prefix up to its
    last Assistant marker and the rest of each transcript is the response (as TRL's HH loader does)."""
    p = jl(
        [
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: a\n\nHuman: b\n\nAssistant: c",
                "rejected": "\n\nHuman: Hi\n\nAssistant: x\n\nHuman: b\n\nAssistant: d",
            }
        ]
    )
    (r,) = read_preference(p).records
    assert r.prompt == [U("Hi")]
    assert r.chosen == [A("a\n\nHuman: b\n\nAssistant: c")] and r.rejected == [A("x\n\nHuman: b\n\nAssistant: d")]


def test_hh_prompt_mismatch(jl):
    p = jl([{"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": "\n\nHuman: Yo\n\nAssistant: a"}])
    with pytest.raises(DataError) as e:
        read_preference(p)
    assert e.value.field == "rejected" and "prompt mismatch" in e.value.reason and e.value.line == 1


def test_hh_one_side_not_a_transcript(jl):
    p = jl([{"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": "just text"}])
    with pytest.raises(DataError) as e:
        read_preference(p)
    assert e.value.field == "rejected" and "HH transcript" in e.value.reason


def test_hh_prompt_string_with_assistant_cue(jl):
    p = jl([{"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Bye"}])
    (r,) = read_preference(p).records
    assert r.prompt == [U("Hi")] and r.chosen == [A("Hello")] and r.conversational


def test_real_hh_files(hh_dir):
    harmless = read_preference(hh_dir / "harmless-base" / "test.jsonl.gz", on_error="skip")
    assert harmless.n_total == 2312
    assert len(harmless.records) + len(harmless.dropped) == 2312
    assert {e.reason for e in harmless.dropped} >= {"empty response"}
    helpful = read_preference(hh_dir / "helpful-base" / "test.jsonl.gz", on_error="skip")
    assert helpful.n_total == 2354
    ident = [e for e in helpful.dropped if e.reason == "chosen identical to rejected"]
    assert len(ident) == 2 and all(e.field == "rejected" for e in ident)
    assert "2× chosen identical to rejected" in helpful.summary()
    r = helpful.records[0]
    assert r.prompt[-1]["role"] == "user" and r.chosen[0]["role"] == "assistant"
    assert not r.chosen[0]["content"].startswith(" ")
    with pytest.raises(DataError, match="test.jsonl.gz:87: field 'chosen': empty response"):
        read_preference(hh_dir / "harmless-base" / "test.jsonl.gz")


# --------------------------------------------------------------------------- formats


def test_preference_formats(jl):
    implicit = {"chosen": [U("Hi?"), A("Hello!")], "rejected": [U("Hi?"), A("Go away.")], "category": "c"}
    p = jl([GOOD_STD, GOOD_CONV, implicit])
    std, conv, imp = read_preference(p).records
    assert std == PreferenceRecord([U("Hi?")], [A("Hello!")], [A("Go away.")], None, False, Source(str(p), 1))
    assert conv.prompt == [S("be nice"), U("Hi?")] and conv.conversational
    assert imp.prompt == [U("Hi?")] and imp.chosen == [A("Hello!")] and imp.category == "c"


def test_message_extra_keys_are_dropped(jl):
    p = jl([{"prompt": [{"role": "user", "content": "q", "name": "x"}], "chosen": [A("a")], "rejected": [A("b")]}])
    assert read_preference(p).records[0].prompt == [U("q")]


def test_pointwise_formats(jl):
    p = jl(
        [
            {"prompt": "q", "completion": "a", "label": True},
            {"prompt": [U("q")], "completion": [A("b")], "label": 0},
            {"prompt": "q", "completion": "c", "label": 0.25},
        ]
    )
    a, b, c = read_pointwise(p).records
    assert a.label is True and not a.conversational and a.completion == [A("a")]
    assert b.label == 0.0 and b.conversational
    assert c.label == 0.25


def test_sft_formats(jl):
    p = jl(
        [
            {"messages": [S("s"), U("q"), A("a")]},
            {"prompt": "q", "completion": "a"},
            {"prompt": [U("q")], "completion": [A("a")]},
            GOOD_STD,
            {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"},
            {"prompt": "q", "completion": "pos", "label": True},
        ]
    )
    recs = read_sft(p).records
    assert recs[0].messages == [S("s"), U("q"), A("a")] and recs[0].conversational
    assert recs[1].messages == [U("q"), A("a")] and not recs[1].conversational
    assert recs[2].messages == [U("q"), A("a")] and recs[2].conversational
    assert recs[3].messages == [U("Hi?"), A("Hello!")]
    assert recs[4].messages == [U("q"), A("good")]
    assert recs[5].messages == [U("q"), A("pos")]


def test_sft_negative_pointwise_is_error(jl):
    p = jl([{"prompt": "q", "completion": "neg", "label": False}])
    with pytest.raises(DataError) as e:
        read_sft(p)
    assert e.value.field == "label" and "negative label" in e.value.reason


def test_prompt_formats(jl):
    p = jl(
        [
            {"prompt": "q"},
            {"prompt": [S("s"), U("q")]},
            {"messages": [U("a"), A("b"), U("c")]},
            GOOD_STD,
            {"chosen": [U("x"), A("y")], "rejected": [U("x"), A("z")]},
        ]
    )
    recs = read_prompts(p).records
    assert [r.prompt for r in recs] == [[U("q")], [S("s"), U("q")], [U("a"), A("b"), U("c")], [U("Hi?")], [U("x")]]
    assert [r.conversational for r in recs] == [False, True, True, False, True]


def test_detect_kind_and_read_any(jl):
    assert detect_kind(jl([GOOD_STD])) == "preference"
    assert detect_kind(jl([{"prompt": "q", "completion": "a", "label": 1}])) == "pointwise"
    assert detect_kind(jl([{"messages": [U("q"), A("a")]}])) == "sft"
    assert detect_kind(jl([{"prompt": "q", "completion": "a"}])) == "sft"
    assert detect_kind(jl([{"messages": [U("q")]}])) == "prompt"
    assert detect_kind(jl([[1], {"other": 1}, {"prompt": "q"}])) == "prompt"
    with pytest.raises(DataError, match="cannot detect"):
        detect_kind(jl([{"x": 1}]))
    p = jl([{"prompt": "q", "completion": "a", "label": 1}])
    assert read_any(p).kind == "pointwise"
    assert read_any(p, "prompt").records[0].prompt == [U("q")]
    with pytest.raises(DataError, match="unknown data kind"):
        read_any(p, "bogus")


@pytest.mark.parametrize(
    "content, line, reason",
    [
        (b'[1, 2]\n["x"]\n', 1, "not a JSON object: got list"),  # records are JSON arrays
        (b"\n[[1], [2]]\n", 1, "not a JSON object: got list"),  # a JSON array of arrays
        ('\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"), 2, "invalid UTF-8: invalid continuation byte"),
        ('{"prompt": "q"}\n'.encode("utf-16"), 1, "invalid UTF-8: invalid start byte at byte 0"),
        (b'\n\n{"prompt": \n', 3, "invalid JSON: Expecting value"),
        (b'{"x": 1, "y": 2}\n[3]\n', 1, "no prompt/chosen/rejected/completion/label/messages field (keys: 'x', 'y')"),
    ],
    ids=["jsonl-arrays", "array-of-arrays", "latin-1", "utf-16", "bad-json", "unknown-keys"],
)
def test_detect_kind_failure_names_first_bad_line_and_why(tmp_path, content, line, reason):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError) as ei:
        detect_kind(p)
    e = ei.value
    assert (e.file, e.line) == (str(p), line)
    assert str(e).startswith(f"{p}:{line}: cannot detect the data kind: ")
    assert reason in str(e)


def test_detect_kind_of_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match="cannot detect the data kind: the file has no records"):
        detect_kind(p)


def test_read_unlabeled_is_public_in_data(jl):
    from alignforge.data.readers import Ctx, check_prompt, check_response, read_unlabeled

    p = jl(
        [
            {"prompt": "q", "completion": "a", "extra": 1},
            {"completion": [U("x"), A("y")]},
            {"prompt": "q", "response": "r"},
            {"prompt": "q"},
        ]
    )
    it = read_unlabeled(p)
    assert next(it) == (1, {"prompt": "q", "completion": "a", "extra": 1}, [U("q")], [A("a")])
    assert next(it)[2:] == ([U("x")], [A("y")])
    assert next(it)[2:] == ([U("q")], [A("r")])
    with pytest.raises(DataError) as ei:
        next(it)
    assert str(ei.value) == f"{p}:4: field 'completion': missing field"
    ctx = Ctx("f.jsonl", 7)
    with pytest.raises(DataError, match="f.jsonl:7: field 'p\\[0\\].role': prompt does not end on a user turn"):
        check_prompt([A("x")], "p", ctx)
    with pytest.raises(DataError, match="f.jsonl:7: field 'c\\[0\\].role': non-assistant message"):
        check_response([U("x")], "c", ctx)


# --------------------------------------------------------------------------- validation

CASES = [
    # (reader, object, expected field, reason fragment)
    (read_preference, {"prompt": "q", "rejected": "b"}, "chosen", "missing field"),
    (read_preference, {"prompt": "q", "chosen": "a"}, "rejected", "missing field"),
    (read_preference, {"chosen": "a", "rejected": "b"}, "prompt", "missing field"),
    (read_preference, {"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt", "wrong type"),
    (read_preference, {"prompt": "q", "chosen": 5, "rejected": "b"}, "chosen", "wrong type"),
    (read_preference, {"prompt": "q", "chosen": [A("a")], "rejected": "b"}, "chosen", "wrong type"),
    (read_preference, {"prompt": [U("q")], "chosen": "a", "rejected": [A("b")]}, "chosen", "wrong type"),
    (
        read_preference,
        {"prompt": [U("q"), "hi"], "chosen": [A("a")], "rejected": [A("b")]},
        "prompt[1]",
        "message must be an object",
    ),
    (
        read_preference,
        {"prompt": [U("q"), {"content": "x"}], "chosen": [A("a")], "rejected": [A("b")]},
        "prompt[1].role",
        "missing field",
    ),
    (
        read_preference,
        {"prompt": [U("q"), {"role": "user"}], "chosen": [A("a")], "rejected": [A("b")]},
        "prompt[1].content",
        "missing field",
    ),
    (
        read_preference,
        {"prompt": [S("s"), U("q"), {"role": "tool", "content": "x"}], "chosen": [A("a")], "rejected": [A("b")]},
        "prompt[2].role",
        "unknown role",
    ),
    (
        read_preference,
        {"prompt": [{"role": 1, "content": "x"}], "chosen": [A("a")], "rejected": [A("b")]},
        "prompt[0].role",
        "wrong type",
    ),
    (
        read_preference,
        {"prompt": [{"role": "user", "content": ["x"]}], "chosen": [A("a")], "rejected": [A("b")]},
        "prompt[0].content",
        "wrong type",
    ),
    (read_preference, {"prompt": "q", "chosen": "   \n", "rejected": "b"}, "chosen", "empty response"),
    (read_preference, {"prompt": [U("q")], "chosen": [A("a")], "rejected": []}, "rejected", "empty response"),
    (read_preference, {"prompt": [U("q")], "chosen": [A("a")], "rejected": [A(" ")]}, "rejected", "empty response"),
    (
        read_preference,
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        "rejected",
        "chosen identical to rejected",
    ),
    (
        read_preference,
        {"prompt": [U("q"), A("x")], "chosen": [A("a")], "rejected": [A("b")]},
        "prompt[1].role",
        "does not end on a user turn",
    ),
    (
        read_preference,
        {"prompt": [U("q")], "chosen": [A("a"), U("b")], "rejected": [A("b")]},
        "chosen[1].role",
        "non-assistant message in response",
    ),
    (read_preference, {"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt", "empty prompt"),
    (read_preference, {"prompt": [], "chosen": [A("a")], "rejected": [A("b")]}, "prompt", "empty prompt"),
    (read_preference, {**GOOD_STD, "category": 7}, "category", "wrong type"),
    (read_preference, {"chosen": [U("q"), A("a")], "rejected": [U("q"), U("b")]}, "rejected", "empty response"),
    (read_pointwise, {"prompt": "q", "completion": "a"}, "label", "missing field"),
    (read_pointwise, {"prompt": "q", "completion": "a", "label": "yes"}, "label", "wrong type"),
    (read_pointwise, {"prompt": "q", "completion": "a", "label": 1.5}, "label", "out of range"),
    (read_pointwise, {"prompt": "q", "completion": "a", "label": -1}, "label", "out of range"),
    (read_pointwise, {"prompt": "q", "completion": " ", "label": 1}, "completion", "empty response"),
    (read_pointwise, {"prompt": "q", "label": 1}, "completion", "missing field"),
    (read_sft, {"messages": [U("q")]}, "messages", "no assistant turn"),
    (read_sft, {"messages": [U("q"), A("a"), U("more")]}, "messages[2].role", "does not end on an assistant"),
    (read_sft, {"messages": [U("q"), {"role": "bot", "content": "a"}]}, "messages[1].role", "unknown role"),
    (read_sft, {"text": "x"}, "messages", "missing field"),
    (read_prompts, {"messages": [U("q"), A("a")]}, "messages[1].role", "does not end on a user turn"),
    (read_prompts, {"other": 1}, "prompt", "missing field"),
]


@pytest.mark.parametrize("reader,obj,field,reason", CASES, ids=[f"{c[0].__name__}-{c[2]}-{c[3]}" for c in CASES])
def test_validation_errors(jl, reader, obj, field, reason):
    p = jl([GOOD_STD if reader is not read_pointwise else {"prompt": "q", "completion": "a", "label": 1}, obj])
    with pytest.raises(DataError) as e:
        reader(p)
    err = e.value
    assert (err.file, err.line, err.field) == (str(p), 2, field)
    assert reason in err.reason
    assert str(err).startswith(f"{p}:2: field '{field}': ")


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_label(jl, bad):
    p = jl([f'{{"prompt": "q", "completion": "a", "label": {bad}}}'], raw=True)
    with pytest.raises(DataError) as e:
        read_pointwise(p)
    assert e.value.field == "label" and "non-finite" in e.value.reason and e.value.line == 1


def test_bool_labels_count_as_0_1(jl):
    p = jl([{"prompt": "q", "completion": "a", "label": False}, {"prompt": "q", "completion": "a", "label": 1}])
    assert [r.label for r in read_pointwise(p).records] == [False, 1.0]


# --------------------------------------------------------------------------- skip mode


def test_skip_mode_collects_and_summarises(jl):
    objs = [
        GOOD_STD,
        {"prompt": "q", "chosen": " ", "rejected": "b"},
        GOOD_CONV,
        {"prompt": "q", "chosen": "x", "rejected": "x"},
        {"prompt": "q", "chosen": "", "rejected": "b"},
    ]
    p = jl(objs)
    p.write_text(p.read_text() + "not json\n")
    res = read_preference(p, on_error="skip")
    assert len(res.records) == 2 and len(res.dropped) == 4 and res.n_total == 6
    assert [e.line for e in res.dropped] == [2, 4, 5, 6]
    s = res.summary()
    assert s.startswith(f"read 2 of 6 records from {p}; dropped 4: ")
    assert "2× empty response" in s and "1× chosen identical to rejected" in s and "1× invalid JSON" in s
    assert f"(first: {p}:2: field 'chosen': empty response)" in s
    with pytest.raises(DataError, match=":2: field 'chosen'"):
        read_preference(p)  # raise mode stops at the first error
    with pytest.raises(ValueError):
        read_preference(p, on_error="ignore")  # type: ignore[arg-type]


def test_summary_without_drops(jl):
    p = jl([GOOD_STD])
    assert read_preference(p, "skip").summary() == f"read 1 of 1 records from {p}"
