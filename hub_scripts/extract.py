r"""Extract a backbone layer's activations over an image source into an activation store (resumable, data-parallel).

    python hub_scripts/extract.py --backbone efficientnet-lite0 --layer blocks.14 --tokens spatial \
        --source openclipart --out runs/acts
    torchrun --nproc_per_node 2 hub_scripts/extract.py ... same flags ...       # one process per GPU (or CPU)

Re-running the same command resumes after the last shard written. Sources: `openclipart` (Debian openclipart-png),
`skimage` (scikit-image sample photos), `folder:PATH` (image files, label = parent folder), `hf:ID_OR_PATH`
(a `datasets` dataset: a Hub id or a local folder / data files; see --split, --image-column, --label-column).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet-lite0",
                   help="backbone spec: efficientnet-lite0, open_clip:MODEL, hf:REPO_OR_FOLDER (default: %(default)s)")
    p.add_argument("--pretrained", help="open_clip only: the pretrained weights tag (e.g. laion2b_s34b_b88k)")
    p.add_argument("--layer", help="layer to read (see --list-layers), e.g. blocks.14 or features for EfficientNet-Lite0")
    p.add_argument("--tokens", default="spatial", choices=["cls", "patches", "all", "spatial", "mean"],
                   help="which tokens of the layer become rows (default: %(default)s)")
    p.add_argument("--list-layers", action="store_true", help="print the backbone's layer names and exit")
    p.add_argument("--source", help="openclipart | skimage | folder:PATH | hf:ID_OR_PATH")
    p.add_argument("--split", default="train", help="hf: only: dataset split (default: %(default)s)")
    p.add_argument("--image-column", default="image", help="hf: only: image column (default: %(default)s)")
    p.add_argument("--label-column", help="hf: only: label column (ClassLabel names are used)")
    p.add_argument("--out", help="store folder (created; an existing store from the same run is resumed)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--shard-rows", type=int, default=2**16, help="rows per shard file, whole images (default: %(default)s)")
    p.add_argument("--max-images", type=int, help="use only the first N images of the source")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the activations (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes for decoding (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device of the backbone, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.list_layers:
        missing = [f"--{k.replace('_', '-')}" for k in ("layer", "source", "out") if getattr(args, k) is None]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def build_source(spec: str, args: argparse.Namespace):
    from nacosae import images

    if spec == "openclipart":
        return images.OpenClipArtSource()
    if spec == "skimage":
        return images.SkimageSource()
    if spec.startswith("folder:"):
        return images.FolderSource(spec[len("folder:"):])
    if spec.startswith("hf:"):
        return images.HFDatasetSource(spec[len("hf:"):], split=args.split, image_column=args.image_column,
                                      label_column=args.label_column)
    raise SystemExit(f"--source {spec!r}: use openclipart, skimage, folder:PATH or hf:ID_OR_PATH")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch  # after parsing, so --help is instant

    if args.threads:
        torch.set_num_threads(args.threads)
    from nacosae.backbones import load_backbone
    from nacosae.extract import extract

    kwargs = {"pretrained": args.pretrained} if args.pretrained else {}
    backbone = load_backbone(args.backbone, device=args.device, **kwargs)
    if args.list_layers:
        print("\n".join(backbone.layers()))
        return 0

    import torch.distributed as dist

    launched = int(os.environ.get("WORLD_SIZE", 1)) > 1  # torchrun / accelerate launch set RANK, WORLD_SIZE, MASTER_*
    if launched and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(args.device).startswith("cuda") else "gloo")
    try:
        store = extract(build_source(args.source, args), backbone, args.layer, args.tokens, args.out,
                        batch_size=args.batch_size, shard_rows=args.shard_rows, dtype=args.dtype, max_images=args.max_images,
                        num_workers=args.num_workers, device=args.device, progress=not args.no_progress)
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()
    if store is None:
        print(f"this rank is done; {args.out} is completed by the last rank to finish (or finalize_store)")
    elif int(os.environ.get("RANK", 0)) == 0:
        meta = store.meta
        print(f"{store}\nskipped {len(meta['skipped'])} image(s)" + "".join(
            f"\n  {s['path']}: {s['reason']}" for s in meta["skipped"][:10]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
