"""Per-feature statistics of an SAE over a probe set, in one streaming pass (METHODS §2).

Input: blocks `(image_idx_N, acts_NTD)` of whole images (`ActivationStore.iter_images`, or `backbone_blocks` straight
from a backbone) and an SAE. Memory is bounded by d_sae × (top_n × T + n_bins) whatever the number of images.

Per feature j (image-level activation a_j(n) = max over tokens (default), mean over tokens, or the CLS token's code,
`aggregate_tokens`, the one definition every other module calls):
  - firing frequency over images (a_j(n) > 0) and over tokens (code > 0);
  - mean and max image-level activation, and the mean token activation;
  - a histogram of nonzero image-level activations (see `FeatureStatsAccumulator`: exact, independent of block order);
  - the top-N images by a_j(n), each with its per-token code map (T values: a heatmap);
  - dead (never fires at image level) and dense (fires on more than `dense_threshold` of images) flags.

Top-N ordering is deterministic: by activation, descending, ties broken by the smaller image index (EfficientNet's
ReLU6 map saturates at 6.0, so exact ties are common). Activation and index are packed into one int64 key whose
integer order is that lexicographic order, so a plain `topk` per block does the merge for all features at once.

Shapes use suffixes: N images, T tokens per image, D d_in, S d_sae, K top_n, H histogram bins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nacosae import __version__
from nacosae.io import atomic_save_safetensors, atomic_write_json

SCHEMA_VERSION = 1
AGGREGATIONS = ("max", "mean", "cls")
STATS_ARRAYS = "feature_stats.safetensors"
STATS_META = "feature_stats.json"
_EMPTY_EXP = -(2**30)  # histogram exponent of a feature that has not fired yet
_LOW32 = (1 << 32) - 1


class FeatureStatsError(ValueError):
    """Stats files that cannot be read as asked (corrupt, other schema, other run)."""


@dataclass(frozen=True)
class FeatureStatsConfig:
    top_n: int = 16
    """Images kept per feature (with their per-token maps)."""
    aggregation: str = "max"
    """Image-level activation from token codes: 'max' over tokens (patch SAEs, METHODS §2), 'mean' over tokens, or 'cls'
    (the code of token `cls_token`, for CLS-token SAEs). CoSy and galleries depend on it: it is saved with the stats."""
    n_bins: int = 64
    """Histogram bins over [0, 2^e), 2^e the smallest power of two above the feature's max; a power of two."""
    dense_threshold: float = 0.5
    """A feature is dense if it fires on more than this fraction of images."""
    cls_token: int = 0
    """'cls' aggregation only: index of the CLS token among the T tokens of an image."""

    def __post_init__(self):
        if self.top_n < 1:
            raise ValueError(f"top_n must be ≥ 1, got {self.top_n}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.n_bins < 2 or self.n_bins & (self.n_bins - 1):
            raise ValueError(f"n_bins must be a power of two ≥ 2 (bins are merged in pairs when the range doubles), got {self.n_bins}")
        if not 0 <= self.dense_threshold <= 1:
            raise ValueError(f"dense_threshold must be in [0, 1], got {self.dense_threshold}")
        if self.cls_token < 0:
            raise ValueError(f"cls_token must be ≥ 0, got {self.cls_token}")


# ------------------------------------------------------------------------------------------------ aggregation
def aggregate_tokens(codes_NTS: Tensor, aggregation: str = "max", cls_token: int = 0) -> Tensor:
    """Image-level activations (N, S) from the token codes (N, T, S) of N images: the one definition (METHODS §2)
    that the feature statistics, evaluation, the naming scorer and the app all use.

    aggregation: 'max' over the T tokens (patch SAEs), 'mean' over them, or 'cls' (the code of token `cls_token`, for
    CLS-token SAEs). Works on any trailing width S (SAE codes, a subset of features, or raw activations (N, T, D)).
    Raises ValueError for another aggregation, a tensor that is not 3-D, no tokens, or `cls_token` outside 0..T-1.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if codes_NTS.dim() != 3 or codes_NTS.shape[1] < 1:
        raise ValueError(f"token codes must be (N images, T ≥ 1 tokens, S), got shape {tuple(codes_NTS.shape)}")
    if aggregation == "max":
        return codes_NTS.amax(1)
    if aggregation == "mean":
        return codes_NTS.mean(1)
    T = codes_NTS.shape[1]
    if not 0 <= cls_token < T:
        raise ValueError(f"cls_token={cls_token} but images have {T} tokens")
    return codes_NTS[:, cls_token]


# ------------------------------------------------------------------------------------------------ sort keys
def _float_key(x: Tensor) -> Tensor:
    """int32 with the same order as the float32 values (flip the magnitude bits of negatives)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _key_to_float(key32: Tensor) -> Tensor:
    return (key32 ^ ((key32 >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _pack(values: Tensor, image_idx: Tensor) -> Tensor:
    """int64 key: high 32 bits order by value, low 32 bits by *smaller* image index first."""
    values = values.to(torch.float32) + 0.0  # −0.0 → +0.0, so the two zeros tie (and break by index)
    return (_float_key(values).to(torch.int64) << 32) | (_LOW32 - image_idx.to(torch.int64))


def _unpack(key: Tensor) -> tuple[Tensor, Tensor]:
    values = _key_to_float((key >> 32).to(torch.int32))
    return values, _LOW32 - (key & _LOW32)


# ------------------------------------------------------------------------------------------------ accumulator
class FeatureStatsAccumulator:
    """The running state of one pass. `update` with token codes; `result` gives `FeatureStats`.

    Histogram: each feature's bins cover [0, 2^e_j) with 2^e_j the smallest power of two strictly above every
    nonzero activation seen so far. When a larger value arrives, e_j grows and bins are merged in pairs once per
    doubling; a value v falls in bin ⌊v·H / 2^e⌋, and since edges at scale 2^(e+1) are every other edge at
    scale 2^e, merging is exact: the final histogram equals a one-shot histogram with those edges, whatever the
    block order. Multiplying by a power of two is exact in floating point, so no value lands in a wrong bin.
    """

    def __init__(self, d_sae: int, tokens_per_image: int, cfg: FeatureStatsConfig = FeatureStatsConfig(),
                 device: str | torch.device = "cpu"):
        if d_sae < 1 or tokens_per_image < 1:
            raise ValueError(f"d_sae and tokens_per_image must be ≥ 1, got {d_sae} and {tokens_per_image}")
        if cfg.aggregation == "cls" and cfg.cls_token >= tokens_per_image:
            raise ValueError(f"cls_token={cfg.cls_token} but images have {tokens_per_image} tokens")
        self.cfg, self.d_sae, self.tokens_per_image = cfg, d_sae, tokens_per_image
        self.device = torch.device(device)
        S, K, T, H = d_sae, cfg.top_n, tokens_per_image, cfg.n_bins
        dev = self.device
        self.n_images = 0
        self.last_image_idx = -1
        self.image_fire_count_S = torch.zeros(S, dtype=torch.int64, device=dev)
        self.token_fire_count_S = torch.zeros(S, dtype=torch.int64, device=dev)
        self.act_sum_S = torch.zeros(S, dtype=torch.float64, device=dev)
        self.token_act_sum_S = torch.zeros(S, dtype=torch.float64, device=dev)
        self.act_max_S = torch.full((S,), -math.inf, dtype=torch.float32, device=dev)
        self.hist_SH = torch.zeros(S, H, dtype=torch.int64, device=dev)
        self.hist_exp_S = torch.full((S,), _EMPTY_EXP, dtype=torch.int64, device=dev)
        self.top_key_SK = torch.full((S, K), torch.iinfo(torch.int64).min, dtype=torch.int64, device=dev)
        self.top_maps_SKT = torch.zeros(S, K, T, dtype=torch.float32, device=dev)

    @torch.no_grad()
    def update(self, image_idx_N: Tensor, codes_NTS: Tensor) -> None:
        """Fold in the (N, T, S) token codes of N images with global indices `image_idx_N` (unique, 0 ≤ idx < 2³²)."""
        N, T, S = codes_NTS.shape
        if T != self.tokens_per_image or S != self.d_sae:
            raise ValueError(f"codes have T={T}, S={S}; this pass was set up for T={self.tokens_per_image}, S={self.d_sae}")
        image_idx_N = torch.as_tensor(image_idx_N).to(self.device, torch.int64).reshape(-1)
        if image_idx_N.shape[0] != N:
            raise ValueError(f"{image_idx_N.shape[0]} image indices for {N} images")
        if N == 0:
            return
        if image_idx_N.min() < 0 or image_idx_N.max() > _LOW32:
            raise ValueError("image indices must be in [0, 2³²)")
        codes_NTS = codes_NTS.to(self.device, torch.float32)
        lowest = codes_NTS.amin()  # amin propagates NaN: one cheap pass checks both
        if torch.isnan(lowest):
            raise ValueError("the SAE codes contain NaN: check the activations and the SAE weights")

        # Token level: one pass over the (N, T, S) codes for each of fire counts and sums. SAE codes end in a ReLU,
        # so sign() is the 0/1 firing indicator; summing it in float32 is exact below 2²⁴ tokens per block and several
        # times faster than counting a bool mask.
        nonneg_NTS = codes_NTS if lowest >= 0 else codes_NTS.clamp(min=0)
        self.token_fire_count_S += torch.sign(nonneg_NTS).reshape(-1, S).sum(0).round().to(torch.int64)
        self.token_act_sum_S += codes_NTS.sum(1).to(torch.float64).sum(0)
        acts_NS = aggregate_tokens(codes_NTS, self.cfg.aggregation, self.cfg.cls_token)

        # Image level.
        self.image_fire_count_S += (acts_NS > 0).sum(0)
        self.act_sum_S += acts_NS.to(torch.float64).sum(0)
        self.act_max_S = torch.maximum(self.act_max_S, acts_NS.amax(0))
        self._update_histogram(acts_NS)
        self._update_top(image_idx_N, acts_NS, codes_NTS)
        self.n_images += N
        self.last_image_idx = max(self.last_image_idx, int(image_idx_N.max()))

    def _update_histogram(self, acts_NS: Tensor) -> None:
        H = self.cfg.n_bins
        block_max_S = acts_NS.amax(0)
        fired_S = block_max_S > 0
        # frexp: x = m·2^e with m in [0.5, 1), so 2^e is the smallest power of two strictly above x.
        need_exp_S = torch.frexp(block_max_S).exponent.to(torch.int64)
        new_exp_S = torch.where(fired_S, torch.maximum(self.hist_exp_S, need_exp_S), self.hist_exp_S)
        started_S = self.hist_exp_S != _EMPTY_EXP
        doublings_S = torch.where(started_S, new_exp_S - self.hist_exp_S, torch.zeros_like(new_exp_S))
        # After log2(H) merges everything sits in bin 0; more merges change nothing.
        for step in range(min(int(doublings_S.max()), int(math.log2(H)))):
            grow = doublings_S > step
            merged = self.hist_SH[grow].view(-1, H // 2, 2).sum(-1)
            self.hist_SH[grow] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
        self.hist_exp_S = new_exp_S

        pos_NS = acts_NS > 0
        if not pos_NS.any():
            return
        n_idx, s_idx = pos_NS.nonzero(as_tuple=True)
        exp = self.hist_exp_S[s_idx]
        # v·H/2^e in float64: exact (a power-of-two scaling) even for tiny or huge exponents.
        scaled = torch.ldexp(acts_NS[n_idx, s_idx].to(torch.float64), (int(math.log2(H)) - exp).to(torch.float64))
        bins = scaled.floor().to(torch.int64).clamp_(0, H - 1)
        self.hist_SH += torch.bincount(s_idx * H + bins, minlength=self.d_sae * H).view(self.d_sae, H)

    def _update_top(self, image_idx_N: Tensor, acts_NS: Tensor, codes_NTS: Tensor) -> None:
        K, T = self.cfg.top_n, self.tokens_per_image
        block_key_SN = _pack(acts_NS, image_idx_N[:, None].expand_as(acts_NS)).T
        cand_SC = torch.cat([self.top_key_SK, block_key_SN], dim=1)
        new_key_SK, pos_SK = cand_SC.topk(K, dim=1)  # keys are unique (distinct image indices): no tie to break
        from_old_SK = pos_SK < K
        maps_SKT = self.top_maps_SKT.gather(1, pos_SK.clamp(max=K - 1)[..., None].expand(-1, -1, T))
        s_idx, k_idx = (~from_old_SK).nonzero(as_tuple=True)
        maps_SKT[s_idx, k_idx] = codes_NTS[pos_SK[s_idx, k_idx] - K, :, s_idx]
        self.top_key_SK, self.top_maps_SKT = new_key_SK, maps_SKT

    # ---------------------------------------------------------------- results and resume
    def result(self, provenance: dict[str, Any] | None = None) -> "FeatureStats":
        if self.n_images == 0:
            raise ValueError("no images were seen: the probe set (or the selected rows) is empty")
        K = self.cfg.top_n
        values_SK, idx_SK = _unpack(self.top_key_SK)
        valid_K = torch.arange(K, device=self.device) < min(K, self.n_images)
        values_SK = torch.where(valid_K, values_SK, torch.full_like(values_SK, math.nan))
        idx_SK = torch.where(valid_K, idx_SK, torch.full_like(idx_SK, -1))
        cpu = lambda t: t.detach().to("cpu")  # noqa: E731
        return FeatureStats(
            config=self.cfg, d_sae=self.d_sae, tokens_per_image=self.tokens_per_image, n_images=self.n_images,
            last_image_idx=self.last_image_idx,
            image_fire_count_S=cpu(self.image_fire_count_S), token_fire_count_S=cpu(self.token_fire_count_S),
            act_sum_S=cpu(self.act_sum_S), token_act_sum_S=cpu(self.token_act_sum_S), act_max_S=cpu(self.act_max_S),
            hist_counts_SH=cpu(self.hist_SH), hist_exp_S=cpu(self.hist_exp_S),
            top_values_SK=cpu(values_SK), top_images_SK=cpu(idx_SK), top_maps_SKT=cpu(self.top_maps_SKT),
            provenance=dict(provenance or {}),
        )

    @classmethod
    def from_stats(cls, stats: "FeatureStats", device: str | torch.device = "cpu") -> "FeatureStatsAccumulator":
        """Resume a pass from (checkpointed) stats: every running quantity is recoverable from them exactly."""
        acc = cls(stats.d_sae, stats.tokens_per_image, stats.config, device)
        dev = acc.device
        acc.n_images, acc.last_image_idx = stats.n_images, stats.last_image_idx
        acc.image_fire_count_S = stats.image_fire_count_S.to(dev).clone()
        acc.token_fire_count_S = stats.token_fire_count_S.to(dev).clone()
        acc.act_sum_S = stats.act_sum_S.to(dev).clone()
        acc.token_act_sum_S = stats.token_act_sum_S.to(dev).clone()
        acc.act_max_S = stats.act_max_S.to(dev).clone()
        acc.hist_SH = stats.hist_counts_SH.to(dev).clone()
        acc.hist_exp_S = stats.hist_exp_S.to(dev).clone()
        valid_SK = stats.top_images_SK >= 0
        keys_SK = _pack(torch.nan_to_num(stats.top_values_SK), stats.top_images_SK.clamp(min=0))
        acc.top_key_SK = torch.where(valid_SK, keys_SK, torch.full_like(keys_SK, torch.iinfo(torch.int64).min)).to(dev)
        acc.top_maps_SKT = stats.top_maps_SKT.to(dev, torch.float32).clone()
        return acc


# ------------------------------------------------------------------------------------------------ result
_ARRAY_FIELDS = ("image_fire_count_S", "token_fire_count_S", "act_sum_S", "token_act_sum_S", "act_max_S",
                 "hist_counts_SH", "hist_exp_S", "top_values_SK", "top_images_SK", "top_maps_SKT")


@dataclass
class FeatureStats:
    """Per-feature statistics of one pass (CPU tensors). The raw sums are kept so a pass can resume exactly."""

    config: FeatureStatsConfig
    """How the pass was run (aggregation, top_n, bins, dense threshold)."""
    d_sae: int
    tokens_per_image: int
    n_images: int
    """Images folded in."""
    last_image_idx: int
    """Largest image index seen (a resumed pass skips images up to it)."""
    image_fire_count_S: Tensor
    """int64: images whose image-level activation is > 0."""
    token_fire_count_S: Tensor
    """int64: tokens whose code is > 0."""
    act_sum_S: Tensor
    """float64: Σ over images of the image-level activation."""
    token_act_sum_S: Tensor
    """float64: Σ over all tokens of the code."""
    act_max_S: Tensor
    """float32: max image-level activation."""
    hist_counts_SH: Tensor
    """int64: histogram of nonzero image-level activations over `hist_edges(j)`."""
    hist_exp_S: Tensor
    """int64: bins of feature j cover [0, 2^hist_exp_S[j]) (a large negative number for features that never fired)."""
    top_values_SK: Tensor
    """float32: image-level activations of the top images, descending (NaN in unused slots)."""
    top_images_SK: Tensor
    """int64: their image indices (ties: smaller index first; −1 in unused slots)."""
    top_maps_SKT: Tensor
    """float32: per-token codes of each top image (reshape T to the token grid for a heatmap)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Where the codes came from: SAE, store or backbone, probe images; free-form, saved as JSON."""

    # ---------------------------------------------------------------- derived per-feature quantities
    @property
    def aggregation(self) -> str:
        return self.config.aggregation

    @property
    def image_frequency_S(self) -> Tensor:
        return self.image_fire_count_S.double() / self.n_images

    @property
    def token_frequency_S(self) -> Tensor:
        return self.token_fire_count_S.double() / (self.n_images * self.tokens_per_image)

    @property
    def mean_act_S(self) -> Tensor:
        """Mean image-level activation over all images (zeros included)."""
        return self.act_sum_S / self.n_images

    @property
    def mean_act_firing_S(self) -> Tensor:
        """Mean image-level activation over the images where the feature fires (NaN for dead features)."""
        count = self.image_fire_count_S.double()
        return torch.where(count > 0, self.act_sum_S / count.clamp(min=1), torch.full_like(count, math.nan))

    @property
    def mean_token_act_S(self) -> Tensor:
        """Mean code over all tokens: the mean over images of the mean over patches (METHODS §2 'also keep the mean')."""
        return self.token_act_sum_S / (self.n_images * self.tokens_per_image)

    @property
    def dead_S(self) -> Tensor:
        """Never fired at image level on the probe set."""
        return self.image_fire_count_S == 0

    @property
    def dense_S(self) -> Tensor:
        return self.image_frequency_S > self.config.dense_threshold

    def hist_edges(self, j: int) -> Tensor:
        """(H+1,) float64 bin edges of feature j's histogram (all zeros if it never fired)."""
        if self.hist_exp_S[j] == _EMPTY_EXP:
            return torch.zeros(self.config.n_bins + 1, dtype=torch.float64)
        return torch.linspace(0, 1, self.config.n_bins + 1, dtype=torch.float64) * 2.0 ** int(self.hist_exp_S[j])

    def top_images(self, j: int, firing_only: bool = True) -> list[tuple[int, float]]:
        """[(image_idx, activation)] of feature j, best first; `firing_only` drops images where it is 0."""
        out = []
        for idx, v in zip(self.top_images_SK[j].tolist(), self.top_values_SK[j].tolist()):
            if idx >= 0 and (v > 0 or not firing_only):
                out.append((idx, v))
        return out

    # ---------------------------------------------------------------- save / load
    def _meta(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "library": "nacosae", "library_version": __version__,
                "config": dataclasses.asdict(self.config), "d_sae": self.d_sae, "tokens_per_image": self.tokens_per_image,
                "n_images": self.n_images, "last_image_idx": self.last_image_idx, "provenance": self.provenance}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `feature_stats.safetensors` then `feature_stats.json`, each atomically. A shared random token in
        both ties the pair together, so a kill between the two writes is detected on load, not silently mixed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        pair_id = uuid.uuid4().hex
        meta = {**self._meta(), "pair_id": pair_id}
        tensors = {name: getattr(self, name) for name in _ARRAY_FIELDS}
        atomic_save_safetensors(folder / STATS_ARRAYS, tensors, metadata={"pair_id": pair_id, "schema_version": str(SCHEMA_VERSION)})
        atomic_write_json(folder / STATS_META, meta)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "FeatureStats":
        from safetensors import SafetensorError, safe_open

        folder = Path(folder)
        meta_path, arrays_path = folder / STATS_META, folder / STATS_ARRAYS
        for p in (meta_path, arrays_path):
            if not p.is_file():
                raise FileNotFoundError(f"{folder} has no {p.name}: run hub_scripts/feature_stats.py to compute the stats")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise FeatureStatsError(f"{meta_path} is not valid JSON ({e}): recompute the stats") from e
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise FeatureStatsError(f"{meta_path} has schema_version {meta.get('schema_version')!r}; this nacosae reads {SCHEMA_VERSION}: recompute the stats")
        try:
            with safe_open(arrays_path, framework="pt") as f:
                file_meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in _ARRAY_FIELDS}
        except (SafetensorError, OSError) as e:
            raise FeatureStatsError(f"cannot read {arrays_path}: {e}. Recompute the stats") from e
        except KeyError as e:  # safe_open raises KeyError-like errors for a missing tensor name in some versions
            raise FeatureStatsError(f"{arrays_path} lacks tensor {e}: recompute the stats") from e
        if file_meta.get("pair_id") != meta.get("pair_id"):
            raise FeatureStatsError(f"{arrays_path.name} and {meta_path.name} in {folder} come from different writes "
                                    "(a save was interrupted): recompute or resume the stats")
        stats = cls(config=FeatureStatsConfig(**meta["config"]), d_sae=meta["d_sae"], tokens_per_image=meta["tokens_per_image"],
                    n_images=meta["n_images"], last_image_idx=meta["last_image_idx"], provenance=meta.get("provenance", {}),
                    **tensors)
        S, K, T, H = stats.d_sae, stats.config.top_n, stats.tokens_per_image, stats.config.n_bins
        expected = {"hist_counts_SH": (S, H), "top_values_SK": (S, K), "top_images_SK": (S, K), "top_maps_SKT": (S, K, T)}
        for name in _ARRAY_FIELDS:
            shape = expected.get(name, (S,))
            if tuple(getattr(stats, name).shape) != shape:
                raise FeatureStatsError(f"{arrays_path}: {name} has shape {tuple(getattr(stats, name).shape)}, expected {shape}")
        return stats


# ------------------------------------------------------------------------------------------------ the pass
CHECKPOINT_DIR = "checkpoint"


@torch.no_grad()
def compute_feature_stats(
    sae,
    blocks: Iterable[tuple[Tensor, Tensor]],
    cfg: FeatureStatsConfig = FeatureStatsConfig(),
    device: str | torch.device | None = None,
    out_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    total_images: int | None = None,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> FeatureStats:
    """One pass over `blocks` of `(image_idx_N, acts_NTD)` raw activations, encoded with `sae.encode`.

    With `out_dir`, the stats are saved there at the end, and the running state is saved (atomically) to
    `out_dir/checkpoint` every `checkpoint_every` blocks; a pass that finds a checkpoint resumes from it. Blocks
    must then come in increasing image order (as `ActivationStore.iter_images` yields them): images up to the
    checkpoint's last index are skipped. The checkpoint is removed once the final stats are written.
    """
    from tqdm.auto import tqdm

    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be ≥ 1, got {checkpoint_every}")
    device = torch.device(device) if device is not None else sae.W_dec.device
    ckpt = Path(out_dir) / CHECKPOINT_DIR if out_dir is not None else None
    acc, skip_until = None, -1
    if ckpt is not None and (ckpt / STATS_META).is_file():
        done = FeatureStats.load(ckpt)
        if done.config != cfg or done.d_sae != sae.cfg.d_sae:
            raise FeatureStatsError(f"the checkpoint in {ckpt} was written with {done.config} and d_sae={done.d_sae}; this "
                                    f"pass asks for {cfg} and d_sae={sae.cfg.d_sae}: delete the checkpoint or use the same settings")
        acc, skip_until = FeatureStatsAccumulator.from_stats(done, device), done.last_image_idx
    bar = tqdm(total=total_images, initial=acc.n_images if acc else 0, unit="img", desc="feature stats", disable=not progress)
    prev_max, n_blocks = -1, 0
    for image_idx_N, acts_NTD in blocks:
        image_idx_N, acts_NTD = torch.as_tensor(image_idx_N).reshape(-1), torch.as_tensor(acts_NTD)
        if acts_NTD.ndim != 3 or acts_NTD.shape[0] != image_idx_N.shape[0]:
            raise ValueError(f"blocks must be (image_idx_N, acts_NTD) of whole images, got shapes {tuple(image_idx_N.shape)} "
                             f"and {tuple(acts_NTD.shape)}")
        if ckpt is not None and len(image_idx_N):
            if image_idx_N[0] <= prev_max or (image_idx_N[1:] <= image_idx_N[:-1]).any():
                raise ValueError("a resumable pass (out_dir set) needs blocks in increasing image order, as "
                                 "ActivationStore.iter_images yields them")
            prev_max = int(image_idx_N[-1])
            keep = image_idx_N > skip_until
            if not keep.all():
                image_idx_N, acts_NTD = image_idx_N[keep], acts_NTD[keep.to(acts_NTD.device)]
        if len(image_idx_N) == 0:
            continue
        codes_NTS = sae.encode(acts_NTD.to(device, torch.float32))
        if acc is None:
            acc = FeatureStatsAccumulator(sae.cfg.d_sae, codes_NTS.shape[1], cfg, device)
        acc.update(image_idx_N, codes_NTS)
        bar.update(len(image_idx_N))
        n_blocks += 1
        if ckpt is not None and n_blocks % checkpoint_every == 0:
            acc.result(provenance).save(ckpt)
    bar.close()
    if acc is None:
        raise ValueError("no images were seen: the probe set (or the selected rows) is empty")
    stats = acc.result(provenance)
    if out_dir is not None:
        stats.save(out_dir)
        for name in (STATS_META, STATS_ARRAYS):  # metadata first: a kill in between leaves no loadable half-checkpoint
            (ckpt / name).unlink(missing_ok=True)
        if ckpt.is_dir() and not any(ckpt.iterdir()):
            ckpt.rmdir()
    return stats


@torch.no_grad()
def backbone_blocks(backbone, images: Iterable, layer: str, tokens: str = "all", batch_images: int = 32,
                    device: str | torch.device = "cpu", start_idx: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """`(image_idx_N, acts_NTD)` blocks straight from a backbone (no store): `images` are PIL images (or anything
    `backbone.preprocess` takes), numbered from `start_idx` in the order given."""
    if batch_images < 1:
        raise ValueError(f"batch_images must be ≥ 1, got {batch_images}")
    pending: list[Tensor] = []
    next_idx = start_idx

    def flush():
        nonlocal next_idx
        pixels = torch.stack(pending).to(device)
        acts_NTD = backbone.activations(pixels, layer, tokens=tokens)
        idx = torch.arange(next_idx, next_idx + len(pending))
        next_idx += len(pending)
        pending.clear()
        return idx, acts_NTD.float()

    for image in images:
        pending.append(backbone.preprocess(image))
        if len(pending) == batch_images:
            yield flush()
    if pending:
        yield flush()


# ------------------------------------------------------------------------------------------------ heatmaps
def heatmap_overlay(pil_image, token_map_T, grid_hw: tuple[int, int], alpha: float = 0.6, vmax: float | None = None,
                    cmap: str = "inferno", box: tuple[float, float, float, float] | None = None):
    """The image with a token map upsampled (bilinear) over it: pixels blend towards the colour map in proportion to
    the activation, so regions where the feature is silent keep their look. `vmax` fixes the colour scale
    (default: the map's max, e.g. pass the feature's `act_max_S[j]` to compare images). Returns an RGB PIL image.

    box: the (left, top, right, bottom) pixels of `pil_image` that the token grid spans, i.e. the backbone's
    `token_box(pil_image.size)` (default: the whole image). Where it reaches outside the image (the backbone pads)
    the picture grows with white to show the padding the model saw; pixels outside it (the backbone's centre crop
    cut them off) are dimmed, since no token saw them."""
    import math

    import matplotlib
    import torch.nn.functional as F
    from PIL import Image

    h, w = grid_hw
    token_map_T = torch.as_tensor(token_map_T, dtype=torch.float32).reshape(-1)
    if h * w != token_map_T.numel():
        raise ValueError(f"the token map has {token_map_T.numel()} values but grid_hw={grid_hw} has {h * w} cells "
                         "(drop the CLS token, or pass the backbone's token grid)")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    from nacosae.images import open_image

    image = open_image(pil_image)
    W, Hpx = image.size
    left, top, right, bottom = (0.0, 0.0, float(W), float(Hpx)) if box is None else (float(v) for v in box)
    if not (right > left and bottom > top):
        raise ValueError(f"box must be (left, top, right, bottom) with right > left and bottom > top, got {box}")
    # whole pixels: the box rounded, the canvas the image grown with white where the box reaches outside it (padding)
    x0, y0 = math.floor(left + 0.5), math.floor(top + 0.5)
    bw, bh = max(1, math.floor(right + 0.5) - x0), max(1, math.floor(bottom + 0.5) - y0)
    cl, ct, cr, cb = min(0, x0), min(0, y0), max(W, x0 + bw), max(Hpx, y0 + bh)
    if (cl, ct, cr, cb) != (0, 0, W, Hpx):
        canvas = Image.new("RGB", (cr - cl, cb - ct), (255, 255, 255))
        canvas.paste(image, (-cl, -ct))
        image, W, Hpx, x0, y0 = canvas, cr - cl, cb - ct, x0 - cl, y0 - ct
    base_HW3 = np.asarray(image, dtype=np.float32) / 255.0
    inside_HW = np.zeros((Hpx, W), dtype=bool)
    inside_HW[max(0, y0):y0 + bh, max(0, x0):x0 + bw] = True
    if not inside_HW.all():  # cropped away by the backbone: dim towards grey
        base_HW3 = np.where(inside_HW[..., None], base_HW3, 0.35 * base_HW3 + 0.65 * 0.5)
    scale = float(token_map_T.max()) if vmax is None else float(vmax)
    if not scale > 0 and inside_HW.all():
        return image  # a silent feature, nothing cropped: the image itself
    heat_HW = np.zeros((Hpx, W), dtype=np.float32)
    if scale > 0:  # else a silent feature: nothing to draw
        grid = (token_map_T.clamp(min=0) / scale).clamp(max=1).view(1, 1, h, w)
        heat_box = F.interpolate(grid, size=(bh, bw), mode="bilinear", align_corners=False)[0, 0].numpy()
        ys, xs = slice(max(0, y0), min(Hpx, y0 + bh)), slice(max(0, x0), min(W, x0 + bw))
        heat_HW[ys, xs] = heat_box[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    colour_HW3 = matplotlib.colormaps[cmap](heat_HW)[..., :3]
    weight_HW1 = alpha * heat_HW[..., None]
    out = base_HW3 * (1 - weight_HW1) + colour_HW3 * weight_HW1
    return Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8))
