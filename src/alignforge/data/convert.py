"""Convert between data kinds and write TRL-format JSONL, atomically.

Supported conversions (the input kind is auto-detected, see :func:`detect_kind`):

* preference -> preference (normalise; raw HH becomes TRL conversational),
  pointwise (two records per pair: chosen ``label: true``, rejected ``label: false``),
  sft (prompt + chosen).
* pointwise -> pointwise, sft (positives only: ``label`` true or == 1.0),
  preference (every positive x negative completion of the same prompt, in file order;
  ``label`` false or == 0.0 is negative, labels strictly between 0 and 1 are not paired).
* sft -> sft. prompt -> prompt.

Anything else raises :class:`DataError`. Output style follows the input: conversational
records are written as message lists, standard records as plain strings. Output is JSONL,
gzip-compressed when the name ends with ``.gz``, written to a temp file in the same
directory and moved into place with :func:`os.replace`, so an error never leaves a
half-written file behind.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Iterable

from alignforge.data.readers import OnError, detect_kind, read_any, summarize_errors
from alignforge.data.records import (
    Message,
    PointwiseRecord,
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
)
from alignforge.errors import DataError

TARGETS = ("preference", "pointwise", "sft", "prompt")

_ALLOWED: dict[str, tuple[str, ...]] = {
    "preference": ("preference", "pointwise", "sft", "prompt"),
    "pointwise": ("pointwise", "sft", "preference", "prompt"),
    "sft": ("sft",),
    "prompt": ("prompt",),
}


# --------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl(records: Iterable[dict], path: str | Path) -> int:
    """Write ``records`` as JSONL (gzip if ``path`` ends with ``.gz``) atomically.

    Returns the number of records written. On any error the temp file is removed and an
    existing file at ``path`` is left untouched.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    n = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            gz = gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) if out.name.endswith(".gz") else None
            sink: Any = gz if gz is not None else raw
            for rec in records:
                sink.write(json.dumps(rec, ensure_ascii=False, allow_nan=False).encode("utf-8"))
                sink.write(b"\n")
                n += 1
            if gz is not None:
                gz.close()  # writes the gzip trailer; does not close `raw`
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; use the normal default
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return n


def _single(msgs: list[Message], role: str) -> bool:
    return len(msgs) == 1 and msgs[0]["role"] == role


def record_to_trl(record: Any) -> dict:
    """One record as a TRL-format dict, in its original style (standard or conversational).

    A record marked standard whose prompt/response is not a single user/assistant message
    is written conversationally (a plain string could not hold it).
    """
    if isinstance(record, PreferenceRecord):
        std = (
            not record.conversational
            and _single(record.prompt, "user")
            and _single(record.chosen, "assistant")
            and _single(record.rejected, "assistant")
        )
        d: dict = (
            {
                "prompt": record.prompt[0]["content"],
                "chosen": record.chosen[0]["content"],
                "rejected": record.rejected[0]["content"],
            }
            if std
            else {"prompt": _copy(record.prompt), "chosen": _copy(record.chosen), "rejected": _copy(record.rejected)}
        )
        if record.category is not None:
            d["category"] = record.category
        if record.label_source is not None:
            d["source"] = record.label_source
        return d
    if isinstance(record, PointwiseRecord):
        std = not record.conversational and _single(record.prompt, "user") and _single(record.completion, "assistant")
        d = (
            {"prompt": record.prompt[0]["content"], "completion": record.completion[0]["content"]}
            if std
            else {"prompt": _copy(record.prompt), "completion": _copy(record.completion)}
        )
        d["label"] = record.label if isinstance(record.label, bool) else float(record.label)
        if record.category is not None:
            d["category"] = record.category
        return d
    if isinstance(record, SFTRecord):
        m = record.messages
        if not record.conversational and len(m) == 2 and m[0]["role"] == "user" and m[1]["role"] == "assistant":
            return {"prompt": m[0]["content"], "completion": m[1]["content"]}
        return {"messages": _copy(m)}
    if isinstance(record, PromptRecord):
        if not record.conversational and _single(record.prompt, "user"):
            return {"prompt": record.prompt[0]["content"]}
        return {"prompt": _copy(record.prompt)}
    raise TypeError(f"not a record: {type(record).__name__}")


def _copy(msgs: list[Message]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


# --------------------------------------------------------------------------- conversions


def is_positive(label: bool | float) -> bool:
    return label is True or (not isinstance(label, bool) and label == 1.0)


def is_negative(label: bool | float) -> bool:
    return label is False or (not isinstance(label, bool) and label == 0.0)


def preference_to_pointwise(recs: list[PreferenceRecord]) -> list[PointwiseRecord]:
    out: list[PointwiseRecord] = []
    for r in recs:
        out.append(PointwiseRecord(r.prompt, r.chosen, True, r.category, r.conversational, r.source))
        out.append(PointwiseRecord(r.prompt, r.rejected, False, r.category, r.conversational, r.source))
    return out


def pointwise_to_preference(recs: list[PointwiseRecord]) -> list[PreferenceRecord]:
    """Pair every positive with every negative completion of the same prompt.

    Prompts are taken in order of first appearance; within a prompt, positives then
    negatives in file order. Pairs whose two completions are identical are skipped.
    """
    groups: dict[str, tuple[list[PointwiseRecord], list[PointwiseRecord]]] = {}
    for r in recs:
        key = json.dumps(r.prompt, sort_keys=True, ensure_ascii=False)
        pos, neg = groups.setdefault(key, ([], []))
        if is_positive(r.label):
            pos.append(r)
        elif is_negative(r.label):
            neg.append(r)
    out: list[PreferenceRecord] = []
    for pos, neg in groups.values():
        for p, n in product(pos, neg):
            if p.completion == n.completion:
                continue
            out.append(
                PreferenceRecord(
                    p.prompt, p.completion, n.completion, p.category, p.conversational and n.conversational, p.source
                )
            )
    return out


def convert_records(records: list, from_kind: str, to: str) -> list:
    """Convert validated records of ``from_kind`` to ``to`` (see module docstring)."""
    if to not in TARGETS:
        raise DataError(f"unknown target kind {to!r} (expected one of {', '.join(TARGETS)})")
    if to not in _ALLOWED[from_kind]:
        why = {
            "sft": "an SFT demonstration has no rejected response or label",
            "prompt": "a prompt has no response",
        }.get(from_kind, "")
        raise DataError(f"cannot convert {from_kind} data to {to}" + (f": {why}" if why else ""))
    if from_kind == to:
        return list(records)
    if to == "prompt":
        return [PromptRecord(r.prompt, r.conversational, r.source) for r in records]
    if from_kind == "preference":
        if to == "pointwise":
            return preference_to_pointwise(records)
        return [SFTRecord(r.prompt + r.chosen, r.conversational, r.source) for r in records]
    # pointwise
    if to == "sft":
        return [SFTRecord(r.prompt + r.completion, r.conversational, r.source) for r in records if is_positive(r.label)]
    return pointwise_to_preference(records)


@dataclass
class ConvertReport:
    in_path: str
    out_path: str
    from_kind: str
    to_kind: str
    n_in: int  # records in the input (valid + dropped)
    n_valid: int
    n_out: int
    dropped: list[DataError] = field(default_factory=list)

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)

    def summary(self) -> str:
        s = (
            f"converted {self.in_path} ({self.from_kind}) -> {self.out_path} ({self.to_kind}): "
            f"read {self.n_valid} of {self.n_in} records, wrote {self.n_out}"
        )
        if self.dropped:
            s += f"; dropped {self.n_dropped}: {summarize_errors(self.dropped)}"
        return s


def convert_file(in_path: str | Path, out_path: str | Path, to: str, on_error: OnError = "raise") -> ConvertReport:
    """Read ``in_path`` (kind auto-detected), convert to ``to`` and write ``out_path``.

    Nothing is written if reading (with ``on_error="raise"``) or converting fails.
    """
    from_kind = detect_kind(in_path)
    if to not in TARGETS or to not in _ALLOWED[from_kind]:
        convert_records([], from_kind, to)  # raises the explanatory DataError
    res = read_any(in_path, from_kind, on_error)
    try:
        out = convert_records(res.records, from_kind, to)
    except DataError as e:
        raise DataError(e.reason, file=str(in_path)) from None
    n = write_jsonl((record_to_trl(r) for r in out), out_path)
    return ConvertReport(
        str(in_path), str(out_path), from_kind, to, res.n_total, len(res.records), n, list(res.dropped)
    )
