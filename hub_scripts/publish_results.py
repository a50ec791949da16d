#!/usr/bin/env python
"""Publish the results dataset (docs/RESULTS_SCHEMA.md) as one Hub dataset repo, or write exactly that layout to a folder.

    python hub_scripts/publish_results.py --results runs/results/blocks.14 --local-dir runs/hub/results
    python hub_scripts/publish_results.py --results runs/results/blocks.14 --repo-id you/efficientnet-lite0-sae-results
    python hub_scripts/publish_results.py --from-stats runs/offline_default --layer blocks.14 --local-dir runs/hub/results

--results folders (each in the dataset layout: data/<table>/*.parquet) are concatenated (several SAEs in one dataset).
--from-stats builds the tables from a run's feature statistics alone (names: top label only) when no naming run exists.
The tables are validated (columns, cross-references, images decodable) before anything is written; the upload is one
commit that also removes the previous parquet shards. The dataset card keeps its hand-written parts, and the named
sections of each --results folder's own card (the evaluation protocol build_results.py wrote) are published with it.
"""

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    defaults = json.loads((REPO / "space_config" / "defaults.json").read_text())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", action="append", default=[], help="results dataset folder (repeatable)")
    ap.add_argument("--from-stats", default=None, help="a run folder (acts/, sae/, stats/ per layer) to build tables from")
    ap.add_argument("--layer", default="blocks.14", help="--from-stats only: the layer (default: %(default)s)")
    ap.add_argument("--top-n", type=int, default=16, help="--from-stats only: top images per feature (default: %(default)s)")
    ap.add_argument("--max-px", type=int, default=224, help="--from-stats only: image size (default: %(default)s)")
    ap.add_argument("--repo-id", default=defaults["results_repo"], help="Hub dataset repo (default: %(default)s)")
    ap.add_argument("--sae-repo", default=defaults["sae_repo"], help="model repo the card links (default: %(default)s)")
    ap.add_argument("--local-dir", default=None, help="write the repo layout here instead of uploading")
    ap.add_argument("--rows-per-shard", type=int, default=None, help="split tables into parquet shards of this many rows")
    ap.add_argument("--private", action="store_true", help="create the Hub dataset repo private")
    ap.add_argument("--dry-run", action="store_true", help="validate and stage only")
    args = ap.parse_args(argv)
    if bool(args.results) == bool(args.from_stats):
        sys.exit("give --results folder(s) or --from-stats RUN, not both")

    from nacosae.publish import load_sae_entry, publish_results
    from nacosae.results import (
        CARD,
        ValidationError,
        carried_sections,
        concat_results,
        read_results_folder,
        tables_from_stats,
    )

    carried: dict[str, str] = {}
    try:
        if args.results:
            parts = [read_results_folder(r) for r in args.results]
            tables = concat_results(parts)
            for folder, part in zip(args.results, parts):  # e.g. "protocol <sae_id>": how that run's names were evaluated
                card = Path(folder) / CARD
                carried.update(carried_sections(card.read_text(encoding="utf-8") if card.is_file() else None,
                                                sorted(set(part["runs"].column("sae_id").to_pylist()))))
        else:
            from nacosae.features import FeatureStats

            run = Path(args.from_stats)
            entry = load_sae_entry(run / "sae" / args.layer / "sae")
            stats = FeatureStats.load(run / "stats" / args.layer)
            images = [json.loads(x) for x in (run / "acts" / args.layer / "images.jsonl").read_text().splitlines() if x]
            side = math.isqrt(stats.tokens_per_image)
            if side * side != stats.tokens_per_image:
                sys.exit(f"{stats.tokens_per_image} tokens per image is not a square grid")
            tables = tables_from_stats(stats, images, entry.config, entry.metrics, entry.sae_id, (side, side),
                                       top_n=args.top_n, max_px=args.max_px)
        out = publish_results(tables, args.repo_id, local_dir=args.local_dir, sae_repo=args.sae_repo,
                              private=args.private or None, rows_per_shard=args.rows_per_shard, dry_run=args.dry_run,
                              carried=carried)
    except (ValidationError, FileNotFoundError) as e:
        sys.exit(f"not published: {e}")
    rows = {t: tables[t].num_rows for t in tables}
    if args.dry_run:
        import shutil

        print(f"staged and valid ({rows}): {out}")
        shutil.rmtree(out)
    elif args.local_dir:
        print(f"wrote {rows} to {out}")
    else:
        print(f"published {rows} to https://huggingface.co/datasets/{args.repo_id} ({out.oid})")


if __name__ == "__main__":
    main()
