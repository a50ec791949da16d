#!/usr/bin/env python
"""Evaluate the names of a naming run: CoSy on held-out renders vs a fixed control set, and the Monosemanticity Score.

    python hub_scripts/evaluate_names.py --work runs/naming/blocks.14
    torchrun --nproc-per-node 2 hub_scripts/evaluate_names.py --work ...   # or RANK / WORLD_SIZE in the environment

CoSy (METHODS §4.1): each name is "rendered" with seeds the naming loop never used, from the eval half of the retrieval
bank (the loop only searched the other half), and the feature's image-level activations on those renders are compared
with its activations on a fixed control set (AUC, MAD). Rank r evaluates features r::world and rewrites
WORK/eval/rank{r}.json after each feature; finished (feature, method) pairs are skipped on a re-run, so names added
later (e.g. mils_gemma) are evaluated without redoing the rest. Rank 0 then computes the MS of every SAE feature and of
the layer's raw channels (METHODS §4.2; WORK/ms.json).
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None):
    from nacosae.evaluate import METHODS, NamingRun, load_run_config
    from nacosae.extract import resolve_rank

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="work folder of the naming run (written by name_features.py)")
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="default: every method that has names")
    ap.add_argument("--no-ms", action="store_true", help="skip the Monosemanticity Score")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    ap.add_argument("--thumb-dir", default=None, help="thumbnail cache (default: $NACOSAE_CACHE/thumbnails)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world = resolve_rank()
    run = NamingRun(load_run_config(args.work), args.work, progress=not args.no_progress, thumb_dir=args.thumb_dir)
    recs = run.evaluate(rank, world, args.methods)
    print(f"[rank {rank}/{world}] evaluated {len(recs)} features")
    if rank == 0 and not args.no_ms:
        ms = run.monosemanticity()
        print(f"MS ({ms['encoder']}): SAE alive {ms['summary_sae_alive']['mean']:.3f}, raw channels {ms['summary_raw']['mean']:.3f}")


if __name__ == "__main__":
    main()
