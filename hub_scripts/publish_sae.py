#!/usr/bin/env python
"""Publish trained SAEs as one Hub model repo (one subfolder per SAE), or write exactly that layout to a folder.

    python hub_scripts/publish_sae.py --sae runs/offline_default/sae/blocks.14/sae --local-dir runs/hub/sae
    python hub_scripts/publish_sae.py --sae runs/offline_default/sae/blocks.14/sae --repo-id you/efficientnet-lite0-saes \
        --results-repo you/efficientnet-lite0-sae-results

Each --sae folder is a `save_pretrained` output (model.safetensors + config.json); its metrics.json is read from the
folder or its parent (where training writes it). Subfolder = `<backbone>/<layer>` from the SAE's provenance. Everything
is validated in a temporary folder first; then one `upload_folder` commit (token: HF_TOKEN or `hf auth login`; never
written anywhere). The model card is updated, not overwritten: hand-written parts outside the generated block stay.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    defaults = json.loads((REPO / "space_config" / "defaults.json").read_text())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", action="append", required=True, help="SAE folder (repeat for several SAEs)")
    ap.add_argument("--sae-id", action="append", default=None, help="override the subfolder of each --sae, in order")
    ap.add_argument("--repo-id", default=defaults["sae_repo"], help="Hub model repo (default: %(default)s)")
    ap.add_argument("--results-repo", default=defaults["results_repo"], help="dataset repo the card links (default: %(default)s)")
    ap.add_argument("--local-dir", default=None, help="write the repo layout here instead of uploading")
    ap.add_argument("--private", action="store_true", help="create the Hub repo private")
    ap.add_argument("--dry-run", action="store_true", help="stage and validate only; print the staged folder")
    args = ap.parse_args(argv)

    from nacosae.publish import ValidationError, load_sae_entry, publish_saes
    from nacosae.sae import CheckpointError

    if args.sae_id and len(args.sae_id) != len(args.sae):
        sys.exit(f"give one --sae-id per --sae ({len(args.sae)}), or none")
    try:
        entries = [load_sae_entry(f, sae_id=(args.sae_id or [None] * len(args.sae))[i]) for i, f in enumerate(args.sae)]
        out = publish_saes(entries, args.repo_id, local_dir=args.local_dir, results_repo=args.results_repo,
                           private=args.private or None, dry_run=args.dry_run)
    except (ValidationError, CheckpointError, FileNotFoundError) as e:
        sys.exit(f"not published: {e}")
    if args.dry_run:
        print(f"staged and valid: {out}")
        for p in sorted(Path(out).rglob("*")):
            print("  ", p.relative_to(out))
        shutil.rmtree(out)
    elif args.local_dir:
        print(f"wrote {', '.join(e.sae_id for e in entries)} to {out}")
    else:
        print(f"published {', '.join(e.sae_id for e in entries)} to https://huggingface.co/{args.repo_id} ({out.oid})")


if __name__ == "__main__":
    main()
