"""A vLLM generation backend (optional extra ``alignforge[vllm]``; needs a CUDA GPU).

:class:`VLLMBackend` answers the same calls as :class:`~alignforge.inference.generate.HFBackend`
(``generate``, ``generate_ids``, ``generate_from_ids``) with an in-process, colocated vLLM engine:
token-id prompts (``vllm.inputs.TokensPrompt``), one ``SamplingParams`` per request with its own
``seed`` (request ``i`` of a call gets ``cfg.seed + i``, so a sample does not depend on what else is
in the batch), EOS stop unless ``stop_on_eos=False`` (``ignore_eos``). :meth:`VLLMBackend.sync_weights`
pushes a trainer's weights into the engine after an update (a LoRA adapter merged in, then unmerged),
the way TRL's colocate mode does (``model_runner.model.load_weights`` + ``reset_prefix_cache``).

Status: written against vLLM's current offline API (``LLM.generate`` with ``TokensPrompt`` and
``SamplingParams(seed=…)``) and tested here against a stand-in of that API only
(``tests/inference/test_vllm_backend.py``): it has not been run on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from alignforge.inference.generate import GeneratedSequence, GenerationConfig, Prompt


def _import_vllm():
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        from alignforge.errors import ModelError

        raise ModelError("the vLLM backend needs vLLM and a CUDA GPU: pip install 'alignforge[vllm]'") from e
    return vllm, TokensPrompt


class VLLMBackend:
    """Generation with a colocated vLLM engine over ``model_path`` (an HF model directory)."""

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        llm: Any = None,
    ):
        from alignforge.inference.generate import bos_to_add, eos_token_ids

        self.vllm, self.TokensPrompt = _import_vllm()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(tokenizer)
        self._bos = bos_to_add(tokenizer)
        if llm is None:
            # the engine runs in this process, beside the trainer (one engine per training process)
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("LOCAL_RANK", str(rank))
            os.environ.setdefault("WORLD_SIZE", str(world_size))
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29513")
            llm = self.vllm.LLM(
                model=str(model_path),
                tokenizer=str(model_path),
                dtype=dtype,
                seed=seed,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                distributed_executor_backend="external_launcher",
                max_num_batched_tokens=4096,
            )
        self.llm = llm

    def render(self, prompt: Prompt) -> list[int]:
        from alignforge.inference.generate import render_prompt

        return render_prompt(self.tokenizer, prompt, self._bos)

    def sampling_params(self, cfg: GenerationConfig, seed: int) -> Any:
        kw: dict[str, Any] = dict(
            n=1,
            max_tokens=cfg.max_new_tokens,
            seed=seed,
            ignore_eos=not cfg.stop_on_eos,
            stop_token_ids=list(self.eos_ids) if cfg.stop_on_eos else [],
            skip_special_tokens=True,
            repetition_penalty=1.0,
        )
        if cfg.greedy:
            kw.update(temperature=0.0, top_p=1.0, top_k=0)
        else:
            kw.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        return self.vllm.SamplingParams(**kw)

    def generate_from_ids(
        self, rows: Sequence[list[int]], cfg: GenerationConfig | None = None
    ) -> list[GeneratedSequence]:
        cfg = cfg or GenerationConfig()
        rows = [list(r) for r in rows]
        if any(not r for r in rows):
            from alignforge.errors import ModelError

            raise ModelError("cannot generate from an empty prompt")
        prompts = [self.TokensPrompt(prompt_token_ids=r) for r in rows]
        params = [self.sampling_params(cfg, cfg.seed + i) for i in range(len(rows))]
        outs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        result = []
        for r, o in zip(rows, outs, strict=True):
            c = o.outputs[0]
            ids = list(c.token_ids)
            finished = bool(ids) and ids[-1] in self.eos_ids and cfg.stop_on_eos
            if cfg.stop_on_eos and not finished and c.finish_reason == "stop":
                finished = True  # stopped on an EOS id that vLLM did not include in token_ids
                ids.append(self.eos_ids[0])
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            result.append(GeneratedSequence(r, ids, text, finished))
        return result

    def generate_ids(self, prompts: Sequence[Prompt], cfg: GenerationConfig | None = None) -> list[GeneratedSequence]:
        return self.generate_from_ids([self.render(p) for p in prompts], cfg)

    def generate(self, prompts: list, cfg: GenerationConfig | None = None) -> list[str]:
        return [g.text for g in self.generate_ids(prompts, cfg)]

    # ------------------------------------------------------------------ weights
    @staticmethod
    def named_weights(model: Any) -> Iterator[tuple[str, Any]]:
        """``(name, tensor)`` pairs under the names of the plain HF model: a PEFT model's LoRA weights are
        merged in first (and unmerged by the caller's :meth:`sync_weights`), its own tensors skipped."""
        from alignforge.models.lora import is_peft

        if not is_peft(model):
            for name, p in model.named_parameters():
                yield name, p.data
            return
        prefix = getattr(model, "prefix", "lora_")
        for name, p in model.named_parameters():
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if prefix in name or "original_module" in name:
                continue
            yield name.replace("modules_to_save.default.", ""), p.data

    def sync_weights(self, model: Any) -> int:
        """Load the trainer's current weights into the engine; returns the number of tensors pushed."""
        from alignforge.models.lora import is_peft

        target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        peft = is_peft(model)
        if peft:
            model.merge_adapter()
        try:
            n = 0
            for name, t in self.named_weights(model):
                target.load_weights([(name, t)])
                n += 1
        finally:
            if peft:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()
        return n
