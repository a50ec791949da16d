"""Monosemanticity Score: the exact closed form (Ãᵀ Ê, METHODS §4.2) vs the O(N²) pairwise definition.

    python benchmarks/bench_ms.py --n-images 5000 --d-sae 1536 --emb-dim 384

The pairwise baseline is vectorised over the N(N−1)/2 pairs of one feature; it is timed on a few features and
reported per feature (its cost is the same for every feature). Both run in float64 on the CPU unless --device.
"""

from __future__ import annotations

import argparse
import time

import torch

from nacosae.metrics import monosemanticity_score, monosemanticity_score_pairwise


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=5000)
    p.add_argument("--d-sae", type=int, default=1536, help="features scored by the closed form")
    p.add_argument("--emb-dim", type=int, default=384, help="width of the second encoder's embeddings")
    p.add_argument("--pairwise-features", type=int, default=4, help="features the pairwise baseline is timed on")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    N, S = args.n_images, args.d_sae
    # Sparse, TopK-like activations and embeddings with a shared direction (positive mean cosine).
    acts_NS = torch.relu(torch.randn(N, S, generator=g) - 1.5)
    emb_NE = torch.randn(N, args.emb_dim, generator=g) + 0.3

    monosemanticity_score(acts_NS[:, :8], emb_NE, device=args.device)  # warm-up
    t0 = time.perf_counter()
    closed_S = monosemanticity_score(acts_NS, emb_NE, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_closed = time.perf_counter() - t0

    F = args.pairwise_features
    t0 = time.perf_counter()
    pair_F = monosemanticity_score_pairwise(acts_NS[:, :F], emb_NE)
    t_pair = time.perf_counter() - t0
    # The pairwise time includes building the N×N cosines once; report it per feature as the O(N²) cost.
    t0 = time.perf_counter()
    monosemanticity_score_pairwise(acts_NS[:, :1], emb_NE)
    t_setup_plus_one = time.perf_counter() - t0
    per_pair_feature = max((t_pair - t_setup_plus_one) / max(F - 1, 1), 1e-12)
    per_closed_feature = t_closed / S
    err = (closed_S[:F] - pair_F).abs().max().item()

    print(f"N = {N} images, E = {args.emb_dim}, threads = {torch.get_num_threads()}, device = {args.device}")
    print(f"{'method':<28}{'features':>10}{'seconds':>12}{'ms / feature':>15}")
    print(f"{'closed form (Ãᵀ Ê)':<28}{S:>10}{t_closed:>12.3f}{1e3 * per_closed_feature:>15.4f}")
    print(f"{'pairwise (N²/2 pairs)':<28}{F:>10}{t_pair:>12.3f}{1e3 * per_pair_feature:>15.4f}")
    print(f"speed ratio per feature: {per_pair_feature / per_closed_feature:,.0f}x   "
          f"(pairwise one-off N×N set-up: {t_setup_plus_one - per_pair_feature:.2f} s)")
    print(f"max |closed − pairwise| on the {F} shared features: {err:.2e}")
    print(f"whole dictionary: closed {t_closed:.2f} s vs pairwise ≈ {per_pair_feature * S:,.0f} s")


if __name__ == "__main__":
    main()
