"""Building the policy a trainer optimises (SFT, DPO, ULMA): full model or LoRA, on its device.

``model.name_or_path`` may name a full model or a LoRA adapter dir (whose ``adapter_config.json``
names its base). With an adapter dir:

* ``lora.enabled=true`` continues training *that* adapter (its own ``r``, ``alpha`` and target
  modules; the ``lora.*`` sizes of the config are not used);
* ``lora.enabled=false`` merges the adapter into its base and trains the merged model in full.

Either way the policy starts as the model as loaded (adapter on), and so does the reference of
DPO/ULMA (``models/refcache.py``).
"""

from __future__ import annotations

from typing import Any


def build_policy(model_cfg: Any, lora_cfg: Any, device: Any = None) -> Any:
    """Load the model named in ``model_cfg`` (an ``alignforge.config.ModelConfig``), with LoRA
    (``lora_cfg``, a ``LoraConfig``) and gradient checkpointing as configured, and move it to
    ``device`` when given (training passes ``accelerator.device``)."""
    from alignforge.models.loading import is_adapter_dir, load_model, resolve_model_path
    from alignforge.models.lora import LoraSettings, apply_lora

    def checkpointing(model: Any) -> Any:
        if model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        return model

    name = model_cfg.name_or_path
    if is_adapter_dir(resolve_model_path(name)):
        if lora_cfg.enabled:  # continue training the adapter
            model = checkpointing(load_model(name, dtype=model_cfg.dtype, trainable_adapter=True))
        else:  # train base + adapter, merged, in full
            model = checkpointing(load_model(name, dtype=model_cfg.dtype).merge_and_unload().requires_grad_(True))
    else:
        model = apply_lora(checkpointing(load_model(name, dtype=model_cfg.dtype)), LoraSettings.from_config(lora_cfg))
    if device is not None:
        model.to(device)
    return model
