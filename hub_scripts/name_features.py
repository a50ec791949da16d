#!/usr/bin/env python
"""Name SAE features with one or more methods, sharded over processes and resumable (METHODS §3).

    python hub_scripts/name_features.py --sae runs/offline_default/sae/blocks.14/sae \\
        --stats runs/offline_default/stats/blocks.14 --store runs/offline_default/acts/blocks.14 \\
        --work runs/naming/blocks.14 --methods mils top_label random
    torchrun --nproc-per-node 2 hub_scripts/name_features.py ... # or RANK=r WORLD_SIZE=w python ... (no process group needed)

Rank r names features r::world of the seeded selection and rewrites WORK/names/<method>/rank{r}.json after each
feature; a MILS loop's state is saved after every step (WORK/names/<method>/states/), so a killed run loses at most one
step. Re-running skips what any rank has finished. The run's settings go to WORK/setup.json on the first start; later
starts (and evaluate_names.py, build_results.py) must use the same ones.

Methods: mils (MILS loop, WordNet vocabulary proposer, no LLM), mils_gemma (MILS loop, Gemma-3-270M few-shot proposer,
only the first --gemma-features features), top_label (majority label of the top images), random (a random vocabulary
word: the floor). vocab (Discover-then-Name) applies only to SAEs on CLIP's image embedding.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None):
    from nacosae.evaluate import METHODS, NamingRun, add_config_arguments, config_from_args, load_run_config
    from nacosae.extract import resolve_rank

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="work folder of this naming run (names, states, evaluations)")
    ap.add_argument("--methods", nargs="+", default=["mils", "top_label", "random"], choices=METHODS,
                    help="naming methods to run, in order (default: %(default)s)")
    ap.add_argument("--resume", action="store_true",
                    help="take every setting from WORK/setup.json (the --sae/--stats/--store options are then not needed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    ap.add_argument("--thumb-dir", default=None, help="thumbnail cache (default: $NACOSAE_CACHE/thumbnails)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = ap.add_argument_group("run settings (NamingRunConfig; fixed once the work folder exists)")
    add_config_arguments(group)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world = resolve_rank()
    cfg = load_run_config(args.work) if args.resume else config_from_args(args)
    run = NamingRun(cfg, args.work, progress=not args.no_progress, thumb_dir=args.thumb_dir)
    for method in args.methods:
        t0 = time.perf_counter()
        recs = run.name_features(method, rank, world)
        print(f"[rank {rank}/{world}] {method}: {len(recs)} features in this rank's shard ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
