"""PPO's critic: a value head on a transformer backbone, one value per position.

The critic is an HF ``*ForSequenceClassification`` model with one label (the reward model's own
architecture): its scalar ``score`` head is applied at *every* position instead of only the last,
so ``V(s_t)`` is read at the state that predicts response token ``t``. Initialised from a reward
model (ChatGLM-RLHF, InstructGPT; the default) it starts out predicting the final score; from the
policy it gets a fresh zero-initialised head.
"""

from __future__ import annotations

import torch
from torch import nn


def _base(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class ValueModel(nn.Module):
    """``forward(input_ids, attention_mask) -> (B, T)`` values (float32 or wider).

    ``values[:, t]`` is computed from the hidden state at position ``t``; the trainer reads the
    value of the state before each response token at ``t − 1``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def head(self) -> nn.Module:
        base = _base(self.model)
        for name in ("score", "classifier"):
            h = getattr(base, name, None)
            if h is not None:
                return h
        raise AttributeError(f"{type(base).__name__} has no 'score' head")

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        base = _base(self.model)
        hidden = base.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        head = self.head()
        w = next(head.parameters())
        v = head(hidden.to(w.dtype)).squeeze(-1)
        return v.to(torch.promote_types(v.dtype, torch.float32))


def load_value_model(init: str, dtype: str = "float32") -> ValueModel:
    """A trainable critic from a saved reward model (its head kept) or any causal LM (head zeroed)."""
    from alignforge.models.reward import is_reward_model_dir, load_reward_backbone

    hf = load_reward_backbone(init, dtype)
    vm = ValueModel(hf)
    if not is_reward_model_dir(init):
        with torch.no_grad():
            for p in vm.head().parameters():
                p.zero_()
    for p in vm.parameters():
        p.requires_grad_(True)
    return vm


class SharedValueModel(nn.Module):
    """The critic as a second LoRA adapter (``"critic"``) on the actor's PEFT model, plus a value head.

    No second copy of the base weights: the critic is base + its own adapter + a zero-initialised
    linear head, so it starts at ``V = 0`` (initialised from the policy). Its forward makes
    ``"critic"`` the active adapter and restores the actor's afterwards; PEFT's ``set_adapter``
    switches ``requires_grad`` off for the inactive adapter, so both adapters' trainable flags are
    restored each time (before any backward). The actor's adapter is untouched by the critic's
    forward, and the reference (all adapters disabled) is the base.

    The PEFT model is held by reference, not as a submodule: its parameters (both adapters)
    belong to the policy; this module's own parameters are the head's. Not usable with gradient
    checkpointing (the recomputation in backward would run with the actor's adapter active).
    """

    ADAPTER = "critic"

    def __init__(self, peft_model: nn.Module):
        import copy

        super().__init__()
        self._peft = [peft_model]
        self.actor_adapter = peft_model.active_adapter
        if self.ADAPTER in peft_model.peft_config:
            raise ValueError(f"the policy already has an adapter named {self.ADAPTER!r}")
        cfg = copy.deepcopy(peft_model.peft_config[self.actor_adapter])
        cfg.inference_mode = False
        peft_model.add_adapter(self.ADAPTER, cfg)
        peft_model.set_adapter(self.actor_adapter)
        names = (f".{self.actor_adapter}.", f".{self.ADAPTER}.")
        self._trainable = [p for n, p in peft_model.named_parameters() if "lora_" in n and any(s in n for s in names)]
        self._restore()
        base = _base(peft_model)
        w = base.get_input_embeddings().weight
        self.head = nn.Linear(base.config.hidden_size, 1, bias=False).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.head.weight.zero_()

    def _restore(self) -> None:
        for p in self._trainable:
            p.requires_grad_(True)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        peft = self._peft[0]
        peft.set_adapter(self.ADAPTER)
        self._restore()
        try:
            hidden = (
                _base(peft)
                .get_decoder()(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
                )
                .last_hidden_state
            )
        finally:
            peft.set_adapter(self.actor_adapter)
            self._restore()
        v = self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)
        return v.to(torch.promote_types(v.dtype, torch.float32))
