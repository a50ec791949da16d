#!/usr/bin/env python
"""Assemble the Hugging Face Space repo (and optionally upload it as one commit).

    python space_config/deploy.py --out runs/space                          # assemble and check only
    python space_config/deploy.py --out runs/space --hardware zero-a10g     # a ZeroGPU Space
    python space_config/deploy.py --out runs/space --repo-id you/nacosae-explorer
    cd runs/space && python app.py                                          # the assembled Space runs alone

The Space gets: README.md (front matter from README.md.tmpl: sdk gradio with the installed gradio version,
`PYTHON_VERSION`, app_file, suggested_hardware, models and datasets links; checked with huggingface_hub's
`SpaceCard`), requirements.txt (pinned) and packages.txt (every Debian package a tab needs) from this folder, app.py,
the nacosae package source, space_config/defaults.json (the repo ids the app loads, overridable in the Space settings
with NACOSAE_SAE_REPO / NACOSAE_RESULTS_REPO, and the hardware: `--hardware`) and the bundled demo (with its render
pools in demo/naming/). Before anything uploads, the assembled folder is checked: front matter, every file present,
and the demo loads with the app's own serving code.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REQUIRED_META = ("sdk", "sdk_version", "app_file", "python_version", "suggested_hardware", "models", "datasets")
PYTHON_VERSION = "3.11"
"""The Space's Python: the version the tests run with (tests/test_space.py), one Spaces supports; never the deploying
machine's by accident."""
HARDWARE = {
    "cpu-basic": "The demo runs on the free **cpu-basic** hardware (2 vCPU): EfficientNet-Lite0 answers \"what fires\" "
                 "and steering in well under a second, and live naming needs no GPU once the SAE's render pool exists "
                 "(the bundled demo ships it; another SAE's pool is encoded once, a few minutes on the CPU).",
    "zero-a10g": "On **ZeroGPU** hardware the model work runs in `@spaces.GPU` functions that ask for the GPU time the "
                 "work needs (about 10 s for \"what fires\" or a steering run, 10 s + 50 ms a picture for each chunk of "
                 "a missing render pool): ZeroGPU counts it against the visitor's daily quota (a few minutes for an "
                 "anonymous visitor, more when logged in). Browsing and live naming on an existing pool use no GPU.",
}
"""The hardware the app supports (`hardware` in defaults.json, Space `suggested_hardware`) and what the card says."""


def assemble(out: Path, sae_repo: str, results_repo: str, hardware: str | None = None) -> Path:
    """Write the Space repo into `out` (replaced). `hardware`: one of `HARDWARE` (default: defaults.json's)."""
    import gradio

    defaults = json.loads((HERE / "defaults.json").read_text())
    hardware = hardware or defaults.get("hardware", "cpu-basic")
    if hardware not in HARDWARE:
        raise SystemExit(f"--hardware must be one of {sorted(HARDWARE)}, got {hardware!r}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    readme = (HERE / "README.md.tmpl").read_text(encoding="utf-8").format(
        gradio_version=gradio.__version__, python_version=PYTHON_VERSION, sae_repo=sae_repo, results_repo=results_repo,
        hardware=hardware, hardware_note=HARDWARE[hardware])
    (out / "README.md").write_text(readme, encoding="utf-8")
    for name in ("requirements.txt", "packages.txt"):
        shutil.copyfile(HERE / name, out / name)
    shutil.copyfile(REPO / "app.py", out / "app.py")
    shutil.copytree(REPO / "nacosae", out / "nacosae", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    defaults.update(sae_repo=sae_repo, results_repo=results_repo, hardware=hardware)
    (out / "space_config").mkdir()
    (out / "space_config" / "defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
    demo = REPO / defaults.get("demo_dir", "demo")
    if not (demo / "results").is_dir():
        sys.exit(f"no bundled demo in {demo}: run hub_scripts/build_demo.py first")
    shutil.copytree(demo, out / defaults.get("demo_dir", "demo"), ignore=shutil.ignore_patterns("__pycache__", "*.tmp*"))
    return out


def check(out: Path) -> None:
    """What the Space needs to start: front matter, files, and a demo the serving code opens."""
    from nacosae.results import split_front_matter
    from nacosae.serve import Source, open_explorer

    from huggingface_hub import SpaceCard

    meta, _ = split_front_matter((out / "README.md").read_text(encoding="utf-8"))
    missing = [k for k in REQUIRED_META if not meta.get(k)]
    if missing or meta.get("sdk") != "gradio" or meta.get("app_file") != "app.py":
        sys.exit(f"README.md front matter: missing {missing} or wrong sdk/app_file ({meta.get('sdk')}, {meta.get('app_file')})")
    card = SpaceCard.load(out / "README.md")  # huggingface_hub's own parser of the Space card's metadata
    if card.data.sdk != "gradio" or str(card.data.python_version) != PYTHON_VERSION or card.data.license != "apache-2.0":
        sys.exit(f"README.md: SpaceCard reads sdk={card.data.sdk!r}, python_version={card.data.python_version!r}, "
                 f"license={card.data.license!r}")
    for rel in ("app.py", "requirements.txt", "packages.txt", "nacosae/serve.py", "space_config/defaults.json"):
        if not (out / rel).is_file():
            sys.exit(f"the assembled Space lacks {rel}")
    demo = out / json.loads((out / "space_config" / "defaults.json").read_text()).get("demo_dir", "demo")
    ex = open_explorer(Source(str(demo / "sae"), str(demo / "results")))
    ex.feature_page(ex.sae_ids[0], int(ex.browse(ex.sae_ids[0]).iloc[0]["feature"]))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"Space assembled in {out}: {size / 1e6:.1f} MB, demo SAEs {ex.sae_ids}")


def main(argv=None):
    defaults = json.loads((HERE / "defaults.json").read_text())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/space", help="where to assemble the Space repo (default: %(default)s)")
    ap.add_argument("--sae-repo", default=defaults["sae_repo"], help="SAE model repo the Space loads (default: %(default)s)")
    ap.add_argument("--results-repo", default=defaults["results_repo"], help="results dataset repo (default: %(default)s)")
    ap.add_argument("--repo-id", default=None, help=f"upload to this Space (e.g. {defaults['space_repo']}); default: assemble only")
    ap.add_argument("--hardware", default=defaults.get("hardware", "cpu-basic"), choices=sorted(HARDWARE),
                    help="the Space's hardware: the app's mode (cpu-basic decorates nothing; zero-a10g uses ZeroGPU) and "
                         "the hardware asked for when the Space is created (default: %(default)s)")
    args = ap.parse_args(argv)

    out = assemble(Path(args.out), args.sae_repo, args.results_repo, args.hardware)
    check(out)
    if args.repo_id:
        from huggingface_hub import HfApi

        api = HfApi()  # token: HF_TOKEN or the login cache; never written anywhere
        api.create_repo(args.repo_id, repo_type="space", space_sdk="gradio", exist_ok=True, space_hardware=args.hardware)
        info = api.upload_folder(repo_id=args.repo_id, repo_type="space", folder_path=str(out),
                                 commit_message="Deploy the nacosae feature explorer", delete_patterns=["nacosae/**", "demo/**"])
        print(f"deployed: https://huggingface.co/spaces/{args.repo_id} ({info.oid})")


if __name__ == "__main__":
    main()
