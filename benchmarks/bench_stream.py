r"""No-store mode against the store: one SAE trained from a backbone stream (`nacosae.stream.BackboneStream`) and the
same SAE trained from a store of the same images, extracted in the same run (the baseline). Reports the training
loop's rows/s of each (metrics.json `rows_per_s`: rows over the loop's wall time, no init sample, no validation),
their ratio, each run's whole wall and CPU time (the store's with and without its extraction), the peak of the
shuffle buffer and both validation FVUs.

    nice -n 10 python benchmarks/bench_stream.py --n-images 300 --threads 1          # EfficientNet-Lite0 blocks.14
    python benchmarks/bench_stream.py --source folder:PATH --tokens-per-image 16 --device cuda

The stream runs the backbone over the training images every epoch (decode, preprocess, forward), so its rate is the
backbone's images/s × rows per image; the store's is the SAE step's plus a read. The images are a seeded subset of
the source that spans its categories (`SubsetSource`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="openclipart", help="an image source spec (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=300, help="seeded subset of the source (default: %(default)s)")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--layer", default="blocks.14")
    p.add_argument("--tokens", default="spatial")
    p.add_argument("--tokens-per-image", type=int, help="the stream's token subsampling (default: every token)")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--buffer-rows", type=int, default=4096, help="the stream's shuffle buffer: small against the rows "
                   "trained, so the loop's rate is the steady one, not the first fill's (default: %(default)s)")
    p.add_argument("--image-batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader decoding processes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from nacosae.backbones import load_backbone
    from nacosae.extract import extract
    from nacosae.images import SubsetSource, source_from_spec
    from nacosae.stream import BackboneStream
    from nacosae.train import TrainConfig, train_many

    torch.set_num_threads(args.threads)
    bb = load_backbone(args.backbone, device=args.device)
    src = SubsetSource(source_from_spec(args.source), args.n_images, seed=0)
    n_images = len(src.records())

    def clocks():
        return time.perf_counter(), time.process_time()

    def cfg(store: str, out: Path) -> TrainConfig:
        return TrainConfig(store=store, out_dir=str(out), expansion=args.expansion, k=args.k, batch_size=args.batch_size,
                           n_epochs=args.epochs, checkpoint_every=10**9, log_every=10, warmup_steps=5, device=args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        w0, c0 = clocks()
        store = extract(src, bb, args.layer, args.tokens, tmp / "store", batch_size=args.image_batch_size,
                        num_workers=args.num_workers, device=args.device, progress=False)
        w1, c1 = clocks()
        (_, m_store), = train_many([cfg(str(store.path), tmp / "from-store")], progress=False)
        w2, c2 = clocks()
        stream = BackboneStream(src, bb, args.layer, args.tokens, tokens_per_image=args.tokens_per_image,
                                buffer_rows=args.buffer_rows, image_batch_size=args.image_batch_size,
                                num_workers=args.num_workers, device=args.device)
        (_, m_stream), = train_many([cfg(stream.label, tmp / "from-stream")], progress=False,
                                    sources={stream.label: stream})
        w3, c3 = clocks()
        store_bytes = sum((store.path / s["file"]).stat().st_size for s in store.shards)

    r_store, r_stream = m_store["rows_per_s"], m_stream["rows_per_s"]
    rows = [
        ("images, layer", f"{n_images} of {args.source} ({sum(r['image_idx'] is not None for r in stream.skipped)} "
                          f"unreadable), {args.backbone} {args.layer} "
                          f"{args.tokens}: T={stream.n_tokens}, d={stream.d}; store {store.meta['dtype']}, "
                          f"{store_bytes / 2**20:.1f} MB"),
        ("SAE", f"TopK d_sae={args.expansion}×{stream.d}, k={args.k}, batch {args.batch_size}, {args.epochs:g} epochs: "
                f"{m_store['n_steps']} steps (store), {m_stream['n_steps']} steps (stream, "
                f"{stream.rows_per_image} rows per image)"),
        ("device, torch threads", f"{args.device}, {args.threads}"),
        ("**training loop rows/s: store | stream**",
         f"**{r_store:,.0f} | {r_stream:,.0f}: the stream at {r_stream / r_store:.3f}× the store's ({r_store / r_stream:.1f}× "
         f"slower)**"),
        ("images/s through the backbone in the stream's loop", f"{r_stream / stream.rows_per_image:.1f}"),
        ("store: extraction, then training (wall / CPU)", f"{w1 - w0:.1f} s / {c1 - c0:.1f} s, then {w2 - w1:.1f} s / "
                                                          f"{c2 - c1:.1f} s"),
        ("stream: training, init sample and validation included (wall / CPU)", f"{w3 - w2:.1f} s / {c3 - c2:.1f} s "
                                                                                f"({stream.n_images_read} images read)"),
        ("stream: peak shuffle buffer", f"{stream.peak_buffer_rows} rows ({stream.peak_buffer_rows * stream.d * 4 / 2**20:.1f} "
                                        f"MB float32; --buffer-rows {args.buffer_rows})"),
        ("val FVU: store | stream", f"{m_store['val_fvu']:.4f} | {m_stream['val_fvu']:.4f}"),
    ]
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print(json.dumps({"rows_per_s_store": r_store, "rows_per_s_stream": r_stream, "ratio": r_stream / r_store}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
