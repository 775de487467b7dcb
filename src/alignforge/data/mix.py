"""Mix several data files into one training file, with a seeded held-out split of each (``alignforge data mix``).

A mix is a list of sources, each ``{file, weight | n, heldout, split_seed, name}``:

1. **Held-out split per source.** The readable records of ``file`` (read as the mix's ``kind``,
   ``preference`` by default) are split by :func:`alignforge.data.split.holdout_split` into a
   training pool and ``heldout`` records (seed ``split_seed``), exactly as ``split_file`` and
   ``experiment_split`` do: the same ``(file, heldout, split_seed)`` holds out the same records in
   the RM / DPO / ULMA results and here. The held-out records go to ``OUT/heldout/NAME.jsonl``
   and are never in the mix. ``heldout: 0`` holds nothing out (no file is written).
2. **The ratio.** Either every source gives ``n`` (take exactly ``n`` records of its pool), or every
   source gives ``weight`` and the mix gives ``n_train``: source *i* gets
   ``n_i = n_train · w_i / Σw`` records, rounded by the largest-remainder rule (floors first, the
   leftover records to the largest fractional parts, ties to the earlier source), so the counts
   add up to ``n_train`` exactly. A source asked for more records than its pool holds is an error.
3. **Sampling.** Source *i*'s ``n_i`` records are ``random.Random(f"mix:{seed}:{i}").sample`` of its
   pool; the union is shuffled with ``random.Random(seed)``. Everything depends only on the files,
   the spec and ``seed``: the same spec gives the same ``OUT/train.jsonl`` byte for byte.

Records are written as TRL JSONL in the conversational style (one style for the whole mix, whatever
style each file had). ``OUT/mix_report.json`` records the spec and, per source, the records read,
dropped, held out, in the pool and taken, and its share of the mix.

Errors name where the problem is: a missing file (``SPEC: sources[i].file: file not found``), a
bad spec field, an empty file or an empty training pool / share (``... sources[i] (FILE): ...``), and
every bad record of every source file as ``FILE:LINE: field 'F': reason`` (each file is read and
validated on its own, so two files of different formats each get their own file:line error).
With ``on_error: skip`` bad records are dropped and counted instead, but a file with no readable
record at all is still an error that quotes its first bad record.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from alignforge.errors import ConfigError, DataError

SOURCE_KEYS = ("file", "weight", "n", "heldout", "split_seed", "name")
SPEC_KEYS = ("sources", "n_train", "seed", "kind", "on_error")


@dataclass
class MixSource:
    file: str
    weight: Optional[float] = None
    n: Optional[int] = None
    heldout: int = 0
    split_seed: int = 0
    name: Optional[str] = None


@dataclass
class MixSpec:
    sources: list[MixSource] = field(default_factory=list)
    n_train: Optional[int] = None  # total with weights
    seed: int = 42
    kind: str = "preference"
    on_error: str = "raise"
    origin: str = "mix spec"  # where the spec came from, for error messages


def _where(spec: MixSpec, i: int, key: str | None = None) -> str:
    return f"{spec.origin}: sources[{i}]" + (f".{key}" if key else "")


def _int(v: Any, where: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}, got {v!r}")
    return v


def parse_spec(obj: Any, origin: str = "mix spec") -> MixSpec:
    """A :class:`MixSpec` from a mapping (a loaded YAML/JSON spec); every field is checked."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{origin}: a mix spec must be a mapping with a 'sources' list")
    unknown = [k for k in obj if k not in SPEC_KEYS]
    if unknown:
        raise ConfigError(f"{origin}: unknown key {unknown[0]!r}; valid keys: {', '.join(SPEC_KEYS)}")
    spec = MixSpec(origin=origin)
    if obj.get("n_train") is not None:
        spec.n_train = _int(obj["n_train"], f"{origin}: n_train", 1)
    if obj.get("seed") is not None:
        spec.seed = _int(obj["seed"], f"{origin}: seed", 0)
    spec.kind = obj.get("kind", spec.kind)
    if spec.kind not in ("preference", "pointwise", "sft", "prompt"):
        raise ConfigError(f"{origin}: kind must be preference, pointwise, sft or prompt, got {spec.kind!r}")
    spec.on_error = obj.get("on_error", spec.on_error)
    if spec.on_error not in ("raise", "skip"):
        raise ConfigError(f"{origin}: on_error must be raise or skip, got {spec.on_error!r}")
    srcs = obj.get("sources")
    if not isinstance(srcs, list) or not srcs:
        raise ConfigError(f"{origin}: 'sources' must be a non-empty list of {{file, weight | n, heldout, ...}}")
    for i, s in enumerate(srcs):
        if not isinstance(s, dict):
            raise ConfigError(f"{_where(spec, i)}: expected a mapping, got {s!r}")
        bad = [k for k in s if k not in SOURCE_KEYS]
        if bad:
            raise ConfigError(f"{_where(spec, i, bad[0])}: unknown key; valid keys: {', '.join(SOURCE_KEYS)}")
        if not isinstance(s.get("file"), str) or not s["file"]:
            raise ConfigError(f"{_where(spec, i, 'file')}: missing (the data file to mix)")
        src = MixSource(file=s["file"])
        if s.get("weight") is not None:
            w = s["weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
                raise ConfigError(f"{_where(spec, i, 'weight')}: expected a number > 0, got {w!r}")
            src.weight = float(w)
        if s.get("n") is not None:
            src.n = _int(s["n"], _where(spec, i, "n"), 1)
        src.heldout = _int(s.get("heldout", 0), _where(spec, i, "heldout"), 0)
        src.split_seed = _int(s.get("split_seed", 0), _where(spec, i, "split_seed"), 0)
        if s.get("name") is not None:
            if not isinstance(s["name"], str) or not s["name"].strip() or "/" in s["name"]:
                raise ConfigError(f"{_where(spec, i, 'name')}: expected a non-empty name without '/'")
            src.name = s["name"]
        spec.sources.append(src)
    check_ratio(spec)
    return spec


def load_spec(path: str | Path) -> MixSpec:
    """A mix spec from a YAML or JSON file; source files are resolved relative to the spec's folder."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"mix spec not found: {p}")
    try:
        obj = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML/JSON: {e}") from None
    spec = parse_spec(obj, origin=str(p))
    for s in spec.sources:
        if not Path(s.file).is_absolute():
            s.file = str(p.parent / s.file)
    return spec


def check_ratio(spec: MixSpec) -> None:
    """Every source gives ``n``, or every source gives ``weight`` and the spec gives ``n_train``."""
    has_n = [s.n is not None for s in spec.sources]
    has_w = [s.weight is not None for s in spec.sources]
    for i, (a, b) in enumerate(zip(has_n, has_w, strict=True)):
        if a == b:
            raise ConfigError(f"{_where(spec, i)}: give exactly one of 'weight' and 'n'")
    if any(has_n) and any(has_w):
        raise ConfigError(f"{spec.origin}: either every source gives 'n' or every source gives 'weight', not a mix")
    if all(has_w) and spec.n_train is None:
        raise ConfigError(f"{spec.origin}: sources give weights, so 'n_train' (the size of the mix) is required")
    if all(has_n) and spec.n_train is not None and spec.n_train != sum(s.n for s in spec.sources):
        raise ConfigError(
            f"{spec.origin}: n_train {spec.n_train} differs from the sum of the sources' n "
            f"({sum(s.n for s in spec.sources)}); drop n_train or make them agree"
        )


def allocate(n_total: int, weights: list[float]) -> list[int]:
    """Largest-remainder rounding of ``n_total · w_i / Σw``: integers that add up to ``n_total``."""
    if n_total < 0 or not weights or any(not w > 0 for w in weights):
        raise ConfigError(f"cannot allocate {n_total} records over weights {weights}")
    tot = sum(weights)
    exact = [n_total * w / tot for w in weights]
    out = [int(x) for x in exact]
    left = n_total - sum(out)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[:left]:
        out[i] += 1
    return out


def source_names(sources: list[MixSource]) -> list[str]:
    """``name``, else the file name without ``.jsonl``/``.json``/``.gz``; colliding defaults get the
    parent folder's name in front (``helpful-base-test``), then an index."""

    def stem(f: str) -> str:
        n = Path(f).name
        for ext in (".gz", ".jsonl", ".json"):
            n = n[: -len(ext)] if n.endswith(ext) else n
        return n or "source"

    first = [s.name or stem(s.file) for s in sources]
    names = [
        f"{Path(s.file).parent.name}-{stem(s.file)}" if s.name is None and first.count(first[i]) > 1 else first[i]
        for i, s in enumerate(sources)
    ]
    for i in range(len(names)):
        if names.count(names[i]) > 1:
            if sources[i].name is not None:
                raise ConfigError(f"mix: two sources are named {names[i]!r}")
            names[i] = f"{names[i]}-{i}"
    return names


def _read_source(spec: MixSpec, i: int, src: MixSource):
    from alignforge.data.readers import read_any

    if not Path(src.file).exists():
        raise ConfigError(f"{_where(spec, i, 'file')}: file not found: {src.file}")
    res = read_any(src.file, spec.kind, on_error=spec.on_error)  # raise: FILE:LINE: field 'F': reason
    if not res.records:
        if res.dropped:
            first = res.dropped[0]
            raise DataError(
                f"no readable {spec.kind} record ({len(res.dropped)} bad; first: {first.reason})",
                file=first.file,
                line=first.line,
                field=first.field,
            )
        raise DataError(f"empty split: no {spec.kind} records ({_where(spec, i)})", file=src.file)
    return res


def _conversational(rec: Any) -> dict:
    from alignforge.data.convert import record_to_trl

    if dataclasses.is_dataclass(rec) and hasattr(rec, "conversational"):
        rec = dataclasses.replace(rec, conversational=True)
    return record_to_trl(rec)


def mix_files(spec: MixSpec, out_dir: str | Path, echo=None) -> dict:
    """Apply ``spec`` (module docstring): write ``OUT/train.jsonl``, ``OUT/heldout/NAME.jsonl`` and
    ``OUT/mix_report.json``; returns the report."""
    from alignforge.data.convert import write_jsonl
    from alignforge.data.split import holdout_split

    check_ratio(spec)
    out = Path(out_dir)
    names = source_names(spec.sources)
    reads = [_read_source(spec, i, s) for i, s in enumerate(spec.sources)]  # every file is validated first
    pools, helds = [], []
    for i, (src, res) in enumerate(zip(spec.sources, reads, strict=True)):
        n_read = len(res.records)
        if src.heldout >= n_read:
            raise ConfigError(
                f"{_where(spec, i, 'heldout')} ({src.file}): holding out {src.heldout} of {n_read} readable records "
                "leaves an empty training pool (empty split)"
            )
        train_idx, held_idx = holdout_split(n_read, src.heldout, src.split_seed)
        pools.append([res.records[k] for k in train_idx])
        helds.append([res.records[k] for k in held_idx])
    if all(s.n is not None for s in spec.sources):
        counts = [s.n for s in spec.sources]
    else:
        counts = allocate(spec.n_train, [s.weight for s in spec.sources])
    for i, (c, pool) in enumerate(zip(counts, pools, strict=True)):
        if c < 1:
            raise ConfigError(
                f"{_where(spec, i)} ({spec.sources[i].file}): its share of n_train={spec.n_train} rounds to 0 records "
                "(empty split); raise n_train or its weight"
            )
        if c > len(pool):
            raise ConfigError(
                f"{_where(spec, i)} ({spec.sources[i].file}): asked for {c} records but its training pool holds "
                f"{len(pool)} ({len(reads[i].records)} readable − {spec.sources[i].heldout} held out)"
            )
    mixed: list[tuple[int, Any]] = []
    for i, (c, pool) in enumerate(zip(counts, pools, strict=True)):
        take = sorted(random.Random(f"mix:{spec.seed}:{i}").sample(range(len(pool)), c))
        mixed += [(i, pool[k]) for k in take]
    random.Random(spec.seed).shuffle(mixed)
    write_jsonl((_conversational(r) for _, r in mixed), out / "train.jsonl")
    total = len(mixed)
    rows = []
    for i, (src, res, name) in enumerate(zip(spec.sources, reads, names, strict=True)):
        held_path = None
        if helds[i]:
            held_path = out / "heldout" / f"{name}.jsonl"
            write_jsonl((_conversational(r) for r in helds[i]), held_path)
        rows.append(
            {
                "name": name,
                "file": src.file,
                "weight": src.weight,
                "n_requested": src.n,
                "read": len(res.records),
                "dropped": len(res.dropped),
                "dropped_summary": res.summary() if res.dropped else "",
                "heldout": len(helds[i]),
                "split_seed": src.split_seed,
                "heldout_file": str(held_path) if held_path else None,
                "pool": len(pools[i]),
                "train": counts[i],
                "share": counts[i] / total,
            }
        )
    report = {
        "kind": spec.kind,
        "seed": spec.seed,
        "n_train": total,
        "ratio": "n per source" if all(s.n is not None for s in spec.sources) else "weights (largest remainder)",
        "train_file": str(out / "train.jsonl"),
        "sources": rows,
    }
    (out / "mix_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    if echo is not None:
        echo(format_mix(report))
    return report


def format_mix(report: dict) -> str:
    """One line per source: read, dropped, held out, pool, taken, share; then the total."""
    lines = [f"{'source':<24} {'read':>6} {'dropped':>7} {'heldout':>7} {'pool':>6} {'train':>6} {'share':>6}"]
    for r in report["sources"]:
        lines.append(
            f"{r['name']:<24} {r['read']:>6} {r['dropped']:>7} {r['heldout']:>7} {r['pool']:>6} {r['train']:>6} "
            f"{r['share']:>6.1%}"
        )
    lines.append(
        f"mixed {report['n_train']} {report['kind']} records (seed {report['seed']}) -> {report['train_file']}"
    )
    return "\n".join(lines)
