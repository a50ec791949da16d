#!/usr/bin/env python
"""The offline naming run, end to end and resumable: name the features of the offline default SAE, evaluate every
name on held-out images, and build the results dataset, tables and figures.

    python hub_scripts/run_naming_offline.py --wait             # waits for run_offline_default.py's blocks.14 SAE
    python hub_scripts/run_naming_offline.py --nproc 2          # stages sharded over 2 processes (RANK / WORLD_SIZE)

Inputs (from hub_scripts/run_offline_default.py): RUN/sae/LAYER/sae (the SAE), RUN/stats/LAYER (its feature
statistics), RUN/acts/LAYER (the activation store). Stages, each resuming where it stopped:
  1. name      mils, top_label and random for --n-features features (hub_scripts/name_features.py);
  2. evaluate  CoSy per feature per method on held-out renders, MS of SAE features vs raw channels
               (hub_scripts/evaluate_names.py);
  3. build     the dataset in OUT, WORK/results.md, figures in FIGURES (hub_scripts/build_results.py);
  4. mils_gemma (Gemma-3-270M) for the first --gemma-features features, then evaluate and build again.
Wall time per stage goes to WORK/timing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def wait_for(paths: list[Path], every_s: float, timeout_s: float) -> None:
    t0 = time.monotonic()
    while True:
        missing = [p for p in paths if not p.exists()]
        if not missing:
            return
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"still missing after {timeout_s:.0f} s: {[str(p) for p in missing]}; run "
                             "hub_scripts/run_offline_default.py first")
        print(f"waiting for {[str(p) for p in missing]} (checking every {every_s:.0f} s)", flush=True)
        time.sleep(every_s)


def run_sharded(script: str, args: list[str], nproc: int, threads: int) -> None:
    """Run a stage script as `nproc` processes with RANK / WORLD_SIZE set (what torchrun would set)."""
    procs = []
    for r in range(nproc):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": str(threads)}
        procs.append(subprocess.Popen([sys.executable, str(HERE / script), *args, "--threads", str(threads)], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{script} failed on ranks {[r for r, c in enumerate(codes) if c]}: re-run to resume")


def main(argv=None):
    from nacosae.evaluate import NamingRun, add_config_arguments, build_results, config_from_args
    from nacosae.naming.report import results_markdown
    from nacosae.io import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/offline_default", help="output folder of run_offline_default.py")
    ap.add_argument("--layer", default="blocks.14", help="the SAE's layer (default: %(default)s)")
    ap.add_argument("--work", default=None, help="work folder (default: runs/naming/LAYER)")
    ap.add_argument("--out", default=None, help="dataset folder (default: runs/results/LAYER)")
    ap.add_argument("--figures", default="docs/figures/naming", help="figures folder (default: %(default)s)")
    ap.add_argument("--skip-gemma", action="store_true", help="do not run the Gemma-3-270M proposer")
    ap.add_argument("--all-features", action="store_true", help="dataset rows for every SAE feature, not only the named")
    ap.add_argument("--nproc", type=int, default=1, help="processes per stage (default: %(default)s: in this process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    ap.add_argument("--wait", action="store_true", help="wait (checking every 60 s) until the SAE and its stats exist")
    ap.add_argument("--wait-timeout", type=float, default=4 * 3600, help="seconds to wait at most (default: %(default)s)")
    ap.add_argument("--thumb-dir", default=None, help="thumbnail cache (default: $NACOSAE_CACHE/thumbnails)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = ap.add_argument_group("run settings (NamingRunConfig); --sae/--stats/--store default to the RUN folder")
    add_config_arguments(group)
    args = ap.parse_args(argv)
    run_dir = Path(args.run)
    args.sae = args.sae or str(run_dir / "sae" / args.layer / "sae")
    args.stats = args.stats or str(run_dir / "stats" / args.layer)
    args.store = args.store or str(run_dir / "acts" / args.layer)
    work = Path(args.work or f"runs/naming/{args.layer}")
    out = Path(args.out or f"runs/results/{args.layer}")
    if args.wait:
        wait_for([Path(args.sae) / "model.safetensors", Path(args.stats) / "feature_stats.json",
                  Path(args.stats) / "feature_stats.safetensors"], 60, args.wait_timeout)
    torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    gemma = not args.skip_gemma and cfg.gemma_features > 0
    timing_path = work / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}

    def stage(name, fn):
        t0 = time.perf_counter()
        fn()
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - t0
        atomic_write_json(timing_path, timing)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)

    common = ["--work", str(work)] + (["--thumb-dir", args.thumb_dir] if args.thumb_dir else []) + \
        (["--no-progress"] if args.no_progress else [])
    cfg_args = [a for k, v in cfg.to_dict().items() if v is not None for a in ("--" + k.replace("_", "-"), str(v))]
    run = None

    def name(method):
        if args.nproc > 1:
            run_sharded("name_features.py", common + cfg_args + ["--methods", method], args.nproc, args.threads)
        else:
            run.name_features(method)

    def evaluate():
        if args.nproc > 1:
            run_sharded("evaluate_names.py", common, args.nproc, args.threads)
        else:
            run.evaluate()
            run.monosemanticity()

    summary = {}

    def build():
        summary.clear()
        summary.update(build_results(run, out, args.figures, all_features=args.all_features))

    if args.nproc > 1:  # the first stage writes WORK/setup.json; this process then reads the finished shards
        stage("name_mils", lambda: name("mils"))
    run = NamingRun(cfg, work, progress=not args.no_progress, thumb_dir=args.thumb_dir)
    # the cheap methods first and a complete dataset without Gemma, so a slow LLM stage never holds the results back
    for m in ("mils", "top_label", "random"):
        stage(f"name_{m}", lambda m=m: name(m))
    stage("evaluate", evaluate)
    stage("build", build)
    if gemma:
        stage("name_mils_gemma", lambda: name("mils_gemma"))
        stage("evaluate_gemma", evaluate)
        stage("build_gemma", build)
    print(results_markdown(summary))
    print(f"dataset: {out} ({summary['n_rows']} features, {summary['n_images']} images); timing (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in timing.items()))


if __name__ == "__main__":
    main()
