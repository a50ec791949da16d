"""Extraction overhead and reader memory of the activation store.

1. On the same images (decoded once, held in memory): the bare backbone (preprocess + forward up to the layer) vs a
   full extraction into a store (DataLoader, fp16 cast, shards, progress files). Overhead target: <= 10 %.
   Best of --repeats runs each, interleaved; CPU time as well as wall time, since CPU time barely moves when other
   jobs share the machine.
2. The streaming reader on a store larger than a RAM budget: peak anonymous resident memory of a reader process
   (sampled at every batch) against the budget. Anonymous, because the reader memory-maps the shards: their pages
   are file cache (RssFile, reclaimable), and the maps make address-space limits (RLIMIT_AS) meaningless.
3. With --store PATH, on a real store: throughput (rows/s) of the chunk-mixing reader vs the previous one that
   shuffled within groups of whole shards (kept below as `legacy_iter_batches`), best of --repeats epochs each,
   interleaved, and how far each one's batch means stray from the store mean, next to an i.i.d. reference.
4. With --many-layers L1,L2,...: k layers from one pass (`extract_many`: one decode, one forward per image) against
   k single-layer extractions, end to end from the image files (a seeded subset of the source, decoding included),
   and where one single-layer extraction's time goes (decode, preprocess, forward); CPU and wall, best of --repeats.
   Also the pure forward rate of the whole image tower (`backbone.output` on preprocessed pixels), float32 and, with
   --autocast bfloat16, under bf16 autocast too, with how far the bf16 activations are from the float32 ones.
   --autocast bfloat16 runs every forward of parts 1 and 4 under `torch.autocast(..., dtype=torch.bfloat16)`, as
   `extract(..., autocast='bfloat16')` does. --no-mha-layout-fix removes open_clip backbones' attention-layout hooks
   (`nacosae.backbones.mha_autocast_layout`) to measure the forward without them (the baseline of that fix).

    python benchmarks/bench_extract.py --source openclipart --n-images 300 --threads 1
    python benchmarks/bench_extract.py --skip-extract --skip-reader --store runs/offline_default/acts/blocks.14
    python benchmarks/bench_extract.py --skip-extract --skip-reader --many-layers blocks.8,blocks.14,features,pooled:mean
    python benchmarks/bench_extract.py --skip-extract --skip-reader --backbone open_clip:ViT-B-32 \
        --many-layers resblocks.3:patches,resblocks.7:patches,resblocks.11:patches --n-images 100 --autocast bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--layer", default="blocks.14")
    p.add_argument("--tokens", default="spatial")
    p.add_argument("--source", default="openclipart", help="openclipart | skimage | folder:PATH (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 reduces noise)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs of each")
    p.add_argument("--ram-budget-mb", type=int, default=512,
                   help="reader part: the store is twice this size (the default buffer is 320 MB at its d=1280)")
    p.add_argument("--buffer-rows", type=int, default=2**17, help="reader: rows in the shuffle buffer")
    p.add_argument("--chunk-rows", type=int, default=1024, help="reader: rows per chunk")
    p.add_argument("--store", default=None, help="part 3: a real store to compare the readers on")
    p.add_argument("--legacy-buffer-shards", type=int, default=4, help="part 3: the old reader's buffer (its default)")
    p.add_argument("--reader-batch-size", type=int, default=4096, help="part 3: batch size (train_sae's default)")
    p.add_argument("--shard-mb", type=int, default=16, help="reader part: size of one shard")
    p.add_argument("--many-layers", help="part 4: comma list of LAYER or LAYER:TOKENS (else --tokens)")
    p.add_argument("--autocast", default="none", choices=["none", "bfloat16"],
                   help="parts 1 and 4: run the backbone's forward under torch.autocast in this dtype (default: %(default)s)")
    p.add_argument("--no-mha-layout-fix", action="store_true",
                   help="remove the open_clip backbone's attention-layout hooks (nacosae.backbones.mha_autocast_layout): "
                        "the forward as open_clip runs it under autocast")
    p.add_argument("--skip-reader", action="store_true")
    p.add_argument("--skip-extract", action="store_true")
    return p.parse_args(argv)


class MemorySource:
    """The first n images of a source, decoded once: extraction then times the store, not the disk."""

    def __init__(self, source, n):
        from nacosae.images import BadImageError

        self.name = f"{source.name}-memory"
        self._records, self._images = [], {}
        for r in source.records():
            if len(self._records) == n:
                break
            try:
                self._images[r.image_id] = source.load(r)
            except BadImageError:
                continue
            self._records.append(r)
        self.skipped = []

    def records(self):
        return list(self._records)

    def load(self, record):
        return self._images[record.image_id]

    def __len__(self):
        return len(self._records)


def bench_extract(args) -> list[tuple[str, str]]:
    import torch

    from nacosae.backbones import load_backbone
    from nacosae.extract import _activations, extract
    from nacosae.images import FolderSource, OpenClipArtSource, SkimageSource

    torch.set_num_threads(args.threads)
    ac = None if args.autocast == "none" else args.autocast
    bb = load_backbone(args.backbone)
    if args.source == "openclipart":
        src = OpenClipArtSource(progress=False)
    elif args.source == "skimage":
        src = SkimageSource()
    else:
        src = FolderSource(args.source.removeprefix("folder:"), progress=False)
    mem = MemorySource(src, args.n_images)
    n = len(mem)
    images = [mem.load(r) for r in mem.records()]
    B = args.batch_size

    def clocks():
        return time.perf_counter(), time.process_time()

    def bare():
        """Preprocess + forward up to the layer: ((wall, cpu) preprocess, (wall, cpu) forward) seconds."""
        w0, c0 = clocks()
        pixels = torch.stack([bb.preprocess(im) for im in images])
        w1, c1 = clocks()
        with torch.inference_mode():
            for i in range(0, n, B):
                _activations(bb, pixels[i:i + B], [(args.layer, args.tokens)], ac)
        w2, c2 = clocks()
        return (w1 - w0, c1 - c0), (w2 - w1, c2 - c1)

    def store_run():
        with tempfile.TemporaryDirectory() as tmp:
            w0, c0 = clocks()
            store = extract(mem, bb, args.layer, args.tokens, Path(tmp) / "store", batch_size=B, progress=False,
                            autocast=ac)
            w1, c1 = clocks()
            size = sum(f.stat().st_size for f in (Path(tmp) / "store").rglob("*") if f.is_file())
            return (w1 - w0, c1 - c0), len(store), size

    bare()  # warm-up: allocator, oneDNN kernels
    pre, fwd, ext = [], [], []
    for _ in range(args.repeats):
        p, f = bare()
        pre.append(p)
        fwd.append(f)
        e, rows, size = store_run()
        ext.append(e)
    # Best of the repeats; CPU time (one thread) is what the store adds in work, and barely moves when other jobs
    # share the machine; wall time also holds the fsyncs.
    best = lambda runs, k: min(r[k] for r in runs)  # noqa: E731
    out = [
        ("images, backbone / layer / tokens", f"{n} {src.name}, {args.backbone} / {args.layer} / {args.tokens}"),
        ("torch threads, batch size, repeats (best of), autocast", f"{args.threads}, {B}, {args.repeats}, {args.autocast}"),
    ]
    for k, clock in ((1, "CPU"), (0, "wall")):
        t_pre, t_fwd, t_ext = best(pre, k), best(fwd, k), best(ext, k)
        out += [
            (f"{clock}: preprocess / forward only", f"{t_pre:.2f} s / {t_fwd:.2f} s ({n / t_fwd:.1f} img/s forward)"),
            (f"{clock}: bare backbone = preprocess + forward", f"{t_pre + t_fwd:.2f} s ({n / (t_pre + t_fwd):.1f} img/s)"),
            (f"{clock}: extraction into a store", f"{t_ext:.2f} s ({n / t_ext:.1f} img/s)"),
            (f"**{clock}: store overhead vs bare backbone**",
             f"**{100 * (t_ext / (t_pre + t_fwd) - 1):+.1f} %** (target <= 10 %)"),
        ]
    out += [
        ("store written", f"{rows} rows, {size / 2**20:.1f} MB on disk"),
        ("all runs, wall s (pre / fwd / extract)",
         " | ".join(f"{a[0]:.1f}/{b[0]:.1f}/{c[0]:.1f}" for a, b, c in zip(pre, fwd, ext, strict=True))),
    ]
    return out


READER_PROBE = r"""
import json, sys, time
import torch
from nacosae.store import ActivationStore

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
path, buffer_rows, chunk_rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = ActivationStore(path)
list(store.iter_batches(4096, n_epochs=1, rows=[0]))  # warm-up: lazy initialisation, one shard
rss0 = status("RssAnon:")
peak, rows, t0 = rss0, 0, time.perf_counter()
for x in store.iter_batches(4096, n_epochs=1, buffer_rows=buffer_rows, chunk_rows=chunk_rows):
    rows += len(x)
    peak = max(peak, status("RssAnon:"))
dt = time.perf_counter() - t0
print(json.dumps({"rows": rows, "seconds": dt, "rss_before": rss0, "rss_peak": peak, "rss_file": status("RssFile:")}))
"""


def bench_reader(args) -> list[tuple[str, str]]:
    import torch

    from nacosae.store import ActivationStore, StoreWriter, finalize_store

    budget = args.ram_budget_mb * 2**20
    d, T = 1280, 49
    rows_per_shard = (args.shard_mb * 2**20 // (2 * d)) // T * T
    n_shards = -(-2 * budget // (rows_per_shard * d * 2))
    per = rows_per_shard // T
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        run = {"provenance": {"backbone": "random"}, "dtype": "float16", "n_images_total": n_shards * per, "source": "random",
               "world_size": 1}
        w = StoreWriter(path, run, 0, 0, n_shards * per)
        g = torch.Generator().manual_seed(0)
        for k in range(n_shards):
            ids = list(range(k * per, (k + 1) * per))
            w.write_shard(torch.randn(rows_per_shard, d, generator=g).half(), torch.tensor(ids).repeat_interleave(T),
                          torch.arange(T).repeat(per), [{"image_idx": i} for i in ids], (k + 1) * per, [])
        w.mark_done()
        finalize_store(path)
        store_bytes = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
        # Large blocks straight from mmap, so freed buffers leave the resident set and RSS tracks live tensors.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
        res = subprocess.run([sys.executable, "-c", READER_PROBE, str(path), str(args.buffer_rows), str(args.chunk_rows)],
                             capture_output=True, text=True, env=env)
        if res.returncode:
            return [("reader", f"FAILED: {res.stderr.strip().splitlines()[-1]}")]
        r = json.loads(res.stdout.strip().splitlines()[-1])
        assert r["rows"] == len(ActivationStore(path))
    shard_bytes = rows_per_shard * d * 2
    growth = r["rss_peak"] - r["rss_before"]
    mb = lambda b: f"{b / 2**20:.0f} MB"  # noqa: E731
    return [
        ("store (random fp16, d=1280, T=49)", f"{mb(store_bytes)} in {n_shards} shards of {mb(shard_bytes)}"),
        ("RAM budget (anonymous memory on top of start-up)",
         f"{mb(budget)}: {'kept' if growth <= budget else '**EXCEEDED**'} (peak growth {mb(growth)})"),
        (f"reader peak anonymous RSS growth, buffer_rows={args.buffer_rows}, chunk_rows={args.chunk_rows}",
         f"{mb(growth)} ({100 * growth / store_bytes:.0f} % of the store)"),
        # What should be live: the buffer, plus one yielded batch (its fp16 gather and its float32 copy).
        ("expected: buffer + one 4096-row batch (fp16 + fp32)", mb(args.buffer_rows * d * 2 + 4096 * d * 6)),
        ("reader process anonymous RSS (after start-up → peak)", f"{mb(r['rss_before'])} → {mb(r['rss_peak'])}"),
        ("mapped shard pages resident at the end (file cache)", mb(r["rss_file"])),
        ("reader throughput", f"{r['rows'] / r['seconds'] / 1e6:.2f} M rows/s ({store_bytes / r['seconds'] / 2**20:.0f} MB/s)"),
    ]


def legacy_iter_batches(store, batch_size: int, shuffle: bool = True, seed: int = 0, n_epochs: int = 1,
                        buffer_shards: int = 4):
    """The reader nacosae had before chunk mixing: shards in random order, `buffer_shards` whole shards loaded at a
    time and shuffled among themselves only (so a buffer holds a few contiguous runs of images). Kept here to measure
    the new reader against it."""
    import numpy as np
    import torch

    from nacosae.store import _take_rows

    counts = store._rows_per_shard(None)
    shard_ids = np.flatnonzero(counts)
    carry_ND = torch.empty(0, store.d, dtype=store.dtype)
    for epoch in range(n_epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(shard_ids) if shuffle else shard_ids
        for g in range(0, len(order), buffer_shards):
            group = order[g:g + buffer_shards]
            pool_ND = torch.empty(len(carry_ND) + int(counts[group].sum()), store.d, dtype=store.dtype)
            pool_ND[:len(carry_ND)] = carry_ND
            filled = len(carry_ND)
            for j in group:
                acts_ND = store._load_shard(j, ("acts_ND",))["acts_ND"]
                pool_ND[filled:filled + len(acts_ND)] = acts_ND
                filled += len(acts_ND)
            n_full = filled // batch_size * batch_size
            perm = rng.permutation(filled)
            for i in range(0, n_full, batch_size):
                yield _take_rows(pool_ND, perm[i:i + batch_size]).float()
            carry_ND = _take_rows(pool_ND, perm[n_full:])
    if len(carry_ND):
        yield carry_ND.float()


def bench_store_reader(args) -> list[tuple[str, str]]:
    """Old vs new reader on a real store: one shuffled epoch each, --repeats times, interleaved (page cache warm)."""
    import numpy as np
    import torch

    from nacosae.store import ActivationStore

    torch.set_num_threads(args.threads)
    store = ActivationStore(args.store)
    B = args.reader_batch_size
    readers = {
        f"old (buffer_shards={args.legacy_buffer_shards})":
            lambda seed: legacy_iter_batches(store, B, seed=seed, buffer_shards=args.legacy_buffer_shards),
        f"new (buffer_rows={args.buffer_rows}, chunk_rows={args.chunk_rows})":
            lambda seed: store.iter_batches(B, seed=seed, n_epochs=1, buffer_rows=args.buffer_rows, chunk_rows=args.chunk_rows),
    }
    for it in readers.values():  # warm-up: page cache, lazy initialisation
        sum(len(x) for x in it(args.repeats))
    times = {name: [] for name in readers}
    for r in range(args.repeats):
        for name, it in readers.items():
            t0 = time.perf_counter()
            n = sum(len(x) for x in it(r))
            times[name].append(time.perf_counter() - t0)
            assert n == len(store), (name, n)
    # Mixing: RMS over channels of (batch mean - store mean) / channel sd, averaged over the full batches of an epoch.
    x_ND = torch.cat([a.reshape(-1, store.d) for _, a in store.iter_images(1024)]).double()
    mu_D, sd_D = x_ND.mean(0), x_ND.std(0)

    def stray(batches):
        devs = [(((x.double().mean(0) - mu_D) / sd_D) ** 2).mean().sqrt().item() for x in batches if len(x) == B]
        return float(np.mean(devs)), float(np.max(devs))

    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x_ND)))
    iid = stray(x_ND[perm[i:i + B]] for i in range(0, len(x_ND), B))
    del x_ND
    out = [("store", f"{args.store}: {len(store)} rows, d={store.d}, {store.meta['dtype']}, {len(store.shards)} shards"),
           ("batch size, torch threads, repeats", f"{B}, {args.threads}, {args.repeats}")]
    for name, it in readers.items():
        best, median = min(times[name]), float(np.median(times[name]))
        m, mx = stray(it(0))
        every = ", ".join(f"{len(store) / t / 1e3:.0f}" for t in times[name])
        out += [(f"reader {name}: throughput",
                 f"**{len(store) / best / 1e3:.0f} k rows/s** best, {len(store) / median / 1e3:.0f} k median (all: {every})"),
                (f"reader {name}: batch-mean stray (mean / max)", f"{m:.3f} / {mx:.3f}")]
    out.append(("i.i.d. rows (whole store permuted in memory): batch-mean stray (mean / max)", f"{iid[0]:.3f} / {iid[1]:.3f}"))
    return out


def bench_many_layers(args) -> list[tuple[str, str]]:
    """k layers from one pass vs k single-layer extractions, from the files; and the single-layer time split."""
    import torch

    from contextlib import nullcontext

    from nacosae.backbones import load_backbone
    from nacosae.extract import Target, _activations, extract, extract_many
    from nacosae.images import FolderSource, OpenClipArtSource, SkimageSource, SubsetSource

    torch.set_num_threads(args.threads)
    ac = None if args.autocast == "none" else args.autocast
    bb = load_backbone(args.backbone)
    if args.no_mha_layout_fix:  # the baseline: open_clip's attention as it comes (backbones.mha_autocast_layout)
        for hook in getattr(bb, "mha_hooks", []):
            hook.remove()
    n_fixed = 0 if args.no_mha_layout_fix else len(getattr(bb, "mha_hooks", []))
    targets = []
    for item in args.many_layers.split(","):
        layer, _, tokens = item.strip().partition(":")
        targets.append((layer, tokens or args.tokens))
    if args.source == "openclipart":
        full = OpenClipArtSource(progress=False)
    elif args.source == "skimage":
        full = SkimageSource()
    else:
        full = FolderSource(args.source.removeprefix("folder:"), progress=False)
    src = SubsetSource(full, args.n_images, seed=0)  # every category, not the first folder's images
    records = src.records()
    n, B = len(records), args.batch_size

    def clocks():
        return time.perf_counter(), time.process_time()

    def split():
        """One single-layer extraction's work, stage by stage: (decode, preprocess, forward of each target, one
        multi-layer forward), each (wall, cpu) seconds; and the pixels. Forwards as extraction runs them (autocast)."""
        w0, c0 = clocks()
        images = [src.load(r) for r in records]
        w1, c1 = clocks()
        pixels = torch.stack([bb.preprocess(im) for im in images])
        w2, c2 = clocks()
        fwd = []
        with torch.inference_mode():
            for layer, tokens in targets:
                a, b = clocks()
                for i in range(0, n, B):
                    _activations(bb, pixels[i:i + B], [(layer, tokens)], ac)
                c, d = clocks()
                fwd.append((c - a, d - b))
            a, b = clocks()
            for i in range(0, n, B):
                _activations(bb, pixels[i:i + B], targets, ac)
            c, d = clocks()
        return (w1 - w0, c1 - c0), (w2 - w1, c2 - c1), fwd, (c - a, d - b), pixels

    def tower(pixels, autocast):
        """The whole image tower (`output`: logits or embedding) on preprocessed pixels: (wall, cpu) seconds."""
        context = torch.autocast(bb.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
        a, b = clocks()
        with torch.inference_mode(), context:
            for i in range(0, n, B):
                bb.output(pixels[i:i + B])
        c, d = clocks()
        return c - a, d - b

    def end_to_end():
        """(k single-layer extractions, one k-layer extraction), each (wall, cpu) seconds, from the files."""
        with tempfile.TemporaryDirectory() as tmp:
            a, b = clocks()
            for j, (layer, tokens) in enumerate(targets):
                extract(src, bb, layer, tokens, Path(tmp) / f"single{j}", batch_size=B, progress=False, autocast=ac)
            c, d = clocks()
            extract_many(src, bb, [Target(layer, tokens, Path(tmp) / f"many{j}") for j, (layer, tokens) in enumerate(targets)],
                         batch_size=B, progress=False, autocast=ac)
            e, f = clocks()
        return (c - a, d - b), (e - c, f - d)

    pixels = split()[-1]  # warm-up: page cache, allocator, oneDNN kernels
    precisions = [None] + ([ac] if ac else [])
    for p in precisions:
        tower(pixels, p)  # warm-up: the kernels of each precision
    splits, e2e, towers = [], [], {p: [] for p in precisions}
    for _ in range(args.repeats):
        splits.append(split())
        e2e.append(end_to_end())
        for p in precisions:
            towers[p].append(tower(pixels, p))
    best = lambda xs: min(xs)  # noqa: E731
    k = len(targets)
    cpu_fwd = [best(s[2][j][1] for s in splits) for j in range(k)]
    deepest = max(range(k), key=lambda j: cpu_fwd[j])  # the costliest forward: a single-layer run's upper end
    out = [("many layers: images, backbone, targets", f"{n} ({src.name}), {args.backbone}, "
                                                      + ", ".join(f"{l_}:{t}" for l_, t in targets)),
           ("torch threads, batch size, repeats (best of), autocast", f"{args.threads}, {B}, {args.repeats}, {args.autocast}"
            + (f" (MHA layout fix on {n_fixed} modules)" if n_fixed else ""))]
    for c, clock in ((1, "CPU"), (0, "wall")):
        t_dec = best(s[0][c] for s in splits)
        t_pre = best(s[1][c] for s in splits)
        t_fwd = [best(s[2][j][c] for s in splits) for j in range(k)]
        t_multi = best(s[3][c] for s in splits)
        one = t_dec + t_pre + t_fwd[deepest]
        t_single = best(e[0][c] for e in e2e)
        t_many = best(e[1][c] for e in e2e)
        out += [
            (f"{clock}: decode / preprocess / forward ({targets[deepest][0]}), per image",
             f"{1e3 * t_dec / n:.1f} / {1e3 * t_pre / n:.1f} / {1e3 * t_fwd[deepest] / n:.1f} ms"),
            (f"**{clock}: decode share of a single-layer extraction ({targets[deepest][0]})**",
             f"**{100 * t_dec / one:.0f} %** (decode + preprocess: {100 * (t_dec + t_pre) / one:.0f} %)"),
            (f"{clock}: forward only, {k} single-layer passes vs one {k}-layer pass",
             f"{sum(t_fwd):.2f} s vs {t_multi:.2f} s ({sum(t_fwd) / t_multi:.2f}×)"),
            (f"**{clock}: extraction from files, {k} single-layer runs vs one {k}-layer run**",
             f"**{t_single:.1f} s ({k * n / t_single:.1f} layer-img/s) vs {t_many:.1f} s ({k * n / t_many:.1f} layer-img/s, "
             f"{n / t_many:.1f} img/s): {t_single / t_many:.2f}×**"),
        ]
        rates = {p: n / best(t[c] for t in towers[p]) for p in precisions}
        out.append((f"**{clock}: pure forward, whole image tower (preprocessed pixels)**",
                    "**" + " vs ".join(f"{rates[p]:.1f} img/s {p or 'float32'}" for p in precisions) + "**"
                    + (f" ({rates[ac] / rates[None]:.2f}×)" if ac else "")))
    if ac:
        # How far the autocast activations are from float32 ones, on the first batch: ||a_bf16 - a_fp32|| / ||a_fp32||.
        with torch.inference_mode():
            ref = _activations(bb, pixels[:B], targets)
            low = _activations(bb, pixels[:B], targets, ac)
        out.append((f"{ac} vs float32 activations, relative error (first batch)",
                    ", ".join(f"{l_}:{t} {((y - x).norm() / x.norm()).item():.1e}"
                              for (l_, t), x, y in zip(targets, ref, low, strict=True))))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    if not args.skip_extract:
        rows += bench_extract(args)
    if not args.skip_reader:
        rows += bench_reader(args)
    if args.store:
        rows += bench_store_reader(args)
    if args.many_layers:
        rows += bench_many_layers(args)
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
