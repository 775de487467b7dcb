"""LoRA adapters: applying, the adapter-free reference policy, saving and merging.

With LoRA the frozen base model *is* the reference policy of DPO/PPO/ULMA, so
:func:`reference_mode` computes reference outputs from the same object with the
adapter switched off instead of keeping a second copy of the model in memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignforge.errors import ModelError
from alignforge.models.loading import atomic_dir, load_model, load_tokenizer


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (``enabled=False`` means full fine-tuning)."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = field(default=None)
    task_type: str = "CAUSAL_LM"  # SEQ_CLS for reward/value models: their score head is trained in full

    @classmethod
    def from_config(cls, cfg: Any, task_type: str = "CAUSAL_LM") -> "LoraSettings":
        """From ``alignforge.config.LoraConfig`` (``["all-linear"]`` means the string ``"all-linear"``)."""
        tm = list(cfg.target_modules)
        return cls(
            enabled=cfg.enabled,
            r=cfg.r,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            target_modules="all-linear" if tm == ["all-linear"] else tm,
            task_type=task_type,
        )


def _unwrap_ddp(model: Any) -> Any:
    """Strip ``DistributedDataParallel``/``DataParallel`` style ``.module`` wrappers."""
    import torch

    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def is_peft(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (also inside a DDP wrapper)."""
    from peft import PeftModel

    return isinstance(_unwrap_ddp(model), PeftModel)


def unwrap_base(model: Any) -> Any:
    """The underlying ``PreTrainedModel`` (through DDP and PeftModel wrappers).

    For a PeftModel this is the base model *with the LoRA layers injected*; use
    :func:`reference_mode` to run it without them. The one PEFT-unwrap helper: it recognises a
    PEFT wrapper by its ``get_base_model`` method, so it imports neither peft nor transformers.
    """
    model = _unwrap_ddp(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def adapter_is_identity(model: Any) -> bool:
    """True for a PEFT model whose LoRA adapter does not change the function (every ``lora_B`` is
    zero, as in a freshly applied adapter): its adapter-disabled base computes the same outputs."""
    if not is_peft(model):
        return False
    b = [p for n, p in _unwrap_ddp(model).named_parameters() if ".lora_B." in n or ".lora_embedding_B." in n]
    return bool(b) and all(not p.detach().any() for p in b)


def apply_lora(model: Any, settings: LoraSettings) -> Any:
    """Wrap ``model`` with a fresh LoRA adapter (``settings.task_type``); no-op when disabled."""
    if not settings.enabled:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    if is_peft(model):
        raise ModelError(
            "model already has a PEFT adapter; load it with trainable_adapter=True "
            "to continue training it instead of applying a new one"
        )
    cfg = LoraConfig(
        task_type=TaskType[settings.task_type],
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        modules_to_save=settings.modules_to_save,
    )
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as e:
        raise ModelError(f"could not apply LoRA (target_modules={settings.target_modules!r}): {e}") from e
    # Keep the user's model name (e.g. "embedded") so saved adapters name a portable base.
    name = getattr(model, "_alignforge_name", None)
    if name is not None:
        peft_model.peft_config["default"].base_model_name_or_path = _portable_name(name)
    return peft_model


def _portable_name(name: str) -> str:
    """Local paths become absolute; names such as ``embedded`` or hub ids stay as they are."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


@contextlib.contextmanager
def reference_mode(model: Any) -> Iterator[Any]:
    """Yield ``model`` computing the reference policy: adapter disabled, no grad, eval mode.

    Only for PEFT models -- the same object is reused, never copied. The previous
    train/eval mode and every parameter's ``requires_grad`` are restored on exit. A full
    (non-PEFT) model has no built-in reference, so this raises :class:`ModelError`.
    """
    import torch

    inner = _unwrap_ddp(model)
    if not is_peft(inner):
        raise ModelError(
            "reference_mode needs a LoRA/PEFT model; for full fine-tuning pass an "
            "explicit reference model (e.g. load_model(<base>) frozen in eval mode)"
        )
    was_training = inner.training
    # PEFT re-activates the active adapter on exit, which switches ``requires_grad`` off for every other
    # adapter (e.g. PPO's shared critic adapter): keep each parameter's flag as it was.
    flags = [(p, p.requires_grad) for p in inner.parameters()]
    inner.eval()
    try:
        with inner.disable_adapter(), torch.no_grad():
            yield inner
    finally:
        inner.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


def save_trained(model: Any, tokenizer: Any, out_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Save a trained model atomically: full weights (safetensors), or only the adapter.

    An adapter dir records ``base_model_name_or_path`` so ``load_model(out_dir)``
    finds its base. The tokenizer is saved alongside in both cases.

    ``state_dict``: the weights to write instead of the model's own (keys as ``model.state_dict()``;
    for an adapter, PEFT keeps the adapter's keys), e.g. the full state gathered from an FSDP-sharded model.
    """
    model = _unwrap_ddp(model)
    with atomic_dir(out_dir) as tmp:
        if is_peft(model):
            cfg = model.peft_config[model.active_adapter]
            if not cfg.base_model_name_or_path:
                base = unwrap_base(model)
                cfg.base_model_name_or_path = _portable_name(
                    getattr(base, "_alignforge_name", None) or base.config._name_or_path
                )
            # only the active (trained policy's) adapter: a PPO critic adapter is not part of the policy
            model.save_pretrained(str(tmp), selected_adapters=[model.active_adapter], state_dict=state_dict)
        else:
            model.save_pretrained(str(tmp), state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir).expanduser().resolve()


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Load base + adapter, merge the LoRA weights in, save a full HF model + tokenizer."""
    model = load_model(adapter_dir, dtype)
    if not is_peft(model):
        raise ModelError(f"{adapter_dir} is not an adapter dir (no adapter_config.json)")
    merged = model.merge_and_unload()
    tok = load_tokenizer(adapter_dir)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return Path(out_dir).expanduser().resolve()
