"""Read and validate preference / pointwise / SFT / prompt data files.

Input containers (see :func:`iter_json_objects`): ``.jsonl``, ``.jsonl.gz``, ``.json`` /
``.json.gz`` (a JSON array, or JSONL content) and Hugging Face ``datasets`` directories
written with ``save_to_disk``.

Record formats (TRL conventions):

* preference: ``{prompt, chosen, rejected}`` as plain strings (*standard*) or message
  lists (*conversational*); ``{chosen, rejected}`` full conversations (*implicit prompt*);
  raw Anthropic HH strings (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``). Optional ``category``,
  and optional ``source`` (a string: who labelled the pair, ``"human"`` or ``"ai:<judge>"``), kept
  as :attr:`PreferenceRecord.label_source`.
* pointwise: ``{prompt, completion, label}`` (TRL unpaired preference), ``label`` a bool or a
  number in [0, 1].
* sft: ``{messages}`` or ``{prompt, completion}``; any preference record (prompt + chosen).
* prompt: ``{prompt}`` or ``{messages}`` ending on a user turn; any preference record.

Every problem is a :class:`~alignforge.errors.DataError` naming file, line and field. Its
reason is ``"<kind>"`` or ``"<kind>: <detail>"``; :meth:`ReadResult.summary` groups dropped
records by ``<kind>``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Union

from alignforge.data.records import (
    Message,
    PointwiseRecord,
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
    Source,
)
from alignforge.errors import DataError

OnError = Literal["raise", "skip"]
Kind = Literal["preference", "pointwise", "sft", "prompt"]
KINDS: tuple[str, ...] = ("preference", "pointwise", "sft", "prompt")
ROLES = frozenset({"system", "user", "assistant"})
HH_PREFIX = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
_HH_SPLIT = re.compile(r"\n\n(Human|Assistant):")


# --------------------------------------------------------------------------- containers


def _is_hf_dir(p: Path) -> bool:
    return any((p / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _iter_hf_dir(p: Path) -> Iterator[tuple[int, Any]]:
    fname = str(p)
    try:
        import datasets  # lazy: heavy import

        ds = datasets.load_from_disk(fname)
    except Exception as e:  # noqa: BLE001 - any loader failure is a data problem
        raise DataError(f"cannot load datasets directory: {type(e).__name__}: {e}", file=fname) from e
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(f"ambiguous split: DatasetDict has splits {splits} and no 'train'", file=fname)
    for i, row in enumerate(ds):
        yield i + 1, row


def _open_bytes(p: Path) -> bytes:
    fname = str(p)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", file=fname) from e
    if p.name.endswith(".gz") or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"invalid gzip data: {e}", file=fname) from e
    return raw


def iter_entries(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, value)``; ``value`` is a :class:`DataError` for an unparsable entry.

    File-level problems (missing file, bad gzip, unreadable directory) raise.
    """
    p = Path(path)
    fname = str(path)
    if not p.exists():
        raise DataError("file not found", file=fname)
    if p.is_dir():
        if not _is_hf_dir(p):
            raise DataError(
                "is a directory but not a Hugging Face datasets directory "
                "(no dataset_info.json / state.json / dataset_dict.json)",
                file=fname,
            )
        yield from _iter_hf_dir(p)
        return
    raw = _open_bytes(p)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if raw.lstrip()[:1] in (b"[", b"{"):  # a JSON array, or one (pretty-printed) object
        try:
            whole = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            whole = None
        if isinstance(whole, list):
            for i, v in enumerate(whole):
                yield i + 1, v
            return
        if isinstance(whole, dict):
            yield 1, whole
            return
    for i, line in enumerate(raw.split(b"\n")):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield i + 1, DataError(f"invalid UTF-8: {e.reason} at byte {e.start}", file=fname, line=i + 1)
            continue
        try:
            yield i + 1, json.loads(text)
        except RecursionError:
            yield i + 1, DataError("invalid JSON: nested too deeply", file=fname, line=i + 1)
        except ValueError as e:
            yield i + 1, DataError(f"invalid JSON: {e}", file=fname, line=i + 1)


def _not_object(v: Any, fname: str, idx: int) -> DataError:
    return DataError(f"not a JSON object: got {_tname(v)}", file=fname, line=idx)


def iter_json_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(index, object)`` for every record of a data file.

    ``index`` is the 1-based line (JSONL) or record index (JSON array, datasets dir).
    Raises :class:`DataError` on the first unparsable entry or non-object.
    """
    fname = str(path)
    for idx, v in iter_entries(path):
        if isinstance(v, DataError):
            raise v
        if not isinstance(v, dict):
            raise _not_object(v, fname, idx)
        yield idx, v


# --------------------------------------------------------------------------- validation helpers


def _tname(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


class Ctx:
    """Where a record is (file and line), used to build its errors; public for readers of other
    record shapes (e.g. :func:`read_unlabeled`)."""

    def __init__(self, file: str | None, line: int | None, lenient: bool = False):
        self.file, self.line = file, line
        self.lenient = lenient  # describe, don't judge: allow empty and identical responses

    def err(self, field_: str | None, reason: str) -> DataError:
        return DataError(reason, file=self.file, line=self.line, field=field_)

    @property
    def source(self) -> Source:
        return Source(self.file, self.line)


_Ctx = Ctx  # old private name, still used by annotate/service.py


def _require(obj: dict, key: str, ctx: Ctx) -> Any:
    v = obj.get(key)
    if v is None:
        raise ctx.err(key, "missing field")
    return v


def _messages(v: Any, fld: str, ctx: Ctx) -> list[Message]:
    """Validate a message list; returns normalised ``{"role", "content"}`` dicts."""
    if not isinstance(v, list):
        raise ctx.err(fld, f"wrong type: expected a list of messages, got {_tname(v)}")
    out: list[Message] = []
    for i, m in enumerate(v):
        f = f"{fld}[{i}]"
        if not isinstance(m, dict):
            raise ctx.err(f, f"wrong type: message must be an object, got {_tname(m)}")
        if m.get("role") is None:
            raise ctx.err(f"{f}.role", "missing field")
        role = m["role"]
        if not isinstance(role, str):
            raise ctx.err(f"{f}.role", f"wrong type: expected a string, got {_tname(role)}")
        if role not in ROLES:
            raise ctx.err(f"{f}.role", f"unknown role: {role!r} (allowed: system, user, assistant)")
        if "content" not in m or m["content"] is None:
            raise ctx.err(f"{f}.content", "missing field")
        content = m["content"]
        if not isinstance(content, str):
            raise ctx.err(f"{f}.content", f"wrong type: expected a string, got {_tname(content)}")
        out.append({"role": role, "content": content})
    return out


def check_prompt(msgs: list[Message], fld: str, ctx: Ctx) -> None:
    """Raise ``ctx.err`` unless ``msgs`` is a non-empty prompt ending on a user turn."""
    if not msgs or all(not m["content"].strip() for m in msgs):
        raise ctx.err(fld, "empty prompt")
    if msgs[-1]["role"] != "user":
        raise ctx.err(
            f"{fld}[{len(msgs) - 1}].role", f"prompt does not end on a user turn: last role is {msgs[-1]['role']!r}"
        )


def check_response(msgs: list[Message], fld: str, ctx: Ctx) -> None:
    """Raise ``ctx.err`` unless ``msgs`` is a non-empty list of assistant turns (non-empty
    content unless ``ctx.lenient``)."""
    if not msgs:
        raise ctx.err(fld, "empty response: no messages")
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            raise ctx.err(f"{fld}[{i}].role", f"non-assistant message in response: role {m['role']!r}")
        if not m["content"].strip() and not ctx.lenient:
            raise ctx.err(fld if len(msgs) == 1 else f"{fld}[{i}].content", "empty response")


def _string(v: Any, fld: str, ctx: Ctx) -> str:
    if not isinstance(v, str):
        raise ctx.err(fld, f"wrong type: expected a string, got {_tname(v)}")
    return v


def _category(obj: dict, ctx: Ctx) -> str | None:
    c = obj.get("category")
    if c is None:
        return None
    if not isinstance(c, str):
        raise ctx.err("category", f"wrong type: expected a string, got {_tname(c)}")
    return c


def _label_source(obj: dict, ctx: Ctx) -> str | None:
    s = obj.get("source")
    if s is None:
        return None
    if not isinstance(s, str):
        raise ctx.err("source", f"wrong type: expected a string (who labelled the pair), got {_tname(s)}")
    return s


def _label(v: Any, ctx: Ctx) -> Union[bool, float]:
    if v is None:
        raise ctx.err("label", "missing field")
    if isinstance(v, bool):
        return v
    if not isinstance(v, (int, float)):
        raise ctx.err("label", f"wrong type: expected a bool or a number, got {_tname(v)}")
    x = float(v)
    if not math.isfinite(x):
        raise ctx.err("label", f"non-finite label: {v}")
    if not 0.0 <= x <= 1.0:
        raise ctx.err("label", f"label out of range [0, 1]: {v}")
    return x


# --------------------------------------------------------------------------- HH / conversation splitting


def is_hh_string(v: Any) -> bool:
    """True for a raw Anthropic HH-RLHF transcript (starts with ``"\\n\\nHuman:"``)."""
    return isinstance(v, str) and v.startswith(HH_PREFIX)


def parse_hh(text: str) -> list[Message]:
    """Split a raw HH transcript into user/assistant messages.

    Turns are delimited by ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"``; one leading space after
    the colon is removed, everything else is kept verbatim.
    """
    parts = _HH_SPLIT.split(text)
    # parts: [before, marker, text, marker, text, ...]; `before` is "" for a proper transcript
    msgs: list[Message] = []
    for marker, content in zip(parts[1::2], parts[2::2], strict=False):
        if content.startswith(" "):
            content = content[1:]
        msgs.append({"role": "user" if marker == "Human" else "assistant", "content": content})
    return msgs


def _split_last_response(msgs: list[Message], fld: str, ctx: Ctx) -> tuple[list[Message], list[Message]]:
    """Split a full conversation into (prompt, [final assistant turn])."""
    if not msgs:
        raise ctx.err(fld, "empty conversation")
    if msgs[-1]["role"] != "assistant":
        raise ctx.err(fld, f"empty response: conversation ends on a {msgs[-1]['role']!r} turn, not an assistant turn")
    return msgs[:-1], msgs[-1:]


def _split_pair(
    chosen: list[Message], rejected: list[Message], ctx: Ctx
) -> tuple[list[Message], list[Message], list[Message]]:
    """Implicit prompt: the common turns before the final assistant turns must be identical."""
    pc, rc = _split_last_response(chosen, "chosen", ctx)
    pr, rr = _split_last_response(rejected, "rejected", ctx)
    if pc != pr:
        k = next((i for i, (a, b) in enumerate(zip(pc, pr, strict=False)) if a != b), min(len(pc), len(pr)))
        raise ctx.err(
            f"rejected[{k}]",
            f"prompt mismatch: chosen and rejected differ before the last assistant turn "
            f"(turn {k}; {len(pc)} vs {len(pr)} prompt turns)",
        )
    return pc, rc, rr


def _split_hh_pair(chosen: str, rejected: str, ctx: Ctx) -> tuple[list[Message], list[Message], list[Message]]:
    """Raw HH pair -> (prompt, chosen, rejected), by the convention of Anthropic's and TRL's loaders.

    The prompt is the common prefix of the two transcripts, cut at its last ``"\n\nAssistant:"``;
    each response is the rest of its transcript. For clean records this is the last assistant
    turn. A few HH records are corrupted (a turn marker without its blank line, so the two
    transcripts diverge earlier); they keep the text after the divergence as the response, as
    TRL does, instead of being dropped.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ctx.err("rejected", "prompt mismatch: chosen and rejected share no prompt up to an '\n\nAssistant:' turn")
    prompt = parse_hh(chosen[:cut])
    outs = []
    for text in (chosen, rejected):
        resp = text[cut + len(HH_ASSISTANT) :]
        outs.append(_as_assistant(resp[1:] if resp.startswith(" ") else resp))
    return prompt, outs[0], outs[1]


def _as_user(s: str) -> list[Message]:
    return [{"role": "user", "content": s}]


def _as_assistant(s: str) -> list[Message]:
    return [{"role": "assistant", "content": s}]


def _prompt_value(v: Any, ctx: Ctx, fld: str = "prompt") -> tuple[list[Message], bool]:
    """(messages, conversational) for a ``prompt`` value: string, HH string, or message list."""
    if isinstance(v, str):
        if is_hh_string(v):
            msgs = parse_hh(v)
            if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"].strip():
                msgs = msgs[:-1]  # "...\n\nAssistant:" generation cue
            check_prompt(msgs, fld, ctx)
            return msgs, True
        if not v.strip():
            raise ctx.err(fld, "empty prompt")
        return _as_user(v), False
    if isinstance(v, list):
        msgs = _messages(v, fld, ctx)
        check_prompt(msgs, fld, ctx)
        return msgs, True
    raise ctx.err(fld, f"wrong type: expected a string or a list of messages, got {_tname(v)}")


def _response_value(v: Any, fld: str, conversational: bool, standard_prompt: bool, ctx: Ctx) -> list[Message]:
    if standard_prompt:
        s = _string(v, fld, ctx) if not isinstance(v, list) else None
        if s is None:
            raise ctx.err(fld, "wrong type: expected a string (prompt is a string), got list")
        if conversational and s.startswith(" "):
            s = s[1:]  # HH-style prompt "...Assistant:" + " response"
        msgs = _as_assistant(s)
    else:
        if isinstance(v, str):
            raise ctx.err(fld, "wrong type: expected a list of messages (prompt is conversational), got string")
        msgs = _messages(v, fld, ctx)
    check_response(msgs, fld, ctx)
    return msgs


# --------------------------------------------------------------------------- record parsers


def parse_preference(obj: dict, ctx: Ctx) -> PreferenceRecord:
    """Validate one preference object (any supported form)."""
    category = _category(obj, ctx)
    if obj.get("prompt") is not None:
        standard = isinstance(obj["prompt"], str)
        prompt, conv = _prompt_value(obj["prompt"], ctx)
        chosen = _response_value(_require(obj, "chosen", ctx), "chosen", conv, standard, ctx)
        rejected = _response_value(_require(obj, "rejected", ctx), "rejected", conv, standard, ctx)
    else:
        c, r = _require(obj, "chosen", ctx), _require(obj, "rejected", ctx)
        if isinstance(c, str) and isinstance(r, str):
            if not (is_hh_string(c) and is_hh_string(r)):
                bad = "chosen" if not is_hh_string(c) else "rejected"
                if not is_hh_string(c) and not is_hh_string(r):
                    raise ctx.err("prompt", "missing field")
                raise ctx.err(bad, "wrong type: not an HH transcript (must start with '\\n\\nHuman:')")
            prompt, chosen, rejected = _split_hh_pair(c, r, ctx)
            check_prompt(prompt, "prompt", ctx)
            check_response(chosen, "chosen", ctx)
            check_response(rejected, "rejected", ctx)
            if chosen == rejected and not ctx.lenient:
                raise ctx.err("rejected", "chosen identical to rejected")
            return PreferenceRecord(prompt, chosen, rejected, category, True, ctx.source, _label_source(obj, ctx))
        elif isinstance(c, list) and isinstance(r, list):
            cm, rm = _messages(c, "chosen", ctx), _messages(r, "rejected", ctx)
        else:
            bad = "rejected" if isinstance(c, (str, list)) else "chosen"
            raise ctx.err(bad, f"wrong type: expected a list of messages or an HH string, got {_tname(obj[bad])}")
        prompt, chosen, rejected = _split_pair(cm, rm, ctx)
        check_prompt(prompt, "prompt", ctx)
        check_response(chosen, "chosen", ctx)
        check_response(rejected, "rejected", ctx)
        conv = True
    if chosen == rejected and not ctx.lenient:
        raise ctx.err("rejected", "chosen identical to rejected")
    return PreferenceRecord(prompt, chosen, rejected, category, conv, ctx.source, _label_source(obj, ctx))


def parse_pointwise(obj: dict, ctx: Ctx) -> PointwiseRecord:
    """Validate one ``{prompt, completion, label}`` object (``prompt`` may be implicit)."""
    category = _category(obj, ctx)
    label = _label(obj.get("label"), ctx)
    if obj.get("prompt") is not None:
        standard = isinstance(obj["prompt"], str)
        prompt, conv = _prompt_value(obj["prompt"], ctx)
        completion = _response_value(_require(obj, "completion", ctx), "completion", conv, standard, ctx)
    else:
        comp = _require(obj, "completion", ctx)
        if isinstance(comp, list):
            prompt, completion = _split_last_response(_messages(comp, "completion", ctx), "completion", ctx)
        elif is_hh_string(comp):
            prompt, completion = _split_last_response(parse_hh(comp), "completion", ctx)
        else:
            raise ctx.err("prompt", "missing field")
        check_prompt(prompt, "prompt", ctx)
        check_response(completion, "completion", ctx)
        conv = True
    return PointwiseRecord(prompt, completion, label, category, conv, ctx.source)


def parse_unlabeled(obj: dict, ctx: Ctx) -> tuple[list[Message], list[Message]]:
    """Validate one unlabeled ``{prompt, completion}`` or ``{prompt, response}`` object (strings
    or message lists, as in pointwise data; the prompt may be implicit in a conversational
    completion) -> ``(prompt, completion)`` messages."""
    fld = "completion" if obj.get("completion") is not None or "response" not in obj else "response"
    if obj.get("prompt") is not None:
        standard = isinstance(obj["prompt"], str)
        prompt, conv = _prompt_value(obj["prompt"], ctx)
        return prompt, _response_value(_require(obj, fld, ctx), fld, conv, standard, ctx)
    comp = _require(obj, fld, ctx)
    if isinstance(comp, list):
        prompt, completion = _split_last_response(_messages(comp, fld, ctx), fld, ctx)
    elif is_hh_string(comp):
        prompt, completion = _split_last_response(parse_hh(comp), fld, ctx)
    else:
        raise ctx.err("prompt", "missing field")
    check_prompt(prompt, "prompt", ctx)
    check_response(completion, fld, ctx)
    return prompt, completion


def _check_sft_messages(msgs: list[Message], ctx: Ctx) -> None:
    if not msgs:
        raise ctx.err("messages", "empty conversation")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ctx.err("messages", "no assistant turn: nothing to train on")
    if msgs[-1]["role"] != "assistant":
        raise ctx.err(
            f"messages[{len(msgs) - 1}].role",
            f"conversation does not end on an assistant turn: last role is {msgs[-1]['role']!r}",
        )
    if not msgs[-1]["content"].strip():
        raise ctx.err(f"messages[{len(msgs) - 1}].content", "empty response")


def parse_sft(obj: dict, ctx: Ctx) -> SFTRecord:
    """Validate one SFT object: ``{messages}``, ``{prompt, completion}`` or a preference record."""
    if obj.get("messages") is not None:
        msgs = _messages(obj["messages"], "messages", ctx)
        _check_sft_messages(msgs, ctx)
        return SFTRecord(msgs, True, ctx.source)
    if "chosen" in obj or "rejected" in obj:
        pref = parse_preference(obj, ctx)
        return SFTRecord(pref.prompt + pref.chosen, pref.conversational, ctx.source)
    if "completion" in obj and "label" in obj:
        pw = parse_pointwise(obj, ctx)
        if not (pw.label is True or (not isinstance(pw.label, bool) and pw.label == 1.0)):
            raise ctx.err("label", f"negative label: not a demonstration (label {pw.label!r})")
        return SFTRecord(pw.prompt + pw.completion, pw.conversational, ctx.source)
    if obj.get("prompt") is None and obj.get("completion") is None:
        raise ctx.err("messages", "missing field")
    standard = isinstance(obj.get("prompt"), str)
    prompt, conv = _prompt_value(_require(obj, "prompt", ctx), ctx)
    completion = _response_value(_require(obj, "completion", ctx), "completion", conv, standard, ctx)
    return SFTRecord(prompt + completion, conv, ctx.source)


def parse_prompt(obj: dict, ctx: Ctx) -> PromptRecord:
    """Validate one prompt object: ``{prompt}``, ``{messages}`` ending on a user turn, or a
    preference record without an explicit prompt (HH / implicit prompt)."""
    if obj.get("prompt") is not None:
        prompt, conv = _prompt_value(obj["prompt"], ctx)
        return PromptRecord(prompt, conv, ctx.source)
    if obj.get("messages") is not None:
        msgs = _messages(obj["messages"], "messages", ctx)
        check_prompt(msgs, "messages", ctx)
        return PromptRecord(msgs, True, ctx.source)
    if "chosen" in obj and "rejected" in obj:
        pref = parse_preference(obj, ctx)
        return PromptRecord(pref.prompt, pref.conversational, ctx.source)
    raise ctx.err("prompt", "missing field")


_PARSERS: dict[str, Callable[[dict, Ctx], Any]] = {
    "preference": parse_preference,
    "pointwise": parse_pointwise,
    "sft": parse_sft,
    "prompt": parse_prompt,
}


# --------------------------------------------------------------------------- results


def reason_kind(err: DataError) -> str:
    """The grouping key of an error's reason (the part before the first ``':'``)."""
    return err.reason.split(":", 1)[0].strip()


def summarize_errors(dropped: list[DataError]) -> str:
    """``"1× empty response, 2× missing field (first: FILE:LINE: ...)"``; ``""`` if none."""
    if not dropped:
        return ""
    counts = Counter(reason_kind(e) for e in dropped)
    parts = ", ".join(f"{n}× {k}" for k, n in counts.most_common())
    return f"{parts} (first: {dropped[0]})"


@dataclass
class ReadResult:
    """What a typed reader returns: the valid records and the dropped ones' errors."""

    records: list
    dropped: list[DataError] = field(default_factory=list)
    path: str = ""
    kind: str = ""

    @property
    def n_total(self) -> int:
        return len(self.records) + len(self.dropped)

    def summary(self) -> str:
        s = f"read {len(self.records)} of {self.n_total} records from {self.path}"
        if self.dropped:
            s += f"; dropped {len(self.dropped)}: {summarize_errors(self.dropped)}"
        return s


def _read(path: str | Path, kind: str, on_error: OnError, lenient: bool = False) -> ReadResult:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    parse = _PARSERS[kind]
    fname = str(path)
    res = ReadResult(records=[], path=fname, kind=kind)
    for idx, v in iter_entries(path):
        try:
            if isinstance(v, DataError):
                raise v
            if not isinstance(v, dict):
                raise _not_object(v, fname, idx)
            res.records.append(parse(v, Ctx(fname, idx, lenient)))
        except DataError as e:
            if on_error == "raise":
                raise
            res.dropped.append(e)
    return res


def read_preference(path: str | Path, on_error: OnError = "raise") -> ReadResult:
    """Read preference pairs -> ``ReadResult`` of :class:`PreferenceRecord`."""
    return _read(path, "preference", on_error)


def read_pointwise(path: str | Path, on_error: OnError = "raise") -> ReadResult:
    """Read ``{prompt, completion, label}`` records -> ``ReadResult`` of :class:`PointwiseRecord`."""
    return _read(path, "pointwise", on_error)


def read_sft(path: str | Path, on_error: OnError = "raise") -> ReadResult:
    """Read demonstrations -> ``ReadResult`` of :class:`SFTRecord`.

    Accepts ``{messages}``, ``{prompt, completion}``, preference records (prompt + chosen)
    and pointwise records with a positive label (a negative label is an error).
    """
    return _read(path, "sft", on_error)


def read_prompts(path: str | Path, on_error: OnError = "raise") -> ReadResult:
    """Read prompts -> ``ReadResult`` of :class:`PromptRecord`."""
    return _read(path, "prompt", on_error)


def read_unlabeled(path: str | Path) -> Iterator[tuple[int, dict, list[Message], list[Message]]]:
    """Yield ``(line, object, prompt_messages, completion_messages)`` for the unlabeled records of
    ``path`` (:func:`parse_unlabeled`). Raises ``DataError`` with file:line on the first bad one."""
    fname = str(path)
    for line, obj in iter_json_objects(path):
        prompt, completion = parse_unlabeled(obj, Ctx(fname, line))
        yield line, obj, prompt, completion


def read_any(
    path: str | Path, kind: str | None = None, on_error: OnError = "raise", lenient: bool = False
) -> ReadResult:
    """Read ``path`` as ``kind`` (one of :data:`KINDS`; ``None`` = :func:`detect_kind`).

    ``lenient=True`` (for describing data, e.g. ``data stats``) accepts empty responses and
    identical chosen/rejected, which training refuses; every structural check still applies.
    """
    if kind is None:
        kind = detect_kind(path)
    if kind not in _PARSERS:
        raise DataError(f"unknown data kind {kind!r} (expected one of {', '.join(KINDS)})", file=str(path))
    return _read(path, kind, on_error, lenient)


def kind_of_object(obj: dict) -> str | None:
    """Guess the kind of one object from its keys, or ``None``."""
    if obj.get("label") is not None and obj.get("completion") is not None:
        return "pointwise"
    if obj.get("chosen") is not None and obj.get("rejected") is not None:
        return "preference"
    msgs = obj.get("messages")
    if isinstance(msgs, list) and msgs:
        last = msgs[-1]
        role = last.get("role") if isinstance(last, dict) else None
        return "prompt" if role == "user" else "sft"
    if obj.get("prompt") is not None:
        return "sft" if obj.get("completion") is not None else "prompt"
    return None


def detect_kind(path: str | Path) -> str:
    """The kind of a data file, from the keys of its first recognisable object.

    If no object is recognisable, the error names the first entry that is not one and why
    (invalid UTF-8 or JSON, not an object, or an object without any of the fields that
    define a kind).
    """
    fname = str(path)
    first_bad: DataError | None = None
    n = 0
    for idx, v in iter_entries(path):
        n += 1
        if isinstance(v, dict):
            k = kind_of_object(v)
            if k is not None:
                return k
            bad = DataError(
                f"no prompt/chosen/rejected/completion/label/messages field "
                f"(keys: {', '.join(map(repr, list(v)[:8])) or 'none'})",
                file=fname,
                line=idx,
            )
        elif isinstance(v, DataError):
            bad = v
        else:
            bad = _not_object(v, fname, idx)
        first_bad = first_bad or bad
    if first_bad is None:
        raise DataError("cannot detect the data kind: the file has no records", file=fname)
    raise DataError(
        f"cannot detect the data kind: none of the {n} record(s) is recognisable; first bad record: {first_bad.reason}",
        file=fname,
        line=first_bad.line,
        field=first_bad.field,
    )
