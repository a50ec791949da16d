"""Feature statistics throughput vs the bare SAE encoder on the same in-memory blocks.

    python benchmarks/bench_features.py --n-images 2048 --batch-images 64 --threads 1

Shapes of the offline default (EfficientNet-Lite0's 192-channel block, 7×7 tokens, 8× TopK SAE): d=192,
d_sae=1536, T=49, k=24. Rows = tokens. The ratio is what the statistics cost on top of encoding.
"""

from __future__ import annotations

import argparse
import time

import torch

from nacosae.features import FeatureStatsConfig, compute_feature_stats
from nacosae.sae import SAE, SAEConfig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=2048)
    p.add_argument("--batch-images", type=int, default=64)
    p.add_argument("--d-in", type=int, default=192)
    p.add_argument("--d-sae", type=int, default=1536)
    p.add_argument("--tokens", type=int, default=49)
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--top-n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    T, D = args.tokens, args.d_in
    # ReLU6-like activations (nonnegative, some saturated) so codes have realistic ties.
    acts = (torch.randn(args.n_images, T, D, generator=g) * 2 + 1).clamp(0, 6).to(dev)
    sae = SAE(SAEConfig(d_in=D, d_sae=args.d_sae, k=args.k), device=dev).init_from_data(acts[:256].reshape(-1, D)).eval()
    blocks = [(torch.arange(lo, min(lo + args.batch_images, args.n_images)), acts[lo:lo + args.batch_images])
              for lo in range(0, args.n_images, args.batch_images)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def bare():
        with torch.no_grad():
            for _, a in blocks:
                sae.encode(a)
        sync()

    def stats():
        compute_feature_stats(sae, blocks, FeatureStatsConfig(top_n=args.top_n), device=dev, progress=False)
        sync()

    rows = args.n_images * T
    results = {}
    for name, fn in (("sae.encode only", bare), ("feature stats (encode + stats)", stats)):
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        results[name] = best
    print(f"N = {args.n_images} images × T = {T} tokens, d = {D}, d_sae = {args.d_sae}, k = {args.k}, "
          f"block = {args.batch_images} images, threads = {torch.get_num_threads()}, device = {dev}")
    print(f"{'pass':<34}{'seconds':>10}{'rows/s':>14}{'images/s':>12}")
    for name, t in results.items():
        print(f"{name:<34}{t:>10.3f}{rows / t:>14,.0f}{args.n_images / t:>12,.0f}")
    t_enc, t_stats = results.values()
    print(f"feature stats take {t_stats / t_enc:.2f}× the time of encoding alone "
          f"(stats overhead {100 * (t_stats - t_enc) / t_enc:.0f} %)")


if __name__ == "__main__":
    main()
