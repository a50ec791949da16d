#!/usr/bin/env python
"""Merge the per-rank shards of a naming run into the results dataset, the comparison tables and the figures.

    python hub_scripts/build_results.py --work runs/naming/blocks.14 --out runs/results/blocks.14 \\
        --figures docs/figures/naming

Reads WORK/names/*/rank*.json, WORK/eval/rank*.json and WORK/ms.json (computing the MS if evaluate_names.py has not),
and writes OUT in the Hub dataset layout (README.md with `configs:`, data/{features,images,runs}/*.parquet; see
docs/RESULTS_SCHEMA.md), loadable with `datasets.load_dataset(OUT, "features")`. Also writes WORK/summary.json,
WORK/results.md (the comparison tables) and the figures. Refuses a run with missing names or evaluations unless
--allow-partial.
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv=None):
    from nacosae.evaluate import NamingRun, build_results, load_run_config
    from nacosae.naming.report import results_markdown

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="work folder of the naming run")
    ap.add_argument("--out", required=True, help="dataset folder to write (replaced as a whole)")
    ap.add_argument("--figures", default=None, help="folder for the figures (default: WORK/figures)")
    ap.add_argument("--all-features", action="store_true",
                    help="one row per SAE feature (galleries for all; names only for the selected ones); default: named only")
    ap.add_argument("--allow-partial", action="store_true", help="build even if some names or evaluations are missing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--thumb-dir", default=None, help="thumbnail cache (default: $NACOSAE_CACHE/thumbnails)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = NamingRun(load_run_config(args.work), args.work, progress=not args.no_progress, thumb_dir=args.thumb_dir)
    summary = build_results(run, args.out, args.figures, all_features=args.all_features, allow_partial=args.allow_partial)
    print(results_markdown(summary))
    print(f"dataset: {args.out} ({summary['n_rows']} features, {summary['n_images']} images)")
    print(json.dumps({k: summary[k] for k in ("n_features_named", "n_published", "published_by_method")}))


if __name__ == "__main__":
    main()
