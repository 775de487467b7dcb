"""Per-token log-probabilities, computing the LM head only where they are needed.

The 49k-token vocabulary head of a small model is a large share of its compute and memory.
:class:`TokenLogProbs` runs the decoder once, then applies the output head only at the
positions whose next token is a target (a response or assistant token), never at prompt or
padding positions. It is an ``nn.Module`` wrapping the causal LM so that DDP/FSDP, which
hook ``forward``, see every parameter through one call (``accelerator.prepare(TokenLogProbs(lm))``).
"""

from __future__ import annotations

import torch
from torch import nn


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Log-probability of each target token from its logits (the one place this is computed).

    Args:
        logits: ``(N, V)`` next-token logits (any float dtype; computed in float32).
        targets: ``(N,)`` token ids.
        softcap: the model's ``final_logit_softcapping`` (``tanh(x / c) * c``), if any.

    Returns:
        ``(N,)`` float32 ``log softmax(logits)[targets]``, as target logit − logsumexp, not
        ``log_softmax(...).gather(...)``: the same value, but it does not materialise the ``(N, V)``
        log-softmax output, and torch's CPU fp32 log_softmax over a 49k vocabulary is biased by ~1e-5
        per token (it adds up to ~1e-3 over a 100-token response; logsumexp is within ~1e-7 of float64).
    """
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def target_logprobs(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    target_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probability of each target token given everything before it.

    Args:
        lm: a causal LM (``PreTrainedModel`` or PEFT model).
        input_ids, attention_mask: ``(B, T)``.
        target_mask: ``(B, T)``; position ``t`` is scored iff ``target_mask[:, t]`` (``t >= 1``).
        position_ids: optional ``(B, T)`` (for packed sequences).

    Returns:
        ``(B, T)`` float32: ``out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` at target
        positions, 0 elsewhere (column 0 is always 0).
    """
    from alignforge.models.lora import unwrap_base

    base = unwrap_base(lm)
    decoder = base.get_decoder()
    head = base.get_output_embeddings()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    tm = target_mask[:, 1:].bool()
    h = hidden[:, :-1][tm]  # (N, H): states that predict a target token
    lp = logprobs_from_logits(head(h), input_ids[:, 1:][tm], getattr(base.config, "final_logit_softcapping", None))
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out[:, 1:][tm] = lp
    return out


class TokenLogProbs(nn.Module):
    """``forward(input_ids, attention_mask, target_mask, position_ids=None) -> (B, T) log-probs``.

    Wraps a causal LM so that a distributed wrapper around *this* module syncs its gradients.
    ``.lm`` is the wrapped model (save it, not the wrapper).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return target_logprobs(self.lm, input_ids, attention_mask, target_mask, position_ids)
