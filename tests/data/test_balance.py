import pytest

from alignforge.data.balance import balance_by_length, bucket_index


def test_bucket_index():
    edges = [0, 8, 16]
    assert [bucket_index(d, edges) for d in (1, 8, 9, 16, 17, 1000)] == [0, 0, 1, 1, 2, 2]


def test_balancing_equalises_each_bucket_by_downsampling():
    # bucket 1-8: 3 longer-won, 1 shorter-won; bucket 9-16: 1 longer-won, 2 shorter-won; 2 equal
    lengths = [
        (10, 5),
        (12, 6),
        (20, 13),
        (5, 9),  # |d| 5, 6, 7, 4
        (30, 18),
        (10, 22),
        (3, 16),  # |d| 12, 12, 13
        (7, 7),
        (9, 9),
    ]
    keep, rep = balance_by_length(lengths, edges=[0, 8, 16], seed=1)
    b1, b2, b3 = rep.buckets
    assert (b1.longer_won_before, b1.shorter_won_before, b1.longer_won_after, b1.shorter_won_after) == (3, 1, 1, 1)
    assert (b2.longer_won_before, b2.shorter_won_before, b2.longer_won_after, b2.shorter_won_after) == (1, 2, 1, 1)
    assert (b3.longer_won_before, b3.shorter_won_before) == (0, 0)
    assert rep.equal_length == 2 and rep.n_before == 9 and rep.n_after == len(keep) == 6
    assert {7, 8, 3, 4} <= set(keep)  # equal-length pairs and every minority pair are kept
    kept = [lengths[i] for i in keep]
    longer = sum(c > r for c, r in kept)
    shorter = sum(c < r for c, r in kept)
    assert longer == shorter == 2
    assert keep == sorted(keep)
    assert balance_by_length(lengths, edges=[0, 8, 16], seed=1)[0] == keep  # seeded
    assert "9 -> 6 pairs" in rep.summary() and "1-8" in rep.summary()


def test_bad_edges():
    with pytest.raises(ValueError, match="start at 0"):
        balance_by_length([(1, 2)], edges=[1, 5])
    with pytest.raises(ValueError):
        balance_by_length([(1, 2)], edges=[0, 5, 5])


def test_real_hh_balance(shared_data, tiny_tokenizer):
    from alignforge.data.tokenize import load_preference_dataset

    pairs, _ = load_preference_dataset(
        shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz", tiny_tokenizer, max_length=4096, on_error="skip"
    )
    keep, rep = balance_by_length([(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs])
    kept = [pairs[i] for i in keep]
    longer = sum(len(p.chosen_ids) > len(p.rejected_ids) for p in kept)
    shorter = sum(len(p.chosen_ids) < len(p.rejected_ids) for p in kept)
    assert longer == shorter > 100 and rep.n_after < rep.n_before
