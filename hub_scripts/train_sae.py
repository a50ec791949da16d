#!/usr/bin/env python
r"""Train sparse autoencoders on activation stores (one, or several from one read of the stores), or straight from a
backbone's activations with no store (--from-backbone).

    python hub_scripts/train_sae.py --store runs/acts/blocks.14 --out-dir runs/sae/blocks.14 --k 24 --expansion 8
    python hub_scripts/train_sae.py --store runs/acts/blocks.14 --store runs/acts/features --out-dir runs/sae \
        --sweep k=16,32 expansion=4,8          # 2 stores × 4 SAEs, each store read once per step for its 4 SAEs
    python hub_scripts/train_sae.py --runs sweep.json --batch-size 4096     # a JSON list of per-SAE settings

One SAE: OUT_DIR gets sae/ (model.safetensors + config.json), metrics.json (validation FVU, explained variance, L0,
dead fraction, throughput), history.jsonl and curves.png. Several: each SAE gets those in its own folder,
OUT_DIR[/STORE_NAME][/KEY1VALUE1-KEY2VALUE2] (the store name only with several --store, the sweep label only with
--sweep), or the out_dir of its --runs entry. --runs entries are objects of the flags below (as field names:
"out_dir", "k", ...) that override the flags given on the command line; "store" and "out_dir" are required.
SAEs on one store must share --batch-size, --seed and --val-fraction (they read one batch stream).

Killed? Run the same command again: every SAE resumes from its own OUT_DIR/checkpoint/, finished ones are kept.

Data parallel over processes (each reads its own share of the stores; rank 0 writes the files):
    torchrun --nproc_per_node 2 hub_scripts/train_sae.py ... same flags ...   # gloo on CPU, nccl with --device cuda

No store (when the disk is the bound): the backbone runs over the images every epoch, its activations go through an
in-memory shuffle buffer (--buffer-rows rows) into the same training loop; instead of --store give
    python hub_scripts/train_sae.py --from-backbone efficientnet-lite0 --layer blocks.14 --tokens spatial \
        --source openclipart --out-dir runs/sae/blocks.14 --k 24 [--tokens-per-image 16] [--sweep k=16,32]
The runs' store field is then the stream's label (stream:BACKBONE/LAYER/TOKENS?source=...); the backbone runs on
--device. --sweep and --runs train several SAEs from the one stream (--runs entries then give no "store").
"""

import argparse
import dataclasses
import itertools
import json
import os
import sys
from pathlib import Path

from nacosae.backbones import TOKEN_CHOICES
from nacosae.cli import add_dataclass_args, dataclass_from_args
from nacosae.images import SOURCE_SPECS
from nacosae.stream import BackboneStream, stream_label
from nacosae.train import TrainConfig, train_many

FIELDS = {f for f in TrainConfig.__dataclass_fields__}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", action="append", help="activation store folder (written by hub_scripts/extract.py); "
                                                         "repeat for several stores")
    parser.add_argument("--out-dir", help="run folder (one SAE), or the folder of the runs (several)")
    parser.add_argument("--sweep", nargs="+", metavar="KEY=V1,V2", default=[],
                        help="train every combination of these settings (e.g. k=16,32 expansion=4,8 activation=topk,relu)")
    parser.add_argument("--runs", help="JSON file: a list of objects of per-SAE settings (each with store and out_dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    stream = parser.add_argument_group("no-store mode (instead of --store)")
    stream.add_argument("--from-backbone", metavar="SPEC", help="train from this backbone's activations as they are "
                        "produced, no store: efficientnet-lite0, open_clip:MODEL, hf:REPO_OR_FOLDER")
    stream.add_argument("--pretrained", help="open_clip only: the pretrained weights tag")
    stream.add_argument("--layer", help="the backbone layer to read, e.g. blocks.14")
    stream.add_argument("--tokens", default="spatial", choices=list(TOKEN_CHOICES),
                        help="which tokens of the layer become rows (default: %(default)s)")
    stream.add_argument("--source", help=f"the images: {SOURCE_SPECS}")
    stream.add_argument("--split", default="train", help="hf: sources only: dataset split (default: %(default)s)")
    stream.add_argument("--image-column", default="image", help="hf: sources only: image column (default: %(default)s)")
    stream.add_argument("--label-column", help="hf: sources only: label column")
    stream.add_argument("--tokens-per-image", type=int, help="train on a random subset of this many tokens of each image, "
                        "drawn anew every epoch (default: every token; validation always reads every token)")
    stream.add_argument("--buffer-rows", type=int, default=2**17, help="rows the in-memory shuffle buffer mixes, float32 "
                        "(default: %(default)s)")
    stream.add_argument("--image-batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    stream.add_argument("--max-images", type=int, help="use only the first N images of the source")
    stream.add_argument("--num-workers", type=int, default=0, help="DataLoader processes decoding images (default: %(default)s)")
    stream.add_argument("--autocast", default="none", choices=["none", "bfloat16"],
                        help="run the backbone's forward under torch.autocast in this dtype (default: %(default)s)")
    add_dataclass_args(parser, TrainConfig, skip=("store", "out_dir"))
    return parser


def stream_store_label(args: argparse.Namespace) -> str:
    """The `store` field of the runs of a --from-backbone command (nacosae.stream.stream_label of its flags)."""
    backbone = args.from_backbone + (f"@{args.pretrained}" if args.pretrained else "")
    return stream_label(backbone, args.layer, args.tokens, source=args.source, tokens_per_image=args.tokens_per_image,
                        max_images=args.max_images, autocast=None if args.autocast == "none" else args.autocast)


def build_stream(args: argparse.Namespace, device: str):
    """The BackboneStream a --from-backbone command trains from (the backbone on `device`)."""
    from nacosae.backbones import load_backbone
    from nacosae.images import source_from_spec

    backbone = load_backbone(args.from_backbone, device=device, **({"pretrained": args.pretrained} if args.pretrained else {}))
    source = source_from_spec(args.source, split=args.split, image_column=args.image_column, label_column=args.label_column)
    return BackboneStream(source, backbone, args.layer, args.tokens, tokens_per_image=args.tokens_per_image,
                          buffer_rows=args.buffer_rows, image_batch_size=args.image_batch_size,
                          num_workers=args.num_workers, max_images=args.max_images, device=device,
                          autocast=None if args.autocast == "none" else args.autocast, label=stream_store_label(args))


def _check_mode(parser, args) -> str | None:
    """The stream label of a --from-backbone command (None for one on stores); one-line errors for bad combinations."""
    if args.from_backbone is None:
        given = [f for f in ("layer", "source", "tokens_per_image", "max_images") if getattr(args, f) is not None]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} belongs to --from-backbone (no-store mode): give --from-backbone, "
                         "or train from a --store")
        return None
    if args.store:
        parser.error("give --store (train from activation stores) or --from-backbone (no store), not both")
    missing = [f"--{f}" for f in ("layer", "source") if getattr(args, f) is None]
    if missing:
        parser.error(f"--from-backbone needs {' and '.join(missing)}")
    return stream_store_label(args)


def _sweep_grid(parser, items: list[str]) -> list[list[tuple[str, str]]]:
    """--sweep KEY=V1,V2 ... → every combination, as lists of (field, value string)."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        field = key.strip().replace("-", "_")
        if not sep or field not in FIELDS - {"store", "out_dir"}:
            parser.error(f"--sweep {item!r}: use KEY=V1,V2 with KEY one of {sorted(FIELDS - {'store', 'out_dir'})}")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            parser.error(f"--sweep {item!r} lists no value")
        axes.append([(field, v) for v in vals])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def _flags(parser, combo: list[tuple[str, str]]) -> list[str]:
    """A sweep combination as command-line flags, so its values are parsed as the flags themselves are."""
    out = []
    for field, value in combo:
        flag = "--" + field.replace("_", "-")
        if TrainConfig.__dataclass_fields__[field].type in (bool, "bool"):
            if value.lower() not in ("true", "false"):
                parser.error(f"--sweep {field}: a switch takes true or false, got {value!r}")
            out.append(flag if value.lower() == "true" else "--no-" + flag[2:])
        else:
            out += [flag, value]
    return out


def build_configs(argv: list[str]) -> list[TrainConfig]:
    """The configs a command line asks for (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    label = _check_mode(parser, args)
    if args.runs:
        if args.store or args.out_dir or args.sweep:
            parser.error("--runs lists every SAE: do not combine it with --store, --out-dir or --sweep")
        try:
            entries = json.loads(Path(args.runs).read_text())
        except json.JSONDecodeError as e:
            parser.error(f"{args.runs} is not valid JSON: {e}")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            parser.error(f"{args.runs} must hold a JSON list of objects")
        cfgs = []
        for i, entry in enumerate(entries):
            unknown = set(entry) - FIELDS
            if label is not None:  # every SAE reads the one stream
                if "store" in entry:
                    parser.error(f"{args.runs} entry {i} names a store: with --from-backbone every SAE trains from the "
                                 "stream; drop its \"store\"")
                entry = {**entry, "store": label}
            if unknown:
                parser.error(f"{args.runs} entry {i}: unknown keys {sorted(unknown)}; keys are {sorted(FIELDS)}")
            missing = [key for key in ("store", "out_dir") if key not in entry]
            if missing:
                parser.error(f"{args.runs} entry {i} has no {' and no '.join(repr(m) for m in missing)}: every entry "
                             "needs its \"out_dir\" (and its \"store\", unless --from-backbone)")
            cfgs.append(dataclass_from_args(TrainConfig, args, **entry))
        return cfgs
    if not (args.store or label) or not args.out_dir:
        parser.error("give --store (or --from-backbone, no store) and --out-dir, or --runs")
    grid = _sweep_grid(parser, args.sweep)
    out = Path(args.out_dir)
    stores = [label] if label else args.store
    cfgs = []
    for store in stores:
        for combo in grid:
            run_dir = out / Path(store).name if len(stores) > 1 else out
            if combo:
                run_dir = run_dir / "-".join(f"{field}{value}" for field, value in combo)
            combo_args = parser.parse_args([*argv, *_flags(parser, combo)])  # the last flag wins
            cfgs.append(dataclass_from_args(TrainConfig, combo_args, store=store, out_dir=str(run_dir)))
    return cfgs


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cfgs = build_configs(argv)
    import torch.distributed as dist

    launched = int(os.environ.get("WORLD_SIZE", 1)) > 1  # torchrun / accelerate launch set RANK, WORLD_SIZE, MASTER_*
    if launched:
        local = int(os.environ.get("LOCAL_RANK", 0))  # one GPU per process: "cuda" means this process's own
        cfgs = [dataclasses.replace(c, device=f"cuda:{local}") if c.device == "cuda" else c for c in cfgs]
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cfgs[0].device.startswith("cuda") else "gloo")
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    stream = None
    try:
        if args.from_backbone:
            stream = build_stream(args, cfgs[0].device)
        results = train_many(cfgs, progress=not args.no_progress, sources={stream.label: stream} if stream else None)
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) != 0:
        return
    if len(cfgs) == 1:
        print(json.dumps(results[0][1], indent=2))
    else:
        for cfg, (_, metrics) in zip(cfgs, results, strict=True):
            print(f"{cfg.out_dir}: val_fvu {metrics['val_fvu']:.4f}, L0 {metrics['val_l0']:.1f}, "
                  f"dead {metrics['val_dead_fraction']:.1%}")
    if stream is not None:
        unreadable = [s for s in stream.skipped if s["image_idx"] is not None]
        listed = len(stream.skipped) - len(unreadable)  # dropped by the source while listing (duplicates, tiny files)
        print(f"{stream.n_images_read} images through the backbone; {len(unreadable)} unreadable image(s) skipped"
              + (f" (and {listed} file(s) the source left out while listing: duplicates, tiny or blank images)" if listed else "")
              + "".join(f"\n  {s['path']}: {s['reason']}" for s in unreadable[:10]))


if __name__ == "__main__":
    main()
