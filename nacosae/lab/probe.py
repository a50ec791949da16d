"""Inside the model: per-unit activations, their statistics, top inputs, histograms, and attribution for one input.

A *unit* is a channel of a conv output (B, C, H, W), a neuron of a linear output (B, D), or a feature dimension of
token outputs (B, T, D). Image-level unit activations reduce the spatial / token axes: max by default (METHODS §2:
"max over patches", which keeps a unit that fires on a small mark from being diluted by the rest of the image).

Layers are named by module qualified names (the names `structure.trace_model` gives module nodes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from nacosae.metrics import monosemanticity_score

REDUCTIONS = ("max", "mean", "none")


def _modules(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    missing = [name for name in layers if name not in named]
    if missing:
        hookable = [n for n in named if n]
        raise KeyError(f"layers {missing} are not modules of {type(model).__name__}; hookable names: {hookable}")
    return {name: named[name] for name in layers}


def reduce_units(acts: Tensor, reduce: str = "max") -> Tensor:
    """(B, C, H, W) → (B, C) and (B, T, D) → (B, D) by max or mean over positions; (B, D) unchanged; 'none' keeps all."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if reduce == "none" or acts.dim() == 2:
        return acts
    if acts.dim() == 4:
        flat = acts.flatten(2)  # (B, C, HW)
        return flat.amax(-1) if reduce == "max" else flat.mean(-1)
    if acts.dim() == 3:
        return acts.amax(1) if reduce == "max" else acts.mean(1)
    raise ValueError(f"cannot reduce an activation of shape {tuple(acts.shape)} to units")


@torch.no_grad()
def record_activations(
    model: nn.Module,
    x_N: Tensor,
    layers: Sequence[str],
    reduce: str = "max",
    batch_size: int = 512,
    edits: dict[str, Callable[[Tensor], Tensor]] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Run `model` over `x_N` in batches; return ({layer: (N, U) unit activations}, logits (N, n_classes)).

    `edits` (layer → function of the layer's output) are applied during the run, so edited downstream layers
    are recorded as the edited model computes them.
    """
    from nacosae.lab.intervene import hooked  # one hook mechanism for recording and editing

    was_training = model.training
    model.eval()
    store: dict[str, list[Tensor]] = {name: [] for name in layers}
    logits = []
    try:
        for start in range(0, x_N.shape[0], batch_size):
            with hooked(model, edits or {}, record=list(layers)) as rec:
                logits.append(model(x_N[start : start + batch_size]))
            for name in layers:
                store[name].append(reduce_units(rec[name], reduce))
    finally:
        model.train(was_training)
    return {name: torch.cat(v) for name, v in store.items()}, torch.cat(logits)


# ---------------------------------------------------------------------------------------------------- statistics
def unit_statistics(acts_NU: Tensor, eps: float = 0.0) -> dict[str, Tensor]:
    """Per-unit mean, std, max, firing rate (fraction of inputs with activation > eps) and dead (never fires)."""
    if acts_NU.dim() != 2 or acts_NU.shape[0] == 0:
        raise ValueError(f"need (N, U) unit activations with N ≥ 1, got {tuple(acts_NU.shape)}")
    firing_U = (acts_NU > eps).float().mean(0)
    return {
        "mean": acts_NU.mean(0),
        "std": acts_NU.std(0) if acts_NU.shape[0] > 1 else torch.zeros(acts_NU.shape[1]),
        "max": acts_NU.amax(0),
        "firing_rate": firing_U,
        "dead": (firing_U == 0).float(),
    }


def dead_fraction(acts_NU: Tensor, eps: float = 0.0) -> float:
    """Fraction of units that never exceed `eps` on these inputs."""
    return unit_statistics(acts_NU, eps)["dead"].mean().item()


def activation_density(acts_NU: Tensor, eps: float = 0.0) -> float:
    """Mean fraction of units active per input (L0 / U): lower = sparser code."""
    return (acts_NU > eps).float().mean().item()


def top_inputs(acts_NU: Tensor, unit: int, k: int = 16) -> tuple[Tensor, Tensor]:
    """Indices and activations of the k inputs on which `unit` fires most; ties broken by the lower index."""
    a_N = acts_NU[:, unit]
    order = torch.sort(-a_N, stable=True).indices[:k]
    return order, a_N[order]


def histogram(acts_N: Tensor, bins: int = 40, nonzero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(counts, bin edges) of one unit's activations (only the nonzero ones with `nonzero`, METHODS §2)."""
    a = acts_N.detach().cpu().double().numpy()
    if nonzero:
        a = a[a != 0]
    if a.size == 0:
        return np.zeros(bins, dtype=np.int64), np.linspace(0.0, 1.0, bins + 1)
    return np.histogram(a, bins=bins)


def monosemanticity(acts_NU: Tensor, emb_NE: Tensor) -> Tensor:
    """Per-unit Monosemanticity Score (METHODS §4.2) against embeddings of the same N images from *another* network;
    NaN for constant (dead) units. Thin wrapper over `nacosae.metrics.monosemanticity_score`."""
    return monosemanticity_score(acts_NU, emb_NE).float()


# ---------------------------------------------------------------------------------------------------- attribution
def _select(logits_BK: Tensor, target: Tensor | int | None) -> tuple[Tensor, Tensor]:
    """Sum over the batch of each row's target logit, and the targets (the predicted class when None)."""
    B = logits_BK.shape[0]
    if target is None:
        target_B = logits_BK.argmax(-1)
    elif isinstance(target, int):
        target_B = torch.full((B,), target, dtype=torch.long, device=logits_BK.device)
    else:
        target_B = target.to(logits_BK.device).long().reshape(B)
    return logits_BK.gather(1, target_B[:, None]).sum(), target_B


def integrated_gradients(
    model: nn.Module, x_B: Tensor, target: Tensor | int | None = None, baseline: Tensor | None = None, n_steps: int = 32
) -> Tensor:
    """Integrated gradients of the target logit w.r.t. the input (Sundararajan et al. 2017), midpoint rule:

        IG_i = (x_i − x'_i) · (1/m) Σ_{s=1..m} ∂F/∂x_i (x' + (s − ½)/m · (x − x'))

    Baseline x' = zeros (a black image) unless given. Completeness: Σ_i IG_i ≈ F(x) − F(x') (exact as m → ∞).
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be ≥ 1, got {n_steps}")
    was_training = model.training
    model.eval()
    baseline = torch.zeros_like(x_B) if baseline is None else baseline.expand_as(x_B)
    with torch.no_grad():
        _, target_B = _select(model(x_B), target)
    total = torch.zeros_like(x_B)
    try:
        for s in range(n_steps):
            alpha = (s + 0.5) / n_steps
            xi = (baseline + alpha * (x_B - baseline)).detach().requires_grad_(True)
            score, _ = _select(model(xi), target_B)
            (grad,) = torch.autograd.grad(score, xi)
            total += grad
    finally:
        model.train(was_training)
    return (x_B - baseline) * total / n_steps


def unit_attribution(
    model: nn.Module, x_B: Tensor, layers: Sequence[str], target: Tensor | int | None = None, method: str = "grad_x_act", n_steps: int = 32
) -> dict[str, Tensor]:
    """Per-unit attribution of the target logit at each layer: {layer: (B, U)}, summed over positions/tokens.

    method 'grad_x_act': a · ∂F/∂a (one backward pass for all layers; exact when F is linear in a, e.g. the layer
    feeding the classifier). 'ig': integrated gradients at the layer, scaling its output a by α ∈ (0, 1] with the
    rest of the forward pass unchanged; Σ_units = F(a) − F(0 at that layer) up to the quadrature error.
    """
    from nacosae.lab.intervene import hooked

    if method not in ("grad_x_act", "ig"):
        raise ValueError(f"method must be 'grad_x_act' or 'ig', got {method!r}")
    _modules(model, layers)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, target_B = _select(model(x_B), target)
        out: dict[str, Tensor] = {}
        if method == "grad_x_act":
            with hooked(model, {}, record=list(layers), keep_graph=True) as rec:
                score, _ = _select(model(x_B), target_B)
            acts = [rec[name] for name in layers]
            grads = torch.autograd.grad(score, acts)
            for name, a, g in zip(layers, acts, grads):
                out[name] = _sum_positions((a * g).detach())
            return out
        for name in layers:
            total, act = None, None
            for s in range(n_steps):
                alpha = (s + 0.5) / n_steps
                holder: dict[str, Tensor] = {}

                def scale(a, alpha=alpha, holder=holder):
                    holder["a"] = a.detach()
                    scaled = (alpha * a.detach()).requires_grad_(True)
                    holder["scaled"] = scaled
                    return scaled

                with hooked(model, {name: scale}):
                    score, _ = _select(model(x_B), target_B)
                (g,) = torch.autograd.grad(score, holder["scaled"])
                total = g if total is None else total + g
                act = holder["a"]
            out[name] = _sum_positions(act * total / n_steps)
        return out
    finally:
        model.train(was_training)


def _sum_positions(t: Tensor) -> Tensor:
    if t.dim() == 4:
        return t.sum((2, 3))
    if t.dim() == 3:
        return t.sum(1)
    return t


def predict(model: nn.Module, x_N: Tensor, batch_size: int = 1024) -> Tensor:
    """(N, n_classes) logits in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(x_N[i : i + batch_size]) for i in range(0, x_N.shape[0], batch_size)])
    finally:
        model.train(was_training)


STATISTICS = ("mean", "firing_rate", "dead", "attribution", "monosemanticity")


def layer_statistic(
    model: nn.Module,
    stat: str,
    layers: Sequence[str],
    probe_x: Tensor | None = None,
    emb_NE: Tensor | None = None,
    x_one: Tensor | None = None,
    target: int | None = None,
    reduce: str = "max",
) -> dict[str, Tensor]:
    """One value per unit of each layer, for colouring the structure view:

    'mean' / 'firing_rate' / 'dead' over the probe images `probe_x`; 'attribution' = gradient × activation of the
    target logit (predicted class when None) for the single input `x_one` (1, C, H, W); 'monosemanticity' = MS over
    `probe_x` against `emb_NE`, embeddings of the same images from another network.
    """
    if stat not in STATISTICS:
        raise ValueError(f"stat must be one of {STATISTICS}, got {stat!r}")
    if stat == "attribution":
        if x_one is None or x_one.shape[0] != 1:
            raise ValueError("'attribution' needs x_one, a batch of one input (1, C, H, W)")
        return {k: v[0] for k, v in unit_attribution(model, x_one, layers, target).items()}
    if probe_x is None:
        raise ValueError(f"{stat!r} needs probe_x, the images to average over")
    acts, _ = record_activations(model, probe_x, layers, reduce)
    if stat == "monosemanticity":
        if emb_NE is None:
            raise ValueError("'monosemanticity' needs emb_NE, embeddings of probe_x from another network (METHODS §4.2)")
        return {k: monosemanticity(a, emb_NE) for k, a in acts.items()}
    return {k: unit_statistics(a)[stat] for k, a in acts.items()}
