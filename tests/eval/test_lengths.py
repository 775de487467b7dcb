"""``eval lengths``: words or tokens, per file and per category, mean and median; the CLI; bad input."""

import json

import pytest

from alignforge.cli import main
from alignforge.errors import DataError
from alignforge.eval.lengths import is_degenerate, length_report


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_lengths_words_by_hand(tmp_path):
    a = _write(
        tmp_path / "a.jsonl",
        [
            {"id": "1", "category": "x", "response": "one two three"},  # 3
            {"id": "2", "category": "x", "response": "one"},  # 1
            {"id": "3", "category": "y", "response": "a b c d e f g h"},  # 8
            {"id": "4", "response": "  "},  # 0, no category
        ],
    )
    b = _write(tmp_path / "b.jsonl", [{"id": "1", "category": "x", "responses": ["a b", "c d e f"]}])  # 2 and 4
    rep = length_report([a, b])
    assert rep["unit"] == "words"
    fa, fb = rep["files"]
    assert (fa["n"], fa["mean"], fa["median"]) == (4, 3.0, 2.0)
    assert fa["by_category"] == {
        "(none)": {"n": 1, "mean": 0.0, "median": 0.0},
        "x": {"n": 2, "mean": 2.0, "median": 2.0},
        "y": {"n": 1, "mean": 8.0, "median": 8.0},
    }
    assert (fb["n"], fb["mean"], fb["median"]) == (2, 3.0, 3.0)  # every turn of a multi-turn row counts


def test_lengths_tokens(tmp_path, tiny_tokenizer):
    texts = ["Hello there, how are you?", "Fine."]
    f = _write(tmp_path / "t.jsonl", [{"response": t} for t in texts])
    n = [len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    rep = length_report([f], tiny_tokenizer)
    assert rep["unit"] == "tokens"
    assert rep["files"][0]["mean"] == pytest.approx(sum(n) / 2)
    assert n != [len(t.split()) for t in texts]  # tokens, not words


def test_lengths_cli(tmp_path, tiny_model_dir, capsys):
    f = _write(tmp_path / "sft.jsonl", [{"category": "c", "response": "a b c"}, {"category": "c", "response": "a"}])
    g = _write(tmp_path / "ppo.jsonl", [{"category": "c", "response": "a b c d e f"}])
    assert main(["eval", "lengths", str(f), str(g), "--out", str(tmp_path / "len.json")]) == 0
    out = capsys.readouterr().out
    assert "sft.jsonl" in out and "ppo.jsonl" in out and "mean words" in out
    rep = json.loads((tmp_path / "len.json").read_text())
    assert [x["mean"] for x in rep["files"]] == [2.0, 6.0]
    assert main(["eval", "lengths", str(f), "--tokenizer", str(tiny_model_dir)]) == 0
    assert "mean tokens" in capsys.readouterr().out


def test_lengths_bad_input(tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"response": "ok"}) + "\n" + json.dumps({"responses": ["a", None]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'responses\[1\]'"):
        length_report([f])
    assert main(["eval", "lengths", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err


def test_is_degenerate_by_hand():
    assert is_degenerate("") and is_degenerate("  \n ")
    assert not is_degenerate("No.")  # short answers are never loops
    loop = "I am sorry " * 6  # 18 words, 3-grams: 3 distinct of 16
    assert is_degenerate(loop)
    assert not is_degenerate(" ".join(f"w{i}" for i in range(20)))  # 18 of 18 distinct
    # 12 words: 10 trigrams; "a b a b ..." has 2 distinct (0.2 < 0.5); 11 words is below min_words
    assert is_degenerate("a b " * 6) and not is_degenerate(("a b " * 6).rsplit(" ", 2)[0])
    # a loop with enough variety is not degenerate: 7 of 12 trigrams distinct (0.58)
    words = "x1 x2 x3 x4 x5 x6 x7".split() + "x1 x2 x3 x4 x5 x6 x7".split()  # 14 words, 12 trigrams, 7 distinct
    assert not is_degenerate(" ".join(words))
