"""The structure view of one lab model, ready to draw: build (or load) a model, trace it, colour its units by a statistic.

    graph, stats, stat_name, title = structure_view("cnn", "firing_rate")             # seeded, untrained
    graph, stats, stat_name, title = structure_view(None, "mean", run_dir="runs/lab")   # trained seed-0 baseline
    html = structure_view_html("vit", "dead")                                          # SVG + text summary (the app)

Shared by `hub_scripts/lab.py structure` and the app's "Lab" tab. UI-free: errors are ValueError /
FileNotFoundError with a message that says what to fix.
"""

from __future__ import annotations

import html as _html
import json
from pathlib import Path

import torch
from torch import nn

from .models import MODEL_KINDS, ModelConfig, build_model
from .probe import STATISTICS
from .structure import LayerGraph, render_svg, trace_model

# the 'dead' and 'firing_rate' statistics read post-activation modules; these are the ones the lab models use
_ACTIVATIONS = ("ReLU", "GELU")


def default_width(model_kind: str) -> int:
    """The lab's default width of an untrained model: the ViT needs a token width that divides into its heads."""
    return 32 if model_kind == "vit" else 8


def run_model_kind(run_dir: str | Path) -> str | None:
    """The model kind of a lab experiment folder, or None when it holds no readable config.json."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["model"]["kind"]
    except (ValueError, KeyError, TypeError):
        return None


def load_run_model(run_dir: str | Path) -> tuple[nn.Module, list[str]]:
    """The trained baseline of the first seed of a lab experiment folder, and the layers it analyses."""
    from safetensors.torch import load_file

    from .figures import load_config

    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: run `python hub_scripts/lab.py experiment --out {run}` first")
    cfg = load_config(json.loads(cfg_path.read_text()))
    weights = run / f"seed{cfg.seeds[0]}" / "baseline.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the experiment in {run} has not finished its first seed; run it again")
    model = build_model(cfg.model)
    model.load_state_dict(load_file(weights))
    return model, list(cfg.analyse_layers)


def probe_images(n_probe: int) -> torch.Tensor:
    """The first `n_probe` Fashion-MNIST test images (N, 1, 28, 28)."""
    from .data import load_fashion_mnist

    if n_probe < 1:
        raise ValueError(f"n_probe must be ≥ 1, got {n_probe}")
    x, _ = load_fashion_mnist("test")
    return x[:n_probe]


def unit_statistic(model: nn.Module, graph: LayerGraph, stat: str, layers: list[str] | None, n_probe: int = 1000) -> dict:
    """Colour units with a statistic over Fashion-MNIST test images (MS uses raw pixels as the other 'encoder').

    layers: None = every post-activation module with units.
    """
    from .probe import layer_statistic

    probe = probe_images(n_probe)
    if layers is None:
        layers = [n.name for n in graph.nodes if n.op == "module" and n.kind in _ACTIVATIONS and n.n_units]
    # raw pixels, centred (non-negative vectors would give every pair a positive cosine), as the 'other encoder'
    emb = probe.flatten(1) - probe.flatten(1).mean(0) if stat == "monosemanticity" else None
    return layer_statistic(model, stat, layers, probe_x=probe, emb_NE=emb, x_one=probe[:1])


def structure_view(
    model_kind: str | None = "cnn",
    stat: str = "mean",
    run_dir: str | Path | None = None,
    n_probe: int = 256,
    width: int = 0,
    trace: str = "auto",
) -> tuple[LayerGraph, dict | None, str, str]:
    """(graph, stats, stat_name, title) of one lab model, for `render_svg` / `render_html` / `render_png`.

    model_kind: 'cnn', 'mlp' or 'vit'; with `run_dir` it must match the run's model (None: take the run's).
    stat: one of probe.STATISTICS, or '' for no colouring.
    run_dir: a lab experiment folder: its trained seed-0 baseline; None: a model with seed-0 random weights.
    n_probe: Fashion-MNIST test images the statistic is computed over.
    width: width of the untrained model (0: the lab default); ignored with `run_dir`.
    """
    if model_kind is not None and model_kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {model_kind!r}: choose one of {', '.join(MODEL_KINDS)}")
    if stat and stat not in STATISTICS:
        raise ValueError(f"unknown statistic {stat!r}: choose one of {', '.join(STATISTICS)} (or '' for none)")
    if run_dir is not None:
        kind = run_model_kind(run_dir)
        if model_kind is not None and kind is not None and kind != model_kind:
            raise ValueError(f"{run_dir} holds a {kind} model, not a {model_kind}: pick {kind}, or leave out the run folder")
        model, layers = load_run_model(run_dir)
        source = f"trained baseline from {Path(run_dir).name}"
    else:
        if model_kind is None:
            raise ValueError("give a model kind (cnn, mlp or vit) or a run folder")
        if width < 0:
            raise ValueError(f"width must be ≥ 0 (0: the lab default), got {width}")
        torch.manual_seed(0)
        model = build_model(ModelConfig(kind=model_kind, width=width or default_width(model_kind)))
        layers = None
        source = "untrained, seed 0"
    model.eval()
    graph = trace_model(model, torch.zeros(1, 1, 28, 28), method=trace)
    stats = unit_statistic(model, graph, stat, layers, n_probe) if stat else None
    title = f"{graph.model_name} ({source})" + (f": units coloured by {stat}" if stat else "")
    return graph, stats, stat, title


def structure_view_html(model_kind: str = "cnn", stat: str = "mean", run_dir: str | Path | None = None, n_probe: int = 256) -> str:
    """An HTML fragment for the app: the scrollable SVG drawing (hover a cell for its value) and the text summary."""
    graph, stats, stat_name, title = structure_view(model_kind, stat, run_dir, n_probe)
    svg = render_svg(graph, stats, stat_name, title, hide=("param",))
    return (f"<div style='overflow:auto;max-height:80vh'>{svg}</div>"
            f"<pre style='font-size:12px'>{_html.escape(graph.summary())}</pre>")
