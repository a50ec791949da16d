"""What a naming run reports: the comparison table, the evaluation protocol text and the figures (markdown + PNG).

    md = comparison_markdown(summary)            # one row per method, from `nacosae.naming.run` summaries
    protocol_markdown(summary)                   # the evaluation-protocol section of the results card
    plot_loop_gain(output, path)                 # held-out AUC: pool-MILS vs its seeds, and per round

The per-feature runs (`nacosae.evaluate.NamingRun`) report through `comparison_table`, `paired_difference`,
`method_table_markdown`, `results_markdown`, `results_card` and the `plot_*` figures at the end of this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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


# ================================================================================================ the per-feature runs
# Tables, figures and card text of `nacosae.evaluate.NamingRun` (the per-feature naming pipeline of hub_scripts/
# name_features.py, evaluate_names.py, build_results.py, run_naming_offline.py). Rows are `results` feature rows with
# `cosy_auc_<method>` / `cosy_mad_<method>` columns; a summary is `nacosae.evaluate.assemble_results`'s.
def comparison_table(rows: Sequence[dict], methods: Sequence[str], threshold: float) -> list[dict]:
    """Per method, over the rows (features) where every method in `methods` has an AUC: mean ± std AUC and MAD,
    the share of features above `threshold`, and the share it wins (highest AUC; ties split equally, so shares sum
    to 1)."""
    rows = [r for r in rows if all(r.get(f"cosy_auc_{m}") is not None for m in methods)]
    if not rows:
        return []
    auc = np.array([[r[f"cosy_auc_{m}"] for m in methods] for r in rows], dtype=np.float64)
    mad = np.array([[r[f"cosy_mad_{m}"] for m in methods] for r in rows], dtype=np.float64)
    best = auc.max(1, keepdims=True)
    winners = np.isclose(auc, best, rtol=0, atol=1e-12)
    wins = (winners / winners.sum(1, keepdims=True)).sum(0) / len(rows)
    std = lambda x: float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return [{"method": m, "n": len(rows), "auc_mean": float(auc[:, i].mean()), "auc_std": std(auc[:, i]),
             "mad_mean": float(mad[:, i].mean()), "mad_std": std(mad[:, i]),
             "share_auc_ge_threshold": float((auc[:, i] >= threshold).mean()), "win_share": float(wins[i])}
            for i, m in enumerate(methods)]


def paired_difference(rows: Sequence[dict], a: str, b: str, n_boot: int = 10000, seed: int = 0) -> dict | None:
    """Method `a` minus method `b` in held-out AUC over the features both named: mean, a 95 % bootstrap interval of the
    mean (features resampled), and the shares of features where a is better / worse. None without common features."""
    pairs = [(r[f"cosy_auc_{a}"], r[f"cosy_auc_{b}"]) for r in rows
             if r.get(f"cosy_auc_{a}") is not None and r.get(f"cosy_auc_{b}") is not None]
    if not pairs:
        return None
    d = np.array([x - y for x, y in pairs], dtype=np.float64)
    boot = d[np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"a": a, "b": b, "n": len(d), "mean": float(d.mean()), "ci95": [float(lo), float(hi)],
            "share_a_better": float((d > 0).mean()), "share_a_worse": float((d < 0).mean())}


def method_table_markdown(table: Sequence[dict], threshold: float) -> str:
    """A `comparison_table` as markdown: one row per method (AUC, MAD, share ≥ threshold, wins)."""
    head = (f"| method | n | CoSy AUC (mean ± std) | CoSy MAD (mean ± std) | AUC ≥ {threshold:g} | wins |\n"
            "|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['method']} | {r['n']} | {r['auc_mean']:.3f} ± {r['auc_std']:.3f} | {r['mad_mean']:.2f} ± {r['mad_std']:.2f} | "
        f"{r['share_auc_ge_threshold']:.0%} | {r['win_share']:.0%} |\n" for r in table)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt, fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Lay `fig` out, write it to `path` (folders made), close it; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_auc_distributions(rows: Sequence[dict], methods: Sequence[str], path: str | os.PathLike, threshold: float,
                           title: str = "") -> Path:
    """Box plots + points of each method's held-out CoSy AUC over the features it named."""
    plt = _pyplot()
    data = [[r[f"cosy_auc_{m}"] for r in rows if r.get(f"cosy_auc_{m}") is not None] for m in methods]
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 2, 3.6))
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(methods) + 1), [f"{m}\n(n={len(d)})" for m, d in zip(methods, data)])
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=9, alpha=0.6)
    ax.axhline(threshold, color="grey", ls="--", lw=1)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_ylabel("held-out CoSy AUC")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "CoSy AUC per method (held-out renders vs control)", fontsize=10)
    return _save_figure(plt, fig, path)


def plot_mils_scores(records_by_method: dict[str, Sequence[dict]], path: str | os.PathLike) -> Path:
    """Best MILS score after each iteration (0 = seed prompts): median and interquartile band over features."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for m, recs in records_by_method.items():
        curves = [r["scores_by_iteration"] for r in recs if r.get("scores_by_iteration")]
        if not curves:
            continue
        L = max(len(c) for c in curves)
        arr = np.array([c + [c[-1]] * (L - len(c)) for c in curves], dtype=np.float64)
        x = np.arange(L)
        ax.plot(x, np.median(arr, 0), marker="o", ms=3, label=f"{m} (n={len(curves)})")
        ax.fill_between(x, np.percentile(arr, 25, 0), np.percentile(arr, 75, 0), alpha=0.2)
    ax.set_xlabel("iteration (0 = seed prompts)")
    ax.set_ylabel("best score (activation / probe max)")
    ax.legend(fontsize=8)
    ax.set_title("MILS: best score vs iteration (search half of the bank)", fontsize=10)
    return _save_figure(plt, fig, path)


def plot_ms(ms_sae: Sequence[float | None], ms_raw: Sequence[float | None], path: str | os.PathLike, encoder: str,
            baseline: float | None = None) -> Path:
    """Histograms of the MS of SAE features and raw channels; `baseline`: the equal-weights MS (a dashed line)."""
    plt = _pyplot()
    a = np.array([v for v in ms_sae if v is not None], dtype=np.float64)
    b = np.array([v for v in ms_raw if v is not None], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(min(a.min(initial=1), b.min(initial=1)), max(a.max(initial=0), b.max(initial=0)), 40)
    ax.hist(a, bins=bins, alpha=0.6, density=True, label=f"SAE features (n={len(a)}, mean {a.mean():.3f})")
    ax.hist(b, bins=bins, alpha=0.6, density=True, label=f"raw channels (n={len(b)}, mean {b.mean():.3f})")
    if baseline is not None:
        ax.axvline(baseline, color="grey", ls="--", lw=1, label=f"equal weights (images ignored): {baseline:.3f}")
    ax.set_xlabel(f"Monosemanticity Score (encoder: {encoder})")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _save_figure(plt, fig, path)




def results_markdown(summary: dict) -> str:
    """The comparison tables of a run as markdown (for the dataset card and docs/naming.md)."""
    thr = summary["threshold"]
    n_all = summary["table_all"][0]["n"] if summary["table_all"] else 0
    out = [f"## CoSy: methods compared ({summary['aggregation']})", "", f"All {n_all} evaluated features:", "",
           method_table_markdown(summary["table_all"], thr)]
    if summary["table_gemma_subset"]:
        out += [f"The {summary['table_gemma_subset'][0]['n']} features also named with Gemma-3-270M:", "",
                method_table_markdown(summary["table_gemma_subset"], thr)]
    if summary.get("paired"):
        out += ["Paired differences in held-out AUC (same features; 95 % bootstrap interval of the mean over features):", "",
                "| a − b | n | mean | 95 % interval | a better | a worse |", "|---|---|---|---|---|---|"]
        out += [f"| {p['a']} − {p['b']} | {p['n']} | {p['mean']:+.3f} | [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] | "
                f"{p['share_a_better']:.0%} | {p['share_a_worse']:.0%} |" for p in summary["paired"]]
        out.append("")
    if summary.get("mils_ablation"):
        out += ["Where the MILS names' held-out AUC comes from (same CoSy protocol): the best seed prompt (top-image hints and "
                "vocabulary words, before any proposal), the best prompt after the loop, the summarised name:", "",
                "| loop | best seed prompt | best loop prompt | name |", "|---|---|---|---|"]
        for m, a in summary["mils_ablation"].items():
            out.append(f"| {m} | " + " | ".join(f"{a[k]['auc_mean']:.3f} ± {a[k]['auc_std']:.3f} ({a[k]['share_ge_threshold']:.0%} "
                                               f"≥ {thr:g})" for k in ("seed_best", "loop_best", "name")) + " |")
        out.append("")
    out.append("`wins`: share of features where the method has the highest held-out AUC (ties split). Published names "
               f"(AUC ≥ {thr:g}) by method: " + ", ".join(f"{m} {n}" for m, n in summary["published_by_method"].items())
               + f"; unnamed {summary['n_features_named'] - summary['n_published']}.")
    return "\n".join(out) + "\n"


def results_card(summary: dict) -> str:
    """README.md of the results dataset: front matter with `configs:` per table, then how it was made and evaluated."""
    from nacosae.results import dataset_card

    ms, ev = summary["ms"], summary["eval"]
    body = f"""# nacosae: named SAE features of {summary['sae_id']}

Features of a sparse autoencoder (SAE) on `{summary['sae_id']}`, named with a MILS-style loop and baselines, each name
scored by CoSy on held-out images, with the Monosemanticity Score (MS) of every feature. Made with nacosae
(`hub_scripts/run_naming_offline.py`); the columns are described in nacosae's `docs/RESULTS_SCHEMA.md`.

```python
from datasets import load_dataset
features = load_dataset("<this repo>", "features", split="train")
images = load_dataset("<this repo>", "images", split="train")   # image_id → picture
```

## How names were evaluated
- Generator: {ev['generator']} (no text-to-image model ships offline). The bank was split by image (seed
  {ev['bank_split_seed']}): the naming loop searched {ev['bank_search_images']} images; CoSy renders came from the other
  {ev['bank_eval_images']}, at ranks the loop never used ({ev['renders_per_name']} per name).
- Control: {ev['n_control']} images, a {ev['control']}.
- Image-level activation: {summary['aggregation']}.
- A name is published (`name`) only when its held-out CoSy AUC ≥ {summary['threshold']:g}; otherwise `unnamed`.
  {summary['n_published']} of {summary['n_features_named']} named features cleared it.
- `vocab` (Discover-then-Name): {summary['vocab']}

{results_markdown(summary)}
## Monosemanticity Score
Encoder `{ms['encoder']}` over {ms['n_images']} probe images. Caveat: {ms['caveat']}.
Mean MS: SAE features (alive) {ms['sae_alive']['mean']:.3f}, named features {ms['sae_named']['mean']:.3f}, raw channels
of the layer {ms['raw_channels']['mean']:.3f}; a feature that ignored the images (equal weights: the mean cosine over
all pairs) would score {ms['uniform_weights_ms']:.3f}.

## Licence
Images: Open Clip Art Library (public domain) and scikit-image sample images (see scikit-image's data licences).
Names, scores and statistics: Apache-2.0, like nacosae.
"""
    return dataset_card(body, extra_yaml="license: other\ntags:\n- sparse-autoencoder\n- interpretability\n- feature-naming",
                        section_name=f"protocol {summary['sae_id']}")  # a named section: publishing keeps it
