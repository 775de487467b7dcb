"""Reward models: an HF ``*ForSequenceClassification`` (backbone + scalar ``score`` head) with our pooling.

Which token is scored (the convention shared with plain transformers)
    A conversation is scored at the **last token of its chat-template rendering**, i.e. of
    ``tokenizer.apply_chat_template(conversation)`` (no generation prompt): for ChatML templates
    (SmolLM2) the ``"\n"`` after the final ``<|im_end|>``. The data side produces exactly these
    ids with ``full_render=True`` (``data/tokenize.py``). Here the position is found from the
    attention mask (or, for packed pairs, from the block layout), never from the pad id.

    HF's ``*ForSequenceClassification`` (transformers 5) pools at the rightmost token that is not
    ``config.pad_token_id``. SmolLM2's pad token *is* its ``<|im_end|>``; that is harmless as
    long as the rendering's last token is not the pad token, and :func:`save_reward_model`
    makes sure of that (it switches the saved pad token to another special token if it is).
    So ``AutoModelForSequenceClassification.from_pretrained(saved_dir)`` on
    ``apply_chat_template(conversation)`` ids, one at a time or right/left-padded with the saved
    tokenizer's pad token, gives the same scores as :class:`RewardModel` (tested).

A saved reward model is a plain HF sequence-classification directory plus ``reward_stats.json``
(the score mean and std on a reference set, for normalisation later). Load it back with
:func:`load_reward_model`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from alignforge.errors import ModelError
from alignforge.models.lora import unwrap_base
from alignforge.models.packing import packed_hidden_states, prefix_cached_hidden

STATS_FILE = "reward_stats.json"


def _head(base: nn.Module) -> nn.Module:
    for name in ("score", "classifier"):
        head = getattr(base, name, None)
        if head is not None:
            return head
    raise ModelError(f"{type(base).__name__} has no 'score' or 'classifier' head")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last position with ``attention_mask == 1`` (left or right padding)."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(1).to(torch.long).argmax(dim=1)


class RewardModel(nn.Module):
    """``forward(batch) -> scores``.

    * unpacked batch (``input_ids``, ``attention_mask``): ``(B,)`` scores;
    * packed pairs (``models.packing.pack_pairs``): ``(r_chosen, r_rejected)``, each ``(B,)``.

    ``.model`` is the wrapped HF (or PEFT) sequence-classification model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _score(self, hidden: torch.Tensor) -> torch.Tensor:
        head = _head(unwrap_base(self.model))
        w = next(head.parameters())
        return head(hidden.to(w.dtype)).float().squeeze(-1)

    def forward(self, batch: dict[str, torch.Tensor]):
        base = unwrap_base(self.model)
        decoder = base.get_decoder()
        rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
        if "segment_ids" in batch:
            h = packed_hidden_states(decoder, batch)
            return self._score(h[rows, batch["chosen_last"]]), self._score(h[rows, batch["rejected_last"]])
        h = decoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state
        return self._score(h[rows, last_token_index(batch["attention_mask"])])

    def score_with_prefix(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` scores of rows that share prefixes (:func:`shared_prefix_batch`'s layout): the
        decoder runs once over each distinct prefix with a KV cache, the cache is indexed to the rows,
        and the rows' remaining tokens run against it. The same scores as :meth:`forward` on the whole
        rows, up to rounding."""
        sm = batch["suffix_mask"]
        _, h = prefix_cached_hidden(
            unwrap_base(self.model).get_decoder(),
            batch["prefix_ids"],
            batch["prefix_mask"],
            batch["prefix_index"],
            batch["suffix_ids"],
            sm,
        )
        rows = torch.arange(h.shape[0], device=h.device)
        return self._score(h[rows, sm.sum(-1) - 1])


def shared_prefix_batch(seqs: Sequence[Sequence[int]], groups: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """The layout of :meth:`RewardModel.score_with_prefix` for ``seqs`` whose rows with equal
    ``groups`` keys share a beginning: each group's longest common prefix of token ids (at most its
    shortest row's length − 1, so every row keeps a token to score at), left-padded, once per group;
    ``prefix_index`` maps rows to it; the rest of each row, right-padded. Any grouping is correct
    (the prefix is the rows' literal common beginning); rows of one prompt share the most."""
    from alignforge.data.collate import pad_batch

    keys: dict[Any, int] = {}
    index = [keys.setdefault(g, len(keys)) for g in groups]
    members: list[list[int]] = [[] for _ in keys]
    for i, k in enumerate(index):
        members[k].append(i)
    prefixes = []
    for rows in members:
        first, n = seqs[rows[0]], min(len(seqs[r]) for r in rows) - 1
        k = 0
        while k < n and all(seqs[r][k] == first[k] for r in rows):
            k += 1
        prefixes.append(list(first[:k]))
    pre = pad_batch(prefixes, pad_id, side="left")
    suf = pad_batch([list(seqs[i][len(prefixes[k]) :]) for i, k in enumerate(index)], pad_id)
    return {
        "prefix_ids": pre["input_ids"],
        "prefix_mask": pre["attention_mask"],
        "prefix_index": torch.tensor(index),
        "suffix_ids": suf["input_ids"],
        "suffix_mask": suf["attention_mask"],
    }


def is_reward_model_dir(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a saved sequence-classification (reward) model directory."""
    from alignforge.models.loading import resolve_model_path

    try:
        return _is_seqcls_dir(resolve_model_path(name_or_path))
    except Exception:  # noqa: BLE001 - an unresolvable name is not a reward model dir
        return False


def _is_seqcls_dir(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_reward_backbone(name_or_path: str, dtype: str = "float32") -> Any:
    """An HF sequence-classification model with one label, from a saved RM or from any causal LM
    (``embedded``, HF dir, GGUF, hub id); a fresh ``score`` head is initialised in the latter case."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from alignforge.models.loading import resolve_model_path, torch_dtype

    path = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if not _is_seqcls_dir(path):
        kwargs["num_labels"] = 1
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load a reward model from {name_or_path!r}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.num_labels != 1:
        raise ModelError(f"{name_or_path!r} has {model.config.num_labels} labels; a reward model has 1")
    model._alignforge_name = os.fspath(name_or_path)  # noqa: SLF001
    return model


def load_reward_model(path: str, dtype: str = "float32") -> tuple[RewardModel, Any, dict]:
    """Load a saved reward model: ``(RewardModel, tokenizer, stats)``; stats has ``mean``/``std``."""
    from alignforge.models.loading import load_tokenizer

    model = load_reward_backbone(path, dtype)
    tok = load_tokenizer(path)
    model.config.pad_token_id = tok.pad_token_id
    stats_file = Path(path) / STATS_FILE
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    return RewardModel(model).eval(), tok, stats


def rendering_end_id(tokenizer: Any) -> int:
    """The last token id of a rendered conversation (the token a reward model scores)."""
    from alignforge.data.tokenize import tokenize_prompt_completion

    p, c = tokenize_prompt_completion(
        [{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello."}], tokenizer, full_render=True
    )
    return (p + c)[-1]


def scoring_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer``, or a copy with another pad token if its pad token is the rendering's last
    token (HF's pooling, the rightmost non-pad token, would then miss it; module docstring)."""
    import copy

    end = rendering_end_id(tokenizer)
    if tokenizer.pad_token_id != end:
        return tokenizer
    for cand in [
        tokenizer.unk_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        *tokenizer.all_special_ids,
        0,
        1,
    ]:
        if cand is not None and cand != end:
            tok = copy.deepcopy(tokenizer)
            tok.pad_token = tok.convert_ids_to_tokens(cand)
            return tok
    raise ModelError(
        "cannot choose a pad token for the reward model: every candidate is the last token of a rendered conversation"
    )


def save_reward_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, stats: dict) -> Path:
    """Save atomically as a full HF model (a LoRA adapter is merged first) + ``reward_stats.json``.

    The saved tokenizer and ``config.pad_token_id`` use a pad token that is not the rendering's
    last token (:func:`scoring_tokenizer`), so plain transformers pools where alignforge does."""
    from alignforge.models.loading import atomic_dir
    from alignforge.models.lora import is_peft

    hf = model.model if isinstance(model, RewardModel) else model
    if is_peft(hf):
        hf = hf.merge_and_unload()
    tokenizer = scoring_tokenizer(tokenizer)
    hf.config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (Path(tmp) / STATS_FILE).write_text(json.dumps(stats, indent=2))
    return Path(out_dir)


# --------------------------------------------------------------------------- batched scoring


def _progress(enabled: bool, total: int, description: str):
    """A started rich progress bar (on stderr) and its task, or ``(None, None)``."""
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    prog.start()
    return prog, prog.add_task(description, total=total)


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)  # longest first: OOM early
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def score_pairs(
    rm, pairs: Sequence, pad_id: int, batch_size: int = 8, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Score both responses of every pair -> ``(chosen, rejected)`` float64 arrays in input order.

    Pairs are packed (``[prompt | chosen | rejected]``) and batched by length.
    """
    from alignforge.models.packing import pack_pairs

    n = len(pairs)
    chosen, rejected = np.zeros(n), np.zeros(n)
    device = next(rm.parameters()).device
    was_training = rm.training
    rm.eval()
    prog, task = _progress(progress, n, "scoring pairs")
    try:
        with torch.no_grad():
            for idx in batches_by_length(
                [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs], batch_size
            ):
                batch = {k: v.to(device) for k, v in pack_pairs([pairs[i] for i in idx], pad_id).items()}
                rc, rr = rm(batch)
                chosen[idx] = rc.double().cpu().numpy()
                rejected[idx] = rr.double().cpu().numpy()
                if prog is not None:
                    prog.advance(task, len(idx))
    finally:
        if prog is not None:
            prog.stop()
        rm.train(was_training)
    return chosen, rejected


def reward_input_ids(conversation: Sequence[dict], text: str, tokenizer: Any) -> list[int]:
    """The ids a reward model scores for ``text`` answering ``conversation``: the whole rendering with
    the RM's own chat template (``full_render``), so any policy's text is scored the same way; an
    empty or blank answer is rendered as a single space."""
    from alignforge.data.tokenize import tokenize_prompt_completion

    p, c = tokenize_prompt_completion(
        list(conversation),
        [{"role": "assistant", "content": text if text.strip() else " "}],
        tokenizer,
        full_render=True,
    )
    return p + c


def score_sequences(
    rm,
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
    progress: bool = True,
    groups: Sequence[Any] | None = None,
) -> np.ndarray:
    """Score whole token sequences (prompt + response), right-padded, batched by length;
    input order kept.

    ``groups`` (a key per row, e.g. its prompt): the rows are batched in their order instead, and
    within a batch the rows of a group run their common prefix once (:meth:`RewardModel.score_with_prefix`;
    the same scores up to rounding) where a group has two or more rows in the batch.
    """
    from alignforge.data.collate import pad_batch

    scores = np.zeros(len(seqs))
    device = next(rm.parameters()).device
    was_training = rm.training
    rm.eval()
    prog, task = _progress(progress, len(seqs), "scoring")
    if groups is None:
        order = batches_by_length([len(s) for s in seqs], batch_size)
    else:
        order = [list(range(i, min(i + batch_size, len(seqs)))) for i in range(0, len(seqs), batch_size)]
    try:
        with torch.no_grad():
            for idx in order:
                keys = None if groups is None else [groups[i] for i in idx]
                batch = None
                if keys is not None and len(set(keys)) < len(keys):
                    batch = shared_prefix_batch([seqs[i] for i in idx], keys, pad_id)
                    batch = batch if batch["prefix_ids"].shape[1] else None  # no group shares a token
                if batch is not None:
                    out = rm.score_with_prefix({k: v.to(device) for k, v in batch.items()})
                else:
                    batch = pad_batch([seqs[i] for i in idx], pad_id)
                    out = rm({k: v.to(device) for k, v in batch.items()})
                scores[idx] = out.double().cpu().numpy()
                if prog is not None:
                    prog.advance(task, len(idx))
    finally:
        if prog is not None:
            prog.stop()
        rm.train(was_training)
    return scores
