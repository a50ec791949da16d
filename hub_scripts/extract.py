r"""Extract backbone layers' activations over an image source into activation stores (resumable, data-parallel).

    python hub_scripts/extract.py --backbone efficientnet-lite0 --layer blocks.14 --tokens spatial \
        --source openclipart --out runs/acts/blocks.14
    python hub_scripts/extract.py --layer blocks.14,features --layer pooled:mean --source openclipart --out runs/acts
    torchrun --nproc_per_node 2 hub_scripts/extract.py ... same flags ...       # one process per GPU (or CPU)

With one --layer, --out is the store folder. With several, each image is still decoded and run through the backbone
once, and --out holds one store per layer: OUT/LAYER, or OUT/LAYER-TOKENS for a layer asked with several token
choices. Re-running the same command resumes after the last shard written (each store on its own).

Sources: `openclipart` (Debian openclipart-png), `skimage` (scikit-image sample photos), `folder:PATH` (image files,
label = parent folder), `hf:ID_OR_PATH` (a `datasets` dataset: a Hub id or a local folder / data files; see --split,
--image-column, --label-column); `openclipart+skimage` chains sources (the offline default's 6,813 images).
"""

from __future__ import annotations

import argparse
import os
import sys

TOKENS = ("cls", "patches", "all", "spatial", "mean")  # nacosae.backbones.TOKEN_CHOICES (not imported: --help stays instant)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet-lite0",
                   help="backbone spec: efficientnet-lite0, open_clip:MODEL, hf:REPO_OR_FOLDER (default: %(default)s)")
    p.add_argument("--pretrained", help="open_clip only: the pretrained weights tag (e.g. laion2b_s34b_b88k)")
    p.add_argument("--layer", action="append",
                   help="layer to read (see --list-layers), e.g. blocks.14 or features for EfficientNet-Lite0; repeat the "
                        "flag or give a comma list for several layers from one pass; LAYER:TOKENS sets that layer's "
                        "token choice (else --tokens)")
    p.add_argument("--tokens", default="spatial", choices=list(TOKENS),
                   help="which tokens of the layer become rows (default: %(default)s)")
    p.add_argument("--list-layers", action="store_true", help="print the backbone's layer names and exit")
    p.add_argument("--source", help="openclipart | skimage | folder:PATH | hf:ID_OR_PATH | openclipart+skimage (one after "
                                    "the other)")
    p.add_argument("--split", default="train", help="hf: only: dataset split (default: %(default)s)")
    p.add_argument("--image-column", default="image", help="hf: only: image column (default: %(default)s)")
    p.add_argument("--label-column", help="hf: only: label column (ClassLabel names are used)")
    p.add_argument("--out", help="store folder with one --layer, else the folder of one store per layer (created; an "
                                 "existing store from the same run is resumed)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--shard-rows", type=int, default=2**16, help="rows per shard file, whole images (default: %(default)s)")
    p.add_argument("--max-images", type=int, help="use only the first N images of the source")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the activations (default: %(default)s)")
    p.add_argument("--autocast", default="none", choices=["none", "bfloat16"],
                   help="run the backbone's forward under torch.autocast in this dtype (bfloat16: faster on GPUs and on "
                        "CPUs with bf16 units, ~3 significant digits; recorded in the store, which refuses a resume "
                        "with another) (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes for decoding (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device of the backbone, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.list_layers:
        missing = [f"--{k.replace('_', '-')}" for k in ("layer", "source", "out") if getattr(args, k) is None]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)}")
        try:
            args.targets = parse_targets(args.layer, args.tokens)
        except ValueError as e:
            p.error(str(e))
    return args


def parse_targets(layer_flags: list[str], default_tokens: str) -> list[tuple[str, str]]:
    """--layer values (each a comma list of LAYER or LAYER:TOKENS) → [(layer, tokens), ...] in the order given."""
    targets = []
    for flag in layer_flags:
        for item in filter(None, (part.strip() for part in flag.split(","))):
            layer, _, tokens = item.partition(":")
            tokens = tokens or default_tokens
            if tokens not in TOKENS:
                raise ValueError(f"--layer {item}: unknown token choice {tokens!r}; choose one of {list(TOKENS)}")
            if (layer, tokens) in targets:
                raise ValueError(f"--layer {item} is asked twice")
            targets.append((layer, tokens))
    if not targets:
        raise ValueError("--layer names no layer")
    return targets


def build_source(spec: str, args: argparse.Namespace):
    from nacosae.images import source_from_spec

    try:
        return source_from_spec(spec, split=args.split, image_column=args.image_column, label_column=args.label_column)
    except ValueError as e:
        raise SystemExit(f"--source: {e}") from e


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch  # after parsing, so --help is instant

    if args.threads:
        torch.set_num_threads(args.threads)
    from nacosae.backbones import load_backbone
    from nacosae.extract import Target, extract_many, store_dirs

    kwargs = {"pretrained": args.pretrained} if args.pretrained else {}
    backbone = load_backbone(args.backbone, device=args.device, **kwargs)
    if args.list_layers:
        print("\n".join(backbone.layers()))
        return 0

    import torch.distributed as dist

    launched = int(os.environ.get("WORLD_SIZE", 1)) > 1  # torchrun / accelerate launch set RANK, WORLD_SIZE, MASTER_*
    if launched and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(args.device).startswith("cuda") else "gloo")
    dirs = [args.out] if len(args.targets) == 1 else store_dirs(args.out, args.targets)
    targets = [Target(layer, tokens, d) for (layer, tokens), d in zip(args.targets, dirs, strict=True)]
    try:
        stores = extract_many(build_source(args.source, args), backbone, targets,
                              batch_size=args.batch_size, shard_rows=args.shard_rows, dtype=args.dtype,
                              max_images=args.max_images, num_workers=args.num_workers, device=args.device,
                              progress=not args.no_progress, autocast=None if args.autocast == "none" else args.autocast)
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()
    if any(store is None for store in stores):
        print(f"this rank is done; {args.out} is completed by the last rank to finish (or finalize_store)")
    elif int(os.environ.get("RANK", 0)) == 0:
        for store in stores:
            print(store)
        meta = stores[0].meta
        print(f"skipped {len(meta['skipped'])} image(s)" + "".join(
            f"\n  {s['path']}: {s['reason']}" for s in meta["skipped"][:10]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
