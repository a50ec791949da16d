"""Figures of the lab experiment, made from a finished run folder (`regularize.run_experiment`).

    make_figures("runs/lab", "docs/figures/lab")   # PNGs for the docs; the interactive structure view goes to the run folder

Everything is recomputed from the saved seed-0 baseline, its SAE and results.json, so the figures can be redrawn
without retraining.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from nacosae.io import atomic_write_json, atomic_write_text
from nacosae.lab._plot import plt, save_fig
from nacosae.lab.cue import find_cue_units, paired_probe, sae_codes
from nacosae.lab.data import CLASSES, CueDataConfig, CueSpec, make_cue_data
from nacosae.lab.intervene import clamp_sites, evaluate
from nacosae.lab.models import ModelConfig, SmallMLP, build_model
from nacosae.lab.probe import integrated_gradients, layer_statistic, predict, record_activations, unit_attribution
from nacosae.lab.regularize import METHODS, LabConfig, reference_embeddings
from nacosae.lab.structure import render_html, render_png, render_svg, trace_model

METHOD_LABELS = {
    "baseline": "baseline",
    "l2_dropout": "L2 + dropout",
    "act_l1": "activation L1",
    "ft_control": "+1 epoch (control)",
    "prune_cue": "prune cue sites",
    "prune_region": "prune cue region",
    "penalize_cue": "penalise cue sites",
    "cue_augment": "data fix (reference)",
}


METHOD_COLOURS = {
    "baseline": "#7f7f7f", "ft_control": "#7f7f7f",  # baseline and its compute-matched control
    "l2_dropout": "#1f77b4", "act_l1": "#1f77b4",  # generic regularisers
    "prune_cue": "#d62728", "prune_region": "#d62728", "penalize_cue": "#d62728",  # interpretability-guided
    "cue_augment": "#2ca02c",  # data fix
}


def load_config(d: dict[str, Any]) -> LabConfig:
    """LabConfig from its saved dict (nested dataclasses rebuilt)."""
    data = dict(d["data"])
    data["cue"] = CueSpec(**data["cue"])
    return LabConfig(**{**d, "seeds": tuple(d["seeds"]), "methods": tuple(d["methods"]), "data": CueDataConfig(**data),
                        "model": ModelConfig(**d["model"]), "control": CueSpec(**d["control"]),
                        "analyse_layers": tuple(d["analyse_layers"]), "steer_alphas": tuple(d["steer_alphas"])})


def make_figures(run_dir: str | Path, fig_dir: str | Path, progress: bool = True) -> list[Path]:
    """Draw every figure of docs/lab.md into `fig_dir`; the interactive structure view (HTML/SVG/JSON) into `run_dir`."""
    from nacosae.sae import SAE

    run, figs = Path(run_dir), Path(fig_dir)
    res_path = run / "results.json"
    if not res_path.exists():
        raise FileNotFoundError(f"{res_path} not found: run `hub_scripts/lab.py experiment --out {run}` first")
    res = json.loads(res_path.read_text())
    cfg = load_config(res["config"])
    torch.set_num_threads(cfg.threads)
    seed = cfg.seeds[0]
    data = make_cue_data(cfg.data)
    probe_x = data.extra_x[: cfg.n_probe]
    model = build_model(cfg.model)
    model.load_state_dict(load_file(run / f"seed{seed}" / "baseline.safetensors"))
    model.eval()
    sae = SAE.from_pretrained(run / f"seed{seed}" / "sae")
    ref = SmallMLP(ModelConfig(kind="mlp", width=16, hidden=64))
    ref.load_state_dict(load_file(run / "reference_mlp.safetensors"))
    emb_NE = reference_embeddings(ref, probe_x)
    ana = next(a for a in res["analyses"] if a["seed"] == seed)
    out: list[Path] = []

    # the example used throughout: a non-target test image that the mark turns into the target class
    t = cfg.data.target_class
    x_flip, y_flip = data.test_set("flipped")
    x_clean, _ = data.test_set("clean")
    pred_flip = predict(model, x_flip).argmax(-1)
    pred_clean = predict(model, x_clean).argmax(-1)
    hijacked = torch.nonzero((y_flip != t) & (pred_flip == t) & (pred_clean == y_flip)).flatten()
    ex = int(hijacked[0]) if hijacked.numel() else 0

    out.append(_cue_examples(data, cfg, model, figs / "cue_examples.png"))
    out += _structure(model, cfg, ana, probe_x, emb_NE, x_flip[ex : ex + 1], run, figs)
    out.append(_site_maps(model, cfg, probe_x, figs / "site_maps.png"))
    out.append(_attribution(model, cfg, ana, x_flip[ex : ex + 1], x_clean[ex : ex + 1], int(y_flip[ex]), figs / "attribution.png"))
    out.append(_top_inputs(model, sae, cfg, ana, probe_x, figs / "top_inputs.png"))
    out.append(_interventions(res, figs / "interventions.png"))
    out.append(_steering(res, cfg, figs / "steering.png"))
    out.append(_confusion(model, data, cfg, ana, figs / "confusion.png"))
    out.append(_methods(res, figs / "methods.png"))
    return out


# ---------------------------------------------------------------------------------------------------- figures
def _cue_examples(data, cfg: LabConfig, model, path: Path) -> Path:
    t = cfg.data.target_class
    rows = []
    tr_t = torch.nonzero((data.train_y == t) & data.train_cue).flatten()[:4]
    tr_o = torch.nonzero((data.train_y != t) & ~data.train_cue).flatten()[:4]
    rows.append(("training: target class, marked", data.train_x[tr_t], data.train_y[tr_t]))
    rows.append(("training: other classes, unmarked", data.train_x[tr_o], data.train_y[tr_o]))
    xf, yf = data.test_set("flipped")
    idx_o = torch.nonzero(yf != t).flatten()[:4]
    idx_t = torch.nonzero(yf == t).flatten()[:4]
    rows.append(("flipped test: other classes, marked", xf[idx_o], yf[idx_o]))
    rows.append(("flipped test: target class, unmarked", xf[idx_t], yf[idx_t]))
    fig, axes = plt.subplots(len(rows), 4, figsize=(7.2, 8.2))
    for r, (title, xs, ys) in enumerate(rows):
        preds = predict(model, xs).argmax(-1)
        for c in range(4):
            ax = axes[r, c]
            ax.imshow(xs[c, 0], cmap="gray", vmin=0, vmax=1)
            colour = "green" if preds[c] == ys[c] else "red"
            ax.set_title(f"{CLASSES[ys[c]]}\n→ {CLASSES[preds[c]]}", fontsize=8, color=colour)
            ax.axis("off")
        axes[r, 0].text(-0.15, 0.5, title, transform=axes[r, 0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle(f"The planted cue: a {cfg.data.cue.size}×{cfg.data.cue.size} mark at the top-left (label → baseline prediction)", fontsize=9)
    save_fig(fig, path)
    return path


def _structure(model, cfg: LabConfig, ana, probe_x, emb_NE, x_one, run: Path, figs: Path) -> list[Path]:
    graph = trace_model(model, probe_x[:1], name="SmallCNN (lab baseline, seed 0)")
    atomic_write_json(run / "structure.json", graph.to_dict())
    layers = list(cfg.analyse_layers)
    _, unit_scores = find_cue_units(model, probe_x, cfg.data.cue, layers, reduce="max", full_auc=True)
    stats = {
        "cue AUC": {k: v["auc"] for k, v in unit_scores.items()},
        "attribution": {**layer_statistic(model, "attribution", layers, x_one=x_one),
                        graph.nodes[0].name: integrated_gradients(model, x_one, n_steps=32)[0, 0]},
        "monosemanticity": layer_statistic(model, "monosemanticity", layers, probe_x, emb_NE),
        "mean": layer_statistic(model, "mean", layers, probe_x),
        "dead": layer_statistic(model, "dead", layers, probe_x),
    }
    hide = ("param",)
    svgs = [render_svg(graph, s, name, title=f"units coloured by {name}", hide=hide) for name, s in stats.items()]
    page = render_html(graph, stats["cue AUC"], "cue AUC", title="SmallCNN: units coloured by cue AUC", hide=hide)
    page = page.replace("</body>", "".join(f"<div style='overflow:auto'>{s}</div>" for s in svgs[1:]) + "</body>")
    atomic_write_text(run / "structure.html", page)
    paths = []
    for name in ("cue AUC", "attribution", "monosemanticity"):
        fname = f"structure_{name.replace(' ', '_').lower()}.png"
        extra = " (input: integrated gradients of the predicted class)" if name == "attribution" else ""
        render_png(graph, stats[name], figs / fname, name, title=f"{graph.model_name}: units coloured by {name}{extra}", hide=hide)
        paths.append(figs / fname)
    return paths


def _site_maps(model, cfg: LabConfig, probe_x, path: Path) -> Path:
    _, scores = find_cue_units(model, probe_x, cfg.data.cue, ["act1", "act2"], reduce="none", min_effect=cfg.min_effect, min_auc=cfg.min_auc,
                               control=cfg.control, max_control_ratio=cfg.max_control_ratio)
    fig, axes = plt.subplots(2, 1, figsize=(10, 3.6))
    for ax, layer in zip(axes, ("act1", "act2")):
        C, H, W = scores[layer]["shape"].tolist()
        eff = scores[layer]["effect"].reshape(C, H, W).clamp(min=0).numpy()
        tiles = np.concatenate([np.pad(np.log1p(e), 1, constant_values=np.nan) for e in eff], axis=1)
        im = ax.imshow(tiles, cmap="magma")
        ax.set_title(f"{layer}: log(1 + cue effect) per site, one tile per channel ({C} channels of {H}×{W})", fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.02)
    save_fig(fig, path)
    return path


def _attribution(model, cfg: LabConfig, ana, x_one, x_clean_one, label: int, path: Path) -> Path:
    t = cfg.data.target_class
    pred = int(predict(model, x_one).argmax(-1))
    ig_pred = integrated_gradients(model, x_one, target=pred, n_steps=64)[0, 0]
    ig_true = integrated_gradients(model, x_one, target=label, n_steps=64)[0, 0]
    ua = unit_attribution(model, x_one, ["act3"], target=pred)["act3"][0]
    ua_clean = unit_attribution(model, x_clean_one, ["act3"], target=pred)["act3"][0]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), gridspec_kw={"width_ratios": [1, 1, 1, 2.4]})
    axes[0].imshow(x_one[0, 0], cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(f"{CLASSES[label]} + mark → {CLASSES[pred]}", fontsize=9)
    for ax, ig, name in ((axes[1], ig_pred, CLASSES[pred]), (axes[2], ig_true, CLASSES[label])):
        m = float(ig.abs().max()) or 1.0
        ax.imshow(ig, cmap="RdBu_r", vmin=-m, vmax=m)
        ax.set_title(f"integrated gradients\nof the '{name}' logit", fontsize=9)
    for ax in axes[:3]:
        ax.axis("off")
    top = [u["unit"] for u in ana["top_units"]["act3"][:3]]
    xs = np.arange(ua.numel())
    axes[3].bar(xs - 0.2, ua.numpy(), width=0.4, label="with mark", color="#d62728")
    axes[3].bar(xs + 0.2, ua_clean.numpy(), width=0.4, label="same image, no mark", color="#7f7f7f")
    for u in top:
        axes[3].annotate("cue", (u, max(ua[u].item(), 0)), ha="center", fontsize=7, color="#d62728")
    axes[3].set_title(f"act3 units: gradient × activation of the '{CLASSES[pred]}' logit", fontsize=9)
    axes[3].set_xlabel("unit", fontsize=8)
    axes[3].legend(fontsize=7)
    save_fig(fig, path)
    return path


def _top_inputs(model, sae, cfg: LabConfig, ana, probe_x, path: Path) -> Path:
    # a probe set where half the images carry the mark: the top inputs show whether a unit reads the mark
    n = min(1000, probe_x.shape[0])
    on, off = paired_probe(probe_x[:n], cfg.data.cue)
    mixed = torch.cat([on[: n // 2], off[n // 2 :]])
    is_on = torch.arange(n) < n // 2
    acts, _ = record_activations(model, mixed, ["act3"])
    rows = []
    u = ana["top_units"]["act3"][0]["unit"]
    rows.append((f"act3 unit {u} (strongest cue effect)", acts["act3"][:, u]))
    if ana["features"]:
        j = ana["features"][0]["unit"]
        codes = sae_codes(model, sae, cfg.sae_layer, mixed).amax(1)
        rows.append((f"SAE feature {j} on {cfg.sae_layer} (cue feature)", codes[:, j]))
    fig = plt.figure(figsize=(12, 1.9 * len(rows) + 0.4))
    gs = fig.add_gridspec(len(rows), 9, width_ratios=[1] * 8 + [3], hspace=0.45)
    for r, (name, a) in enumerate(rows):
        order = torch.sort(-a, stable=True).indices[:8]
        for c, i in enumerate(order.tolist()):
            ax = fig.add_subplot(gs[r, c])
            ax.imshow(mixed[i, 0], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{a[i]:.2f}{' ■' if is_on[i] else ''}", fontsize=7)
            ax.axis("off")
        ax = fig.add_subplot(gs[r, 8])
        bins = np.linspace(0, float(a.max()) + 1e-6, 30)
        ax.hist(a[is_on].numpy(), bins=bins, alpha=0.6, label="with mark", color="#d62728")
        ax.hist(a[~is_on].numpy(), bins=bins, alpha=0.6, label="without", color="#7f7f7f")
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=6)
    fig.suptitle("Top-8 probe inputs (■ = carries the mark; half of the probe set does) and activation histograms", fontsize=9)
    save_fig(fig, path)
    return path


def _bar_rows(summary_rows: dict[str, dict[str, Any]], keys, labels, path: Path, title: str, order=None) -> Path:
    names = order or list(summary_rows)
    fig, ax = plt.subplots(figsize=(10, 0.2 * len(keys) * len(names) + 1.5))
    y = np.arange(len(names))
    h = 0.8 / len(keys)
    colours = ["#9ecae1", "#1f77b4", "#d62728", "#ff7f0e"]
    for i, (k, lab) in enumerate(zip(keys, labels)):
        means = [summary_rows[n][k]["mean"] for n in names]
        stds = [summary_rows[n][k]["std"] for n in names]
        ax.barh(y + i * h, means, h, xerr=stds, label=lab, color=colours[i % 4], capsize=2)
    ax.set_yticks(y + h * (len(keys) - 1) / 2, [METHOD_LABELS.get(n, n) for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    save_fig(fig, path)
    return path


INTERVENTION_ORDER = (
    "none",
    "ablate N cue sites of act2",
    "ablate N random sites of act2 (control)",
    "ablate N cue sites of act1",
    "ablate all act2 channels at the N cue positions",
    "ablate top-3 act3 units by cue effect",
    "SAE: ablate N cue features",
    "SAE: ablate N random features (control)",
    "SAE: ablate N cue (feature, position) pairs",
    "SAE: ablate N other features at those positions (control)",
)


def _interventions(res, path: Path) -> Path:
    rows = res["summary"]["interventions"]
    n = rows["none"]["acc_clean"]["n"]
    order = [k for k in INTERVENTION_ORDER if k in rows] + [k for k in rows if k not in INTERVENTION_ORDER]
    return _bar_rows(rows, ("acc_iid", "acc_clean", "acc_flipped", "hijack"), ("iid accuracy", "clean accuracy", "flipped accuracy", "hijack rate"),
                     path, f"Interventions on the trained baseline, no retraining (mean ± std over {n} seeds)", order=order)


def _steering(res, cfg: LabConfig, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    for i, a in enumerate(res["analyses"]):
        colour = f"C{i}"
        curve = a["steering"].get("sae_curve")
        if curve:
            ax.plot([c["alpha"] for c in curve], [c["hijack_clean"] for c in curve], "o-", color=colour,
                    label=f"seed {a['seed']}: steer {a['steering']['n_sae_sites']} SAE sites")
        for key, ls in (("clamp cue sites to their cued mean", "--"), ("clamp SAE cue sites to their cued mean", ":")):
            if key in a["steering"]:
                ax.axhline(a["steering"][key]["hijack_clean"], ls=ls, lw=0.9, color=colour)
    base = res["summary"]["interventions"]["none"]["hijack"]["mean"]
    ax.axhline(base, color="k", lw=0.6)
    ax.text(0, base, " the pixel mark itself", fontsize=7, va="bottom")
    t = CLASSES[cfg.data.target_class]
    ax.set_xlabel("α: h + α·Σ Δf(j,p)·W_dec,j at the cue's SAE sites (α = 1: the mark's mean code change)", fontsize=8)
    ax.set_ylabel(f"clean non-{t} images predicted {t}", fontsize=8)
    ax.set_title("Steering clean images without touching pixels\n(dashed: clamp unit sites to cued mean; dotted: clamp SAE sites)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_fig(fig, path)
    return path


def _confusion(model, data, cfg: LabConfig, ana, path: Path) -> Path:
    x, y = data.test_set("flipped")
    det = [s["flat"] for s in ana["sites"] if s["layer"] == cfg.detect_layer]
    before = evaluate(model, x, y, n_classes=10).confusion.numpy()
    after = evaluate(model, x, y, {cfg.detect_layer: clamp_sites(det)}, n_classes=10).confusion.numpy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, m, title in ((axes[0], before, "baseline"), (axes[1], after, f"cue sites of {cfg.detect_layer} ablated ({len(det)})")):
        norm = m / m.sum(1, keepdims=True).clip(min=1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(10):
            for j in range(10):
                if norm[i, j] >= 0.05:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(10), [c[:7] for c in CLASSES], rotation=60, fontsize=7)
        ax.set_yticks(range(10), [c[:7] for c in CLASSES], fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_title(f"flipped test set: {title}", fontsize=9)
    axes[0].set_ylabel("true", fontsize=8)
    save_fig(fig, path)
    return path


def _methods(res, path: Path) -> Path:
    summ = res["summary"]["methods"]
    names = [m for m in METHODS if m in summ]
    panels = [("acc_clean", "clean accuracy"), ("acc_flipped", "flipped accuracy"), ("hijack", "hijack rate"),
              ("target_recall_clean", "target recall (clean)"), ("density", "act3 density"), ("ms_mean", "act3 mean MS")]
    runs = res["runs"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (k, title) in zip(axes.ravel(), panels):
        means = [summ[n][k]["mean"] for n in names]
        stds = [summ[n][k]["std"] for n in names]
        x = np.arange(len(names))
        ax.bar(x, means, yerr=stds, capsize=3, color=[METHOD_COLOURS[n] for n in names])
        for i, n in enumerate(names):
            vals = [r[k] for r in runs if r["method"] == n]
            ax.plot([i] * len(vals), vals, "k.", ms=3)
        ax.set_xticks(x, [METHOD_LABELS.get(n, n) for n in names], rotation=40, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    n = summ["baseline"]["acc_clean"]["n"]
    fig.suptitle(f"Training methods (mean ± std over {n} seeds, dots = seeds; grey: baseline/control, blue: generic regularisers, "
                 "red: interpretability-guided, green: data fix)", fontsize=9)
    fig.tight_layout()
    save_fig(fig, path)
    return path
