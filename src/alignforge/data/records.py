"""The record types every reader returns and every trainer consumes.

Internally every text is conversational: a list of ``{"role", "content"}`` messages.
A TRL *standard* record (plain strings) becomes a one-message list
(``prompt`` -> user turn, ``chosen``/``rejected``/``completion`` -> assistant turn), and
``conversational=False`` remembers that so conversion can write the same style back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class Source:
    """Where a record came from: file path and 1-based line (or record index for JSON arrays)."""

    file: str | None = None
    line: int | None = None


@dataclass
class PreferenceRecord:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    category: str | None = None
    conversational: bool = True
    source: Source = field(default_factory=Source)
    # who labelled the pair: the record's optional "source" field, e.g. "human" or "ai:<judge name>"
    label_source: str | None = None


@dataclass
class PointwiseRecord:
    prompt: list[Message]
    completion: list[Message]
    label: Union[bool, float]
    category: str | None = None
    conversational: bool = True
    source: Source = field(default_factory=Source)


@dataclass
class SFTRecord:
    messages: list[Message]  # the whole conversation; assistant turns are trained on
    conversational: bool = True
    source: Source = field(default_factory=Source)


@dataclass
class PromptRecord:
    prompt: list[Message]
    conversational: bool = True
    source: Source = field(default_factory=Source)


Record = Union[PreferenceRecord, PointwiseRecord, SFTRecord, PromptRecord]


@dataclass
class TokenizedSFT:
    """One tokenized SFT example. ``loss_mask[i] == 1`` iff ``input_ids[i]`` is an assistant token
    that the model is trained to predict (the chat template's end-of-turn token included)."""

    input_ids: list[int]
    loss_mask: list[int]
    source: Source = field(default_factory=Source)


@dataclass
class TokenizedPair:
    """One tokenized preference pair; the responses are the tokens that follow ``prompt_ids``."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    category: str | None = None
    source: Source = field(default_factory=Source)


@dataclass
class TokenizedPointwise:
    """One tokenized point-wise example (ULMA, point-wise DPO, KTO); the completion follows the prompt."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: float
    category: str | None = None
    source: Source = field(default_factory=Source)
