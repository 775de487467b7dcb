"""Tokenize conversations through the tokenizer's chat template.

Rendering
    :func:`render` uses ``tokenizer.apply_chat_template(..., tokenize=False)``. A tokenizer
    without a chat template falls back to the HH plain format::

        "\\n\\nSystem: {system}\\n\\nHuman: {user}\\n\\nAssistant: {assistant}{eos_token}"

    i.e. every assistant message is followed by the EOS token text (if the tokenizer has one)
    and the generation prompt is ``"\\n\\nAssistant:"``.

Assistant mask (SFT)
    For assistant message ``i`` we render ``prefix = render(msgs[:i], add_generation_prompt=True)``
    and ``upto = render(msgs[:i+1])``. The template must be *prefix-consistent*
    (``upto.startswith(prefix)`` and the full render starts with ``upto``), else a
    :class:`DataError` is raised. The assistant character span is
    ``[len(prefix), len(prefix) + len(upto[len(prefix):].rstrip())]``: the end-of-turn token
    (``<|im_end|>``; EOS in the fallback format) is trained on, the trailing newline is not.
    The full text is tokenized once with offsets; a token is masked in iff its character span
    overlaps an assistant span.

BOS
    Rendered text is tokenized with ``add_special_tokens=False``. If the tokenizer would add a
    BOS itself (``tokenizer("x").input_ids[0] == bos_token_id``) and the ids do not already
    start with it (a template containing ``{{ bos_token }}``), exactly one BOS is prepended.

Prompt / completion (preference pairs)
    The prompt is rendered with the generation prompt; the completion text is what
    ``render(prompt + completion)`` adds after it, right-stripped (so it ends with the
    end-of-turn token, not the newline). Completion ids are the tokens of the joint text after
    the prompt's tokens; if BPE merged a token across the boundary (the joint tokens do not
    start with the prompt tokens), the completion text is tokenized on its own instead.

    ``full_render=True`` (reward models) keeps what the template adds after the end-of-turn
    token (ChatML's ``"\n"``): the completion runs to the end of ``render(prompt + completion)``,
    so ``prompt_ids + completion_ids`` are the ids of
    ``tokenizer.apply_chat_template(prompt + completion)``, whose last token a reward model scores
    (as HF's ``*ForSequenceClassification`` does; see ``models/reward.py``).

Truncation (shared by SFT and pairs; for SFT the "prompt" is every token before the last
assistant response and there is one response)
    If ``len(prompt) + max(len(response)) > max_length``, the prompt is cut first: it keeps its
    **last** ``max(max_length - max_resp, min_prompt)`` tokens, where
    ``min_prompt = max_prompt_length or max_length // 2`` (clamped to ``max_length - 1``);
    a leading BOS is kept (and counts towards that length). Only if that is not enough does a
    response lose tokens: with ``overlong="truncate"`` every response keeps its **first**
    ``max_length - len(prompt)`` tokens; with ``overlong="truncate_prompt"`` (the reward
    model's default: a cut response would be scored in mid-text) such an example is dropped.
    With ``overlong="drop"`` every example longer than ``max_length`` is dropped.

    The tokenize functions return ``(example, cut)``; ``cut`` is a :class:`Cut`: ``NONE`` (it
    fits; falsy), ``PROMPT`` (only the prompt was cut) or ``RESPONSE`` (a response was cut, or
    would have had to be when the example is dropped).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal, Sequence

from alignforge.data.readers import OnError, read_preference, read_sft, summarize_errors
from alignforge.data.records import (
    Message,
    PointwiseRecord,
    PreferenceRecord,
    SFTRecord,
    Source,
    TokenizedPair,
    TokenizedPointwise,
    TokenizedSFT,
)
from alignforge.errors import ConfigError, DataError, ModelError

Overlong = Literal["truncate", "drop", "truncate_prompt"]
OVERLONG: tuple[str, ...] = ("truncate", "drop", "truncate_prompt")


class Cut(IntEnum):
    """What truncation did to an example (module docstring); falsy iff it fit."""

    NONE = 0
    PROMPT = 1  # only the prompt lost tokens (from the left)
    RESPONSE = 2  # a response lost tokens, or would have (the example was then dropped)


_BOS_CACHE: "weakref.WeakKeyDictionary[Any, int | None]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- rendering


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_plain(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    eos = getattr(tokenizer, "eos_token", None) or ""
    parts = []
    for m in messages:
        role, c = m["role"], m["content"]
        if role == "assistant":
            parts.append(f"\n\nAssistant: {c}{eos}")
        elif role == "user":
            parts.append(f"\n\nHuman: {c}")
        else:
            parts.append(f"\n\nSystem: {c}")
    if add_generation_prompt:
        parts.append("\n\nAssistant:")
    return "".join(parts)


def render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """Render ``messages`` to text with the chat template (HH plain format if there is none)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not has_chat_template(tokenizer):
        return _render_plain(tokenizer, msgs, add_generation_prompt)
    try:
        out = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja raise_exception() etc.
        raise DataError(f"chat template failed: {type(e).__name__}: {e}") from e
    if isinstance(out, list):  # some versions return a batch
        out = out[0]
    return out


# --------------------------------------------------------------------------- encoding


def auto_bos_id(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer adds by itself on ``tokenizer("x")``, else ``None``."""
    try:
        return _BOS_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    bos = getattr(tokenizer, "bos_token_id", None)
    res = None
    if bos is not None:
        ids = tokenizer("x")["input_ids"]
        res = bos if ids and ids[0] == bos else None
    try:
        _BOS_CACHE[tokenizer] = res
    except TypeError:
        pass
    return res


def _encode(tokenizer: Any, text: str, offsets: bool = False) -> tuple[list[int], list[tuple[int, int]] | None]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    except NotImplementedError as e:
        raise ModelError("a fast tokenizer (with offset mapping) is required for assistant masks") from e
    ids = list(enc["input_ids"])
    offs = [tuple(o) for o in enc["offset_mapping"]] if offsets else None
    bos = auto_bos_id(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
        if offs is not None:
            offs.insert(0, (0, 0))
    return ids, offs


def _not_prefix(where: str, src: Source | None) -> DataError:
    s = src or Source()
    return DataError(
        "chat template is not prefix-consistent: the rendering of a conversation "
        f"does not start with the rendering of {where}; assistant tokens cannot be "
        "located",
        file=s.file,
        line=s.line,
        field="messages",
    )


def _with_source(e: DataError, src: Source | None) -> DataError:
    if src is None or e.file is not None:
        return e
    return DataError(e.reason, file=src.file, line=src.line, field=e.field or "messages")


def assistant_spans(
    tokenizer: Any, messages: Sequence[Message], source: Source | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """``(full_text, [(start, end) character span of each assistant message])``."""
    msgs = list(messages)
    try:
        full = render(tokenizer, msgs)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = render(tokenizer, msgs[:i], add_generation_prompt=True)
            upto = render(tokenizer, msgs[: i + 1])
            if not upto.startswith(prefix):
                raise _not_prefix(f"the turns before assistant message {i} plus the generation prompt", source)
            if not full.startswith(upto):
                raise _not_prefix(f"its first {i + 1} messages", source)
            tail = upto[len(prefix) :].rstrip()
            spans.append((len(prefix), len(prefix) + len(tail)))
    except DataError as e:
        raise _with_source(e, source) from None
    return full, spans


def tokenize_messages(
    tokenizer: Any, messages: Sequence[Message], source: Source | None = None
) -> tuple[list[int], list[int], int]:
    """Tokenize a conversation -> ``(input_ids, loss_mask, last_response_start)``.

    ``last_response_start`` is the index of the first token of the last assistant message
    (``len(input_ids)`` if there is none).
    """
    full, spans = assistant_spans(tokenizer, messages, source)
    ids, offs = _encode(tokenizer, full, offsets=True)
    assert offs is not None
    mask = [0] * len(ids)
    last_start = len(ids)
    for k, (s, e) in enumerate(offs):
        for a, b in spans:
            if s < b and e > a:
                mask[k] = 1
                break
    if spans:
        a, b = spans[-1]
        last_start = next((k for k, (s, e) in enumerate(offs) if s < b and e > a), len(ids))
    return ids, mask, last_start


def _prompt_text_ids(tokenizer: Any, prompt: Sequence[Message], source: Source | None) -> tuple[str, list[int]]:
    try:
        p_text = render(tokenizer, prompt, add_generation_prompt=True)
    except DataError as e:
        raise _with_source(e, source) from None
    return p_text, _encode(tokenizer, p_text)[0]


def _completion_ids(
    tokenizer: Any,
    prompt: Sequence[Message],
    p_text: str,
    p_ids: list[int],
    completion: Sequence[Message],
    source: Source | None,
    fld: str,
    full_render: bool = False,
) -> list[int]:
    try:
        full = render(tokenizer, list(prompt) + list(completion))
    except DataError as e:
        raise _with_source(e, source) from None
    if not full.startswith(p_text):
        s = source or Source()
        raise DataError(
            "chat template is not prefix-consistent: rendering prompt + response does "
            "not start with the rendered prompt (with generation prompt)",
            file=s.file,
            line=s.line,
            field=fld,
        )
    c_text = full[len(p_text) :] if full_render else full[len(p_text) :].rstrip()
    joint, _ = _encode(tokenizer, p_text + c_text)
    if joint[: len(p_ids)] == p_ids:
        return joint[len(p_ids) :]
    return list(tokenizer(c_text, add_special_tokens=False)["input_ids"])


def tokenize_prompt(prompt_msgs: Sequence[Message], tokenizer: Any, source: Source | None = None) -> list[int]:
    """Prompt ids with the generation prompt, exactly as the trainers' ``prompt_ids``."""
    return _prompt_text_ids(tokenizer, prompt_msgs, source)[1]


def tokenize_prompt_completion(
    prompt_msgs: Sequence[Message],
    completion_msgs: Sequence[Message],
    tokenizer: Any,
    source: Source | None = None,
    full_render: bool = False,
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)``: prompt with generation prompt; completion up to and
    including the end-of-turn token, or to the end of the rendering with ``full_render``
    (reward models; see module docstring)."""
    p_text, p_ids = _prompt_text_ids(tokenizer, prompt_msgs, source)
    return p_ids, _completion_ids(
        tokenizer, prompt_msgs, p_text, p_ids, completion_msgs, source, "completion", full_render
    )


# --------------------------------------------------------------------------- truncation


def starts_with_bos(tokenizer: Any, ids: list[int]) -> bool:
    """Whether ``ids`` start with the tokenizer's BOS (which truncation keeps)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and ids[:1] == [bos]


def _check_args(max_length: int, overlong: str) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
    if overlong not in OVERLONG:
        raise ConfigError(f"overlong must be 'truncate', 'drop' or 'truncate_prompt', got {overlong!r}")


def _fit(
    prompt: list, responses: list[list], max_length: int, max_prompt_length: int | None, keep_first: bool, overlong: str
) -> tuple[list, list[list], Cut, bool]:
    """``(prompt, responses, cut, keep)`` by the truncation rule; ``keep=False``: drop the example."""
    if len(prompt) + max((len(r) for r in responses), default=0) <= max_length:
        return prompt, responses, Cut.NONE, True
    p, rs, _ = truncate_prompt_responses(prompt, responses, max_length, max_prompt_length, keep_first)
    cut = Cut.RESPONSE if any(len(a) < len(b) for a, b in zip(rs, responses, strict=True)) else Cut.PROMPT
    keep = overlong == "truncate" or (overlong == "truncate_prompt" and cut == Cut.PROMPT)
    return p, rs, cut, keep


def truncate_prompt_responses(
    prompt: list, responses: list[list], max_length: int, max_prompt_length: int | None = None, keep_first: bool = False
) -> tuple[list, list[list], bool]:
    """Apply the truncation rule (module docstring) -> ``(prompt, responses, truncated)``.

    ``keep_first``: keep the prompt's first element (a BOS) when cutting it from the left.
    """
    max_resp = max((len(r) for r in responses), default=0)
    if len(prompt) + max_resp <= max_length:
        return prompt, responses, False
    min_prompt = max_prompt_length if max_prompt_length else max_length // 2
    min_prompt = max(1, min(min_prompt, max_length - 1))
    keep = max(max_length - max_resp, min_prompt)
    if len(prompt) > keep:
        if keep_first and prompt:
            prompt = [prompt[0]] + (prompt[len(prompt) - (keep - 1) :] if keep > 1 else [])
        else:
            prompt = prompt[len(prompt) - keep :]
    room = max_length - len(prompt)
    return prompt, [r[:room] for r in responses], True


def tokenize_sft(
    record: SFTRecord,
    tokenizer: Any,
    max_length: int,
    overlong: Overlong = "truncate",
    max_prompt_length: int | None = None,
) -> tuple[TokenizedSFT | None, Cut]:
    """Tokenize one SFT record -> ``(example, cut)`` (:class:`Cut`); ``example`` is ``None`` when
    it does not fit in ``max_length`` and ``overlong`` drops it."""
    _check_args(max_length, overlong)
    ids, mask, start = tokenize_messages(tokenizer, record.messages, record.source)
    idx = list(range(len(ids)))
    p, (r,), cut, keep = _fit(
        idx[:start], [idx[start:]], max_length, max_prompt_length, starts_with_bos(tokenizer, ids), overlong
    )
    if not keep:
        return None, cut
    if not cut:
        return TokenizedSFT(ids, mask, record.source), cut
    kept = p + r
    return TokenizedSFT([ids[i] for i in kept], [mask[i] for i in kept], record.source), cut


def tokenize_preference(
    record: PreferenceRecord,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int | None = None,
    overlong: Overlong = "truncate",
    full_render: bool = False,
) -> tuple[TokenizedPair | None, Cut]:
    """Tokenize one pair -> ``(pair, cut)`` (:class:`Cut`); ``pair`` is ``None`` when dropped.
    ``full_render``: responses run to the end of the rendering (reward models; module docstring)."""
    _check_args(max_length, overlong)
    src = record.source
    p_text, p_ids = _prompt_text_ids(tokenizer, record.prompt, src)
    c = _completion_ids(tokenizer, record.prompt, p_text, p_ids, record.chosen, src, "chosen", full_render)
    r = _completion_ids(tokenizer, record.prompt, p_text, p_ids, record.rejected, src, "rejected", full_render)
    p, (c, r), cut, keep = _fit(
        p_ids, [c, r], max_length, max_prompt_length, starts_with_bos(tokenizer, p_ids), overlong
    )
    return (TokenizedPair(p, c, r, record.category, src) if keep else None), cut


def tokenize_pointwise(
    record: PointwiseRecord,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int | None = None,
    overlong: Overlong = "truncate",
) -> tuple[TokenizedPointwise | None, Cut]:
    """Tokenize one point-wise record -> ``(example, cut)`` (same truncation rule)."""
    _check_args(max_length, overlong)
    src = record.source
    p_text, p_ids = _prompt_text_ids(tokenizer, record.prompt, src)
    c = _completion_ids(tokenizer, record.prompt, p_text, p_ids, record.completion, src, "completion")
    p, (c,), cut, keep = _fit(p_ids, [c], max_length, max_prompt_length, starts_with_bos(tokenizer, p_ids), overlong)
    return (TokenizedPointwise(p, c, float(record.label), record.category, src) if keep else None), cut


# --------------------------------------------------------------------------- datasets


@dataclass
class DatasetReport:
    """Counts from loading and tokenizing one or more files."""

    kind: str
    files: list[str]
    max_length: int
    n_read: int = 0  # records in the files (valid + dropped by validation)
    dropped: list[DataError] = field(default_factory=list)  # validation / template errors
    n_truncated: int = 0  # examples kept with tokens cut (prompt and/or response)
    n_overlong_dropped: int = 0  # examples dropped as longer than max_length (by `overlong`)
    n_out: int = 0
    n_response_truncated: int = 0  # of n_truncated: those with a response cut (its end is lost)
    overlong: str = "truncate"

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)

    def add(self, cut: Cut, kept: bool) -> None:
        """Count one tokenized example by what truncation did to it."""
        if not kept:
            self.n_overlong_dropped += 1
        elif cut:
            self.n_truncated += 1
            self.n_response_truncated += int(cut == Cut.RESPONSE)

    def counts(self) -> dict:
        """The counts as a JSON-serialisable dict (e.g. for ``rm eval``'s ``summary.json``)."""
        return {
            "summary": self.summary(),
            "n_read": self.n_read,
            "n_out": self.n_out,
            "n_dropped": self.n_dropped,
            "n_truncated": self.n_truncated,
            "n_response_truncated": self.n_response_truncated,
            "n_overlong_dropped": self.n_overlong_dropped,
            "overlong": self.overlong,
            "max_length": self.max_length,
        }

    def summary(self) -> str:
        s = f"{self.kind}: {self.n_out} examples from {self.n_read} records in {len(self.files)} file(s)"
        if self.dropped:
            s += f"; dropped {self.n_dropped} invalid: {summarize_errors(self.dropped)}"
        s += f"; {self.n_truncated} truncated to max_length {self.max_length}"
        if self.n_truncated:
            s += f" ({self.n_response_truncated} with a response cut)"
        if self.n_overlong_dropped and self.overlong == "truncate_prompt":
            s += (
                f"; {self.n_overlong_dropped} dropped: a response would not fit in max_length {self.max_length} "
                "even with the prompt cut"
            )
        elif self.n_overlong_dropped:
            s += f"; {self.n_overlong_dropped} dropped as longer than max_length {self.max_length}"
        return s


def _as_paths(paths: str | Path | Sequence[str | Path]) -> list[str]:
    if isinstance(paths, (str, Path)):
        return [str(paths)]
    return [str(p) for p in paths]


def _load(kind: str, paths, reader, tok_fn, tokenizer, max_length, overlong, on_error):
    _check_args(max_length, overlong)
    files = _as_paths(paths)
    report = DatasetReport(kind, files, max_length, overlong=overlong)
    out = []
    for path in files:
        res = reader(path, on_error)
        report.n_read += res.n_total
        report.dropped.extend(res.dropped)
        for rec in res.records:
            try:
                ex, cut = tok_fn(rec)
            except DataError as e:
                if on_error == "raise":
                    raise
                report.dropped.append(e)
                continue
            report.add(cut, ex is not None)
            if ex is not None:
                out.append(ex)
    report.n_out = len(out)
    return out, report


def load_sft_dataset(
    paths: str | Path | Sequence[str | Path],
    tokenizer: Any,
    max_length: int,
    overlong: Overlong = "truncate",
    on_error: OnError = "raise",
    max_prompt_length: int | None = None,
) -> tuple[list[TokenizedSFT], DatasetReport]:
    """Read (:func:`read_sft`) and tokenize SFT files."""
    return _load(
        "sft",
        paths,
        read_sft,
        lambda r: tokenize_sft(r, tokenizer, max_length, overlong, max_prompt_length),
        tokenizer,
        max_length,
        overlong,
        on_error,
    )


def load_preference_dataset(
    paths: str | Path | Sequence[str | Path],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int | None = None,
    overlong: Overlong = "truncate",
    on_error: OnError = "raise",
    full_render: bool = False,
) -> tuple[list[TokenizedPair], DatasetReport]:
    """Read (:func:`read_preference`) and tokenize preference files (``full_render``: for a reward
    model, see :func:`tokenize_preference`)."""
    return _load(
        "preference",
        paths,
        read_preference,
        lambda r: tokenize_preference(r, tokenizer, max_length, max_prompt_length, overlong, full_render),
        tokenizer,
        max_length,
        overlong,
        on_error,
    )


def _read_pointwise_or_pairs(path: str, on_error: OnError):
    """Point-wise records; a preference file is converted (chosen -> label 1, rejected -> 0)."""
    from alignforge.data.convert import preference_to_pointwise
    from alignforge.data.readers import detect_kind, read_pointwise

    if detect_kind(path) == "preference":
        res = read_preference(path, on_error)
        res.records = preference_to_pointwise(res.records)
        return res
    return read_pointwise(path, on_error)


def load_pointwise_dataset(
    paths: str | Path | Sequence[str | Path],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int | None = None,
    overlong: Overlong = "truncate",
    on_error: OnError = "raise",
) -> tuple[list[TokenizedPointwise], DatasetReport]:
    """Read point-wise files (or preference files, converted) and tokenize them."""
    return _load(
        "pointwise",
        paths,
        _read_pointwise_or_pairs,
        lambda r: tokenize_pointwise(r, tokenizer, max_length, max_prompt_length, overlong),
        tokenizer,
        max_length,
        overlong,
        on_error,
    )
