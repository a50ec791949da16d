"""The scorer of the MILS loop: a feature's activation on rendered images (METHODS §3.1 step 4).

    scorer.score(images, features) -> Tensor (n_images, n_features)
    table = ImageActivationTable.from_store(store, sae)          # every probe image's image-level activations, once
    TableScorer(table, stats.act_max_S).score(images, features)  # the same score, looked up instead of recomputed

`FeatureScorer` runs the images through the same backbone layer and SAE the feature comes from, aggregates each
image's token codes the way the feature statistics did (max over tokens by default, METHODS §2), and divides by the
feature's maximum image-level activation on the probe set, so 1.0 means "as strong as on its best probe image" and
scores compare across features.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from nacosae.features import AGGREGATIONS, aggregate_tokens
from nacosae.images import open_image
from nacosae.io import atomic_save_safetensors


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


# ================================================================================================ the activation table
TABLE_SCHEMA_VERSION = 1
"""Version of a saved `ImageActivationTable` (a table of another version is rebuilt, never misread)."""
REF_KEY = "nacosae_ref"
"""`PIL.Image.info` key under which bank images carry their ref (path), so a scorer can look their activations up."""


def store_ref(record: dict) -> str:
    """The ref of a probe image: its file path, or its image id for images without a file (scikit-image samples)."""
    return str(record["path"]) if record.get("path") else str(record["image_id"])


class ImageActivationTable:
    """Image-level activations of images by ref: every SAE feature (N, S) and every raw channel (N, D) of the layer.

    Built once from the activation store (`from_store`); `rows(refs, images)` returns the SAE rows, computing the
    images the store lacks through `fallback` (a `FeatureScorer`, raw activations) and remembering them.
    """

    def __init__(self, refs: Sequence[str], acts_NS: Tensor, raw_ND: Tensor, aggregation: str, fallback=None):
        if acts_NS.shape[0] != len(refs) or raw_ND.shape[0] != len(refs):
            raise ValueError(f"{len(refs)} refs for {acts_NS.shape[0]} SAE rows and {raw_ND.shape[0]} raw rows")
        self.refs = list(refs)
        self.index = {r: i for i, r in enumerate(self.refs)}
        if len(self.index) != len(self.refs):
            raise ValueError("refs must be unique (one row per image)")
        self.acts_NS, self.raw_ND, self.aggregation, self.fallback = acts_NS.float(), raw_ND.float(), aggregation, fallback
        self._extra: dict[str, Tensor] = {}
        self.n_fallback = 0

    @property
    def d_sae(self) -> int:
        return self.acts_NS.shape[1]

    @classmethod
    @torch.no_grad()
    def from_store(cls, store, sae, aggregation: str = "max", cls_token: int = 0, batch_images: int = 256,
                   progress: bool = True, rows=None) -> ImageActivationTable:
        """The table of every image of the store, or of the images whose indices `rows` names: each image's token
        codes and raw channels aggregated by `aggregate_tokens`, one block of `batch_images` images at a time."""
        wanted = None if rows is None else {int(i) for i in rows}
        images = store.images if wanted is None else [r for r in store.images if r["image_idx"] in wanted]
        pos = {r["image_idx"]: i for i, r in enumerate(images)}
        N = len(images)
        acts_NS = torch.zeros(N, sae.cfg.d_sae)
        raw_ND = torch.zeros(N, store.d)
        bar = tqdm(total=N, desc="activation table", unit="img", disable=not progress)
        for image_idx_N, acts_NTD in store.iter_images(batch_images, rows=rows):
            B, T, D = acts_NTD.shape
            codes_NTS = sae.encode(acts_NTD.reshape(B * T, D).to(sae.W_dec.device)).reshape(B, T, -1).float().cpu()
            rows = torch.as_tensor([pos[int(i)] for i in image_idx_N])
            acts_NS[rows] = aggregate_tokens(codes_NTS, aggregation, cls_token)
            raw_ND[rows] = aggregate_tokens(acts_NTD.float().cpu(), aggregation, cls_token)
            bar.update(B)
        bar.close()
        return cls([store_ref(r) for r in images], acts_NS, raw_ND, aggregation)

    def save(self, path: str | os.PathLike, key: str) -> None:
        atomic_save_safetensors(path, {"acts_NS": self.acts_NS, "raw_ND": self.raw_ND},
                                metadata={"refs": json.dumps(self.refs), "aggregation": self.aggregation, "key": key,
                                          "schema_version": str(TABLE_SCHEMA_VERSION)})

    @classmethod
    def load(cls, path: str | os.PathLike, key: str) -> ImageActivationTable | None:
        """The saved table, or None when there is none or it was built from other inputs (`key` differs)."""
        from safetensors import safe_open

        if not Path(path).is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("schema_version") != str(TABLE_SCHEMA_VERSION):
                return None
            return cls(json.loads(meta["refs"]), f.get_tensor("acts_NS"), f.get_tensor("raw_ND"), meta["aggregation"])

    def rows(self, refs: Sequence[str | None], images: Sequence[Image.Image] | None = None) -> Tensor:
        """(N, S) SAE activations; a ref the table lacks (or None) needs its image, run through `fallback`."""
        out = torch.empty(len(refs), self.d_sae)
        todo = []
        for i, r in enumerate(refs):
            if r is not None and r in self.index:
                out[i] = self.acts_NS[self.index[r]]
            elif r is not None and r in self._extra:
                out[i] = self._extra[r]
            else:
                todo.append(i)
        if todo:
            if images is None or self.fallback is None:
                raise KeyError(f"{len(todo)} image(s) are not in the activation table (e.g. {refs[todo[0]]!r}) and there is "
                               "no fallback scorer (or no images) to compute them")
            acts = self.fallback.activations([images[i] for i in todo], range(self.d_sae))
            self.n_fallback += len(todo)
            for i, a in zip(todo, acts):
                out[i] = a
                if refs[i] is not None:
                    self._extra[refs[i]] = a.clone()
        return out

    def raw_rows(self, refs: Sequence[str]) -> Tensor:
        missing = [r for r in refs if r not in self.index]
        if missing:
            raise KeyError(f"raw-channel activations exist only for probe images; {missing[:3]} are not in the store")
        return self.raw_ND[torch.as_tensor([self.index[r] for r in refs], dtype=torch.long)]


class _LazyFeatureScorer:
    """A FeatureScorer on the run's backbone, built (and the backbone loaded) only when an image is not in the table.

    run: anything with `backbone` (loaded on first access), `layer`, `tokens`, `sae`, `aggregation` and `stats`
    (`nacosae.evaluate.NamingRun`)."""

    def __init__(self, run):
        self.run, self._scorer = run, None

    def activations(self, images, features):
        if self._scorer is None:
            r = self.run
            self._scorer = FeatureScorer(r.backbone, r.layer, r.tokens, r.sae, r.aggregation,
                                         cls_token=getattr(r.stats.config, "cls_token", 0))
        return self._scorer.activations(images, features)


class TableScorer:
    """The MILS scorer (METHODS §3.1 step 4) on top of an `ImageActivationTable`: activation / probe-set max, looking up
    images by `image.info[REF_KEY]` (bank thumbnails carry it); equal to `FeatureScorer.score` up to the store's dtype."""

    def __init__(self, table: ImageActivationTable, max_act_S: Tensor):
        self.table = table
        self.max_act_S = torch.as_tensor(max_act_S, dtype=torch.float32).flatten()
        if self.max_act_S.numel() != table.d_sae:
            raise ValueError(f"max_act_S has {self.max_act_S.numel()} entries, the table {table.d_sae} features")

    def activations(self, images: Sequence[Image.Image], features: Sequence[int]) -> Tensor:
        refs = [im.info.get(REF_KEY) for im in images]
        return self.table.rows(refs, images)[:, torch.as_tensor(list(features), dtype=torch.long)]

    def score(self, images: Sequence[Image.Image], features: Sequence[int]) -> Tensor:
        feats = torch.as_tensor(list(features), dtype=torch.long)
        max_F = self.max_act_S[feats]
        if not (max_F > 0).all():
            raise ValueError(f"features {feats[~(max_F > 0)].tolist()} never fired on the probe set: nothing to name")
        return self.activations(images, features) / max_F
