"""Model loading, the embedded SmolLM2 model, LoRA helpers.

Kept light on purpose: importing ``alignforge.models`` does not import torch,
transformers or peft; the public names below are loaded from their submodules on
first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "cache_dir": "loading",
    "embedded_gguf_path": "loading",
    "convert_gguf": "loading",
    "ensure_embedded": "loading",
    "ensure_gguf": "loading",
    "resolve_model_path": "loading",
    "is_adapter_dir": "loading",
    "load_tokenizer": "loading",
    "load_model": "loading",
    "load_model_and_tokenizer": "loading",
    "model_fingerprint": "loading",
    "LoraSettings": "lora",
    "apply_lora": "lora",
    "is_peft": "lora",
    "unwrap_base": "lora",
    "reference_mode": "lora",
    "save_trained": "lora",
    "merge_adapter": "lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
