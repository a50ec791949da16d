#!/usr/bin/env python
"""The small-network lab (docs/lab.md): look inside a small classifier, find what reacts to a planted cue, switch it
off, and train with what was found.

    python hub_scripts/lab.py experiment --seeds 3 --out runs/lab --figures docs/figures/lab
    python hub_scripts/lab.py figures --run runs/lab --out docs/figures/lab
    python hub_scripts/lab.py structure --model cnn --out runs/structure            # any of cnn / mlp / vit
    python hub_scripts/lab.py structure --run runs/lab --stat monosemanticity --out runs/structure

`experiment` runs on CPU in minutes (Fashion-MNIST from the Debian package dataset-fashion-mnist; a 20k-image subset
of the training split by default). Killed? Run the same command again: finished runs are kept and skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _experiment(args) -> None:
    from nacosae.lab.data import CueDataConfig
    from nacosae.lab.figures import make_figures
    from nacosae.lab.regularize import METHODS, LabConfig, run_experiment

    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    cfg = LabConfig(
        seeds=tuple(range(args.seed0, args.seed0 + args.seeds)),
        methods=methods,
        data=CueDataConfig(target_class=args.target_class, p_target=args.p_target, p_other=args.p_other, n_train=args.n_train),
        epochs=args.epochs,
        ft_epochs=args.ft_epochs,
        threads=args.threads,
    )
    summary = run_experiment(cfg, args.out, progress=not args.no_progress)
    print(format_summary(summary))
    if args.figures:
        paths = make_figures(args.out, args.figures, progress=not args.no_progress)
        print(f"{len(paths)} figures in {args.figures}; interactive structure view: {Path(args.out) / 'structure.html'}")


def format_summary(summary: dict) -> str:
    """Plain-text tables of the experiment's numbers (mean ± std over seeds)."""
    from nacosae.lab.figures import INTERVENTION_ORDER, METHOD_LABELS

    keys = ("acc_iid", "acc_clean", "acc_flipped", "hijack", "target_recall_clean", "density", "ms_mean", "n_cue_sites")
    lines = [f"{'method':<22}" + "".join(f"{k:>22}" for k in keys)]
    from nacosae.lab.regularize import METHODS

    for m in [m for m in METHODS if m in summary["methods"]]:
        row = summary["methods"][m]
        lines.append(f"{METHOD_LABELS.get(m, m):<22}" + "".join(f"{row[k]['mean']:>14.3f} ± {row[k]['std']:.3f}" for k in keys))
    lines.append("")
    ikeys = ("acc_iid", "acc_clean", "acc_flipped", "hijack")
    lines.append(f"{'intervention (baseline, no retraining)':<60}" + "".join(f"{k:>22}" for k in ikeys))
    rows = summary["interventions"]
    for name in [k for k in INTERVENTION_ORDER if k in rows] + [k for k in rows if k not in INTERVENTION_ORDER]:
        lines.append(f"{name:<60}" + "".join(f"{rows[name][k]['mean']:>14.3f} ± {rows[name][k]['std']:.3f}" for k in ikeys))
    lines.append(f"wall time {summary.get('wall_s', float('nan')):.0f} s")
    return "\n".join(lines)


def _figures(args) -> None:
    from nacosae.lab.figures import make_figures

    paths = make_figures(args.run, args.out, progress=not args.no_progress)
    print("\n".join(map(str, paths)))


def _structure(args) -> None:
    from nacosae.io import atomic_write_json, atomic_write_text
    from nacosae.lab.structure import render_html, render_png
    from nacosae.lab.view import structure_view

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    graph, stats, stat_name, title = structure_view(
        None if args.run else args.model, args.stat, run_dir=args.run or None, n_probe=args.n_probe, width=args.width,
        trace=args.trace,
    )
    atomic_write_json(out / "structure.json", graph.to_dict())
    atomic_write_text(out / "structure.html", render_html(graph, stats, stat_name, title=title, hide=("param",)))
    render_png(graph, stats, out / "structure.png", stat_name, title=title, hide=("param",))
    print(graph.summary())
    print(f"wrote {out}/structure.json, structure.html, structure.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("experiment", help="plant the cue, train, detect, intervene, compare training methods")
    e.add_argument("--seeds", type=int, default=3, help="number of model seeds (default 3)")
    e.add_argument("--seed0", type=int, default=0, help="first seed")
    e.add_argument("--out", default="runs/lab", help="run folder (resumable)")
    e.add_argument("--figures", default="", help="also draw the figures into this folder (e.g. docs/figures/lab)")
    e.add_argument("--methods", default="", help="comma-separated subset of the training methods (default: all)")
    e.add_argument("--n-train", type=int, default=20000, help="training images (a class-balanced subset of the 60k)")
    e.add_argument("--epochs", type=int, default=4, help="epochs of the from-scratch methods")
    e.add_argument("--ft-epochs", type=int, default=1, help="epochs of the fine-tuned methods")
    e.add_argument("--target-class", type=int, default=6, help="class the cue co-occurs with (6 = Shirt)")
    e.add_argument("--p-target", type=float, default=0.9, help="share of target-class training images with the cue")
    e.add_argument("--p-other", type=float, default=0.01, help="share of other training images with the cue")
    e.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=_experiment)

    f = sub.add_parser("figures", help="redraw the figures of a finished experiment")
    f.add_argument("--run", default="runs/lab", help="experiment folder")
    f.add_argument("--out", default="docs/figures/lab", help="figure folder")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=_figures)

    s = sub.add_parser("structure", help="trace a model and draw its structure (JSON + interactive HTML/SVG + PNG)")
    s.add_argument("--model", choices=("cnn", "mlp", "vit"), default="cnn", help="built-in model (random weights) when --run is not given")
    s.add_argument("--width", type=int, default=0, help="model width (0: the lab default)")
    s.add_argument("--run", default="", help="use the trained seed-0 baseline of this experiment folder instead")
    s.add_argument("--stat", default="", choices=("", "mean", "firing_rate", "dead", "attribution", "monosemanticity"),
                   help="colour units by this statistic over --n-probe Fashion-MNIST test images (monosemanticity: against centred raw pixels)")
    s.add_argument("--n-probe", type=int, default=1000, help="test images the statistic is computed over (default 1000)")
    s.add_argument("--trace", default="auto", choices=("auto", "fx", "hooks"), help="tracing method")
    s.add_argument("--out", default="runs/structure", help="output folder")
    s.set_defaults(func=_structure)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
