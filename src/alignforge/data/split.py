"""Seeded, deterministic held-out splits of a data file (shared by the RM, DPO and ULMA results).

:func:`holdout_split` picks ``k`` of ``n`` indices with ``random.Random(seed).sample``; the
choice depends only on ``(n, k, seed)`` (Python's ``random`` is stable across platforms and
versions for ``sample``), never on the records themselves. :func:`split_file` applies it to the
readable records of a file (after ``on_error="skip"`` drops malformed ones, so indices refer to
the records that were read) and writes both parts as TRL-format JSONL (conversational records
stay conversational), atomically.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from alignforge.errors import ConfigError


def holdout_split(n: int, k: int = 300, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train, heldout)``: sorted index lists partitioning ``range(n)``; ``len(heldout) == k``."""
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(k, int) or k < 0 or k > n:
        raise ConfigError(f"cannot hold out {k!r} of {n} records")
    held = sorted(random.Random(seed).sample(range(n), k))
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


@dataclass
class SplitReport:
    in_path: str
    kind: str
    n_read: int
    n_dropped: int
    n_train: int
    n_heldout: int
    seed: int

    def summary(self) -> str:
        s = (
            f"{self.in_path}: {self.n_read} {self.kind} records -> {self.n_train} train + "
            f"{self.n_heldout} held out (seed {self.seed})"
        )
        return s + (f"; {self.n_dropped} unreadable records skipped" if self.n_dropped else "")


def split_file(
    in_path: str | Path,
    train_out: str | Path,
    heldout_out: str | Path,
    k: int = 300,
    seed: int = 0,
    kind: str | None = None,
) -> SplitReport:
    """Split a data file (any format the readers accept) into train and held-out JSONL files.

    ``kind`` (``preference``, ``pointwise``, ``sft``, ``prompt``) defaults to the detected kind.
    Records keep their order within each output. Outputs ending in ``.gz`` are gzipped.
    """
    from alignforge.data.convert import record_to_trl, write_jsonl
    from alignforge.data.readers import detect_kind, read_any

    if Path(train_out).resolve() == Path(heldout_out).resolve():
        raise ConfigError("train_out and heldout_out must be different files")
    kind = kind or detect_kind(in_path)
    res = read_any(in_path, kind, on_error="skip")
    recs = res.records
    train, held = holdout_split(len(recs), k, seed)
    write_jsonl((record_to_trl(recs[i]) for i in train), train_out)
    write_jsonl((record_to_trl(recs[i]) for i in held), heldout_out)
    return SplitReport(str(in_path), kind, len(recs), len(res.dropped), len(train), len(held), seed)


def experiment_split(
    in_path: str | Path,
    out_dir: str | Path,
    heldout: int = 300,
    split_seed: int = 0,
    n_train: int = 0,
    seed: int = 42,
    echo=print,
) -> tuple["SplitReport", int]:
    """The held-out protocol the RM and DPO/ULMA experiments share.

    Splits ``in_path`` (preference pairs) into a training pool and ``heldout`` pairs (seed
    ``split_seed``), then samples ``n_train`` pool pairs (seed ``seed``; 0 = all) into
    ``out_dir/train.jsonl`` (held-out pairs: ``out_dir/heldout.jsonl``). Returns the split report
    and the number of training pairs.
    """
    from alignforge.data.convert import record_to_trl, write_jsonl
    from alignforge.data.readers import read_preference

    data = Path(out_dir)
    rep = split_file(
        in_path, data / "train_pool.jsonl", data / "heldout.jsonl", k=heldout, seed=split_seed, kind="preference"
    )
    echo(rep.summary())
    pool = read_preference(data / "train_pool.jsonl").records
    n = len(pool) if n_train <= 0 else min(n_train, len(pool))
    sub = sorted(random.Random(seed).sample(range(len(pool)), n))
    write_jsonl((record_to_trl(pool[i]) for i in sub), data / "train.jsonl")
    echo(f"training on {n} of {len(pool)} pool pairs (seed {seed})")
    return rep, n
