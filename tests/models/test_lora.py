"""Tests for alignforge.models.lora on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from alignforge.errors import ModelError
from alignforge.models.loading import load_model, load_tokenizer
from alignforge.models.lora import (
    LoraSettings,
    apply_lora,
    is_peft,
    merge_adapter,
    reference_mode,
    save_trained,
    unwrap_base,
)

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _perturb_lora(model, seed: int = 0) -> None:
    """Make the adapter non-trivial (lora_B starts at zero, i.e. a no-op adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture()
def lora_model(tiny_model_dir):
    model = apply_lora(load_model(tiny_model_dir), LoraSettings(enabled=True, r=4, alpha=8))
    _perturb_lora(model)
    return model


def test_apply_lora_disabled_is_identity(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert apply_lora(model, LoraSettings()) is model
    assert not is_peft(model)
    assert unwrap_base(model) is model


def test_apply_lora_wraps_all_linear(tiny_model_dir):
    model = apply_lora(load_model(tiny_model_dir), LoraSettings(enabled=True, r=4))
    assert is_peft(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= wrapped
    assert "lm_head" not in wrapped
    base = unwrap_base(model)
    assert type(base).__name__ == "LlamaForCausalLM"
    # A fresh adapter is a no-op: lora_B is zero.
    torch.testing.assert_close(_logits(model), _logits(load_model(tiny_model_dir)))
    with pytest.raises(ModelError, match="already has a PEFT adapter"):
        apply_lora(model, LoraSettings(enabled=True))


def test_apply_lora_bad_target(tiny_model_dir):
    with pytest.raises(ModelError, match="no_such_proj"):
        apply_lora(load_model(tiny_model_dir), LoraSettings(enabled=True, target_modules=["no_such_proj"]))


def test_reference_mode_disables_adapter(tiny_model_dir, lora_model):
    base_logits = _logits(load_model(tiny_model_dir))
    lora_model.train()
    with reference_mode(lora_model) as ref:
        assert ref is lora_model  # same object, no copy
        out = ref(IDS).logits
        assert not out.requires_grad
        assert not ref.training
        assert torch.equal(out, base_logits)  # a disabled adapter runs exactly the base layers
    assert lora_model.training  # mode restored
    lora_model.eval()
    after = _logits(lora_model)
    assert (after - base_logits).abs().max() > 1e-3
    # gradients flow again outside the context
    lora_model(IDS).logits.sum().backward()
    assert any(p.grad is not None for n, p in lora_model.named_parameters() if "lora_" in n)


def test_reference_mode_needs_peft(tiny_model_dir):
    with pytest.raises(ModelError, match="explicit reference model"):
        with reference_mode(load_model(tiny_model_dir)):
            pass


def test_save_trained_adapter_roundtrip(tiny_model_dir, lora_model, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    out = save_trained(lora_model, tok, tmp_path / "adapter")
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())

    loaded = load_model(out)
    assert is_peft(loaded)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(_logits(loaded), _logits(lora_model.eval()))  # saved and reloaded: the same weights
    trainable = load_model(out, trainable_adapter=True)
    assert any(p.requires_grad for p in trainable.parameters())
    # the adapter's own tokenizer is used
    assert load_tokenizer(out).chat_template == tok.chat_template
    # explicit adapter= on a base name gives the same model
    explicit = load_model(tiny_model_dir, adapter=out)
    torch.testing.assert_close(_logits(explicit), _logits(loaded))


def test_adapter_dir_without_tokenizer_uses_base_tokenizer(tiny_model_dir, lora_model, tmp_path):
    out = save_trained(lora_model, None, tmp_path / "adapter")
    assert not (out / "tokenizer.json").exists()
    tok = load_tokenizer(out)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_save_trained_full_model(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2.0)
    out = save_trained(model, load_tokenizer(tiny_model_dir), tmp_path / "full")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    reloaded = load_model(out)
    assert not is_peft(reloaded)
    torch.testing.assert_close(_logits(reloaded), _logits(model))


def test_adapter_with_missing_base_name_is_model_error(tiny_model_dir, lora_model, tmp_path):
    out = save_trained(lora_model, None, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="gone"):
        load_model(out)


def test_merge_adapter_matches_adapter_logits(tiny_model_dir, lora_model, tmp_path):
    adapter = save_trained(lora_model, load_tokenizer(tiny_model_dir), tmp_path / "adapter")
    merged_dir = merge_adapter(adapter, tmp_path / "merged")
    files = {p.name for p in merged_dir.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert "adapter_config.json" not in files
    merged = load_model(merged_dir)
    assert not is_peft(merged)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # W + BA in one matrix vs W x + B(A x): fp32 rounding differs, so the tolerance scales with the logits
    adapter_logits = _logits(load_model(adapter))
    scale = float(adapter_logits.abs().max())
    torch.testing.assert_close(_logits(merged), adapter_logits, atol=1e-5 * max(1.0, scale), rtol=1e-5)
    # and it really differs from the base model
    assert (_logits(merged) - _logits(load_model(tiny_model_dir))).abs().max() > 1e-3


def test_merge_adapter_rejects_full_model(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="adapter"):
        merge_adapter(tiny_model_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
