#!/usr/bin/env python
"""Build the app's bundled demo (`demo/`) from the offline-default run: the SAE in the Hub model-repo layout and
its results in the Hub dataset layout, with small thumbnails, so the app opens with real content and no network.

    python hub_scripts/build_demo.py                                   # runs/offline_default, blocks.14
    python hub_scripts/build_demo.py --results runs/results/blocks.14  # with names, CoSy, MS, MILS history

Every feature comes from the feature statistics (names `unnamed`, `name_top_label` = the majority label of its top
images); the rows of a results dataset, when there is one (it may cover only the named features), replace theirs,
and the named sections of its card (the evaluation protocol) go into the demo's card.
A results dataset made with another SAE (other width, other training run) is refused.
Output: OUT/sae/<sae_id>/{model.safetensors,config.json,metrics.json} + OUT/sae/README.md, and
OUT/results/{README.md,data/<table>/*.parquet}: the same files `publish_sae.py` / `publish_results.py` upload.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None):
    from nacosae.results import THUMBNAIL_FORMATS

    defaults = json.loads((REPO / "space_config" / "defaults.json").read_text())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/offline_default", help="offline-default run folder (default: %(default)s)")
    ap.add_argument("--layer", default="blocks.14", help="which of its SAEs (default: %(default)s)")
    ap.add_argument("--results", default=None, help="results dataset folder (RESULTS_SCHEMA layout); default: "
                    "RUN/results/<layer> when it exists, else stats only")
    ap.add_argument("--out", default="demo", help="output folder (default: %(default)s)")
    ap.add_argument("--sae", default=None, help="the SAE folder, when the run folder has none (default: RUN/sae/LAYER/sae)")
    ap.add_argument("--top-n", type=int, default=9, help="top images kept per feature (default: %(default)s)")
    ap.add_argument("--max-px", type=int, default=112, help="thumbnail size (default: %(default)s)")
    ap.add_argument("--image-format", choices=list(THUMBNAIL_FORMATS), default="webp",
                    help="thumbnail encoding (nacosae.results.thumbnail_bytes; default: %(default)s, ~4x smaller than "
                    "PNG on clip art)")
    ap.add_argument("--renders-per-feature", type=int, default=2,
                    help="MILS prompts per feature whose render images are kept (default: %(default)s)")
    ap.add_argument("--max-mb", type=float, default=10.0, help="fail when the bundle is larger (default: %(default)s)")
    args = ap.parse_args(argv)

    from nacosae.features import FeatureStats
    from nacosae.publish import load_sae_entry, publish_results, publish_saes
    from nacosae.results import (
        CARD,
        ValidationError,
        carried_sections,
        overlay_results,
        read_results_folder,
        shrink_results,
        tables_from_stats,
    )

    run, out = Path(args.run), Path(args.out)
    from nacosae.layout import RunLayout

    layout = RunLayout(run)
    entry = load_sae_entry(Path(args.sae) if args.sae else layout.sae_weights(args.layer))
    publish_saes([entry], defaults["sae_repo"], local_dir=out / "sae", results_repo=defaults["results_repo"])
    results = Path(args.results) if args.results else layout.results(args.layer)
    has_results = results.is_dir() and any((results / "data").glob("*/*.parquet"))
    if args.results and not has_results:
        sys.exit(f"--results {results} has no data/<table>/*.parquet (see docs/RESULTS_SCHEMA.md)")
    if not layout.stats(args.layer).is_dir():
        # no run folder: a complete results dataset (every feature row with its statistics, e.g. `nacosae name
        # --base-results demo/results`) is the whole input
        if not has_results:
            sys.exit(f"neither {layout.stats(args.layer)} nor a results dataset: give --run or --results")
        tables = read_results_folder(results)
        card = results / CARD
        carried = carried_sections(card.read_text(encoding="utf-8") if card.is_file() else None, [entry.sae_id])
        return _write(tables, carried, args, defaults, out)
    # every feature from the statistics (names: top label only); the results' rows, where there are any, replace them
    stats = FeatureStats.load(layout.stats(args.layer))
    store_images = [json.loads(line) for line in (layout.acts(args.layer) / "images.jsonl").read_text().splitlines() if line]
    T = stats.tokens_per_image
    side = math.isqrt(T)
    if side * side != T:
        sys.exit(f"{T} tokens per image is not a square grid: this script handles CNN maps and ViT patch grids only")
    tables = tables_from_stats(stats, store_images, entry.config, entry.metrics, entry.sae_id, (side, side),
                               top_n=args.top_n, max_px=args.max_px)
    carried: dict[str, str] = {}
    if has_results:
        extra = read_results_folder(results)
        print(f"results dataset {results}: {extra['features'].num_rows} feature rows replace the statistics-only ones")
        try:
            tables = overlay_results(tables, extra)
        except ValidationError as e:
            sys.exit(str(e))
        card = results / CARD
        carried = carried_sections(card.read_text(encoding="utf-8") if card.is_file() else None, [entry.sae_id])
    else:
        print(f"no results dataset at {results}: names are the top label only")
    return _write(tables, carried, args, defaults, out)


def _write(tables, carried, args, defaults, out: Path):
    from nacosae.publish import publish_results
    from nacosae.results import shrink_results

    tables = shrink_results(tables, args.top_n, args.max_px, args.renders_per_feature, args.image_format)
    publish_results(tables, defaults["results_repo"], local_dir=out / "results", sae_repo=defaults["sae_repo"],
                    carried=carried)
    size = folder_size(out)
    print(f"demo bundle: {out} ({size / 1e6:.1f} MB): sae {folder_size(out / 'sae') / 1e6:.1f} MB, "
          f"results {folder_size(out / 'results') / 1e6:.1f} MB; features {tables['features'].num_rows}, images {tables['images'].num_rows}")
    if size > args.max_mb * 1e6:
        sys.exit(f"the bundle is {size / 1e6:.1f} MB > {args.max_mb} MB: lower --top-n, --max-px or --renders-per-feature")


if __name__ == "__main__":
    main()
