"""Per-feature statistics (frequencies, histograms, top images with heatmaps) of an SAE over a probe set (METHODS §2).

From an activation store:
    python hub_scripts/feature_stats.py --store runs/acts --sae runs/sae/sae --out runs/stats
Straight from a backbone over a folder of images (no store):
    python hub_scripts/feature_stats.py --backbone efficientnet-lite0 --layer blocks.14 --tokens spatial \
        --image-folder probe/ --sae runs/sae/sae --out runs/stats

Resumable: the running state is checkpointed to OUT/checkpoint every --checkpoint-every blocks; run the same
command again after a kill. Writes OUT/feature_stats.safetensors + OUT/feature_stats.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from nacosae.cli import add_dataclass_args, dataclass_from_args
from nacosae.features import CHECKPOINT_DIR, STATS_META, FeatureStats, FeatureStatsConfig, backbone_blocks, compute_feature_stats
from nacosae.images import open_image
from nacosae.sae import SAE

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("activations (a store, or a backbone + image folder)")
    src.add_argument("--store", help="activation store folder written by hub_scripts/extract.py")
    src.add_argument("--split", choices=("all", "train", "val"), default="all",
                     help="store only: which images (split by image as in training: --val-fraction, --seed)")
    src.add_argument("--val-fraction", type=float, default=0.1, help="store only: share of images in the 'val' split")
    src.add_argument("--seed", type=int, default=0, help="store only: seed of the split (use the training run's)")
    src.add_argument("--backbone", help="backbone spec for nacosae.backbones.load_backbone, e.g. efficientnet-lite0")
    src.add_argument("--layer", help="backbone only: layer name")
    src.add_argument("--tokens", default="all", help="backbone only: token choice (all, patches, spatial, cls, mean)")
    src.add_argument("--image-folder", help="backbone only: folder of images, read recursively in sorted path order")
    p.add_argument("--sae", required=True, help="SAE folder (config.json + model.safetensors) or Hub repo id")
    p.add_argument("--sae-subfolder", default=None, help="subfolder of the SAE in a Hub repo")
    p.add_argument("--out", required=True, help="output folder for the stats")
    p.add_argument("--batch-images", type=int, default=64, help="images per block")
    p.add_argument("--checkpoint-every", type=int, default=50, help="blocks between checkpoints of the running state")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="recompute even if OUT already holds finished stats")
    add_dataclass_args(p, FeatureStatsConfig)
    args = p.parse_args(argv)
    if bool(args.store) == bool(args.backbone):
        p.error("give either --store, or --backbone with --layer and --image-folder")
    if args.backbone and not (args.layer and args.image_folder):
        p.error("--backbone needs --layer and --image-folder")
    return args


def store_blocks(args, cfg_provenance: dict):
    from nacosae.store import ActivationStore

    store = ActivationStore(args.store)
    rows = None
    if args.split != "all":
        train_idx, val_idx = store.split(args.val_fraction, seed=args.seed)
        rows = train_idx if args.split == "train" else val_idx
    n_images = len(store.image_idx) if rows is None else len(rows)
    cfg_provenance.update(source="store", store=str(Path(args.store).resolve()), store_provenance=store.provenance,
                          split=args.split, val_fraction=args.val_fraction, split_seed=args.seed)
    return store.iter_images(args.batch_images, rows=rows, device=args.device), n_images, store.tokens_per_image


def folder_blocks(args, cfg_provenance: dict, skip_until: int):
    from nacosae.backbones import load_backbone

    folder = Path(args.image_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--image-folder {folder} is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    bb = load_backbone(args.backbone)
    cfg_provenance.update(source="backbone", backbone_provenance=bb.provenance(args.layer, args.tokens),
                          image_folder=str(folder.resolve()), image_paths=[str(p.relative_to(folder)) for p in paths])
    start = skip_until + 1  # resume: do not run the backbone again on images already folded in
    images = (open_image(p) for p in paths[start:])  # upright RGB, transparency onto white; bad files raise
    blocks = backbone_blocks(bb, images, args.layer, args.tokens, args.batch_images, args.device, start_idx=start)
    return blocks, len(paths), None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dataclass_from_args(FeatureStatsConfig, args)
    out = Path(args.out)
    if (out / STATS_META).is_file() and not args.overwrite:
        print(f"{out} already holds feature stats; pass --overwrite to recompute")
        return 0
    sae = SAE.from_pretrained(args.sae, subfolder=args.sae_subfolder, device=args.device)
    provenance = {"sae": args.sae, "sae_subfolder": args.sae_subfolder, "sae_provenance": sae.cfg.provenance}
    if args.store:
        blocks, n_images, T = store_blocks(args, provenance)
    else:
        ckpt_meta = out / CHECKPOINT_DIR / STATS_META
        skip_until = FeatureStats.load(out / CHECKPOINT_DIR).last_image_idx if ckpt_meta.is_file() else -1
        blocks, n_images, T = folder_blocks(args, provenance, skip_until)
    if T is not None and math.isqrt(T) ** 2 == T:
        provenance["grid_hw"] = [math.isqrt(T)] * 2  # square token grid: heatmap_overlay(…, grid_hw)
    stats = compute_feature_stats(sae, blocks, cfg, device=args.device, out_dir=out, checkpoint_every=args.checkpoint_every,
                                  total_images=n_images, provenance=provenance)
    if "grid_hw" not in provenance and math.isqrt(stats.tokens_per_image) ** 2 == stats.tokens_per_image:
        stats.provenance["grid_hw"] = [math.isqrt(stats.tokens_per_image)] * 2
        stats.save(out)
    n_dead, n_dense = int(stats.dead_S.sum()), int(stats.dense_S.sum())
    print(f"{stats.n_images} images, {stats.d_sae} features ({cfg.aggregation} aggregation): "
          f"{n_dead} dead ({n_dead / stats.d_sae:.1%}), {n_dense} dense; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
