"""Tests for alignforge.data.stats."""

from __future__ import annotations

import json

from alignforge.data.stats import compute_stats, diff_histogram, format_stats

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731


def test_diff_histogram_bins():
    h = diff_histogram([-300, -256, -255, -1, 0, 1, 16, 17, 256, 257])
    got = {b["label"]: b["count"] for b in h}
    assert got == {
        "<= -256": 2,
        "-255..-128": 1,
        "-127..-64": 0,
        "-63..-32": 0,
        "-31..-16": 0,
        "-15..-1": 1,
        "0": 1,
        "1..16": 2,
        "17..32": 1,
        "33..64": 0,
        "65..128": 0,
        "129..256": 1,
        ">= 257": 1,
    }
    assert h[0]["lo"] is None and h[-1]["hi"] is None


def test_preference_stats_by_hand_in_words(jl):
    p = jl(
        [
            {"prompt": "one two", "chosen": "a b c", "rejected": "a"},  # single, +2
            {
                "prompt": [S("sys word"), U("h1"), A("x y"), U("last turn here")],
                "chosen": [A("r")],
                "rejected": [A("r s t u")],
            },  # multi, -3
            {"prompt": "p", "chosen": "same len", "rejected": "also two"},  # single, 0
            {"prompt": "p", "chosen": "x"},  # invalid
        ]
    )
    s = compute_stats(p, None)
    assert (s["records"], s["valid"], s["pairs"], s["dropped"]) == (4, 3, 3, 1)
    assert s["dropped_reasons"] == {"missing field": 1} and s["identical_pairs"] == 0
    assert s["first_dropped"] == f"{p}:4: field 'rejected': missing field"
    single, multi, all_ = (s["rows"][g] for g in ("single_turn", "multi_turn", "all"))
    assert single == {
        "count": 2,
        "avg_turns": 1.0,
        "avg_history_tokens": 0.0,
        "avg_prompt_tokens": 1.5,
        "avg_chosen_tokens": 2.5,
        "avg_rejected_tokens": 1.5,
        "avg_response_tokens": 2.0,
    }
    assert multi == {
        "count": 1,
        "avg_turns": 2.0,
        "avg_history_tokens": 5.0,
        "avg_prompt_tokens": 3.0,
        "avg_chosen_tokens": 1.0,
        "avg_rejected_tokens": 4.0,
        "avg_response_tokens": 2.5,
    }
    assert all_["count"] == 3 and all_["avg_history_tokens"] == round(5 / 3, 2)
    assert s["equal_length_pairs"] == 1 and s["longer_chosen_share"] == 0.5
    assert sum(b["count"] for b in s["length_diff_histogram"]) == 3
    json.dumps(s, allow_nan=False)
    text = format_stats(s)
    assert "single-turn" in text and "multi-turn" in text and "equal-length pairs: 1" in text
    assert "50.0%" in text and "words" in text


def test_stats_describe_pairs_that_training_rejects(jl):
    s = compute_stats(
        jl(
            [
                {"prompt": "p", "chosen": "dup", "rejected": "dup"},
                {"prompt": "p", "chosen": " ", "rejected": "b"},
                {"prompt": "p", "chosen": "a", "rejected": "b"},
            ]
        ),
        None,
    )
    assert (s["pairs"], s["identical_pairs"], s["empty_response_pairs"], s["dropped"]) == (3, 1, 1, 0)
    assert "1 with an empty response, 1 with chosen identical to rejected" in format_stats(s)


def test_token_counts_use_tokenizer_without_special_tokens(jl, tiny_tokenizer):
    p = jl([{"prompt": "The quick brown fox", "chosen": "Hello! How can I help?", "rejected": "No."}])
    s = compute_stats(p, tiny_tokenizer)
    n = lambda t: len(tiny_tokenizer(t, add_special_tokens=False).input_ids)  # noqa: E731
    row = s["rows"]["all"]
    assert row["avg_prompt_tokens"] == n("The quick brown fox")
    assert row["avg_chosen_tokens"] == n("Hello! How can I help?")
    assert row["avg_rejected_tokens"] == n("No.")
    assert s["token_unit"] == "tokens" and s["longer_chosen_share"] == 1.0


def test_sft_pointwise_prompt_stats(jl):
    sft = compute_stats(
        jl(
            [{"messages": [U("a b"), A("c"), U("d"), A("e f g")]}, {"prompt": "x", "completion": "y z"}], name="s.jsonl"
        ),
        None,
    )
    assert sft["kind"] == "sft" and "pairs" not in sft and "length_diff_histogram" not in sft
    assert sft["rows"]["multi_turn"] == {
        "count": 1,
        "avg_turns": 2.0,
        "avg_history_tokens": 3.0,
        "avg_prompt_tokens": 1.0,
        "avg_response_tokens": 3.0,
    }
    pw = compute_stats(
        jl(
            [
                {"prompt": "q", "completion": "a b", "label": True},
                {"prompt": "q", "completion": "c", "label": 0},
                {"prompt": "q", "completion": "c", "label": 0.5},
            ],
            name="p.jsonl",
        ),
        None,
    )
    assert pw["labels"] == {"positive": 1, "negative": 1, "other": 1}
    assert pw["rows"]["all"]["avg_response_tokens"] == round(4 / 3, 2)
    pr = compute_stats(jl([{"prompt": "a b c"}], name="q.jsonl"), None, kind="prompt")
    assert pr["rows"]["all"] == {"count": 1, "avg_turns": 1.0, "avg_history_tokens": 0.0, "avg_prompt_tokens": 3.0}
    assert pr["rows"]["multi_turn"]["count"] == 0 and pr["rows"]["multi_turn"]["avg_turns"] is None
    for s in (sft, pw, pr):
        json.dumps(s, allow_nan=False)
        assert format_stats(s)


def test_real_hh_harmless_stats(hh_dir, tiny_tokenizer):
    s = compute_stats(hh_dir / "harmless-base" / "test.jsonl.gz", tiny_tokenizer)
    assert s["records"] == 2312 and s["pairs"] == 2312 and s["dropped"] == 0
    assert s["empty_response_pairs"] == 4 and s["identical_pairs"] == 0  # described, flagged, not dropped
    rows = s["rows"]
    assert rows["single_turn"]["count"] + rows["multi_turn"]["count"] == rows["all"]["count"] == s["pairs"]
    assert rows["single_turn"]["avg_history_tokens"] == 0.0 and rows["multi_turn"]["avg_history_tokens"] > 0
    assert rows["multi_turn"]["avg_turns"] > 2
    h = s["length_diff_histogram"]
    assert sum(b["count"] for b in h) == s["pairs"]
    zero = next(b for b in h if b["label"] == "0")
    assert zero["count"] == s["equal_length_pairs"]
    assert 0.0 < s["longer_chosen_share"] < 1.0
    json.dumps(s, allow_nan=False)
    assert "2312" in format_stats(s)


def test_data_stats_cli_names_first_dropped_line(jl, tiny_model_dir, capsys):
    from alignforge.cli import main

    p = jl(
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "a", "rejected": 3},
            {"prompt": "p", "chosen": "a"},
        ]
    )
    assert main(["data", "stats", str(p), "--tokenizer", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "dropped: 1× wrong type, 1× missing field" in out
    assert f"first dropped: {p}:2: field 'rejected': wrong type: expected a string, got number" in out
    assert compute_stats(jl([{"prompt": "p", "chosen": "a", "rejected": "b"}]), None)["first_dropped"] is None


def test_data_stats_cli_on_undetectable_file(tmp_path, tiny_model_dir, capsys):
    from alignforge.cli import main

    p = tmp_path / "arrays.jsonl"
    p.write_text('\n[{"prompt": "p"}]\n[{"prompt": "q"}]\n')  # JSONL whose records are arrays
    assert main(["data", "stats", str(p), "--tokenizer", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:2: cannot detect the data kind" in err and "not a JSON object: got list" in err
