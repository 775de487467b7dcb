"""Bucket-based length balancing (ChatGLM-RLHF §1b), a data step before reward-model training.

Annotators favour long answers, so a reward model can learn "longer is better". ChatGLM-RLHF
buckets pairs by the absolute token-length difference ``|len(chosen) - len(rejected)|`` and,
within each bucket, balances the pairs where the longer response won against those where the
shorter one won. The paper gives neither the bucket edges nor whether it down- or up-samples
[unv]; we **down-sample the majority side** to the minority count (seeded, so it is
reproducible) and make the edges configurable. Pairs of equal length carry no length signal and
are kept as they are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

DEFAULT_EDGES = (0, 8, 16, 32, 64, 128, 256)


@dataclass
class BucketCount:
    label: str
    longer_won_before: int = 0
    shorter_won_before: int = 0
    longer_won_after: int = 0
    shorter_won_after: int = 0


@dataclass
class BalanceReport:
    buckets: list[BucketCount] = field(default_factory=list)
    equal_length: int = 0
    n_before: int = 0
    n_after: int = 0

    def summary(self) -> str:
        lines = [
            f"length balancing: {self.n_before} -> {self.n_after} pairs ({self.equal_length} of equal length kept)",
            "  |len diff|     longer-won  shorter-won   ->  longer-won  shorter-won",
        ]
        for b in self.buckets:
            lines.append(
                f"  {b.label:>11}  {b.longer_won_before:>11}  {b.shorter_won_before:>11}   ->  "
                f"{b.longer_won_after:>10}  {b.shorter_won_after:>11}"
            )
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "n_before": self.n_before,
            "n_after": self.n_after,
            "equal_length": self.equal_length,
            "buckets": [vars(b) for b in self.buckets],
        }


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """``"1-8"``, ``"9-16"``, ..., ``">256"`` for bucket edges ``0, 8, 16, ..., 256``."""
    labels = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        labels.append(f"{lo + 1}-{hi}" if hi is not None else f">{lo}")
    return labels


def bucket_index(absdiff: int, edges: Sequence[int]) -> int:
    """Bucket of a positive length difference: bucket i holds ``edges[i] < d <= edges[i+1]``."""
    for i in range(len(edges) - 1, -1, -1):
        if absdiff > edges[i]:
            return i
    raise ValueError("equal lengths have no bucket")


def balance_by_length(
    lengths: Sequence[tuple[int, int]], edges: Sequence[int] = DEFAULT_EDGES, seed: int = 0
) -> tuple[list[int], BalanceReport]:
    """Choose which pairs to keep.

    Args:
        lengths: ``(len(chosen), len(rejected))`` in tokens, one per pair.
        edges: increasing bucket edges starting at 0; bucket i is ``edges[i] < |d| <= edges[i+1]``,
            the last one is open.
        seed: for the down-sampling.

    Returns:
        ``(kept_indices, report)``; indices are sorted, so the original order is preserved.
    """
    edges = list(edges)
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"bucket edges must start at 0 and increase: {edges}")
    labels = bucket_labels(edges)
    longer = [[] for _ in edges]
    shorter = [[] for _ in edges]
    keep: list[int] = []
    report = BalanceReport(buckets=[BucketCount(lb) for lb in labels], n_before=len(lengths))
    for i, (c, r) in enumerate(lengths):
        d = c - r
        if d == 0:
            keep.append(i)
            report.equal_length += 1
            continue
        (longer if d > 0 else shorter)[bucket_index(abs(d), edges)].append(i)
    rng = random.Random(seed)
    for k, b in enumerate(report.buckets):
        lw, sw = longer[k], shorter[k]
        b.longer_won_before, b.shorter_won_before = len(lw), len(sw)
        n = min(len(lw), len(sw))
        lw_keep = sorted(rng.sample(lw, n)) if len(lw) > n else lw
        sw_keep = sorted(rng.sample(sw, n)) if len(sw) > n else sw
        b.longer_won_after, b.shorter_won_after = len(lw_keep), len(sw_keep)
        keep += lw_keep + sw_keep
    keep.sort()
    report.n_after = len(keep)
    return keep, report
