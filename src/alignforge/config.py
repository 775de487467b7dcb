"""Typed configs: dataclasses loaded from YAML, with ``key=value`` overrides.

A config is a tree of dataclasses. YAML mirrors it (``train: {lr: 1e-5}``) and overrides
use dotted keys (``train.lr=1e-5``). Every value is checked against the field's type
(``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``Optional``, ``list[...]``);
an unknown key is an error that lists the valid keys.

This module imports no ML library, so ``alignforge --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from alignforge.errors import ConfigError

# --------------------------------------------------------------------------- shared sections


@dataclass
class ModelConfig:
    """Which model to start from."""

    name_or_path: str = "embedded"  # "embedded" (SmolLM2-135M-Instruct), an HF dir, a .gguf file or a hub id
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # weights dtype when loading
    gradient_checkpointing: bool = False


@dataclass
class LoraConfig:
    """LoRA through PEFT. With LoRA the reference model is the base with the adapter disabled."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class DataConfig:
    """Training data and how it is tokenised."""

    train_files: list[str] = field(default_factory=list)
    max_length: int = 1024
    max_prompt_length: Optional[int] = None  # default: max_length // 2 when a prompt must be cut
    # too long: cut prompt then responses | drop | cut only the prompt, drop if a response must be cut
    # (the reward model's default); see data/tokenize.py
    overlong: Literal["truncate", "drop", "truncate_prompt"] = "truncate"
    on_error: Literal["raise", "skip"] = "raise"  # bad records: fail at once, or drop with a summary


@dataclass
class TrainConfig:
    """The optimisation loop shared by every trainer (see ``trainers/common.py``)."""

    output_dir: str = "outputs/run"
    seed: int = 42
    epochs: int = 1
    max_steps: int = -1  # > 0 overrides epochs
    per_device_batch_size: int = 4
    grad_accum: int = 1
    group_by_length: bool = False  # batches of similar length (less padding); still a pure function of the step
    lr: float = 2e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the latest checkpoint in output_dir
    resume_force: bool = False  # resume even if batch size, grad_accum, world size, seed, data or steps changed
    log_every: int = 1
    progress: bool = True  # rich progress bar on the main process
    tensorboard: bool = True
    # on CPU with glibc: keep freed memory in the process (no heap trimming, no mmap for large blocks), so
    # a step does not page-fault its activations and gradients in again (trainers/common.keep_freed_memory);
    # the process's RSS then stays at its peak
    keep_freed_memory: bool = True
    # generation probe (inference/probe.py): greedy answers to fixed prompts every N steps and before
    # step 1, logged as gen_len_mean / gen_finished, answers in OUTPUT/samples.jsonl; 0 = off
    probe_every: int = 0
    probe_prompts: int = 8  # how many prompts: the first N of probe_file, else the first N distinct training prompts
    probe_file: Optional[str] = None
    probe_max_new_tokens: int = 64


# --------------------------------------------------------------------------- loading


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(inner)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` (converting strings from the CLI); raise ConfigError."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad from None
                if f.is_integer():
                    return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if math.isnan(out):
            raise bad
        return out
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted keys that a config class accepts."""
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out += valid_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _build(cls: type, data: dict, prefix: str, source: str, base: Any = None) -> Any:
    """``cls`` from ``data``; keys not in ``data`` keep their values in ``base`` (the parent's
    default for this section, e.g. the RM's ``DataConfig(max_length=512, ...)``), else the class defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            full = f"{prefix}{k}"
            keys = valid_keys(cls, prefix)
            raise ConfigError(f"{source}: unknown config key '{full}'. Valid keys: {', '.join(keys)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        v = data[f.name]
        if _is_dataclass_type(tp):
            kwargs[f.name] = _build(tp, v if v is not None else {}, f"{prefix}{f.name}.", source, _field_default(f))
        else:
            try:
                kwargs[f.name] = _coerce(v, tp, f"{prefix}{f.name}")
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return dataclasses.replace(base, **kwargs) if isinstance(base, cls) else cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-5"`` -> ``("train.lr", "1e-5")``; values are typed later, against the field."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    raw = raw.strip()
    # YAML gives lists/nulls/bools; plain scalars stay strings and are coerced by type.
    if raw.startswith("[") or raw.lower() in ("null", "~"):
        try:
            return key, yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': {e}") from None
    return key, raw


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Build ``cls`` from an optional YAML file plus ``key=value`` overrides (dotted keys)."""
    tree: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of config sections")
        tree = loaded
    for item in overrides:
        key, value = parse_override(item)
        if key not in valid_keys(cls):
            raise ConfigError(
                f"unknown config key '{key}' in override '{item}'. Valid keys: {', '.join(valid_keys(cls))}"
            )
        _set_dotted(tree, key, value)
    return _build(cls, tree, "", source if not overrides else f"{source} (+ overrides)")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
