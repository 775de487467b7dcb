"""PNG plots of a reward-model evaluation (matplotlib, Agg backend; no display needed).

* ``score_hist.png``: score histograms of chosen vs rejected responses;
* ``accuracy_by_length.png``: accuracy per |Δlen| bucket (bars labelled with n), with the
  "longer won" / "shorter won" split;
* ``score_vs_length.png``: score against response length (tokens), chosen and rejected;
* ``score_by_category.png``: per-category score distributions (ChatGLM-RLHF Figure 3), only when
  the data has categories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_eval(
    result: dict, chosen: Sequence[float], rejected: Sequence[float], pairs: Sequence, out_dir: str | Path
) -> list[Path]:
    """Write the evaluation plots into ``out_dir``; returns their paths."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c, r = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    both = np.concatenate([c, r])
    bins = np.linspace(both.min(), both.max(), 31) if both.size and both.min() < both.max() else 10
    ax.hist(c, bins=bins, alpha=0.6, label=f"chosen (mean {c.mean():.2f})")
    ax.hist(r, bins=bins, alpha=0.6, label=f"rejected (mean {r.mean():.2f})")
    ax.set_xlabel("reward score")
    ax.set_ylabel("responses")
    ci = result.get("accuracy_ci95") or [float("nan")] * 2
    ax.set_title(f"accuracy {result['accuracy']:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}), n={result['n_pairs']}")
    ax.legend()
    paths.append(_save(fig, out / "score_hist.png"))

    rows = [b for b in result["accuracy_by_length_bucket"] if b["n"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(rows))
    w = 0.27
    acc = [b["accuracy"] for b in rows]
    bars = ax.bar(x - w, acc, w, label="all")
    for bar, b in zip(bars, rows, strict=False):
        ax.annotate(
            f"n={b['n']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7
        )
    for off, key, lab in ((0.0, "accuracy_longer_won", "longer won"), (w, "accuracy_shorter_won", "shorter won")):
        vals = [b.get(key) for b in rows]
        ax.bar(x + off, [v if v is not None else 0.0 for v in vals], w, label=lab)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels([b["bucket"] for b in rows])
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("|len(chosen) - len(rejected)| (tokens)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "accuracy_by_length.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    lc = [len(p.chosen_ids) for p in pairs]
    lr = [len(p.rejected_ids) for p in pairs]
    ax.scatter(lc, c, s=6, alpha=0.5, label="chosen")
    ax.scatter(lr, r, s=6, alpha=0.5, label="rejected")
    lcor = result["length_correlation"]

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    ax.set_title(f"score vs length: pearson {fmt(lcor['pearson'])}, spearman {fmt(lcor['spearman'])}")
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("reward score")
    ax.legend()
    paths.append(_save(fig, out / "score_vs_length.png"))

    cats = result.get("by_category")
    if cats:
        from alignforge.eval.rm_eval import NO_CATEGORY

        names = list(cats)
        key = [getattr(p, "category", None) or NO_CATEGORY for p in pairs]
        data = [np.concatenate([c[[k == n for k in key]], r[[k == n for k in key]]]) for n in names]
        fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 4))
        if all(d.size > 1 and np.ptp(d) > 0 for d in data):  # a KDE needs spread
            ax.violinplot(data, showmedians=True)
        else:
            ax.boxplot(data)
        ax.set_xticks(np.arange(1, len(names) + 1))
        ax.set_xticklabels(
            [f"{n}\n(n={cats[n]['n']}, acc {cats[n]['accuracy']:.2f})" for n in names],
            fontsize=7,
            rotation=30 if len(names) > 6 else 0,
        )
        ax.set_ylabel("reward score (chosen + rejected)")
        ax.set_title("score distribution by category")
        paths.append(_save(fig, out / "score_by_category.png"))
    return paths
