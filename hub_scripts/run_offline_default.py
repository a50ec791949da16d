#!/usr/bin/env python
"""The offline default, end to end: EfficientNet-Lite0 over Open Clip Art + scikit-image photos → activation
stores → SAEs → quality numbers and a purity check.

    python hub_scripts/run_offline_default.py                 # the full run (~30 min on 2 CPU cores)
    python hub_scripts/run_offline_default.py --quick         # a 600-image smoke run (~2 min)

For each layer it extracts spatial tokens (7×7 = 49 per image), trains a TopK SAE, computes per-feature
statistics, and measures *purity*: the share of a feature's top-16 images that share its most common Open Clip
Art category, against the same for the layer's raw channels and for random 16-image sets. Then it names every live
feature of each SAE (`nacosae.naming.run`, the shared render pool over the offline bank) and writes the results
dataset. Everything resumes when re-run after a kill. Results: OUT/results.json, OUT/results.md and
OUT/results/<layer> (paths: `nacosae.layout.RunLayout`).
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
from nacosae.extract import extract
from nacosae.features import FeatureStatsConfig, compute_feature_stats
from nacosae.images import ConcatSource, ImageSource, OpenClipArtSource, SkimageSource, SubsetSource
from nacosae.io import atomic_write_json, atomic_write_text
from nacosae.layout import RunLayout
from nacosae.metrics import label_purity, random_set_purity
from nacosae.store import ActivationStore
from nacosae.train import TrainConfig, train

LAYERS = {  # layer → (expansion, k, epochs, image cap): the 1280-d final map costs a full forward per image and
    # trains far slower on 2 cores (ASSETS.md), so the default run gives it a seeded 2,000-image subset
    "blocks.14": (8, 24, 12.0, None),
    "features": (4, 32, 6.0, 2000),
}


class RawChannels:
    """Stands in for an SAE in `compute_feature_stats` so raw channels get the same statistics (the baseline)."""

    def __init__(self, d: int):
        self.cfg = SimpleNamespace(d_sae=d)
        self.W_dec = torch.zeros(d, 1)  # only .device is read

    def encode(self, x):
        return x


def run_layer(source, backbone, layer: str, out: Path, args) -> dict:
    expansion, k, epochs, cap = LAYERS[layer]
    if args.epochs is not None:
        epochs = args.epochs
    if cap is not None and not args.max_images:
        source = SubsetSource(source, cap, seed=args.seed)
    t0 = time.perf_counter()
    run = RunLayout(out)
    store_dir = run.acts(layer)
    store = extract(source, backbone, layer, "spatial", store_dir, batch_size=32, dtype="float16")
    t_extract = time.perf_counter() - t0

    sae, metrics = train(TrainConfig(store=str(store_dir), out_dir=str(run.sae(layer)), expansion=expansion, k=k,
                                     n_epochs=epochs, batch_size=args.batch_size, seed=args.seed))
    t_train = time.perf_counter() - t0 - t_extract

    labels = [img.get("label") for img in store.images]
    stats_cfg = FeatureStatsConfig(top_n=16, aggregation="max")
    sae_stats = compute_feature_stats(sae, store.iter_images(256), stats_cfg, out_dir=run.stats(layer),
                                      total_images=len(labels), provenance={"sae": str(run.sae_weights(layer))})
    raw_stats = compute_feature_stats(RawChannels(store.d), store.iter_images(256), stats_cfg, out_dir=run.stats(layer, raw=True),
                                      total_images=len(labels), provenance={"raw_channels_of": layer})
    purity_sae = label_purity(sae_stats.top_images_SK, labels)
    purity_raw = label_purity(raw_stats.top_images_SK, labels)
    alive = ~sae_stats.dead_S.numpy()
    t_named = time.perf_counter()
    naming = name_layer(run, layer, sae, backbone, store, sae_stats, metrics, args) if layer in args.name_layers else {}
    t_named = time.perf_counter() - t_named
    return {
        "layer": layer,
        "d_in": store.d,
        "d_sae": sae.cfg.d_sae,
        "k": k,
        "epochs": epochs,
        "n_images": len(labels),
        "n_rows": len(store),
        **{k_: metrics[k_] for k_ in ("val_fvu", "val_explained_variance", "val_l0", "val_dead_fraction", "rows_per_s")},
        "purity_sae_mean": float(np.nanmean(purity_sae[alive])),
        "purity_sae_share_ge_0.5": float(np.nanmean(purity_sae[alive] >= 0.5)),
        "purity_raw_mean": float(np.nanmean(purity_raw)),
        "purity_random_mean": random_set_purity(labels, set_size=16, n_sets=2000, seed=args.seed),
        "seconds_extract": round(t_extract, 1),
        "seconds_train": round(t_train, 1),
        "seconds_naming": round(t_named, 1),
        **naming,
    }


def name_layer(run: RunLayout, layer: str, sae, backbone, store, stats, metrics: dict, args) -> dict:
    """Name every live feature of the layer's SAE on the shared pool and write its results dataset."""
    from nacosae.naming.engine import EngineConfig
    from nacosae.naming.run import name_every_feature, write_naming_results
    from nacosae.results import tables_from_stats

    sae_id = f"efficientnet-lite0/{layer}"
    config = json.loads((run.sae_weights(layer) / "config.json").read_text())
    grid = int(round(store.tokens_per_image ** 0.5))  # EfficientNet maps are square (7×7)
    base = tables_from_stats(stats, store.images, config, metrics, sae_id, grid_hw=(grid, grid), top_n=16)
    from nacosae.naming.bank import offline_bank

    # --quick: a seeded family subset of the bank, so the smoke run encodes ~1,200 pictures, not 8,527
    bank = offline_bank(max_items=1200 if args.quick else None, seed=args.seed)
    out = name_every_feature(sae, backbone, layer, "spatial", run.naming(layer), bank=bank,
                             cfg=EngineConfig(seed=args.seed), n_per_feature_mils=0 if args.quick else 48)
    write_naming_results(out, sae_id, config, metrics, run.results(layer), base, figures_dir=run.naming(layer))
    return {"naming_mean_auc_all_live": out.summary["mean_auc_all_live"], "naming_n_named": out.summary["n_named"],
            "naming_n_live": out.summary["n_live"]}


def to_markdown(rows: list[dict]) -> str:
    head = ("| layer | d_in → d_sae | k | images | FVU (val) | L0 | dead | purity SAE | SAE ≥ 0.5 | purity raw | purity random "
            "| named / live | held-out AUC (all live) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['layer']} | {r['d_in']} → {r['d_sae']} | {r['k']} | {r['n_images']} | {r['val_fvu']:.3f} | {r['val_l0']:.1f} | "
        f"{r['val_dead_fraction']:.1%} | {r['purity_sae_mean']:.2f} | {r['purity_sae_share_ge_0.5']:.0%} | {r['purity_raw_mean']:.2f} | "
        f"{r['purity_random_mean']:.2f} | "
        + (f"{r['naming_n_named']} / {r['naming_n_live']} | {r['naming_mean_auc_all_live']:.3f} |\n" if "naming_n_named" in r
           else "– | – |\n")
        for r in rows
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/offline_default", help="output folder (default: %(default)s)")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS), help="EfficientNet-Lite0 layers")
    parser.add_argument("--quick", action="store_true", help="600 images and 2 epochs: a smoke run of every stage")
    parser.add_argument("--name-layers", nargs="*", default=["blocks.14"], choices=list(LAYERS),
                        help="layers whose features are named (default: %(default)s; none: --name-layers)")
    parser.add_argument("--max-images", type=int, default=None, help="a seeded random subset of this many images")
    parser.add_argument("--epochs", type=float, default=None, help="override the per-layer epochs")
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
    source: ImageSource = ConcatSource([OpenClipArtSource(), SkimageSource()])
    if args.max_images:
        source = SubsetSource(source, args.max_images, seed=args.seed)
    backbone = load_backbone("efficientnet-lite0")
    rows = [run_layer(source, backbone, layer, out, args) for layer in args.layers]
    atomic_write_json(out / "results.json", rows)
    md = to_markdown(rows)
    atomic_write_text(out / "results.md", md)
    print(md)
    acts = RunLayout(out).acts(args.layers[0])
    skipped = ActivationStore(acts).meta.get("skipped", [])
    print(f"{len(skipped)} images skipped (listed in {acts / 'meta.json'})")


if __name__ == "__main__":
    main()
