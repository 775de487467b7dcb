"""KV primitives: forwards on a cached prefix equal full forwards; the path cache's bound and LRU."""

import pytest
import torch

from alignforge.errors import ConfigError
from alignforge.inference.kvcache import (
    PrefixKVCache,
    cache_layers,
    extend,
    layers_len,
    layers_nbytes,
    option_probs,
    slice_layers,
)


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()


def full_last_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_extend_on_a_prefix_equals_the_full_forward_for_ragged_rows(model64):
    prefix = [5, 17, 33, 2, 90, 41]
    rows = [[7], [8, 9, 10, 11], [12, 13]]
    pre = extend(model64, None, [prefix])
    assert layers_len(cache_layers(pre.cache)) == len(prefix)
    torch.testing.assert_close(pre.logits[0], full_last_logits(model64, prefix), atol=1e-10, rtol=0)
    ext = extend(model64, cache_layers(pre.cache), rows)
    for i, r in enumerate(rows):
        want = full_last_logits(model64, prefix + r)
        torch.testing.assert_close(ext.logits[i], want, atol=1e-10, rtol=0)
    # the prefix was not modified in place: a second extension from it is the same
    again = extend(model64, cache_layers(pre.cache), rows[:1])
    torch.testing.assert_close(again.logits[0], ext.logits[0], atol=1e-10, rtol=0)


def test_extend_rejects_empty_rows(model64):
    with pytest.raises(ValueError, match="at least one new token"):
        extend(model64, None, [[1, 2], []])


def test_option_probs_sums_each_options_ids():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    got = option_probs(logits, [[0, 1], [3]])
    torch.testing.assert_close(got, torch.tensor([[0.3, 0.4]]))


def test_path_cache_assembles_segments_and_evicts_least_recently_used(model64):
    ids = [3, 4, 5, 6, 7, 8]
    full = cache_layers(extend(model64, None, [ids]).cache)
    one_token = layers_nbytes(slice_layers(full, 0, 1))
    cache = PrefixKVCache(max_mb=(4 * one_token + 3) / 2**20)  # room for 4 tokens of KV, no logits
    cache.put(tuple(ids[:2]), slice_layers(full, 0, 2), None, pinned=True)
    cache.put(tuple(ids[:3]), slice_layers(full, 2, 3), None, parent=tuple(ids[:2]))
    cache.put(tuple(ids[:2] + [99]), slice_layers(full, 2, 3), None, parent=tuple(ids[:2]))  # a sibling
    layers, _ = cache.lookup(tuple(ids[:3]))
    for (k, v), (fk, fv) in zip(layers, full, strict=True):
        assert torch.equal(k, fk[..., :3, :]) and torch.equal(v, fv[..., :3, :])
    # a 5th token evicts the least recently used entry (the sibling), not the pinned root
    cache.put(tuple(ids[:4]), slice_layers(full, 3, 4), None, parent=tuple(ids[:3]))
    assert tuple(ids[:2] + [99]) not in cache and tuple(ids[:2]) in cache and cache.evictions == 1
    # an entry whose parent is gone is a miss, and is dropped
    cache.drop(tuple(ids[:3]))
    assert cache.lookup(tuple(ids[:4])) is None and tuple(ids[:4]) not in cache
    assert cache.hits == 1 and cache.misses == 1


def test_path_cache_too_small_for_one_path_is_a_clear_error(model64):
    full = cache_layers(extend(model64, None, [[1, 2, 3, 4]]).cache)
    cache = PrefixKVCache(max_mb=layers_nbytes(full) / 2 / 2**20)
    with pytest.raises(ConfigError, match="too small for one path.*raise cache_mb"):
        cache.put((1, 2, 3, 4), full, None, pinned=True)
    with pytest.raises(ConfigError, match="max_mb must be > 0"):
        PrefixKVCache(0)


def test_forward_stats_count_calls_and_positions(model64):
    from alignforge.inference.kvcache import FORWARD_STATS, reset_forward_stats

    reset_forward_stats()
    extend(model64, None, [[1], [2, 3, 4]])  # 2 rows x width 3 (padding included)
    extend(model64, None, [[5, 6]])
    assert FORWARD_STATS == {"calls": 2, "positions": 8}
