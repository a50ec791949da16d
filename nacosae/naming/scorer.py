"""The scorer of the MILS loop: a feature's activation on rendered images (METHODS §3.1 step 4).

    scorer.score(images, features) -> Tensor (n_images, n_features)

`FeatureScorer` runs the images through the same backbone layer and SAE the feature comes from, aggregates each
image's token codes the way the feature statistics did (max over tokens by default, METHODS §2), and divides by the
feature's maximum image-level activation on the probe set, so 1.0 means "as strong as on its best probe image" and
scores compare across features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import Tensor

from nacosae.features import AGGREGATIONS, aggregate_tokens
from nacosae.images import open_image


@runtime_checkable
class Scorer(Protocol):
    def score(self, images: Sequence[Image.Image], features: Sequence[int]) -> Tensor: ...


class FeatureScorer:
    """Image-level SAE feature activations on PIL images, normalised by the probe-set maxima `max_act_S`.

    backbone: a `nacosae.backbones` backbone (`preprocess(pil) -> (C,H,W)`, `activations(x_BCHW, layer, tokens) -> (B,T,D)`).
    max_act_S: the per-feature max image-level activation on the probe set (`FeatureStats.act_max_S`), with the same
        aggregation; None leaves scores raw (only for tests and quick looks: raw scores do not compare across features).
    """

    def __init__(self, backbone, layer: str, tokens: str, sae, aggregation: str = "max", max_act_S: Tensor | None = None,
                 cls_token: int = 0, batch_size: int = 32, device: str | torch.device = "cpu"):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS} (as in the feature statistics), got {aggregation!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        d_sae = sae.cfg.d_sae
        if max_act_S is not None:
            max_act_S = torch.as_tensor(max_act_S, dtype=torch.float32).flatten().cpu()
            if max_act_S.numel() != d_sae:
                raise ValueError(f"max_act_S has {max_act_S.numel()} entries but the SAE has d_sae={d_sae} features")
        self.backbone, self.layer, self.tokens, self.sae = backbone, layer, tokens, sae
        self.aggregation, self.max_act_S, self.cls_token = aggregation, max_act_S, cls_token
        self.batch_size, self.device = batch_size, torch.device(device)

    @classmethod
    def from_stats(cls, backbone, layer: str, tokens: str, sae, stats, **kwargs) -> "FeatureScorer":
        """With the aggregation and probe maxima of a `nacosae.features.FeatureStats` pass."""
        return cls(backbone, layer, tokens, sae, aggregation=stats.aggregation, max_act_S=stats.act_max_S,
                   cls_token=getattr(stats.config, "cls_token", 0), **kwargs)

    @torch.no_grad()
    def activations(self, images: Sequence[Image.Image], features: Sequence[int]) -> Tensor:
        """Raw image-level activations (n_images, n_features)."""
        feats = torch.as_tensor(list(features), dtype=torch.long)
        if feats.numel() and (feats.min() < 0 or feats.max() >= self.sae.cfg.d_sae):
            raise ValueError(f"features must be in 0..{self.sae.cfg.d_sae - 1}, got {features}")
        out = []
        for i in range(0, len(images), self.batch_size):
            x_BCHW = torch.stack([self.backbone.preprocess(open_image(im)) for im in images[i: i + self.batch_size]])
            acts_BTD = self.backbone.activations(x_BCHW.to(self.device), self.layer, self.tokens)
            B, T, D = acts_BTD.shape
            acts_ND = acts_BTD.reshape(B * T, D).to(self.sae.W_dec.device, self.sae.W_dec.dtype)
            codes_BTS = self.sae.encode(acts_ND).reshape(B, T, -1)
            codes_BTF = codes_BTS[..., feats.to(codes_BTS.device)]
            out.append(aggregate_tokens(codes_BTF, self.aggregation, self.cls_token).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(feats))

    def score(self, images: Sequence[Image.Image], features: Sequence[int]) -> Tensor:
        """Activations divided by each feature's probe-set max (METHODS §3.1 step 4)."""
        acts_NF = self.activations(images, features)
        if self.max_act_S is None:
            return acts_NF
        max_F = self.max_act_S[torch.as_tensor(list(features), dtype=torch.long)]
        dead = [int(f) for f, m in zip(features, max_F.tolist()) if not m > 0]
        if dead:
            raise ValueError(f"features {dead} never fired on the probe set (max activation 0): there is nothing to name; "
                             "skip dead features (FeatureStats.dead_S)")
        return acts_NF / max_F
