"""Property tests: every reader fails only with AlignforgeError, whatever the file holds;
assistant masks always cover exactly the assistant texts."""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignforge.data.convert import convert_file
from alignforge.data.readers import (
    detect_kind,
    iter_json_objects,
    read_any,
    read_pointwise,
    read_preference,
    read_prompts,
    read_sft,
)
from alignforge.data.records import SFTRecord
from alignforge.data.tokenize import tokenize_messages, tokenize_sft
from alignforge.errors import AlignforgeError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
READERS = [read_preference, read_pointwise, read_sft, read_prompts]
NAMES = ["d.jsonl", "d.jsonl.gz", "d.json", "d.json.gz", "d.txt"]

KEYS = ["prompt", "chosen", "rejected", "completion", "label", "messages", "category", "role", "content"]
HH = st.builds(
    lambda turns: "".join(f"\n\n{r}:{t}" for r, t in turns),
    st.lists(st.tuples(st.sampled_from(["Human", "Assistant"]), st.text(max_size=8)), max_size=4),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    HH,
    st.sampled_from(["system", "user", "assistant", "tool", " ", ""]),
)
MESSAGE = st.fixed_dictionaries({}, optional={"role": SCALARS, "content": SCALARS})
JSONISH = st.recursive(
    SCALARS,
    lambda ch: st.one_of(st.lists(ch, max_size=4), st.dictionaries(st.sampled_from(KEYS), ch, max_size=4)),
    max_leaves=12,
)
FIELD = st.one_of(SCALARS, st.lists(st.one_of(MESSAGE, SCALARS), max_size=4), JSONISH)
RECORD = st.dictionaries(st.sampled_from(KEYS), FIELD, max_size=6)


_TMP = tempfile.TemporaryDirectory(prefix="alignforge-fuzz-")


def _write(data: bytes, name: str) -> str:
    d = tempfile.mkdtemp(dir=_TMP.name)
    path = os.path.join(d, name)
    if name.endswith(".gz") and not data.startswith(b"\x1f\x8b"):
        data = gzip.compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _exercise(path: str) -> None:
    """Run every reader in both modes; only AlignforgeError may escape."""
    for fn in (
        lambda: list(iter_json_objects(path)),
        lambda: detect_kind(path),
        lambda: read_any(path, on_error="skip"),
    ):
        try:
            fn()
        except AlignforgeError:
            pass
    for reader in READERS:
        try:
            res = reader(path, on_error="skip")
            assert res.n_total == len(res.records) + len(res.dropped)
            res.summary()
        except AlignforgeError:
            pass
        try:
            reader(path, on_error="raise")
        except AlignforgeError:
            pass


@FUZZ
@given(data=st.binary(max_size=300), name=st.sampled_from(NAMES))
def test_fuzz_random_bytes(data, name):
    _exercise(_write(data, name))


@FUZZ
@given(values=st.lists(JSONISH, max_size=5), name=st.sampled_from(NAMES), as_array=st.booleans())
def test_fuzz_random_json_values(values, name, as_array):
    text = json.dumps(values) if as_array else "\n".join(json.dumps(v) for v in values)
    _exercise(_write(text.encode(), name))


@FUZZ
@given(records=st.lists(RECORD, min_size=1, max_size=5), name=st.sampled_from(NAMES))
def test_fuzz_record_like_structures(records, name):
    path = _write("\n".join(json.dumps(r) for r in records).encode(), name)
    _exercise(path)
    for to in ("preference", "pointwise", "sft"):
        out = os.path.join(os.path.dirname(path), f"out-{to}.jsonl")
        try:
            rep = convert_file(path, out, to, on_error="skip")
            assert rep.n_in == rep.n_valid + rep.n_dropped
            assert os.path.exists(out)
        except AlignforgeError:
            assert not os.path.exists(out)


ROLE = st.sampled_from(["system", "user", "assistant"])
MSGS = st.lists(
    st.fixed_dictionaries({"role": ROLE, "content": st.sampled_from(["", " ", "hi", "ok", "x y"])}), max_size=4
)
TEXTISH = st.one_of(st.sampled_from(["", " ", "hi", "ok", "x y"]), HH)
NEAR_VALID = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(TEXTISH, MSGS),
        "chosen": st.one_of(TEXTISH, MSGS),
        "rejected": st.one_of(TEXTISH, MSGS),
        "completion": st.one_of(TEXTISH, MSGS),
        "messages": MSGS,
        "label": st.one_of(st.booleans(), st.floats(-1, 2)),
        "category": st.one_of(st.none(), st.text(max_size=3), st.integers()),
    },
)


@FUZZ
@given(records=st.lists(NEAR_VALID, min_size=1, max_size=6))
def test_fuzz_near_valid_records_keep_invariants(records):
    path = _write("\n".join(json.dumps(r) for r in records).encode(), "d.jsonl")
    _exercise(path)
    for r in read_preference(path, on_error="skip").records:
        assert r.prompt and r.prompt[-1]["role"] == "user"
        assert r.chosen != r.rejected
        assert all(m["role"] == "assistant" and m["content"].strip() for m in r.chosen + r.rejected)
    for r in read_pointwise(path, on_error="skip").records:
        assert 0.0 <= float(r.label) <= 1.0 and r.prompt[-1]["role"] == "user"
    for r in read_sft(path, on_error="skip").records:
        assert r.messages[-1]["role"] == "assistant" and r.messages[-1]["content"].strip()
    for r in read_prompts(path, on_error="skip").records:
        assert r.prompt[-1]["role"] == "user"


SAFE_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc", "Zs", "Zl", "Zp"]), min_size=1, max_size=12
)
CONTENT = st.builds(lambda a, b: a + b, SAFE_TEXT, st.text(alphabet="abc .,!?é", max_size=12))


@settings(max_examples=50, deadline=None)
@given(turns=st.lists(st.tuples(CONTENT, CONTENT), min_size=1, max_size=3), system=st.none() | CONTENT)
def test_fuzz_mask_covers_exactly_assistant_text(tiny_tokenizer, turns, system):
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in turns:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    ids, mask, cut = tokenize_messages(tiny_tokenizer, msgs)
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=False):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    decoded = [tiny_tokenizer.decode(r, skip_special_tokens=False) for r in runs]
    assert decoded == [a + "<|im_end|>" for _, a in turns]
    ex, over = tokenize_sft(SFTRecord(msgs), tiny_tokenizer, max_length=24)
    assert len(ex.input_ids) == len(ex.loss_mask) <= 24 and bool(over) == (len(ids) > 24)
    assert sum(ex.loss_mask) >= 1 and not math.isnan(sum(ex.loss_mask))


def test_fuzz_helpers_really_write_gzip():
    p = _write(b'{"prompt": "q"}\n', "x.jsonl.gz")
    assert len(read_prompts(p).records) == 1
    with pytest.raises(AlignforgeError):
        read_prompts(_write(b"\x1f\x8bjunk", "y.jsonl"))
