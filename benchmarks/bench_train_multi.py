r"""N SAEs trained from one read of a store (`train_many`) against N separate runs (`train`): wall and CPU time, and
the bytes each reads from the store (activation rows copied out of the shards: the training stream, the init sample,
the validation pass). Also the cost of the read alone (one epoch of the training stream, no SAE), which is what one
read saves per extra SAE. Best of --repeats, interleaved; every run in a fresh folder.

    python benchmarks/bench_train_multi.py                         # synthetic store: planted dictionary, d=192
    python benchmarks/bench_train_multi.py --store runs/offline_default/acts/blocks.14 --k 16,24,32,48
    python benchmarks/bench_train_multi.py --expansion 2 --k 8,16,24,32   # small SAEs: the read matters most
    python benchmarks/bench_train_multi.py --processes 1,2 --k 32           # + one SAE data-parallel on 1 vs 2 processes

With --processes: one SAE (the first k) trained by `hub_scripts/train_sae.py` under `torchrun --nproc_per_node P`
(gloo on CPU, each process reading its own share of the store, --threads torch threads each), wall time per P.

The synthetic store has the shape of the offline default's blocks.14 store (d=192, T=49, float16): rows are sparse
sums of planted directions (`nacosae.synthetic.PlantedDictionary`), so the SAEs have something to learn.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="a real store (default: a synthetic one written to a temporary folder)")
    p.add_argument("--rows", type=int, default=200_000, help="synthetic store: rows (default: %(default)s)")
    p.add_argument("--d", type=int, default=192, help="synthetic store: width (default: %(default)s)")
    p.add_argument("--k", default="16,24,32,48", help="one SAE per k (default: %(default)s)")
    p.add_argument("--expansion", type=int, default=8, help="d_sae = expansion × d (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=10, help="learning-rate warm-up (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="best of this many (default: %(default)s)")
    p.add_argument("--processes", help="also: one SAE data-parallel on each of these process counts, e.g. 1,2")
    return p.parse_args(argv)


def synthetic_store(path: Path, n_rows: int, d: int) -> Path:
    """A float16 store of planted-dictionary rows, T=49 rows per 'image', 2**16-row shards."""
    import torch

    from nacosae.store import StoreWriter, finalize_store
    from nacosae.synthetic import PlantedDictionary

    T = 49
    n_img = n_rows // T
    per = 2**16 // T
    planted = PlantedDictionary(d=d, n_directions=4 * d, n_active=8, noise=0.05, seed=0)
    run = {"provenance": {"backbone": "planted-dictionary", "layer": "synthetic", "tokens": "all"}, "dtype": "float16",
           "n_images_total": n_img, "source": {"name": "synthetic"}, "world_size": 1}
    w = StoreWriter(path, run, 0, 0, n_img)
    for s in range(0, n_img, per):
        ids = list(range(s, min(s + per, n_img)))
        x_ND = torch.cat([planted.sample(min(8192, len(ids) * T - i)) for i in range(0, len(ids) * T, 8192)])
        w.write_shard(x_ND.half(), torch.tensor(ids).repeat_interleave(T), torch.arange(T).repeat(len(ids)),
                      [{"image_idx": i} for i in ids], ids[-1] + 1, [])
    w.mark_done()
    finalize_store(path)
    return path


class ReadCounter:
    """Counts the activation bytes copied out of store shards (chunk reads of the stream, whole-shard loads)."""

    def __init__(self):
        from nacosae.store import ActivationStore

        self.bytes = 0
        cls = ActivationStore
        real_chunk, real_load = cls._read_chunk, cls._load_shard

        def read_chunk(store, *a, **k):
            out = real_chunk(store, *a, **k)
            self.bytes += out.nbytes
            return out

        def load_shard(store, *a, **k):
            out = real_load(store, *a, **k)
            self.bytes += sum(t.nbytes for t in out.values())
            return out

        cls._read_chunk, cls._load_shard = read_chunk, load_shard


def data_parallel(args, store_path: Path, tmp: Path, k: int) -> list[tuple[str, str]]:
    """Wall time of one SAE trained under torchrun with each process count (best of --repeats, interleaved)."""
    import json
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "hub_scripts" / "train_sae.py"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    counts = [int(p) for p in args.processes.split(",")]
    times = {p: [] for p in counts}
    fvu = {}
    for r in range(args.repeats):
        for p in counts:
            out = tmp / f"ddp{p}-{r}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(p), str(script),
                   "--store", str(store_path), "--out-dir", str(out), "--expansion", str(args.expansion), "--k", str(k),
                   "--batch-size", str(args.batch_size), "--n-epochs", str(args.epochs), "--warmup-steps",
                   str(args.warmup_steps), "--checkpoint-every", str(10**9)]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                raise RuntimeError(f"torchrun with {p} process(es) failed:\n{res.stderr[-2000:]}")
            times[p].append(time.perf_counter() - t0)
            fvu[p] = json.loads((out / "metrics.json").read_text())["val_fvu"]
    base = min(times[counts[0]])
    return [(f"**data parallel, one SAE (k={k}): wall with {p} process(es), {args.threads} thread(s) each**",
             f"**{min(times[p]):.1f} s ({base / min(times[p]):.2f}× the {counts[0]}-process run)**, val FVU {fvu[p]:.4f}")
            for p in counts]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from nacosae.store import ActivationStore
    from nacosae.train import TrainConfig, train, train_many

    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    counter = ReadCounter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store_path = Path(args.store) if args.store else synthetic_store(tmp / "store", args.rows, args.d)
        store = ActivationStore(store_path)

        def cfgs(root: Path) -> list[TrainConfig]:
            return [TrainConfig(store=str(store_path), out_dir=str(root / f"k{k}"), expansion=args.expansion, k=k,
                                batch_size=args.batch_size, n_epochs=args.epochs, checkpoint_every=10**9, log_every=10,
                                warmup_steps=args.warmup_steps)
                    for k in ks]

        def timed(fn):
            counter.bytes = 0
            w, c = time.perf_counter(), time.process_time()
            fn()
            return time.perf_counter() - w, time.process_time() - c, counter.bytes

        def read_only():
            train_rows, _ = store.split(0.05, seed=0)
            n_steps = max(1, int(args.epochs * store.n_rows_in(train_rows) / args.batch_size))
            it = store.iter_batches(args.batch_size, shuffle=True, seed=0, rows=train_rows)
            for _ in range(n_steps):
                next(it)

        separate, together, reads = [], [], []
        for r in range(args.repeats):
            reads.append(timed(read_only))
            separate.append(timed(lambda: [train(c, progress=False) for c in cfgs(tmp / f"separate{r}")]))
            together.append(timed(lambda: train_many(cfgs(tmp / f"together{r}"), progress=False)))
        m_sep = [train(c, progress=False)[1] for c in cfgs(tmp / "separate0")]  # finished: loaded, not retrained
        m_tog = [train(c, progress=False)[1] for c in cfgs(tmp / "together0")]
        ddp = data_parallel(args, store_path, tmp, ks[0]) if args.processes else []

    n = len(ks)
    best = lambda runs, i: min(x[i] for x in runs)  # noqa: E731
    mb = lambda b: f"{b / 2**20:.0f} MB"  # noqa: E731
    t_sep, t_tog, t_read = (best(separate, 0), best(together, 0), best(reads, 0))
    c_sep, c_tog, c_read = (best(separate, 1), best(together, 1), best(reads, 1))
    rows = [
        ("store", f"{store_path if args.store else 'synthetic (planted dictionary)'}: {len(store)} rows, d={store.d}, "
                  f"{store.meta['dtype']}"),
        ("SAEs", f"{n} × TopK, d_sae={args.expansion}×{store.d}, k={args.k}, batch {args.batch_size}, {args.epochs:g} epoch(s), "
                 f"{m_sep[0]['n_steps']} steps each"),
        ("torch threads, repeats (best of)", f"{args.threads}, {args.repeats}"),
        ("read alone: one epoch of the training stream (wall / CPU)", f"{t_read:.1f} s / {c_read:.1f} s"),
        (f"**wall: {n} separate runs vs one run of {n}**", f"**{t_sep:.1f} s vs {t_tog:.1f} s: {t_sep / t_tog:.2f}×**"),
        (f"CPU: {n} separate runs vs one run of {n}", f"{c_sep:.1f} s vs {c_tog:.1f} s: {c_sep / c_tog:.2f}×"),
        (f"**bytes read: {n} separate runs vs one run of {n}**",
         f"**{mb(separate[0][2])} vs {mb(together[0][2])}: {separate[0][2] / together[0][2]:.2f}×**"),
        ("val FVU per SAE, separate | together (equal: same batches, same steps)",
         " ; ".join(f"k={k}: {a['val_fvu']:.4f} | {b['val_fvu']:.4f}" for k, a, b in zip(ks, m_sep, m_tog, strict=True))),
    ]
    rows += ddp
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
