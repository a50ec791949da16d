"""What a naming run reports: the comparison table, the evaluation protocol text and the figures (markdown + PNG).

    md = comparison_markdown(summary)            # one row per method, from `nacosae.naming.run` summaries
    protocol_markdown(summary)                   # the evaluation-protocol section of the results card
    plot_loop_gain(output, path)                 # held-out AUC: pool-MILS vs its seeds, and per round
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

METHOD_NOTES = {
    "pool_mils": "all-feature MILS loop on the shared pool (the pipeline's names)",
    "retrieval": "the bank's own descriptions and keywords as the only prompts (no loop)",
    "mils": "per-feature MILS loop (seeded subsample)",
    "top_label": "majority category of the top search-split pictures",
    "random": "a random vocabulary word (the floor)",
}


def _fmt(x, spec="{:.3f}") -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else spec.format(x)


def comparison_markdown(summary: dict[str, Any]) -> str:
    """The per-method table: n, held-out CoSy AUC and MAD (mean ± std), share at AUC ≥ threshold, renders per feature,
    then the paired bootstrap differences."""
    thr = summary["engine_config"]["threshold"]
    lines = [f"| method | n | CoSy AUC (mean ± std) | CoSy MAD (mean ± std) | AUC ≥ {thr} | renders / feature | what |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["table"]:
        lines.append(f"| `{r['method']}` | {r['n']} | {_fmt(r['auc_mean'])} ± {_fmt(r['auc_std'])} | "
                     f"{_fmt(r['mad_mean'], '{:.2f}')} ± {_fmt(r['mad_std'], '{:.2f}')} | "
                     f"{_fmt(r['share_auc_ge_threshold'], '{:.0%}')} | {_fmt(r['renders_per_feature'], '{:.1f}')} | "
                     f"{METHOD_NOTES.get(r['method'], '')} |")
    lines += ["", "| paired difference (held-out AUC) | n | mean | 95 % bootstrap interval |", "|---|---|---|---|"]
    for k, p in summary["paired"].items():
        lines.append(f"| {k} | {p['n']} | {_fmt(p['mean'], '{:+.3f}')} | [{_fmt(p['lo'], '{:+.3f}')}, {_fmt(p['hi'], '{:+.3f}')}] |")
    return "\n".join(lines) + "\n"


def protocol_markdown(summary: dict[str, Any]) -> str:
    """The evaluation protocol, for the results card and docs/naming.md."""
    cfg, sizes = summary["engine_config"], summary["split_sizes"]
    return (
        "## Evaluation protocol\n\n"
        f"Every live feature ({summary['n_live']} of {summary['n_features']}; {summary['n_dead']} dead) was named. Offline, "
        "a text-to-image model is replaced by retrieval from a described bank (Open Clip Art, Noto Color Emoji with "
        f"CLDR descriptions, scikit-image photos; `{summary['bank']}`), split by family into search "
        f"({sizes['search']}), select ({sizes['select']}) and eval ({sizes['eval']}) pictures: near-copies, icon sets "
        "and series never straddle two splits. Each bank picture was encoded once into the render pool "
        f"({summary['pool_rows']} rows, {summary['pool_bytes'] / 1e6:.1f} MB sparse). A prompt's score on a split is "
        f"the mean mid-rank of its {cfg['n_images']} nearest pictures of that split among {cfg['n_controls']} control "
        "pictures of the same split (= ROC-AUC). The loop searches on the search split only, the name is chosen "
        f"among each feature's {cfg['n_select']} best prompts on the select split (`{cfg['selection']}`), and CoSy "
        f"(AUC, MAD; {cfg['n_eval_images']} renders) is measured once, on the eval split. Image-level activation: max "
        f"over tokens. A name is published when its held-out AUC ≥ {cfg['threshold']}; otherwise the feature is "
        "`unnamed` and its row says why (dead, dense, below_threshold).\n\n"
        f"Mean held-out AUC over all live features (each with the name the pipeline chose, named or not): "
        f"**{summary['mean_auc_all_live']:.3f}**; {summary['n_named']} features named.\n\n"
        + comparison_markdown(summary)
    )


def plot_loop_gain(results: dict[str, Any], live, path: str | os.PathLike) -> Path:
    """Two panels: per-feature held-out AUC of pool-MILS against the retrieval-only seeds (the loop's gain), and the
    mean best search score after each round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pm, rt = results["pool_mils"], results["retrieval"]
    common = [j for j in live if j in pm.auc and j in rt.auc]
    a = np.array([rt.auc[j] for j in common])
    b = np.array([pm.auc[j] for j in common])
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.2))
    ax[0].scatter(a, b, s=6, alpha=0.4)
    ax[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    ax[0].set(xlabel="retrieval only (seed prompts): held-out AUC", ylabel="pool-MILS: held-out AUC",
              title=f"loop gain {np.mean(b - a):+.3f} over {len(common)} features")
    rounds = max((len(h) for h in pm.history.values()), default=0)
    means = []
    for r in range(rounds):
        vals = [h[min(r, len(h) - 1)]["score"] for h in pm.history.values() if h]
        means.append(np.mean(vals))
    ax[1].plot(range(rounds), means, marker="o")
    ax[1].set(xlabel="round (0 = seed prompts)", ylabel="mean best search-split score", title="search score per round")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
