"""Pure metrics: reconstruction quality (METHODS §1), CoSy (§4.1) and the Monosemanticity Score (§4.2).

No I/O here. Inputs are torch tensors or anything `torch.as_tensor` accepts (numpy arrays, lists).
Shapes use suffixes: B rows, D d_in, S d_sae, N/M images, F features, E embedding width.
Sums that run over many rows accumulate in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "fvu",
    "explained_variance",
    "l0",
    "dead_fraction",
    "RunningSAEMetrics",
    "evaluate_sae",
    "cosy_scores",
    "cosy_scores_batched",
    "monosemanticity_score",
    "monosemanticity_score_pairwise",
    "ms_summary",
    "monosemanticity_report",
]


def _as_tensor(x, name: str) -> Tensor:
    """`x` as a tensor of real, finite numbers: the one input check of every metric here.

    Raises TypeError for other dtypes and ValueError for NaN or ±inf (a NaN cannot be ranked, and an inf turns a mean
    or a standard deviation into inf or NaN, so CoSy's MAD, FVU and MS would come out as 0, inf or NaN without a word).
    """
    t = torch.as_tensor(x)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8, torch.bool)):
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            n_nan = int(torch.isnan(t).sum())
            raise ValueError(f"{name} contains {int(bad.sum())} non-finite values ({n_nan} NaN, {int(bad.sum()) - n_nan} ±inf), "
                             f"the first at index {first}: metrics need finite activations; check the encoder outputs "
                             "(an overflow in float16/bfloat16, or a NaN in the backbone)")
    return t


# ------------------------------------------------------------------------------------------------ §1 reconstruction
def fvu(x_BD: Tensor, x_hat_BD: Tensor) -> float:
    """Fraction of variance unexplained, Σ‖x − x̂‖² / Σ‖x − x̄‖² with x̄ the mean over rows (METHODS §1).

    Leading dimensions are flattened into rows, so (B, T, D) token activations work as they are.
    """
    m = RunningSAEMetrics()
    m.update(x_BD, x_hat_BD)
    return m.compute()["fvu"]


def explained_variance(x_BD: Tensor, x_hat_BD: Tensor) -> float:
    """1 − FVU (METHODS §1)."""
    return 1.0 - fvu(x_BD, x_hat_BD)


def l0(codes_BS: Tensor) -> float:
    """Mean number of nonzero latents per row; leading dimensions are flattened into rows."""
    codes_BS = _as_tensor(codes_BS, "codes_BS")
    if codes_BS.ndim == 0 or codes_BS.numel() == 0:
        raise ValueError(f"l0 needs a non-empty (..., d_sae) code, got shape {tuple(codes_BS.shape)}")
    rows = codes_BS.reshape(-1, codes_BS.shape[-1])
    return (rows != 0).sum(-1, dtype=torch.float64).mean().item()


def dead_fraction(fire_counts_S: Tensor, n_rows: int, min_frequency: float = 0.0) -> float:
    """Fraction of latents whose firing frequency over `n_rows` rows is ≤ `min_frequency` (0: never fired)."""
    fire_counts_S = _as_tensor(fire_counts_S, "fire_counts_S")
    if n_rows <= 0:
        raise ValueError(f"n_rows must be positive (the rows the fire counts were taken over), got {n_rows}")
    if fire_counts_S.ndim != 1 or fire_counts_S.numel() == 0:
        raise ValueError(f"fire_counts_S must be a non-empty 1-d tensor, got shape {tuple(fire_counts_S.shape)}")
    if (fire_counts_S < 0).any() or (fire_counts_S > n_rows).any():
        raise ValueError(f"fire counts must lie in 0..n_rows={n_rows}: were they taken over a different number of rows?")
    freq_S = fire_counts_S.to(torch.float64) / n_rows
    return (freq_S <= min_frequency).to(torch.float64).mean().item()


class RunningSAEMetrics:
    """Streams FVU, explained variance, L0 and dead fraction over batches with bounded memory.

    The total variance Σ‖x − x̄‖² needs the mean of all rows, which is only known at the end. Instead of the
    cancellation-prone Σx² − (Σx)²/n, each batch's per-dimension mean and centred sum of squares are merged
    into the running ones with Chan et al.'s parallel update, in float64.
    """

    def __init__(self):
        self.n_rows = 0
        self.sq_err = 0.0  # Σ‖x − x̂‖² (python float = float64)
        self.mean_D: Tensor | None = None  # running per-dimension mean (float64)
        self.m2_D: Tensor | None = None  # running per-dimension Σ (x − mean)² (float64)
        self.l0_sum = 0.0  # Σ over rows of the number of active latents
        self.n_code_rows = 0
        self.fire_counts_S: Tensor | None = None  # int64, rows on which each latent was nonzero

    @torch.no_grad()
    def update(self, x_BD: Tensor, x_hat_BD: Tensor, codes_BS: Tensor | None = None) -> None:
        x_BD, x_hat_BD = _as_tensor(x_BD, "x_BD"), _as_tensor(x_hat_BD, "x_hat_BD")
        if x_BD.shape != x_hat_BD.shape:
            raise ValueError(f"x and x_hat must have the same shape, got {tuple(x_BD.shape)} and {tuple(x_hat_BD.shape)}")
        if x_BD.ndim == 0:
            raise ValueError("x must have a feature dimension (..., D)")
        x_BD = x_BD.reshape(-1, x_BD.shape[-1]).to(torch.float64)
        x_hat_BD = x_hat_BD.reshape(-1, x_hat_BD.shape[-1]).to(torch.float64)
        B = x_BD.shape[0]
        if B == 0:
            return
        if self.mean_D is not None and self.mean_D.shape[0] != x_BD.shape[1]:
            raise ValueError(f"batches disagree on D: had {self.mean_D.shape[0]}, got {x_BD.shape[1]}")
        self.sq_err += (x_BD - x_hat_BD).pow(2).sum().item()
        batch_mean_D = x_BD.mean(0)
        batch_m2_D = (x_BD - batch_mean_D).pow(2).sum(0)
        if self.mean_D is None:
            self.mean_D, self.m2_D = batch_mean_D, batch_m2_D
        else:  # Chan, Golub & LeVeque (1979): merge two (count, mean, M2) summaries
            n_a, n = self.n_rows, self.n_rows + B
            delta_D = batch_mean_D.to(self.mean_D.device) - self.mean_D
            self.mean_D = self.mean_D + delta_D * (B / n)
            self.m2_D = self.m2_D + batch_m2_D.to(self.m2_D.device) + delta_D.pow(2) * (n_a * B / n)
        self.n_rows += B
        if codes_BS is not None:
            codes_BS = _as_tensor(codes_BS, "codes_BS")
            codes_BS = codes_BS.reshape(-1, codes_BS.shape[-1])
            if codes_BS.shape[0] != B:
                raise ValueError(f"codes have {codes_BS.shape[0]} rows but x has {B}")
            active_BS = codes_BS != 0
            self.l0_sum += active_BS.sum().item()
            self.n_code_rows += B
            counts_S = active_BS.sum(0, dtype=torch.int64)
            if self.fire_counts_S is None:
                self.fire_counts_S = counts_S
            elif self.fire_counts_S.shape != counts_S.shape:
                raise ValueError(f"batches disagree on d_sae: had {self.fire_counts_S.shape[0]}, got {counts_S.shape[0]}")
            else:
                self.fire_counts_S = self.fire_counts_S + counts_S.to(self.fire_counts_S.device)

    def compute(self) -> dict[str, float]:
        """dict(fvu, explained_variance, l0, dead_fraction, n_rows); the code entries are NaN without codes."""
        if self.n_rows == 0:
            raise ValueError("no rows seen: call update() with at least one non-empty batch first")
        total_var = self.m2_D.sum().item()
        if total_var <= 0:
            raise ValueError("the activations have zero variance (all rows equal): FVU is undefined")
        fvu_value = self.sq_err / total_var
        out = {"fvu": fvu_value, "explained_variance": 1.0 - fvu_value, "n_rows": self.n_rows}
        if self.fire_counts_S is None:
            out.update(l0=math.nan, dead_fraction=math.nan)
        else:
            out.update(l0=self.l0_sum / self.n_code_rows, dead_fraction=dead_fraction(self.fire_counts_S, self.n_code_rows))
        return out


@torch.no_grad()
def evaluate_sae(sae, batches: Iterable, device: str | torch.device | None = None) -> dict[str, float]:
    """FVU, explained variance, L0 and dead fraction of `sae` over `batches` of raw activations.

    Each batch is a (..., D) tensor, or a tuple whose last element is one (e.g. the `(image_idx_N, acts_NTD)`
    blocks of `ActivationStore.iter_images`); leading dimensions are flattened into rows. Dead = never fired
    on these rows.
    """
    device = device if device is not None else sae.W_dec.device
    metrics = RunningSAEMetrics()
    for batch in batches:
        x = batch[-1] if isinstance(batch, (tuple, list)) else batch
        x_BD = torch.as_tensor(x).to(device, torch.float32)
        x_BD = x_BD.reshape(-1, x_BD.shape[-1])
        codes_BS = sae.encode(x_BD)
        metrics.update(x_BD, sae.decode(codes_BS), codes_BS)
    return metrics.compute()


# ------------------------------------------------------------------------------------------------ §4.1 CoSy
def cosy_scores(a_syn_N, a_ctrl_M) -> tuple[float, float]:
    """CoSy AUC and MAD of one feature (METHODS §4.1).

    AUC: ROC-AUC of telling generated images (label 1) from control images (label 0) by the activation, ties
    counted as half (the Mann–Whitney statistic, equal to sklearn's roc_auc_score with average ranks).
    MAD: (mean(a_syn) − mean(a_ctrl)) / std(a_ctrl), unbiased std; 0 when std(a_ctrl) = 0.
    """
    a_syn_N, a_ctrl_M = _as_tensor(a_syn_N, "a_syn_N"), _as_tensor(a_ctrl_M, "a_ctrl_M")
    if a_syn_N.ndim != 1 or a_ctrl_M.ndim != 1:
        raise ValueError(f"cosy_scores takes 1-d activations (use cosy_scores_batched for several features), got {tuple(a_syn_N.shape)} and {tuple(a_ctrl_M.shape)}")
    auc_F, mad_F = cosy_scores_batched(a_syn_N[:, None], a_ctrl_M[:, None])
    return auc_F.item(), mad_F.item()


def cosy_scores_batched(a_syn_NF, a_ctrl_MF) -> tuple[Tensor, Tensor]:
    """Per-feature CoSy (AUC, MAD) as two float64 (F,) tensors; column f of both inputs is feature f.

    AUC = (#{syn > ctrl} + ½ #{syn = ctrl}) / (N·M), counted exactly with a sorted control column and
    `searchsorted` per feature: O((N + M) log M) and no (N, M) matrix.
    """
    a_syn_NF, a_ctrl_MF = _as_tensor(a_syn_NF, "a_syn_NF"), _as_tensor(a_ctrl_MF, "a_ctrl_MF")
    if a_syn_NF.ndim != 2 or a_ctrl_MF.ndim != 2 or a_syn_NF.shape[1] != a_ctrl_MF.shape[1]:
        raise ValueError(f"need (N, F) and (M, F) activations with the same F, got {tuple(a_syn_NF.shape)} and {tuple(a_ctrl_MF.shape)}")
    N, M = a_syn_NF.shape[0], a_ctrl_MF.shape[0]
    if N < 1 or M < 2:
        raise ValueError(f"CoSy needs at least 1 generated and 2 control images (the unbiased std needs 2), got {N} and {M}")
    a_syn_FN = a_syn_NF.to(torch.float64).T.contiguous()
    a_ctrl_FM = a_ctrl_MF.to(torch.float64).T.contiguous()
    ctrl_sorted_FM = a_ctrl_FM.sort(dim=1).values
    below_FN = torch.searchsorted(ctrl_sorted_FM, a_syn_FN, side="left")  # ctrl < syn
    below_or_tied_FN = torch.searchsorted(ctrl_sorted_FM, a_syn_FN, side="right")  # ctrl ≤ syn
    # Integer counts: exact however many images there are.
    wins_x2_F = (below_FN + below_or_tied_FN).sum(1)
    auc_F = wins_x2_F.to(torch.float64) / (2.0 * N * M)

    std_F = a_ctrl_FM.std(dim=1, unbiased=True)
    diff_F = a_syn_FN.mean(1) - a_ctrl_FM.mean(1)
    mad_F = torch.where(std_F > 0, diff_F / torch.where(std_F > 0, std_F, torch.ones_like(std_F)), torch.zeros_like(std_F))
    return auc_F, mad_F


# ------------------------------------------------------------------------------------------------ §4.2 MS
def _min_max_normalise(acts_NS: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-feature (column) min–max scaling to [0, 1]; returns (Ã, valid_S) where constant columns are invalid."""
    lo_S, hi_S = acts_NS.amin(0), acts_NS.amax(0)
    range_S = (hi_S - lo_S).to(dtype)
    valid_S = range_S > 0
    scaled_NS = (acts_NS.to(dtype) - lo_S.to(dtype)) / torch.where(valid_S, range_S, torch.ones_like(range_S))
    return scaled_NS, valid_S


def _unit_embeddings(emb_NE, N: int, dtype: torch.dtype, device) -> Tensor:
    emb_NE = _as_tensor(emb_NE, "emb_NE")
    if emb_NE.ndim != 2 or emb_NE.shape[0] != N:
        raise ValueError(f"emb_NE must be (N, E) with N={N} rows, one per image, got {tuple(emb_NE.shape)}")
    emb_NE = emb_NE.to(device, dtype)
    norm_N1 = emb_NE.norm(dim=1, keepdim=True)
    if not (norm_N1 > 0).all():
        raise ValueError("some embeddings are all zeros and cannot be unit-normalised: drop those images")
    return emb_NE / norm_N1


def _check_ms_inputs(acts_NS) -> Tensor:
    acts_NS = _as_tensor(acts_NS, "acts_NS")
    if acts_NS.ndim != 2 or acts_NS.shape[0] < 2:
        raise ValueError(f"acts_NS must be (N, S) with N ≥ 2 images (MS sums over pairs), got {tuple(acts_NS.shape)}")
    return acts_NS


@torch.no_grad()
def monosemanticity_score(
    acts_NS,
    emb_NE,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
) -> Tensor:
    """Monosemanticity Score of every feature, exact closed form (METHODS §4.2, Pach et al. 2025).

        MS_j = Σ_{n<m} ã_n ã_m cos(ê_n, ê_m) / Σ_{n<m} ã_n ã_m
             = (‖Σ_n ã_n ê_n‖² − Σ_n ã_n²) / ((Σ_n ã_n)² − Σ_n ã_n²)

    with ã the feature's activations min–max normalised over the N images and ê unit-normalised embeddings
    from an encoder other than the SAE's backbone. All features at once as Ãᵀ Ê, in chunks of `chunk_size`
    features so at most N·chunk_size + chunk_size·E values (plus Ê) are held; `dtype` is the accumulation
    precision (float64 by default: the numerator subtracts two sums of similar size when MS is near 0).
    Returns a float64 (S,) tensor on the CPU; constant (incl. dead) features, and features whose pair
    weights sum to 0 (one image at the max, all others at the min), are NaN.
    """
    acts_NS = _check_ms_inputs(acts_NS)
    N, S = acts_NS.shape
    device = torch.device(device) if device is not None else acts_NS.device
    emb_NE = _unit_embeddings(emb_NE, N, dtype, device)
    if chunk_size is None:
        chunk_size = max(1, min(S, (1 << 24) // N))  # ~128 MB of float64 per chunk of Ã
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    ms_S = torch.full((S,), math.nan, dtype=torch.float64)
    for start in range(0, S, chunk_size):
        a_NC, valid_C = _min_max_normalise(acts_NS[:, start : start + chunk_size].to(device), dtype)
        v_CE = a_NC.T @ emb_NE  # Σ_n ã_n ê_n per feature
        sum_sq_C = a_NC.pow(2).sum(0)
        numer_C = v_CE.pow(2).sum(1) - sum_sq_C
        denom_C = a_NC.sum(0).pow(2) - sum_sq_C  # = 2 Σ_{n<m} ã_n ã_m ≥ 0
        ok_C = valid_C & (denom_C > 0)
        ms_C = torch.where(ok_C, numer_C / torch.where(ok_C, denom_C, torch.ones_like(denom_C)), torch.full_like(denom_C, math.nan))
        ms_S[start : start + chunk_size] = ms_C.to("cpu", torch.float64)
    return ms_S


@torch.no_grad()
def monosemanticity_score_pairwise(acts_NS, emb_NE, max_images: int = 6000) -> Tensor:
    """The O(N²) definition of MS (METHODS §4.2), for tests and benchmarks: per feature, a weighted mean of
    cos(ê_n, ê_m) over all pairs n < m with weights ã_n ã_m, vectorised over the pairs. float64 throughout."""
    acts_NS = _check_ms_inputs(acts_NS)
    N, S = acts_NS.shape
    if N > max_images:
        raise ValueError(f"the pairwise MS holds N²/2 pairs; N={N} > max_images={max_images}: use monosemanticity_score")
    emb_NE = _unit_embeddings(emb_NE, N, torch.float64, acts_NS.device)
    rows_P, cols_P = torch.triu_indices(N, N, offset=1, device=acts_NS.device)
    cos_P = (emb_NE @ emb_NE.T)[rows_P, cols_P]
    a_NS, valid_S = _min_max_normalise(acts_NS, torch.float64)
    ms_S = torch.full((S,), math.nan, dtype=torch.float64)
    for j in range(S):
        if not valid_S[j]:
            continue
        a_N = a_NS[:, j]
        w_P = a_N[rows_P] * a_N[cols_P]
        w_sum = w_P.sum()
        if w_sum > 0:
            ms_S[j] = ((w_P * cos_P).sum() / w_sum).item()
    return ms_S


# ---------------------------------------------------------------------------- label purity of top images
def label_purity(top_images_SK, labels_N) -> "np.ndarray":
    """Share of each feature's top images that carry its most common label (NaN: no top image, or none labelled).

    `top_images_SK` holds image indices, −1 in unused slots; `labels_N[i]` is image i's label or None.
    """
    import numpy as np
    from collections import Counter

    top = torch.as_tensor(top_images_SK).cpu().numpy()
    out = np.full(top.shape[0], np.nan)
    for j, row in enumerate(top):
        labels = [labels_N[i] for i in row if i >= 0 and labels_N[i] is not None]
        if labels:
            out[j] = Counter(labels).most_common(1)[0][1] / len(labels)
    return out


def random_set_purity(labels_N, set_size: int = 16, n_sets: int = 1000, seed: int = 0) -> float:
    """Mean purity of random image sets of `set_size`: the floor a feature's top images must clear."""
    import numpy as np

    rng = np.random.default_rng(seed)
    idx = np.array([i for i, lab in enumerate(labels_N) if lab is not None])
    if len(idx) < set_size:
        raise ValueError(f"need at least {set_size} labelled images, got {len(idx)}")
    sets = np.stack([rng.choice(idx, set_size, replace=False) for _ in range(n_sets)])
    return float(np.nanmean(label_purity(sets, labels_N)))


def ms_summary(ms: Tensor) -> dict[str, float]:
    """n, NaN count, mean, median, max and share ≥ 0.5 of the finite MS values in `ms` (NaN: dead/constant features)."""
    ms = torch.as_tensor(ms, dtype=torch.float64)
    ok = ms[~torch.isnan(ms)]
    if not len(ok):
        return {"n": 0, "n_nan": int(ms.numel()), "mean": math.nan, "median": math.nan, "max": math.nan}
    return {"n": len(ok), "n_nan": int(ms.numel() - len(ok)), "mean": float(ok.mean()), "median": float(ok.median()),
            "max": float(ok.max()), "share_ge_0.5": float((ok >= 0.5).double().mean())}


def monosemanticity_report(acts_NS: Tensor, raw_ND: Tensor, emb_NE: Tensor, alive_S: Tensor | None = None,
                           named: Sequence[int] = ()) -> dict[str, Any]:
    """MS (METHODS §4.2) of SAE features and of the layer's raw channels on the same N images and embeddings.

    Also the MS a feature would get with equal weights on every image (the mean cosine over all pairs): the level of a
    feature that ignores what is in the images; MS is only informative above it. NaN (dead/constant) → None in lists.
    """
    ms_S = monosemanticity_score(acts_NS, emb_NE)
    ms_raw_D = monosemanticity_score(raw_ND, emb_NE)
    n = emb_NE.shape[0]
    unit_NE = emb_NE.double() / emb_NE.double().norm(dim=1, keepdim=True)
    uniform = float((unit_NE.sum(0).pow(2).sum() - n) / (n * n - n))
    alive_S = torch.ones(ms_S.shape[0], dtype=torch.bool) if alive_S is None else torch.as_tensor(alive_S, dtype=torch.bool)
    return {"ms_S": [None if math.isnan(v) else v for v in ms_S.tolist()],
            "ms_raw_D": [None if math.isnan(v) else v for v in ms_raw_D.tolist()],
            "summary_sae_alive": ms_summary(ms_S[alive_S]),
            "summary_sae_named": ms_summary(ms_S[list(named)]) if len(named) else ms_summary(torch.tensor([])),
            "summary_raw": ms_summary(ms_raw_D), "uniform_weights_ms": uniform}

