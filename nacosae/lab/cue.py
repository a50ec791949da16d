"""Automatic search for units and SAE features that detect a cue.

Paired design: the same probe images are run once without and once with the cue pasted in, so any difference in a
unit's response is caused by the cue alone. Per unit:

    gap    = mean(a_on) − mean(a_off)
    effect = gap / sqrt((var(a_on) + var(a_off)) / 2)        Cohen's d with the pooled std
    auc    = P(a_on > a_off) over all (on, off) pairs        ROC-AUC of telling cued from clean images (ties ½)

(the pooled std is floored at 1 % of the layer's overall std, so a unit that is constant on both sets, e.g. a conv
site in an empty corner that the cue always drives to the same value, gets a large but finite score).

A unit is called a cue detector when effect ≥ `min_effect` and auc ≥ `min_auc`. The same scores with a *control*
mark (the same square somewhere the training data never correlated with a class) tell a cue-specific detector
from a unit that reacts to any bright mark: with a control, a detector must also have
effect(control) ≤ `max_control_ratio` · effect(cue).

Units are channels (reduce 'max'/'mean' over positions) or *sites* (reduce 'none': one unit per channel × position
of a conv map, or per neuron of a linear layer); sites locate where in the map the cue is read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from nacosae.lab.data import CueSpec, apply_cue, remove_cue
from nacosae.lab.probe import record_activations
from nacosae.metrics import cosy_scores_batched


@dataclass(frozen=True)
class CueUnit:
    """One detected cue detector."""

    layer: str
    """Module name (for units) or 'sae:<module>' (for SAE features)."""
    unit: int
    """Channel / neuron, or SAE feature index."""
    mean_off: float
    """Mean response on the probe images without the cue."""
    mean_on: float
    """Mean response on the same images with the cue."""
    effect: float
    """Cohen's d of on vs off (pooled std)."""
    auc: float
    """ROC-AUC of telling cued from clean images by this unit's response."""
    control_effect: float = float("nan")
    """Cohen's d for the control mark (NaN if no control was run)."""
    position: tuple[int, ...] = ()
    """(row, col) of a conv site (reduce 'none'); empty for channel-level units, neurons and SAE features."""
    flat: int = -1
    """Index into the flattened per-example activation (what `intervene.clamp_sites` takes); -1 if not a site."""

    @property
    def gap(self) -> float:
        return self.mean_on - self.mean_off

    def to_dict(self) -> dict:
        return {**asdict(self), "gap": self.gap, "position": list(self.position)}

    @property
    def label(self) -> str:
        where = f"@({','.join(map(str, self.position))})" if self.position else ""
        return f"{self.layer}[{self.unit}]{where}"


def cue_scores(acts_on_NU: Tensor, acts_off_NU: Tensor, auc_min_effect: float | None = None) -> dict[str, Tensor]:
    """Per-unit gap, effect (Cohen's d) and AUC of responses with vs without the cue (see the module docstring).

    The exact AUC sorts every unit's responses; with `auc_min_effect` it is computed only for units whose |effect|
    reaches that value (the others get NaN), which keeps a search over thousands of conv sites fast.
    """
    if acts_on_NU.shape != acts_off_NU.shape or acts_on_NU.dim() != 2 or acts_on_NU.shape[0] < 2:
        raise ValueError(
            f"need two (N, U) response matrices of the same shape with N ≥ 2, got {tuple(acts_on_NU.shape)} and {tuple(acts_off_NU.shape)}"
        )
    on, off = acts_on_NU.double(), acts_off_NU.double()
    gap_U = on.mean(0) - off.mean(0)
    floor = max(0.01 * off.std().item(), 1e-8)
    pooled_U = ((on.var(0) + off.var(0)) / 2).sqrt().clamp_min(floor)
    effect_U = gap_U / pooled_U
    if auc_min_effect is None:
        auc_U, _ = cosy_scores_batched(on, off)
    else:
        auc_U = torch.full_like(gap_U, float("nan"))
        cand = torch.nonzero(effect_U.abs() >= auc_min_effect).flatten()
        if cand.numel():
            auc_U[cand], _ = cosy_scores_batched(on[:, cand], off[:, cand])
    return {"gap": gap_U.float(), "effect": effect_U.float(), "auc": auc_U.float(), "mean_on": on.mean(0).float(), "mean_off": off.mean(0).float()}


def select_detectors(
    scores: dict[str, Tensor],
    layer: str,
    min_effect: float = 1.0,
    min_auc: float = 0.9,
    max_units: int | None = None,
    control: dict[str, Tensor] | None = None,
    max_control_ratio: float = 0.5,
    site_shape: tuple[int, ...] | None = None,
) -> list[CueUnit]:
    """Units whose scores pass the thresholds (and, with a control, the specificity test), strongest effect first.

    `site_shape` (C, H, W) turns flat site indices into (channel, (row, col)).
    """
    eff, auc = scores["effect"], scores["auc"]
    ok = (eff >= min_effect) & (auc >= min_auc)
    if control is not None:
        ok &= control["effect"] <= max_control_ratio * eff
    hits = torch.nonzero(ok).flatten().tolist()
    hits.sort(key=lambda u: (-float(eff[u]), u))
    if max_units is not None:
        hits = hits[:max_units]
    out = []
    for u in hits:
        unit, position, flat = u, (), -1
        if site_shape is not None:
            flat = u
            if len(site_shape) == 3:
                unit, rem = divmod(u, site_shape[1] * site_shape[2])
                position = divmod(rem, site_shape[2])
        out.append(
            CueUnit(layer, unit, float(scores["mean_off"][u]), float(scores["mean_on"][u]), float(eff[u]), float(auc[u]),
                    float(control["effect"][u]) if control is not None else float("nan"), tuple(position), flat)
        )
    return out


def paired_probe(x_N: Tensor, cue: CueSpec) -> tuple[Tensor, Tensor]:
    """(with cue, without cue) versions of the same images; the cue's pixels are zeroed in the 'without' copy so the
    pair differs only there."""
    off = remove_cue(x_N, cue)
    return apply_cue(off, cue), off


@torch.no_grad()
def find_cue_units(
    model: nn.Module,
    x_N: Tensor,
    cue: CueSpec,
    layers: Sequence[str],
    reduce: str = "max",
    min_effect: float = 1.0,
    min_auc: float = 0.9,
    max_units: int | None = None,
    control: CueSpec | None = None,
    max_control_ratio: float = 0.5,
    full_auc: bool = False,
) -> tuple[list[CueUnit], dict[str, dict[str, Tensor]]]:
    """Detect cue units in each of `layers` from paired responses on the probe images `x_N` (clean images the model
    was not evaluated on). reduce 'max'/'mean': channel-level units; 'none': sites (see the module docstring).

    Returns (detectors, all scores {layer: {gap, effect, auc, mean_on, mean_off[, control_effect], shape}}), where a
    site layer's score vectors are flat over (C·H·W) and `shape` holds (C, H, W). The AUC is computed only for units
    with effect ≥ min_effect (NaN elsewhere) unless `full_auc`.
    """

    def responses(spec):
        on_N, off_N = paired_probe(x_N, spec)
        acts_on, _ = record_activations(model, on_N, layers, reduce)
        acts_off, _ = record_activations(model, off_N, layers, reduce)
        return acts_on, acts_off

    acts_on, acts_off = responses(cue)
    ctrl_on, ctrl_off = responses(control) if control is not None else (None, None)
    found, all_scores = [], {}
    for name in layers:
        shape = tuple(acts_on[name].shape[1:])
        s = cue_scores(acts_on[name].flatten(1), acts_off[name].flatten(1), auc_min_effect=None if full_auc else min_effect)
        # the control only needs its effect (specificity test), never its AUC
        ctrl = cue_scores(ctrl_on[name].flatten(1), ctrl_off[name].flatten(1), auc_min_effect=math.inf) if control is not None else None
        if ctrl is not None:
            s["control_effect"] = ctrl["effect"]
        s["shape"] = torch.tensor(shape)
        all_scores[name] = s
        found += select_detectors(s, name, min_effect, min_auc, max_units, ctrl, max_control_ratio, shape if reduce == "none" else None)
    return found, all_scores


@torch.no_grad()
def find_cue_features(
    model: nn.Module,
    sae,
    layer: str,
    x_N: Tensor,
    cue: CueSpec,
    min_effect: float = 1.0,
    min_auc: float = 0.9,
    max_units: int | None = None,
    control: CueSpec | None = None,
    max_control_ratio: float = 0.5,
    per_position: bool = False,
) -> tuple[list[CueUnit], dict[str, Tensor]]:
    """The same search over the latents of an SAE trained on `layer`.

    Image-level codes (max over positions, METHODS §2) by default; with `per_position` each (feature, position) pair
    of a conv map is a unit of its own (an *SAE site*, flat index j·H·W + row·W + col, what
    `intervene.sae_clamp_sites` takes): a feature that fires all over clean images but at the top-left corner only
    with the mark is a cue carrier there, yet its image-level maximum barely moves.
    """
    with torch.no_grad():
        probe_acts, _ = record_activations(model, x_N[:1], [layer], reduce="none")
    spatial = tuple(probe_acts[layer].shape[2:]) if probe_acts[layer].dim() == 4 else (1, 1)

    def codes(x):
        c_NTS = sae_codes(model, sae, layer, x)
        return c_NTS.transpose(1, 2).flatten(1) if per_position else c_NTS.amax(1)  # (N, S·T) or (N, S)

    on_N, off_N = paired_probe(x_N, cue)
    s = cue_scores(codes(on_N), codes(off_N), auc_min_effect=min_effect if per_position else None)
    ctrl = None
    if control is not None:
        c_on, c_off = paired_probe(x_N, control)
        ctrl = cue_scores(codes(c_on), codes(c_off), auc_min_effect=math.inf if per_position else None)
        s["control_effect"] = ctrl["effect"]
    shape = (sae.cfg.d_sae, *spatial) if per_position else None
    if shape is not None:
        s["shape"] = torch.tensor(shape)
    return select_detectors(s, f"sae:{layer}", min_effect, min_auc, max_units, ctrl, max_control_ratio, shape), s


def layer_tokens(a: Tensor) -> Tensor:
    """A layer output as tokens (N, T, D): conv maps (N, C, H, W) → (N, H·W, C), vectors (N, D) → (N, 1, D)."""
    if a.dim() == 4:
        return a.permute(0, 2, 3, 1).flatten(1, 2)
    if a.dim() == 2:
        return a[:, None]
    return a


@torch.no_grad()
def sae_codes(model: nn.Module, sae, layer: str, x_N: Tensor, batch_size: int = 512) -> Tensor:
    """(N, T, S) SAE codes of `layer`'s tokens on `x_N`."""
    out = []
    for i in range(0, x_N.shape[0], batch_size):
        acts, _ = record_activations(model, x_N[i : i + batch_size], [layer], reduce="none")
        out.append(sae.encode(layer_tokens(acts[layer])))
    return torch.cat(out)
