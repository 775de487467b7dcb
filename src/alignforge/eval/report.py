"""``alignforge report``: one self-contained HTML page for one training run or several side by side.

The page has no external URL and needs no JavaScript: every image is an inlined base64 PNG
(matplotlib, Agg backend), the style is inline, and a Content-Security-Policy meta tag forbids
scripts and any fetch but ``data:`` images. Every piece of text (model output, prompts, file
names, table cells) is HTML-escaped. The file is written atomically (temp file + rename).

Sections:

* **Runs**: per run dir, the number of logged steps and the last value of the curve metrics.
* **Training curves**: from each run dir's ``metrics.jsonl`` (rows with ``step``), one plot per
  metric among :data:`CURVE_KEYS` that some run logged (``loss`` always; PPO's ``reward``,
  ``reward_raw``, ``kl_ref``, ``response_len``; RM/DPO accuracies; DPO's implicit rewards, its
  ``kl_data`` and ``nll_chosen``; the probe's ``gen_len_mean``), one line per run.
* **Scores and lengths**: histograms over the response files (``--responses``) and each run's
  ``samples.jsonl`` (its first and last logged step): response length in whitespace words (the
  one unit every source has), and the score where rows carry one (``score``, as ``rm score``
  writes, else ``reward``, as PPO's samples).
* **Evaluation tables**: from each eval JSON (``--eval``); see :func:`eval_tables` for the formats.
* **Example responses**: the first prompts of the response files, one column per file, rows
  matched by ``id``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from alignforge.errors import DataError

CURVE_KEYS = (
    "loss",
    "reward",
    "reward_raw",
    "kl_ref",
    "response_len",
    "accuracy",
    "reward_accuracy",
    "reward_margin",
    "reward_chosen",
    "reward_rejected",
    "kl_data",
    "nll_chosen",
    "gen_len_mean",
)


# --------------------------------------------------------------------------- inputs


@dataclass
class Run:
    label: str
    path: Path
    metrics: list[dict]
    samples: list[dict] = field(default_factory=list)


def _read_jsonl_objects(path: Path) -> list[tuple[int, dict]]:
    from alignforge.data.readers import iter_json_objects

    return list(iter_json_objects(path))


def read_run(path: str | Path, label: str | None = None) -> Run:
    """A run dir's ``metrics.jsonl`` (required; every row needs a numeric ``step``) and ``samples.jsonl`` (optional)."""
    d = Path(path)
    if not d.is_dir():
        raise DataError("run dir not found (expected a trainer's output dir)", file=str(d))
    m = d / "metrics.jsonl"
    if not m.is_file():
        raise DataError(f"run dir {d} has no metrics.jsonl (a trainer writes OUTPUT/metrics.jsonl)", file=str(d))
    rows = []
    for line, obj in _read_jsonl_objects(m):
        step = obj.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            raise DataError("missing or not a number", file=str(m), line=line, field="step")
        rows.append(obj)
    if not rows:
        raise DataError("no rows", file=str(m))
    s = d / "samples.jsonl"
    samples = [obj for _, obj in _read_jsonl_objects(s)] if s.is_file() else []
    return Run(label or d.name, d, rows, samples)


@dataclass
class ResponseFile:
    label: str
    path: Path
    rows: list[dict]  # {"id", "prompt", "responses", "score"}


def read_response_file(path: str | Path, label: str | None = None) -> ResponseFile:
    """A response JSONL (``eval generate``'s rows, or any rows with ``response``/``responses``), validated by
    :func:`alignforge.eval.responses.read_responses`; ``score`` (or ``reward``) is kept when numeric."""
    from alignforge.eval.responses import read_responses

    p = Path(path)
    if not p.is_file():
        raise DataError("response file not found", file=str(p))
    raw = dict(_read_jsonl_objects(p))
    rows = []
    for r in read_responses(p):
        obj = raw[r.line]
        score = obj.get("score", obj.get("reward"))
        score = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None
        rows.append({"id": r.id, "prompt": obj.get("prompt"), "responses": r.responses, "score": score})
    if not rows:
        raise DataError("no responses", file=str(p))
    return ResponseFile(label or p.name, p, rows)


def _unique_labels(paths: Sequence[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    out = []
    for p, n in zip(paths, names, strict=True):
        out.append(n if names.count(n) == 1 else f"{p.parent.name}/{n}" if p.parent.name else str(p))
    if len(set(out)) != len(out):
        out = [str(p) for p in paths]
    return out


# --------------------------------------------------------------------------- eval JSON -> tables


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[dict]


def _table_from(spec: Any, where: str, file: str, default_title: str) -> Table:
    """``spec``: a list of row objects, or ``{"title"?, "columns"?, "rows": [row objects]}``."""
    if isinstance(spec, list):
        spec = {"rows": spec}
    if not isinstance(spec, dict):
        raise DataError(
            f"expected an object with 'rows' or a list of row objects, got {type(spec).__name__}",
            file=file,
            field=where,
        )
    rows = spec.get("rows")
    if not isinstance(rows, list):
        raise DataError("expected a list of row objects", file=file, field=f"{where}.rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"expected an object, got {type(r).__name__}", file=file, field=f"{where}.rows[{i}]")
    cols = spec.get("columns")
    if cols is None:
        cols = list(dict.fromkeys(k for r in rows for k in r))
    elif not isinstance(cols, list) or not all(isinstance(c, str) for c in cols):
        raise DataError("expected a list of strings", file=file, field=f"{where}.columns")
    title = spec.get("title", default_title)
    return Table(str(title), list(cols), rows)


def _harm_tables(obj: dict) -> list[Table]:
    rows = []
    for part, metric in (("harmful", "attack_success_rate"), ("benign", "over_refusal")):
        if part in obj:
            p = obj[part]
            m = p[metric]
            rows.append(
                {
                    "set": part,
                    "metric": metric,
                    "n": p["n"],
                    "refused": p["n_refused"],
                    "empty": p["n_empty"],
                    "value": m["value"],
                    "ci_low": m["ci"][0],
                    "ci_high": m["ci"][1],
                    "file": p.get("file"),
                }
            )
    return [Table("attack success rate / over-refusal (refusal strings)", list(rows[0]), rows)]


def _lengths_tables(obj: dict) -> list[Table]:
    rows = []
    for f in obj["files"]:
        for cat, s in f["by_category"].items():
            rows.append(
                {"file": Path(f["file"]).name, "category": cat, "n": s["n"], "mean": s["mean"], "median": s["median"]}
            )
        rows.append(
            {"file": Path(f["file"]).name, "category": "all", "n": f["n"], "mean": f["mean"], "median": f["median"]}
        )
    return [Table(f"response lengths ({obj['unit']})", ["file", "category", "n", "mean", "median"], rows)]


def _rm_eval_tables(obj: dict) -> list[Table]:
    ci = obj.get("accuracy_ci95") or [None, None]
    lc = obj.get("length_correlation") or {}
    head = {
        "pairs": obj["n_pairs"],
        "accuracy": obj["accuracy"],
        "ci95_low": ci[0],
        "ci95_high": ci[1],
        "ties": obj.get("n_ties"),
        "rm_prefers_longer": obj.get("rm_prefers_longer"),
        "pearson(score, len)": lc.get("pearson"),
        "spearman(score, len)": lc.get("spearman"),
    }
    out = [Table("reward model evaluation", list(head), [head])]
    out.append(_table_from(obj["accuracy_by_length_bucket"], "accuracy_by_length_bucket", "", "accuracy by |Δlen|"))
    if obj.get("by_category"):
        rows = [{"category": k, "n": v["n"], "accuracy": v["accuracy"]} for k, v in obj["by_category"].items()]
        out.append(Table("accuracy by category", ["category", "n", "accuracy"], rows))
    return out


def eval_tables(obj: Any, file: str) -> list[Table]:
    """The tables of one eval JSON. Recognised, in this order:

    1. the generic form: ``{"table": T}`` and/or ``{"tables": [T, ...]}``, where ``T`` is
       ``{"title": str (optional), "columns": [str] (optional: the rows' keys), "rows": [object]}``
       or just a list of row objects (``eval rm-accuracy`` writes this form);
    2. ``eval harm``'s report (``harmful``/``benign``), ``eval lengths``' (``unit`` + ``files``) and
       ``rm eval``'s ``summary.json`` (``accuracy_by_length_bucket``);
    3. otherwise any JSON with lists of row objects: a top-level list is one table, and every
       top-level key holding a non-empty list of objects is a table titled by the key.

    Anything else raises ``DataError`` naming the file (and the field, for a malformed table)."""
    stem = Path(file).name
    tables: list[Table] = []
    if isinstance(obj, dict) and ("table" in obj or "tables" in obj):
        if "table" in obj:
            tables.append(_table_from(obj["table"], "table", file, obj.get("title", stem)))
        if "tables" in obj:
            if not isinstance(obj["tables"], list):
                raise DataError("expected a list of tables", file=file, field="tables")
            tables += [_table_from(t, f"tables[{i}]", file, f"{stem} ({i + 1})") for i, t in enumerate(obj["tables"])]
        return tables
    try:
        if isinstance(obj, dict) and "harmful" in obj:
            return _harm_tables(obj)
        if isinstance(obj, dict) and "unit" in obj and "files" in obj:
            return _lengths_tables(obj)
        if isinstance(obj, dict) and "accuracy_by_length_bucket" in obj:
            return _rm_eval_tables(obj)
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise DataError(f"malformed report: {type(e).__name__}: {e}", file=file) from None
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        return [_table_from(obj, "(top level)", file, stem)]
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
                tables.append(_table_from(v, k, file, f"{stem}: {k}"))
    if not tables:
        raise DataError(
            "no table found: expected {'table': {'rows': [...]}}, {'tables': [...]}, a harm/lengths/rm eval report, "
            "or a list of row objects",
            file=file,
        )
    return tables


def read_eval_file(path: str | Path) -> list[Table]:
    p = Path(path)
    if not p.is_file():
        raise DataError("eval file not found", file=str(p))
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", file=str(p), line=e.lineno) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e.reason}", file=str(p)) from None
    return eval_tables(obj, str(p))


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def curve_plots(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """``(metric, base64 PNG)`` per metric of :data:`CURVE_KEYS` that some run logged; one line per run."""
    plt = _plt()
    out = []
    for key in CURVE_KEYS:
        series = []
        for run in runs:
            pts = [(float(r["step"]), _num(r.get(key))) for r in run.metrics]
            pts = [(s, v) for s, v in pts if v is not None]
            if pts:
                series.append((run.label, pts))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for label, pts in series:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out.append((key, _png(fig)))
    return out


def _sample_sets(run: Run) -> list[tuple[str, list[dict]]]:
    steps = sorted({s.get("step") for s in run.samples if _num(s.get("step")) is not None})
    if not steps:
        return [(f"{run.label} (samples)", run.samples)] if run.samples else []
    pick = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
    return [(f"{run.label} (samples, step {st:g})", [s for s in run.samples if s.get("step") == st]) for st in pick]


def _text(v: Any) -> str:
    return v if isinstance(v, str) else ""


def histogram_plots(runs: Sequence[Run], files: Sequence[ResponseFile]) -> list[tuple[str, str]]:
    """``(name, base64 PNG)``: response length (words) and, where rows carry one, score histograms."""
    plt = _plt()
    lengths: list[tuple[str, list[float]]] = []
    scores: list[tuple[str, list[float]]] = []
    for f in files:
        lengths.append((f.label, [float(len(r["responses"][-1].split())) for r in f.rows]))
        sc = [r["score"] for r in f.rows if r["score"] is not None]
        if sc:
            scores.append((f.label, sc))
    for run in runs:
        for label, rows in _sample_sets(run):
            lengths.append((label, [float(len(_text(r.get("response")).split())) for r in rows]))
            sc = [v for r in rows if (v := _num(r.get("score", r.get("reward")))) is not None]
            if sc:
                scores.append((label, sc))
    out = []
    for name, data, xlabel in (("length", lengths, "response length (words)"), ("score", scores, "score")):
        data = [(lab, v) for lab, v in data if v]
        if not data:
            continue
        allv = [x for _, v in data for x in v]
        lo, hi = min(allv), max(allv)
        bins = [lo + (hi - lo) * i / 20 for i in range(21)] if hi > lo else 10
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for lab, v in data:
            ax.hist(v, bins=bins, alpha=0.5, label=f"{lab} (n={len(v)}, mean {sum(v) / len(v):.2f})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("responses")
        ax.set_title(f"{name} histogram")
        ax.legend(fontsize=7)
        out.append((name, _png(fig)))
    return out


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figcaption{font-size:.85em;color:#555}
.ex td{max-width:520px}.ex pre,.prompt pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.85em}
.muted{color:#777}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt_cell(v: Any) -> tuple[str, bool]:
    """Cell text and whether it is numeric."""
    if v is None:
        return "-", False
    if isinstance(v, bool):
        return str(v).lower(), False
    if isinstance(v, int):
        return str(v), True
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else f"{v:.4g}"), True
    if isinstance(v, list) and len(v) == 2 and all(_num(x) is not None for x in v):
        return f"{v[0]:.4g} – {v[1]:.4g}", True
    if isinstance(v, str):
        return v, False
    return json.dumps(v, ensure_ascii=False), False


def table_html(t: Table) -> str:
    parts = [f"<h3>{esc(t.title)}</h3>", "<table><thead><tr>"]
    parts += [f"<th>{esc(c)}</th>" for c in t.columns]
    parts.append("</tr></thead><tbody>")
    for r in t.rows:
        parts.append("<tr>")
        for c in t.columns:
            text, num = fmt_cell(r.get(c))
            parts.append(f'<td class="num">{esc(text)}</td>' if num else f"<td>{esc(text)}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _figs(imgs: Sequence[tuple[str, str]]) -> str:
    return (
        '<div class="figs">'
        + "".join(
            f'<figure><img alt="{esc(n)}" src="data:image/png;base64,{b}"><figcaption>{esc(n)}</figcaption></figure>'
            for n, b in imgs
        )
        + "</div>"
    )


def _prompt_text(p: Any) -> str:
    if isinstance(p, str):
        return p
    if isinstance(p, list):
        msgs = [m for m in p if isinstance(m, dict)]
        if len(msgs) == 1:
            return str(msgs[0].get("content", ""))
        return "\n\n".join(f"[{m.get('role', '?')}] {m.get('content', '')}" for m in msgs)
    return "" if p is None else json.dumps(p, ensure_ascii=False)


def examples_html(files: Sequence[ResponseFile], n: int) -> str:
    by_file = [{r["id"]: r for r in f.rows} for f in files]
    ids = list(dict.fromkeys(r["id"] for f in files for r in f.rows))[: max(n, 0)]
    parts = ['<table class="ex"><thead><tr><th>prompt</th>']
    parts += [f"<th>{esc(f.label)}</th>" for f in files]
    parts.append("</tr></thead><tbody>")
    for i in ids:
        first = next(m[i] for m in by_file if i in m)
        parts.append(
            f'<tr><td class="prompt"><div class="muted">id {esc(i)}</div>'
            f"<pre>{esc(_prompt_text(first['prompt']))}</pre></td>"
        )
        for m in by_file:
            if i not in m:
                parts.append('<td class="muted">(no response)</td>')
                continue
            r = m[i]
            resp = r["responses"]
            body = resp[0] if len(resp) == 1 else "\n\n".join(f"— turn {k + 1} —\n{t}" for k, t in enumerate(resp))
            score = f'<div class="muted">score {r["score"]:.4g}</div>' if r["score"] is not None else ""
            parts.append(f"<td>{score}<pre>{esc(body)}</pre></td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def runs_table(runs: Sequence[Run]) -> Table:
    keys = [k for k in CURVE_KEYS if any(_num(r.get(k)) is not None for run in runs for r in run.metrics)]
    rows = []
    for run in runs:
        last = run.metrics[-1]
        row = {"run": run.label, "path": str(run.path), "rows": len(run.metrics), "last step": last.get("step")}
        for k in keys:
            vals = [r[k] for r in run.metrics if _num(r.get(k)) is not None]
            row[f"last {k}"] = vals[-1] if vals else None
        row["samples"] = len(run.samples)
        rows.append(row)
    return Table("last logged value per run", list(rows[0]), rows)


def build_report(
    run_dirs: Sequence[str | Path],
    eval_files: Sequence[str | Path] = (),
    responses: Sequence[str | Path] = (),
    n_examples: int = 8,
    title: str = "alignforge report",
) -> str:
    """The report page as a string (see the module docstring). Inputs are validated before any plotting."""
    paths = [Path(p) for p in run_dirs]
    runs = [read_run(p, lab) for p, lab in zip(paths, _unique_labels(paths), strict=True)] if paths else []
    tables = [(Path(f), read_eval_file(f)) for f in eval_files]
    rpaths = [Path(p) for p in responses]
    files = [read_response_file(p, lab) for p, lab in zip(rpaths, _unique_labels(rpaths), strict=True)]
    if not runs and not tables and not files:
        raise DataError("nothing to report: give run dirs, --eval files or --responses files")

    body = [f"<h1>{esc(title)}</h1>"]
    if runs:
        body += ["<h2>Runs</h2>", table_html(runs_table(runs))]
        curves = curve_plots(runs)
        body += ["<h2>Training curves</h2>", _figs(curves) if curves else '<p class="muted">no curve metrics</p>']
    hists = histogram_plots(runs, files)
    if hists:
        body += ["<h2>Scores and lengths</h2>", _figs(hists)]
    if tables:
        body.append("<h2>Evaluation tables</h2>")
        for f, ts in tables:
            body.append(f'<p class="muted">from {esc(f)}</p>')
            body += [table_html(t) for t in ts]
    if files and n_examples > 0:
        body += ["<h2>Example responses</h2>", examples_html(files, n_examples)]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    eval_files: Sequence[str | Path] = (),
    responses: Sequence[str | Path] = (),
    n_examples: int = 8,
    title: str = "alignforge report",
) -> Path:
    """Build the page and write it atomically to ``out``; returns the path."""
    page = build_report(run_dirs, eval_files, responses, n_examples=n_examples, title=title)
    dst = Path(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst
