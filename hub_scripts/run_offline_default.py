#!/usr/bin/env python
"""The offline default, end to end: EfficientNet-Lite0 over Open Clip Art + scikit-image photos → activation
stores → SAEs → quality numbers and a purity check.

    python hub_scripts/run_offline_default.py                 # the full run (about 1–2 h on 2 CPU cores)
    python hub_scripts/run_offline_default.py --quick         # a 600-image smoke run (about 7 min)
    python hub_scripts/run_offline_default.py --layers features --name-layers --sweep k=16,32,64 expansion=2,4

It extracts every layer's spatial tokens (7×7 = 49 per image) in one pass over the images (`extract_many`) and
trains every SAE from one read of the stores (`train_many`; `--sweep` adds final-map SAEs at other k and widths to
that read). For each SAE it computes per-feature statistics and measures *purity*: the share of a feature's top-16
images that share its most common Open Clip Art category, against the same for the layer's raw channels and for
random 16-image sets. Then it names every live feature of the `--name-layers` SAEs (`nacosae.naming.run`, the
shared render pool over the offline bank) and writes their results datasets. Everything resumes when re-run after a
kill. Results: OUT/results.json, OUT/results.md and OUT/results/<layer> (paths: `nacosae.layout.RunLayout`).
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch

from nacosae.backbones import load_backbone
from nacosae.extract import Target, extract_many
from nacosae.features import FeatureStatsConfig, compute_feature_stats
from nacosae.images import ImageSource, SubsetSource, source_from_spec
from nacosae.io import atomic_write_json, atomic_write_text
from nacosae.layout import RunLayout
from nacosae.metrics import label_purity, random_set_purity
from nacosae.store import ActivationStore
from nacosae.train import TrainConfig, train_many

LAYERS = {  # layer → (expansion, k, epochs): all 6,813 images for both layers, extracted in one pass
    "blocks.14": (8, 24, 12.0),
    "features": (4, 32, 8.0),
}
TOP_N = 16  # purity: the top-16 images of a feature (max over its 7×7 tokens)


class RawChannels:
    """Stands in for an SAE in `compute_feature_stats` so raw channels get the same statistics (the baseline)."""

    def __init__(self, d: int):
        self.cfg = SimpleNamespace(d_sae=d)
        self.W_dec = torch.zeros(d, 1)  # only .device is read

    def encode(self, x):
        return x


def image_labels(store: ActivationStore) -> list:
    """labels_N indexed by global image index (None for images without a label or without rows)."""
    labels = [None] * store.meta["n_images_total"]
    for img in store.images:
        labels[img["image_idx"]] = img.get("label")
    return labels


def unit_purity(encoder, store: ActivationStore, labels: list, stats_dir: Path, provenance: dict):
    """(stats, summary) of one set of units, an SAE's features or a layer's raw channels (`RawChannels`): their
    statistics over the whole store, then the top-16 category purity of the live units, overall and by firing
    frequency, and their median firing frequency."""
    stats = compute_feature_stats(encoder, store.iter_images(256), FeatureStatsConfig(top_n=TOP_N, aggregation="max"),
                                  out_dir=stats_dir, total_images=store.meta["n_images"], provenance=provenance)
    purity = label_purity(stats.top_images_SK, labels)
    alive = ~stats.dead_S.numpy()
    return stats, {"mean": float(np.nanmean(purity[alive])), "share_ge_0.5": float(np.nanmean(purity[alive] >= 0.5)),
                   "by_frequency": purity_by_frequency(purity, stats, alive),
                   "frequency_median": float(np.median(stats.image_frequency_S.numpy()[alive])),
                   "dead_fraction": float(1 - alive.mean())}


FREQUENCY_BINS = (0.0, 0.01, 0.05, 0.2, 1.0)  # share of images a unit fires on


def purity_by_frequency(purity, stats, alive) -> list[dict]:
    """Mean purity of the units in each bin of image frequency: SAE features and raw channels fire on very different
    shares of the images (median ~4 % vs ~40 % on the final map), and purity depends on it."""
    freq = stats.image_frequency_S.numpy()
    rows = []
    for lo, hi in zip(FREQUENCY_BINS[:-1], FREQUENCY_BINS[1:]):
        m = alive & (freq >= lo) & ((freq < hi) if hi < 1 else (freq <= hi))
        rows.append({"bin": f"[{lo:g}, {hi:g}{')' if hi < 1 else ']'}", "n": int(m.sum()),
                     "purity": float(np.nanmean(purity[m])) if m.any() else None})
    return rows


def sweep_configs(items: list[str]) -> list[tuple[str, int, int]]:
    """--sweep k=16,32 expansion=2,4 → [(label, k, expansion), ...] (every combination)."""
    axes = {"k": [], "expansion": []}
    for item in items:
        key, _, values = item.partition("=")
        if key not in axes or not values:
            raise SystemExit(f"--sweep {item!r}: use k=V1,V2 and/or expansion=V1,V2")
        axes[key] = [int(v) for v in values.split(",") if v]
    ks = axes["k"] or [LAYERS["features"][1]]
    es = axes["expansion"] or [LAYERS["features"][0]]
    return [(f"k{k}-expansion{e}", k, e) for k in ks for e in es]


def run_all(source, backbone, out: Path, args) -> list[dict]:
    """Extract every layer in one pass, train every SAE (each layer's, and the sweep's) in one read of the stores,
    then statistics, purity and naming per SAE."""
    run = RunLayout(out)
    layers = args.layers
    t0 = time.perf_counter()
    stores = extract_many(source, backbone, [Target(layer, "spatial", run.acts(layer)) for layer in layers],
                          batch_size=32, dtype="float16")
    t_extract = time.perf_counter() - t0

    def cfg(layer, out_dir, expansion, k, epochs):
        return TrainConfig(store=str(run.acts(layer)), out_dir=str(out_dir), expansion=expansion, k=k, n_epochs=epochs,
                           batch_size=args.batch_size, seed=args.seed)

    jobs = []  # (layer, sweep label or None, config)
    for layer in layers:
        expansion, k, epochs = LAYERS[layer]
        jobs.append((layer, None, cfg(layer, run.sae(layer), expansion, k, args.epochs or epochs)))
    if args.sweep and "features" in layers:
        epochs = args.epochs or LAYERS["features"][2]
        main_k, main_e = LAYERS["features"][1], LAYERS["features"][0]
        jobs += [("features", label, cfg("features", run.sweep("features", label), e, k, epochs))
                 for label, k, e in sweep_configs(args.sweep) if (k, e) != (main_k, main_e)]
    t1 = time.perf_counter()
    trained = train_many([c for _, _, c in jobs])
    t_train = time.perf_counter() - t1

    baselines = {}  # layer → (labels, raw channels' purity summary, random-set purity): once per layer
    for layer, store in zip(layers, stores, strict=True):
        labels = image_labels(store)
        _, raw = unit_purity(RawChannels(store.d), store, labels, run.stats(layer, raw=True), {"raw_channels_of": layer})
        baselines[layer] = labels, raw, random_set_purity(labels, set_size=TOP_N, n_sets=2000, seed=args.seed)

    rows = []
    for (layer, label, c), (sae, metrics) in zip(jobs, trained, strict=True):
        store = stores[layers.index(layer)]
        labels, raw, random_purity = baselines[layer]
        stats_dir = run.stats(layer) if label is None else run.sweep(layer, label) / "stats"
        stats, pur = unit_purity(sae, store, labels, stats_dir, {"sae": str(Path(c.out_dir) / "sae")})
        row = {
            "layer": layer,
            "sweep": label,
            "d_in": store.d,
            "d_sae": sae.cfg.d_sae,
            "k": c.k,
            "epochs": c.n_epochs,
            "n_steps": metrics["n_steps"],
            "n_images": store.meta["n_images"],
            "n_rows": len(store),
            **{k_: metrics[k_] for k_ in ("val_fvu", "val_explained_variance", "val_l0", "val_dead_fraction", "rows_per_s")},
            "purity_sae_mean": pur["mean"],
            "purity_sae_share_ge_0.5": pur["share_ge_0.5"],
            "purity_sae_by_frequency": pur["by_frequency"],
            "stats_dead_fraction": pur["dead_fraction"],
            "purity_raw_mean": raw["mean"],
            "purity_raw_by_frequency": raw["by_frequency"],
            "image_frequency_median_sae": pur["frequency_median"],
            "image_frequency_median_raw": raw["frequency_median"],
            "purity_random_mean": random_purity,
            "seconds_extract_all_layers": round(t_extract, 1),
            "seconds_train_all_saes": round(t_train, 1),
        }
        if label is None and layer in args.name_layers:
            t_named = time.perf_counter()
            row.update(name_layer(run, layer, sae, backbone, store, stats, metrics, args))
            row["seconds_naming"] = round(time.perf_counter() - t_named, 1)
        rows.append(row)
    return rows


def name_layer(run: RunLayout, layer: str, sae, backbone, store, stats, metrics: dict, args) -> dict:
    """Name every live feature of the layer's SAE on the shared pool and write its results dataset."""
    from nacosae.naming.engine import EngineConfig
    from nacosae.naming.run import name_every_feature, write_naming_results
    from nacosae.results import tables_from_stats

    sae_id = f"efficientnet-lite0/{layer}"
    config = json.loads((run.sae_weights(layer) / "config.json").read_text())
    grid = int(round(store.tokens_per_image ** 0.5))  # EfficientNet maps are square (7×7)
    base = tables_from_stats(stats, store.images, config, metrics, sae_id, grid_hw=(grid, grid), top_n=TOP_N)
    from nacosae.naming.bank import offline_bank

    # --quick: a seeded family subset of the bank, so the smoke run encodes ~1,200 pictures, not 8,527
    bank = offline_bank(max_items=1200 if args.quick else None, seed=args.seed)
    out = name_every_feature(sae, backbone, layer, "spatial", run.naming(layer), bank=bank,
                             cfg=EngineConfig(seed=args.seed), n_per_feature_mils=0 if args.quick else 48)
    write_naming_results(out, sae_id, config, metrics, run.results(layer), base, figures_dir=run.naming(layer))
    return {"naming_mean_auc_all_live": out.summary["mean_auc_all_live"], "naming_n_named": out.summary["n_named"],
            "naming_n_live": out.summary["n_live"]}


def to_markdown(rows: list[dict]) -> str:
    return summary_table(rows) + "\n" + frequency_table(rows)


def summary_table(rows: list[dict]) -> str:
    head = ("| layer | SAE | d_in → d_sae | k | steps | images | FVU (val) | L0 | dead | purity SAE | SAE ≥ 0.5 | purity raw | purity random "
            "| named / live | held-out AUC (all live) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['layer']} | {r.get('sweep') or 'default'} | {r['d_in']} → {r['d_sae']} | {r['k']} | {r['n_steps']} | {r['n_images']} | {r['val_fvu']:.3f} | {r['val_l0']:.1f} | "
        f"{r['val_dead_fraction']:.1%} | {r['purity_sae_mean']:.2f} | {r['purity_sae_share_ge_0.5']:.0%} | {r['purity_raw_mean']:.2f} | "
        f"{r['purity_random_mean']:.2f} | "
        + (f"{r['naming_n_named']} / {r['naming_n_live']} | {r['naming_mean_auc_all_live']:.3f} |\n" if "naming_n_named" in r
           else "– | – |\n")
        for r in rows
    )


def frequency_table(rows: list[dict]) -> str:
    """Purity by the share of images a unit fires on, for every SAE and each layer's raw channels (n units in brackets)."""
    bins = [b["bin"] for b in rows[0]["purity_sae_by_frequency"]]
    head = ("| layer | units | median image frequency | " + " | ".join(f"purity, frequency {b}" for b in bins) + " |\n"
            + "|---" * (3 + len(bins)) + "|\n")

    def cells(by_bin):
        return " | ".join("–" if c["purity"] is None else f"{c['purity']:.2f} ({c['n']})" for c in by_bin)

    lines, raw_done = [], set()
    for r in rows:
        lines.append(f"| {r['layer']} | SAE {r.get('sweep') or 'default'} | {r['image_frequency_median_sae']:.3f} | "
                     f"{cells(r['purity_sae_by_frequency'])} |\n")
        if r["layer"] not in raw_done:
            raw_done.add(r["layer"])
            lines.append(f"| {r['layer']} | raw channels | {r['image_frequency_median_raw']:.3f} | "
                         f"{cells(r['purity_raw_by_frequency'])} |\n")
    return head + "".join(lines)


def plot_purity(rows: list[dict], path: Path) -> None:
    """Purity against image frequency, one line per SAE and per layer's raw channels (the frequency_table, drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(1, len(layers), figsize=(6.5 * len(layers), 4.2), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        mine = [r for r in rows if r["layer"] == layer]
        bins = [b["bin"] for b in mine[0]["purity_sae_by_frequency"]]
        for r in mine:
            ys = [b["purity"] if b["purity"] is not None and b["n"] >= 10 else float("nan") for b in r["purity_sae_by_frequency"]]
            ax.plot(bins, ys, marker="o", lw=1.2, alpha=0.8, label=f"SAE {r.get('sweep') or 'default'} (mean {r['purity_sae_mean']:.2f})")
        raw = [b["purity"] if b["purity"] is not None and b["n"] >= 10 else float("nan") for b in mine[0]["purity_raw_by_frequency"]]
        ax.plot(bins, raw, marker="s", lw=2.5, color="black", label=f"raw channels (mean {mine[0]['purity_raw_mean']:.2f})")
        ax.axhline(mine[0]["purity_random_mean"], color="grey", ls="--", label="random 16-image sets")
        ax.set_xlabel("share of images the unit fires on")
        ax.set_ylabel(f"top-{TOP_N} category purity")
        ax.set_title(f"{layer}: purity by firing frequency (bins with ≥ 10 units)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/offline_default", help="output folder (default: %(default)s)")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS), help="EfficientNet-Lite0 layers")
    parser.add_argument("--quick", action="store_true", help="600 images and 2 epochs: a smoke run of every stage")
    parser.add_argument("--name-layers", nargs="*", default=["blocks.14"], choices=list(LAYERS),
                        help="layers whose features are named (default: %(default)s; none: --name-layers)")
    parser.add_argument("--max-images", type=int, default=None, help="a seeded random subset of this many images")
    parser.add_argument("--epochs", type=float, default=None, help="override the per-layer epochs")
    parser.add_argument("--sweep", nargs="+", metavar="KEY=V1,V2", default=[],
                        help="also train the final map (`features`) SAE at every combination of k=... and expansion=... "
                             "in the same read of its store, each with its own statistics and purity row")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_images = args.max_images or 600
        args.epochs = args.epochs or 2.0
        args.batch_size = min(args.batch_size, 1024)
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    source: ImageSource = source_from_spec("openclipart+skimage")
    if args.max_images:
        source = SubsetSource(source, args.max_images, seed=args.seed)
    backbone = load_backbone("efficientnet-lite0")
    rows = run_all(source, backbone, out, args)
    atomic_write_json(out / "results.json", rows)
    plot_purity(rows, RunLayout(out).figures / "purity_by_frequency.png")
    md = to_markdown(rows)
    atomic_write_text(out / "results.md", md)
    print(md)
    acts = RunLayout(out).acts(args.layers[0])
    skipped = ActivationStore(acts).meta.get("skipped", [])
    print(f"{len(skipped)} files skipped: duplicates, tiny, blank or unreadable images of the whole source (listed in {acts / 'meta.json'})")


if __name__ == "__main__":
    main()
