"""Interventions: edit a layer's output during the forward pass and measure what changes downstream.

    edits = {"act3": zero_units([5, 17])}                       # ablate two neurons
    edits = {"act2": clamp_units([3], 0.0)}                      # zero a conv channel everywhere
    edits = {"act3": sae_clamp(sae, [12], 0.0)}                  # ablate SAE feature 12, error added back (METHODS §5)
    edits = {"act3": sae_steer(sae, 12, alpha=4.0)}              # h + α·W_dec,12 (METHODS §5)
    res = evaluate(model, x_N, y_N, edits)                        # accuracy, confusion matrix, predictions

Units are channels of (B, C, H, W) outputs and the last axis of (B, D) / (B, T, D) outputs. SAE edits read the layer
as tokens (…, D): a conv map is permuted to (B, H, W, C) so the SAE sees one C-vector per position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Edit = Callable[[Tensor], Tensor]


@contextmanager
def hooked(model: nn.Module, edits: dict[str, Edit], record: Sequence[str] = (), keep_graph: bool = False) -> Iterator[dict[str, Tensor]]:
    """Within the block, module `name`'s output is replaced by `edits[name](output)`, and the (edited) outputs of the
    modules in `record` land in the yielded dict (detached unless `keep_graph`)."""
    named = dict(model.named_modules())
    wanted = list(dict.fromkeys([*edits, *record]))
    missing = [n for n in wanted if n not in named or not n]
    if missing:
        raise KeyError(f"layers {missing} are not modules of {type(model).__name__}; hookable names: {[n for n in named if n]}")
    rec: dict[str, Tensor] = {}
    record = set(record)

    def make(name: str):
        def hook(mod, args, out):
            if name in edits:
                out = edits[name](out)
                if not isinstance(out, Tensor):
                    raise TypeError(f"the edit for {name} must return a tensor, got {type(out).__name__}")
            if name in record:
                rec[name] = out if keep_graph else out.detach()
            return out

        return hook

    handles = [named[name].register_forward_hook(make(name)) for name in wanted]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def _unit_axis(t: Tensor) -> int:
    return 1 if t.dim() == 4 else t.dim() - 1


def _check_units(t: Tensor, units: Sequence[int]) -> list[int]:
    n = t.shape[_unit_axis(t)]
    units = [int(u) for u in units]
    bad = [u for u in units if not 0 <= u < n]
    if bad:
        raise IndexError(f"units {bad} out of range for a layer with {n} units")
    return units


def clamp_units(units: Sequence[int], value: float | Sequence[float] | Tensor = 0.0) -> Edit:
    """Set `units` to `value` (one number, or one per unit) at every position. Ablation = clamp to 0."""

    def edit(a: Tensor) -> Tensor:
        idx = _check_units(a, units)
        v = torch.as_tensor(value, dtype=a.dtype, device=a.device)
        if v.dim() == 1 and v.numel() != len(idx):
            raise ValueError(f"{v.numel()} values for {len(idx)} units")
        out = a.clone()
        if a.dim() == 4:
            out[:, idx] = v[None, :, None, None] if v.dim() == 1 else v
        else:
            out[..., idx] = v
        return out

    return edit


def zero_units(units: Sequence[int]) -> Edit:
    """Ablate `units` (set to 0 everywhere): for ReLU units, the value they take when they do not fire."""
    return clamp_units(units, 0.0)


def clamp_sites(flat: Sequence[int], value: float | Sequence[float] | Tensor = 0.0) -> Edit:
    """Set single sites (entries of the flattened per-example activation, e.g. channel c at position (r, q) of a
    (C, H, W) map is c·H·W + r·W + q; `CueUnit.flat`) to `value` (one number or one per site)."""
    flat = [int(i) for i in flat]

    def edit(a: Tensor) -> Tensor:
        n = a[0].numel()
        bad = [i for i in flat if not 0 <= i < n]
        if bad:
            raise IndexError(f"sites {bad} out of range for a layer with {n} values per example")
        v = torch.as_tensor(value, dtype=a.dtype, device=a.device)
        if v.dim() == 1 and v.numel() != len(flat):
            raise ValueError(f"{v.numel()} values for {len(flat)} sites")
        out = a.clone()
        out.view(a.shape[0], -1)[:, flat] = v
        return out

    return edit


def _as_tokens(a: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """(…, D) view of a layer output for an SAE, and the inverse layout change."""
    if a.dim() == 4:
        return a.permute(0, 2, 3, 1), lambda t: t.permute(0, 3, 1, 2)
    return a, lambda t: t


def sae_clamp(sae, features: Sequence[int], value: float = 0.0) -> Edit:
    """METHODS §5 clamp: h' = decode(f with f_j := v) + (h − x̂), so only feature j's contribution changes and the
    SAE's reconstruction error is kept (with v = f_j the layer is returned unchanged). Ablation = v = 0."""
    features = [int(j) for j in features]
    if any(not 0 <= j < sae.cfg.d_sae for j in features):
        raise IndexError(f"features {features} out of range for an SAE with d_sae={sae.cfg.d_sae}")

    def edit(a: Tensor) -> Tensor:
        h, back = _as_tokens(a)
        codes = sae.encode(h)
        err = h - sae.decode(codes)
        codes = codes.clone()
        codes[..., features] = value
        return back(sae.decode(codes) + err)

    return edit


def sae_clamp_sites(sae, flat: Sequence[int], value: float | Sequence[float] | Tensor = 0.0) -> Edit:
    """METHODS §5 clamp at single (feature, position) pairs of a conv map: flat index j·H·W + row·W + col
    (`CueUnit.flat` from `find_cue_features(per_position=True)`); `value` one number or one per pair. The SAE error
    is added back, so only those features at those positions change."""
    flat = [int(i) for i in flat]

    def edit(a: Tensor) -> Tensor:
        if a.dim() != 4:
            raise ValueError(f"sae_clamp_sites edits conv maps (B, C, H, W); got shape {tuple(a.shape)} (use sae_clamp)")
        h, back = _as_tokens(a)  # (B, H, W, C)
        codes_BHWS = sae.encode(h)
        err = h - sae.decode(codes_BHWS)
        codes_BSHW = codes_BHWS.permute(0, 3, 1, 2).contiguous()
        n = codes_BSHW[0].numel()
        bad = [i for i in flat if not 0 <= i < n]
        if bad:
            raise IndexError(f"SAE sites {bad} out of range for d_sae × H × W = {n}")
        codes_BSHW.view(a.shape[0], -1)[:, flat] = torch.as_tensor(value, dtype=codes_BSHW.dtype, device=a.device)
        return back(sae.decode(codes_BSHW.permute(0, 2, 3, 1)) + err)

    return edit


def sae_steer_sites(sae, flat: Sequence[int], alpha: float | Sequence[float] | Tensor) -> Edit:
    """METHODS §5 steer at (feature, position) pairs of a conv map: h'_p = h_p + Σ_j α_{j,p} · s·W_dec,j for each
    pair (flat index j·H·W + row·W + col), α one number or one per pair (e.g. the cue's mean code change there)."""
    flat = [int(i) for i in flat]

    def edit(a: Tensor) -> Tensor:
        if a.dim() != 4:
            raise ValueError(f"sae_steer_sites edits conv maps (B, C, H, W); got shape {tuple(a.shape)} (use sae_steer)")
        B, C, H, W = a.shape
        if any(not 0 <= i < sae.cfg.d_sae * H * W for i in flat):
            raise IndexError(f"SAE sites out of range for d_sae × H × W = {sae.cfg.d_sae * H * W}")
        coef_SP = torch.zeros(sae.cfg.d_sae * H * W, dtype=a.dtype, device=a.device)
        coef_SP[flat] = torch.as_tensor(alpha, dtype=a.dtype, device=a.device)
        coef_SP = coef_SP.view(sae.cfg.d_sae, H * W)
        push_PC = coef_SP.T @ (sae.W_dec.detach().to(a.dtype) * sae.cfg.input_scale)  # (H·W, C)
        return a + push_PC.T.reshape(1, C, H, W)

    return edit


def sae_steer(sae, feature: int, alpha: float, positions_HW: Tensor | None = None) -> Edit:
    """METHODS §5 steer: h' = h + α W_dec,j. The SAE's decoder works in scaled space (x̂ = s·(f W_dec + b_dec)), so the
    raw-space direction is s·W_dec,j: α is then in units of the feature's own activation (α = 1 adds what f_j += 1 adds).

    On a conv map, `positions_HW` (bool (H, W)) limits the push to those positions (e.g. where the feature fires on
    cued images); None pushes every position."""
    if not 0 <= feature < sae.cfg.d_sae:
        raise IndexError(f"feature {feature} out of range for an SAE with d_sae={sae.cfg.d_sae}")

    def edit(a: Tensor) -> Tensor:
        h, back = _as_tokens(a)
        direction_D = sae.W_dec[feature].detach().to(h.dtype) * sae.cfg.input_scale
        if positions_HW is None:
            return back(h + alpha * direction_D)
        if a.dim() != 4 or tuple(positions_HW.shape) != tuple(a.shape[2:]):
            raise ValueError(f"positions_HW {tuple(positions_HW.shape)} must match the conv map's (H, W) {tuple(a.shape[2:])}")
        mask_HW1 = positions_HW.to(h.device, h.dtype)[..., None]
        return back(h + alpha * mask_HW1 * direction_D)

    return edit


@dataclass
class EvalResult:
    """Predictions of a (possibly edited) model on a labelled set."""

    accuracy: float
    """Fraction correct."""
    confusion: Tensor
    """(K, K) counts, rows = true class, columns = predicted class."""
    pred: Tensor
    """(N,) predicted classes."""

    def recall(self) -> Tensor:
        """(K,) per-class accuracy."""
        return self.confusion.diag().float() / self.confusion.sum(1).clamp_min(1).float()

    def predicted_rate(self, cls: int, mask: Tensor | None = None) -> float:
        """Fraction of the inputs in `mask` (all when None) predicted as `cls`."""
        p = self.pred if mask is None else self.pred[mask]
        return (p == cls).float().mean().item() if p.numel() else float("nan")


@torch.no_grad()
def evaluate(
    model: nn.Module, x_N: Tensor, y_N: Tensor, edits: dict[str, Edit] | None = None, batch_size: int = 1024, n_classes: int | None = None
) -> EvalResult:
    """Accuracy and confusion matrix of `model` with `edits` applied (eval mode)."""
    if x_N.shape[0] != y_N.shape[0]:
        raise ValueError(f"{x_N.shape[0]} inputs but {y_N.shape[0]} labels")
    was_training = model.training
    model.eval()
    preds = []
    try:
        with hooked(model, edits or {}):
            for i in range(0, x_N.shape[0], batch_size):
                preds.append(model(x_N[i : i + batch_size]).argmax(-1))
    finally:
        model.train(was_training)
    pred = torch.cat(preds)
    K = n_classes or int(max(int(y_N.max()), int(pred.max())) + 1)
    conf = torch.bincount(y_N * K + pred, minlength=K * K).reshape(K, K)
    return EvalResult((pred == y_N).float().mean().item(), conf, pred)


@torch.no_grad()
def run_with_edits(model: nn.Module, x_B: Tensor, edits: dict[str, Edit]) -> Tensor:
    """Logits of `model` on `x_B` with `edits` applied (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        with hooked(model, edits):
            return model(x_B)
    finally:
        model.train(was_training)
