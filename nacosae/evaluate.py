"""Evaluation runs: name SAE features with every method, then score each name on images the naming never saw
(METHODS §3-4), and compare the methods.

    run = NamingRun(NamingRunConfig(sae=..., stats=..., store=...), work_dir="runs/naming/blocks.14")
    run.name_features("mils", rank, world_size)     # work/names/mils/rank{r}.json, MILS state saved after each step
    run.evaluate(rank, world_size)                  # work/eval/rank{r}.json: CoSy per feature per method
    run.monosemanticity()                           # work/ms.json: MS of SAE features and of the layer's raw channels
    features, images, runs, summary = assemble_results(run)     # rows for nacosae.results.write_results

Every stage shards the selected features over ranks (rank r takes features r::world), writes its own shard file
atomically after each feature, and skips features any shard has finished, so a killed run resumes, and 1 or N
processes give the same merged result.

Honest evaluation (the naming loop must not see the evaluation images):
- The offline generator is retrieval from a described image bank (Open Clip Art). The bank is split by image, seeded,
  into a *search* half (the only images the MILS loop can retrieve) and an *eval* half (the only images CoSy renders
  come from); on top of that the eval renders use `MILSConfig.eval_seeds` (ranks the loop never used), as a
  diffusion generator would use unseen seeds (METHODS §3.1, last line).
- The control set is fixed for all features and methods: a seeded sample of probe images outside the eval half.
- Image-level activation = the feature statistics' aggregation (max over the 7×7 tokens for EfficientNet maps).
- A name is published only if its held-out CoSy AUC clears `threshold`; otherwise the feature is `unnamed`.

Speed: every probe image's image-level activations (all SAE features, and the raw channels) are read once from the
activation store into an `ImageActivationTable`; the bank images are probe images, so the MILS scorer and CoSy look
them up instead of re-running the backbone (the same backbone, layer and preprocessing wrote the store; it holds
float16). Images the store lacks go through the backbone.

This module keeps the run's work folder (config, shards, setup, resume) and the merge step; the parts it calls have
their own owners: the activation table and scorers in `nacosae.naming.scorer`, the MS report in `nacosae.metrics`,
tables, figures, markdown and the card text in `nacosae.naming.report`, the row builders in `nacosae.results`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from nacosae import __version__
from nacosae.images import ImageRecord, SkimageSource, cache_dir, open_image, pad_to_square
from nacosae.io import atomic_write_bytes, atomic_write_json
from nacosae.metrics import cosy_scores, monosemanticity_report
from nacosae.naming.generators import DescribedImageBank, Render, RetrievalGenerator
from nacosae.naming.report import (
    comparison_table,
    paired_difference,
    plot_auc_distributions,
    plot_mils_scores,
    plot_ms,
    results_card,
    results_markdown,
)
from nacosae.naming.scorer import REF_KEY, ImageActivationTable, TableScorer, _LazyFeatureScorer, store_ref
from nacosae.naming.vocab import OPENCLIPART_DIR, normalise

SCHEMA_VERSION = 1
METHODS = ("mils", "mils_gemma", "top_label", "random", "vocab")
MILS_METHODS = ("mils", "mils_gemma")
PUBLISHABLE = ("mils", "mils_gemma", "top_label", "vocab")
"""Methods whose name may be published (`random` is the floor, never a name)."""
UNNAMED = "unnamed"
MUTABLE_SETTINGS = ("gemma_features", "threshold", "ms_encoder")
"""Settings a resumed run may change: they decide which features Gemma names and which names are published, never a
finished name or score."""


# ================================================================================================ configuration
@dataclass(frozen=True)
class NamingRunConfig:
    sae: str
    """SAE folder (config.json + model.safetensors)."""
    stats: str
    """FeatureStats folder of that SAE over the probe set (nacosae.features)."""
    store: str
    """The activation store the stats were computed from (the probe images' activations at the SAE's layer)."""
    sae_id: str = ""
    """Id of the SAE in the results dataset; '' = '<backbone>/<layer>' from the SAE's provenance."""
    n_features: int = 64
    """Features to name: a seeded sample of the features that are neither dead nor dense and fire on ≥ min_fires images."""
    feature_seed: int = 0
    """Seed of that sample."""
    min_fires: int = 16
    """Only features firing on at least this many probe images are sampled (a full top-16 gallery to learn from)."""
    gemma_features: int = 16
    """mils_gemma names only the first this many selected features (Gemma-3-270M is slow on CPU)."""
    bank_source: str = "store"
    """The retrieval bank: 'store' = the probe set's Open Clip Art images (all in the activation table), or 'openclipart'
    = the whole cleaned Open Clip Art listing (the same images when the probe set is all of Open Clip Art)."""
    bank_max_images: int | None = None
    """A seeded subset of this many bank images (tests, development); None: all."""
    bank_eval_fraction: float = 0.5
    """Share of the bank (split by image, seeded) held out for evaluation renders; the loop searches the rest."""
    bank_seed: int = 0
    """Seed of the bank split (and of the bank subset)."""
    n_iterations: int = 8
    """T of the `mils` loop (METHODS §3.1)."""
    n_candidates: int = 16
    """n: new prompts per iteration (`mils`)."""
    n_best: int = 8
    """m: best prompts kept and shown to the proposer."""
    n_images: int = 3
    """G: renders per prompt in the loop; eval renders use the seeds after these (`MILSConfig.eval_seeds`)."""
    n_seed_prompts: int = 24
    """Seed prompts: the top-image hints, then vocabulary words."""
    n_hints: int = 6
    """Hints from the top probe images: their majority label, then their descriptions."""
    gemma_iterations: int = 4
    """T of the `mils_gemma` loop."""
    gemma_candidates: int = 8
    """n of the `mils_gemma` loop."""
    render_template: str = "{}"
    """How a prompt (and a name, for CoSy) is sent to the generator."""
    mils_seed: int = 0
    """Base seed of proposals and seed-prompt samples."""
    n_eval_renders: int = 16
    """Held-out renders per name for CoSy (METHODS §4.1; the paper: 50 SDXL images)."""
    n_control: int = 500
    """Control images for CoSy: a seeded sample of probe images outside the eval half of the bank."""
    control_seed: int = 0
    """Seed of that sample."""
    threshold: float = 0.6
    """A name is published only if its held-out CoSy AUC is ≥ this (else the feature is 'unnamed')."""
    ms_images: int = 1000
    """Probe images (a seeded sample of the file-backed ones) for the Monosemanticity Score (METHODS §4.2)."""
    ms_seed: int = 0
    """Seed of that sample."""
    ms_encoder: str = "auto"
    """Image encoder of the MS (`nacosae.backbones.ms_encoder`): 'auto' (EfficientNet-Lite2 for SAEs on the offline
    EfficientNet-Lite0, DINOv2 ViT-B otherwise), 'dinov2', 'efficientnet-lite2' or 'own' (the SAE's backbone at ms_layer)."""
    ms_layer: str = "pooled"
    """Layer of the SAE's own backbone embedding the MS images with ms_encoder='own' (not independent: a caveat)."""

    def __post_init__(self):
        for name in ("n_features", "min_fires", "n_iterations", "n_candidates", "n_best", "n_images", "n_seed_prompts",
                     "gemma_iterations", "gemma_candidates", "n_eval_renders", "ms_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.n_hints < 0 or self.gemma_features < 0:
            raise ValueError(f"n_hints and gemma_features must be ≥ 0, got {self.n_hints}, {self.gemma_features}")
        if self.n_control < 2:
            raise ValueError(f"n_control must be ≥ 2 (CoSy's MAD needs a std), got {self.n_control}")
        if not 0 < self.bank_eval_fraction < 1:
            raise ValueError(f"bank_eval_fraction must be in (0, 1), got {self.bank_eval_fraction}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold is a ROC-AUC and must be in [0, 1], got {self.threshold}")
        if self.bank_source not in ("store", "openclipart"):
            raise ValueError(f"bank_source must be 'store' or 'openclipart', got {self.bank_source!r}")
        if self.bank_max_images is not None and self.bank_max_images < 4:
            raise ValueError(f"bank_max_images must be ≥ 4 or None, got {self.bank_max_images}")
        if self.render_template.count("{}") != 1:
            raise ValueError(f"render_template must contain '{{}}' exactly once, got {self.render_template!r}")

    def mils_config(self, method: str):
        """The MILSConfig of a MILS method (both share G, so both use the same eval seeds)."""
        from nacosae.naming.mils import MILSConfig

        if method == "mils":
            T, n = self.n_iterations, self.n_candidates
        elif method == "mils_gemma":
            T, n = self.gemma_iterations, self.gemma_candidates
        else:
            raise ValueError(f"{method!r} is not a MILS method {MILS_METHODS}")
        return MILSConfig(n_iterations=T, n_candidates=n, n_best=self.n_best, n_images=self.n_images,
                          render_template=self.render_template, seed=self.mils_seed)

    @property
    def eval_seeds(self) -> tuple[int, ...]:
        return self.mils_config("mils").eval_seeds(self.n_eval_renders)

    def resolved(self) -> NamingRunConfig:
        """Paths made absolute, so a resumed run started from another folder is recognised as the same run."""
        return dataclasses.replace(self, sae=str(Path(self.sae).resolve()), stats=str(Path(self.stats).resolve()),
                                   store=str(Path(self.store).resolve()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (for --help), read from its source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def add_config_arguments(parser, cls=None) -> None:
    """One `--field-name` option per field of `NamingRunConfig` (help = the field's docstring, default = its default).
    Fields without a default are checked by `config_from_args`, not by argparse, so a script can also take them
    from a work folder's setup.json."""
    cls = cls or NamingRunConfig
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING
        kind = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), str)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None if required else f.default,
                            help=docs.get(f.name, "") + (" (required)" if required else " (default: %(default)s)"))


def config_from_args(args, cls=None):
    """The config from parsed `add_config_arguments` options (an error names the missing required ones)."""
    cls = cls or NamingRunConfig
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and getattr(args, f.name) is None]
    if missing:
        raise SystemExit(f"missing required options: {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def load_run_config(work_dir: str | os.PathLike) -> NamingRunConfig:
    """The config a work folder was started with (its setup.json)."""
    path = Path(work_dir) / "setup.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: start the run with hub_scripts/name_features.py (it writes the "
                                "settings there), then evaluate and build from the same --work folder")
    return NamingRunConfig(**_read_json(path)["config"])


def _seed_of(*parts: Any) -> int:
    """A stable 32-bit seed from any parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little")


# ================================================================================================ images
def load_thumbnail(path: str | os.PathLike, thumb_dir: str | os.PathLike | None = None, size: int = 224) -> Image.Image:
    """The image at `path` as RGB, composited onto white, padded to a white square and resized to `size` px (bicubic):
    EfficientNet-Lite0's preprocessing up to normalisation, so the backbone sees the same pixels as from the original.
    With `thumb_dir` the thumbnail is cached there as PNG (keyed by path, size and file mtime): decoding large Open
    Clip Art PNGs dominates retrieval otherwise."""
    path = Path(path)
    cache = None
    if thumb_dir is not None:
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{size}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        cache = Path(thumb_dir) / key[:2] / f"{key}.png"
        if cache.is_file():
            return open_image(cache)
    im = pad_to_square(open_image(path)).resize((size, size), Image.Resampling.BICUBIC)
    if cache is not None:
        import io

        buf = io.BytesIO()
        im.save(buf, format="PNG")
        atomic_write_bytes(cache, buf.getvalue())
    return im


@torch.no_grad()
def ms_embeddings(encoder, layer: str, images: Iterable[Image.Image], batch_size: int = 32,
                  progress: bool = True, total: int | None = None) -> Tensor:
    """(N, E) float32 image embeddings for the Monosemanticity Score (METHODS §4.2): `encoder` (a
    `nacosae.backbones.Backbone`, the one `ms_encoder` chose) at `layer`, its "mean" token (the layer's average over
    its tokens, e.g. the pooled 1280-d vector of EfficientNet), one row per image in the order given, on the CPU.

    images: PIL images, any iterable (a generator decodes them lazily: only `batch_size` are held at a time); each
    goes through `encoder.preprocess`; `total` sizes the progress bar when `images` has no len. The one owner of the MS
    embedding: `NamingRun.monosemanticity` and `hub_scripts/ms_table.py` call it. Raises ValueError for batch_size < 1
    or no images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    total = len(images) if hasattr(images, "__len__") else total
    bar = tqdm(total=total, desc="MS embeddings", unit="img", disable=not progress)
    emb, batch = [], []
    for img in itertools.chain(images, [None]):  # None: flush the last, partial batch
        if img is not None:
            batch.append(encoder.preprocess(img))
        if batch and (img is None or len(batch) == batch_size):
            emb.append(encoder.activations(torch.stack(batch), layer, "mean")[:, 0].float().cpu())
            bar.update(len(batch))
            batch = []
    bar.close()
    if not emb:
        raise ValueError("ms_embeddings got no images")
    return torch.cat(emb)


def ms_sample(records: Sequence[dict], n_images: int, seed: int = 0) -> list[dict]:
    """The MS images of an activation store: a seeded sample (`random.Random(seed)`) of min(n_images, #) of its
    records that have a file path (`ActivationStore.images`; scikit-image samples have none), drawn from them in
    image_idx order, so a run and `hub_scripts/ms_table.py` with the same seed score the same images."""
    if n_images < 1:
        raise ValueError(f"n_images must be ≥ 1, got {n_images}")
    file_recs = sorted((r for r in records if r.get("path")), key=lambda r: r["image_idx"])
    if not file_recs:
        raise ValueError("the store holds no image with a file path to embed for the MS")
    return random.Random(seed).sample(file_recs, min(n_images, len(file_recs)))


@dataclass
class ThumbnailBank(DescribedImageBank):
    """A described image bank whose images are (disk-cached) thumbnails carrying their ref in `image.info[REF_KEY]`."""

    thumb_dir: Path | None = None
    """Thumbnail cache folder (None: decode the originals every time)."""
    thumb_size: int = 224

    def load_image(self, i: int) -> Image.Image:
        if i in self._images:
            self._images.move_to_end(i)
            return self._images[i]
        im = load_thumbnail(self.paths[i], self.thumb_dir, self.thumb_size)
        im.info[REF_KEY] = str(self.paths[i])
        self._images[i] = im
        if len(self._images) > self.image_cache_size:
            self._images.popitem(last=False)
        return im

    def subset(self, idx: Sequence[int]) -> ThumbnailBank:
        idx = [int(i) for i in idx]
        return ThumbnailBank([self.paths[i] for i in idx], [self.descriptions[i] for i in idx], [self.labels[i] for i in idx],
                             self.embeddings_NE[torch.as_tensor(idx, dtype=torch.long)], self.embedder,
                             self.image_cache_size, thumb_dir=self.thumb_dir, thumb_size=self.thumb_size)


def split_bank(bank: DescribedImageBank, eval_fraction: float = 0.5, seed: int = 0) -> tuple[ThumbnailBank, ThumbnailBank]:
    """(search half, eval half): a seeded split of the bank by image (disjoint; each keeps bank order)."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = len(bank)
    n_eval = round(eval_fraction * n)
    if not 0 < n_eval < n:
        raise ValueError(f"a bank of {n} images cannot be split with eval_fraction={eval_fraction}: both halves need images")
    perm = np.random.default_rng(seed).permutation(n)
    if not isinstance(bank, ThumbnailBank):
        bank = ThumbnailBank(bank.paths, bank.descriptions, bank.labels, bank.embeddings_NE, bank.embedder)
    return bank.subset(np.sort(perm[n_eval:])), bank.subset(np.sort(perm[:n_eval]))


# ================================================================================================ CoSy, publishing
def cosy_for_name(name: str, generator, seeds: Sequence[int], acts_fn: Callable[[list[Render]], Tensor],
                  control_acts_M: Tensor, template: str = "{}") -> dict[str, Any]:
    """CoSy (METHODS §4.1) of one name: render it with `seeds` (held-out), take the feature's image-level activations
    on the renders (`acts_fn(renders) -> (N,)`) and compare with the control activations. Returns auc, mad, refs."""
    renders = generator.render(template.format(name), list(seeds))
    a_syn_N = torch.as_tensor(acts_fn(renders), dtype=torch.float64).flatten()
    auc, mad = cosy_scores(a_syn_N, torch.as_tensor(control_acts_M, dtype=torch.float64).flatten())
    return {"name": name, "auc": auc, "mad": mad, "render_refs": [r.ref for r in renders],
            "mean_act": float(a_syn_N.mean())}


def publish(aucs: dict[str, float | None], names: dict[str, str | None], threshold: float,
            methods: Sequence[str] = PUBLISHABLE) -> tuple[str, str | None]:
    """(name, method): the eligible method with the highest held-out AUC (ties: order of `methods`) if it is ≥
    `threshold`, else ('unnamed', None). The threshold is on the same renders the AUC is reported on: choosing the
    best of a few methods on them is a mild optimistic bias, stated in the write-up."""
    best = None
    for m in methods:
        a = aucs.get(m)
        if names.get(m) and a is not None and not math.isnan(a) and (best is None or a > aucs[best]):
            best = m
    if best is None or aucs[best] < threshold:
        return UNNAMED, None
    return names[best], best


# ================================================================================================ the run
def select_features(stats, n: int, seed: int = 0, min_fires: int = 16) -> list[int]:
    """A seeded sample (in draw order) of `n` features that are neither dead nor dense and fire on ≥ `min_fires` images."""
    ok = (~stats.dead_S) & (~stats.dense_S) & (stats.image_fire_count_S >= min_fires)
    cand = torch.nonzero(ok).flatten().numpy()
    if len(cand) < n:
        raise ValueError(f"only {len(cand)} features are alive, not dense and fire on ≥ {min_fires} probe images; asked "
                         f"for {n}: lower n_features or min_fires")
    return [int(j) for j in np.random.default_rng(seed).choice(cand, n, replace=False)]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _merge_shards(folder: Path, merge_records: bool = False) -> dict[int, dict]:
    """Union of the `rank*.json` shards in `folder` (feature → record). With `merge_records` the records of one feature
    in several shards (a run resumed with another world size) are merged key by key (eval records: method → scores)."""
    out: dict[int, dict] = {}
    for p in sorted(folder.glob("rank*.json")):
        for k, rec in _read_json(p)["records"].items():
            j = int(k)
            out[j] = {**out[j], **rec} if merge_records and j in out else rec
    return out


class NamingRun:
    """Everything the naming and evaluation stages share, loaded once per process; see the module docstring."""

    def __init__(self, cfg: NamingRunConfig, work_dir: str | os.PathLike, progress: bool = True, backbone=None,
                 thumb_dir: str | os.PathLike | None = None, embedder=None):
        from nacosae.features import FeatureStats
        from nacosae.naming.vocab import load_vocabulary
        from nacosae.sae import SAE
        from nacosae.store import ActivationStore

        self.cfg = cfg.resolved()
        self.work = Path(work_dir)
        self.progress = progress
        self.sae = SAE.from_pretrained(self.cfg.sae)
        self.stats = FeatureStats.load(self.cfg.stats)
        self.store = ActivationStore(self.cfg.store)
        prov = self.sae.cfg.provenance
        if self.stats.d_sae != self.sae.cfg.d_sae:
            raise ValueError(f"the stats in {self.cfg.stats} are for d_sae={self.stats.d_sae}, the SAE has {self.sae.cfg.d_sae}: "
                             "pass the stats of this SAE")
        if self.store.d != self.sae.cfg.d_in or self.store.provenance.get("layer") != prov.get("layer"):
            raise ValueError(f"the store {self.cfg.store} holds layer {self.store.provenance.get('layer')!r} (d={self.store.d}); "
                             f"the SAE reads layer {prov.get('layer')!r} (d_in={self.sae.cfg.d_in})")
        if self.stats.n_images != self.store.meta["n_images"]:
            raise ValueError(f"the stats saw {self.stats.n_images} images, the store has {self.store.meta['n_images']}: "
                             "they come from different probe sets")
        self.layer, self.tokens = prov["layer"], prov["tokens"]
        self.sae_id = self.cfg.sae_id or f"{prov.get('backbone', 'backbone')}/{self.layer}"
        self.aggregation = self.stats.aggregation
        self._backbone = backbone  # loaded on first use: only images missing from the store and the MS need it
        self.records = {r["image_idx"]: r for r in self.store.images}
        self.thumb_dir = Path(thumb_dir) if thumb_dir is not None else cache_dir() / "thumbnails"

        key = self._table_key()
        table_path = self.work / "activation_table.safetensors"
        self.table = ImageActivationTable.load(table_path, key)
        if self.table is None:
            self.table = ImageActivationTable.from_store(self.store, self.sae, self.aggregation,
                                                         getattr(self.stats.config, "cls_token", 0), progress=progress)
            self.table.save(table_path, key)
        self.table.fallback = _LazyFeatureScorer(self)
        self.scorer = TableScorer(self.table, self.stats.act_max_S)
        self.vocab = load_vocabulary()

        bank = ThumbnailBank.from_openclipart(OPENCLIPART_DIR, paths=self._bank_paths(), embedder=embedder)
        bank.thumb_dir = self.thumb_dir
        self.search_bank, self.eval_bank = split_bank(bank, self.cfg.bank_eval_fraction, self.cfg.bank_seed)
        self._bank_description = dict(zip(map(str, bank.paths), bank.descriptions))
        self.search_generator = RetrievalGenerator(self.search_bank)
        self.eval_generator = RetrievalGenerator(self.eval_bank)

        self.features = select_features(self.stats, self.cfg.n_features, self.cfg.feature_seed, self.cfg.min_fires)
        eval_refs = {str(p) for p in self.eval_bank.paths}
        pool = sorted(r for r in self.table.refs if r not in eval_refs)
        if len(pool) < self.cfg.n_control:
            raise ValueError(f"only {len(pool)} probe images lie outside the eval half of the bank; n_control="
                             f"{self.cfg.n_control}: lower it")
        self.control_refs = sorted(random.Random(self.cfg.control_seed).sample(pool, self.cfg.n_control))
        self.control_acts_MS = self.table.rows(self.control_refs)
        self._proposers: dict[str, Any] = {}
        self._check_setup()

    # ---------------------------------------------------------------- setup
    @property
    def backbone(self):
        if self._backbone is None:
            from nacosae.backbones import load_backbone

            self._backbone = load_backbone(self.sae.cfg.provenance["backbone"])
        return self._backbone

    def _table_key(self) -> str:
        h = hashlib.sha256()
        h.update((Path(self.cfg.sae) / "model.safetensors").read_bytes())
        h.update(json.dumps(self.store.meta.get("shards"), sort_keys=True).encode())
        h.update(f"{self.aggregation}|{__version__}".encode())
        return h.hexdigest()[:32]

    def _bank_paths(self) -> list[Path]:
        from nacosae.images import OpenClipArtSource

        if self.cfg.bank_source == "store":
            root = OPENCLIPART_DIR.resolve()
            paths = [Path(r["path"]) for r in self.store.images if r.get("path") and Path(r["path"]).resolve().is_relative_to(root)]
            if len(paths) < 4:
                raise ValueError(f"the probe set has {len(paths)} Open Clip Art images: too few for a retrieval bank; use "
                                 "bank_source='openclipart'")
        else:
            paths = [Path(r.path) for r in OpenClipArtSource(OPENCLIPART_DIR).records()]
        if self.cfg.bank_max_images is not None and len(paths) > self.cfg.bank_max_images:
            paths = sorted(random.Random(self.cfg.bank_seed).sample(paths, self.cfg.bank_max_images))
        return paths

    def _check_setup(self) -> None:
        """Write work/setup.json, or check that this process runs with the settings the folder was started with."""
        setup = {"schema_version": SCHEMA_VERSION, "config": self.cfg.to_dict(), "sae_id": self.sae_id,
                 "features": self.features, "control_refs": self.control_refs,
                 "search_bank": self.search_bank.id, "eval_bank": self.eval_bank.id}
        path = self.work / "setup.json"
        if path.is_file():
            old = _read_json(path)
            norm = lambda d: json.dumps(d, sort_keys=True)
            # settings that change no finished result (which features Gemma names, the publishing threshold) may change
            fixed = lambda d: {**d, "config": {k: v for k, v in (d.get("config") or {}).items() if k not in MUTABLE_SETTINGS}}
            diff = [k for k in setup if norm(fixed(old).get(k)) != norm(fixed(setup).get(k))]
            if diff:
                cdiff = [k for k in setup["config"] if norm(old["config"].get(k)) != norm(setup["config"][k])]
                raise ValueError(f"{self.work} was started with other settings ({', '.join(cdiff or diff)} differ): resume "
                                 "with the same settings, or use another --work folder")
            if norm(old) != norm(setup):
                atomic_write_json(path, setup)
        else:
            atomic_write_json(path, setup)

    def features_for(self, method: str) -> list[int]:
        if method == "mils_gemma":
            return self.features[: self.cfg.gemma_features]
        return list(self.features)

    def probe_record(self, image_idx: int) -> dict:
        return self.records[int(image_idx)]

    def feature_hints(self, j: int) -> list[str]:
        """The majority label of feature j's top probe images, then their descriptions (best first), deduplicated."""
        from nacosae.naming.baselines import top_label_names

        top = [self.probe_record(i) for i, _ in self.stats.top_images(j)]
        hints = [top_label_names([[r["label"] for r in top if r.get("label")]])[0] or ""]
        # the bank's description of an Open Clip Art image (file-name words filtered to English) reads better than the
        # probe record's, which keeps truncated author names ("flag brazil crystal feli")
        hints += [self._bank_description.get(store_ref(r), r.get("description") or "").split(";")[0] for r in top]
        out = list(dict.fromkeys(normalise(h) for h in hints if normalise(h)))
        return out[: self.cfg.n_hints]

    # ---------------------------------------------------------------- naming
    def proposer(self, method: str):
        if method not in self._proposers:
            from nacosae.naming.proposers import GGUFProposer, VocabularyProposer

            self._proposers[method] = VocabularyProposer(self.vocab) if method == "mils" else GGUFProposer()
        return self._proposers[method]

    def _name_mils(self, method: str, j: int, state_dir: Path) -> dict:
        from nacosae.naming.mils import MILSState, new_state, run_mils, seed_prompts

        cfg = self.cfg.mils_config(method)
        state_path = state_dir / f"feature_{j:05d}.json"
        hints = self.feature_hints(j)
        if state_path.is_file():
            state = MILSState.load(state_path)
        else:
            seeds = seed_prompts(self.vocab, self.cfg.n_seed_prompts, seed=_seed_of(self.cfg.mils_seed, j), hints=hints)
            state = new_state(j, seeds, hints=hints)
        proposer = self.proposer(method)
        while not state.done:  # one step per call, saved after each: a kill loses at most one step
            state = run_mils(state, proposer, self.search_generator, self.scorer, cfg, time_budget_s=0.0, progress=False)
            state.save(state_path)
        scores_by_iteration = [h["best"][0][0] for h in state.history if h["step"] in ("seed", "propose") and h["best"]]
        tps = getattr(proposer, "tokens_per_second", None)  # LLM proposers: generation speed in this process
        return {"feature": j, "method": method, "name": state.name, "hints": hints, "seconds": state.elapsed_s,
                "proposer": proposer.id, "proposer_tokens_per_s": tps if tps is None or not math.isnan(tps) else None, "generator": self.search_generator.id, "mils_config": dataclasses.asdict(cfg),
                "best": [[s, p] for s, p in state.best], "scores_by_iteration": scores_by_iteration,
                "candidates": [{"iteration": c.iteration, "prompt": c.prompt, "score": c.score, "refs": c.refs}
                               for c in state.candidates]}

    def _name_baseline(self, method: str, j: int) -> dict:
        from nacosae.naming.baselines import VocabularyNamer, random_word_names, top_label_names

        if method == "top_label":
            labels = [self.probe_record(i)["label"] for i, _ in self.stats.top_images(j) if self.probe_record(i).get("label")]
            name = top_label_names([labels])[0]
            name = normalise(name) if name else None  # folder names: "signs_and_symbols" → "signs and symbols"
        elif method == "random":
            # seeded per feature, so the word does not depend on which rank names which features
            name = random_word_names(self.vocab.words, 1, seed=_seed_of(self.cfg.mils_seed, "random", j))[0]
        elif method == "vocab":  # Discover-then-Name; the vocabulary's text embeddings are computed once per run
            if "vocab" not in self._proposers:
                self._proposers["vocab"] = VocabularyNamer(self.sae, self.backbone, self.vocab.words, layer=self.layer)
            name = self._proposers["vocab"].name([j])[0][0]
        else:
            raise ValueError(f"unknown method {method!r}; methods: {METHODS}")
        return {"feature": j, "method": method, "name": name}

    def vocab_applicable(self) -> tuple[bool, str]:
        """(True, '') where Discover-then-Name applies (CLIP's image embedding), else (False, why)."""
        from nacosae.naming.baselines import EMBEDDING_LAYER, check_text_aligned

        backbone_name = self.sae.cfg.provenance.get("backbone", "?")
        if self.layer != EMBEDDING_LAYER:  # decided without loading the backbone
            return False, (f"the SAE reads {backbone_name} layer {self.layer!r}, not CLIP's image embedding: decoder rows "
                           "are not in a text-aligned space (METHODS §3.2), so no vocabulary word can be matched to them")
        try:
            check_text_aligned(self.backbone, self.layer, self.sae.cfg.d_in)
        except ValueError as e:
            return False, str(e)
        return True, ""

    def name_features(self, method: str, rank: int = 0, world_size: int = 1) -> dict[int, dict]:
        """Name this rank's share of the features with `method`; returns this rank's records (new and resumed)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; methods: {METHODS}")
        if method == "vocab":
            ok, reason = self.vocab_applicable()
            if not ok:
                raise ValueError(f"vocabulary naming does not apply to this SAE: {reason}")
        folder = self.work / "names" / method
        shard_path = folder / f"rank{rank:03d}.json"
        mine = {int(k): v for k, v in _read_json(shard_path)["records"].items()} if shard_path.is_file() else {}
        done = _merge_shards(folder) if folder.is_dir() else {}
        todo = [j for j in self.features_for(method)[rank::world_size] if j not in done]
        for j in tqdm(todo, desc=f"naming ({method}) rank {rank}", unit="feature", disable=not self.progress):
            rec = self._name_mils(method, j, folder / "states") if method in MILS_METHODS else self._name_baseline(method, j)
            mine[j] = rec
            atomic_write_json(shard_path, {"schema_version": SCHEMA_VERSION, "method": method, "rank": rank,
                                           "world_size": world_size, "records": {str(k): v for k, v in sorted(mine.items())}})
        return mine

    def names(self, method: str) -> dict[int, dict]:
        folder = self.work / "names" / method
        return _merge_shards(folder) if folder.is_dir() else {}

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, rank: int = 0, world_size: int = 1, methods: Sequence[str] | None = None) -> dict[int, dict]:
        """CoSy of every available name of this rank's features on held-out renders vs the fixed control set."""
        methods = [m for m in (methods or METHODS) if (self.work / "names" / m).is_dir()]
        names = {m: self.names(m) for m in methods}
        folder = self.work / "eval"
        shard_path = folder / f"rank{rank:03d}.json"
        mine = {int(k): v for k, v in _read_json(shard_path)["records"].items()} if shard_path.is_file() else {}
        done = _merge_shards(folder, merge_records=True) if folder.is_dir() else {}
        feats = self.features[rank::world_size]

        def pending(j):  # methods that named j (a None name: nothing to evaluate) and are not evaluated yet
            return [m for m in methods if j in names[m] and names[m][j]["name"] and m not in done.get(j, {})]

        todo = [j for j in feats if pending(j)]
        for j in tqdm(todo, desc=f"evaluating rank {rank}", unit="feature", disable=not self.progress):
            rec = dict(done.get(j, {}))
            for m in pending(j):
                rec[m] = cosy_for_name(names[m][j]["name"], self.eval_generator, self.cfg.eval_seeds,
                                       lambda rs, j=j: self.table.rows([r.ref for r in rs], [r.image for r in rs])[:, j],
                                       self.control_acts_MS[:, j], self.cfg.render_template)
            mine[j] = rec
            atomic_write_json(shard_path, {"schema_version": SCHEMA_VERSION, "rank": rank, "world_size": world_size,
                                           "records": {str(k): v for k, v in sorted(mine.items())}})
        return mine

    def mils_ablation(self, method: str = "mils") -> dict | None:
        """Where the MILS name's held-out AUC comes from: the same CoSy for the best *seed* prompt (iteration 0: top-image
        hints and vocabulary words, no proposer), the best prompt after the loop, and the summarised name. Cached in
        work/ablation_<method>.json."""
        path = self.work / f"ablation_{method}.json"
        if path.is_file():
            return _read_json(path)
        recs = self.names(method)
        if not recs:
            return None
        out: dict[str, Any] = {"method": method, "features": {}}
        for j, rec in sorted(recs.items()):
            cands = rec["candidates"]
            seeds = [c for c in cands if c["iteration"] == 0]
            # the loop's own order: best score, then the shorter prompt, then the earlier one (nacosae.naming.mils)
            key = lambda ic: (-ic[1]["score"], len(ic[1]["prompt"].split()), ic[0])  # noqa: E731
            prompts = {"seed_best": min(enumerate(seeds), key=key)[1]["prompt"],
                       "loop_best": min(enumerate(cands), key=key)[1]["prompt"], "name": rec["name"]}
            acts = lambda rs, j=j: self.table.rows([r.ref for r in rs], [r.image for r in rs])[:, j]  # noqa: E731
            out["features"][str(j)] = {k: {"prompt": v, "auc": cosy_for_name(v, self.eval_generator, self.cfg.eval_seeds, acts,
                                                                              self.control_acts_MS[:, j],
                                                                              self.cfg.render_template)["auc"]}
                                       for k, v in prompts.items()}
        for k in ("seed_best", "loop_best", "name"):
            a = np.array([f[k]["auc"] for f in out["features"].values()])
            out[k] = {"auc_mean": float(a.mean()), "auc_std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                      "share_ge_threshold": float((a >= self.cfg.threshold).mean())}
        atomic_write_json(path, out)
        return out

    def evaluations(self) -> dict[int, dict]:
        folder = self.work / "eval"
        return _merge_shards(folder, merge_records=True) if folder.is_dir() else {}

    # ---------------------------------------------------------------- monosemanticity
    def load_probe_image(self, record: dict) -> Image.Image:
        """A probe image's pixels (a thumbnail for files; scikit-image samples from the package)."""
        if record.get("path"):
            return load_thumbnail(record["path"], self.thumb_dir)
        if record.get("source") == "skimage":
            fields = {f.name for f in dataclasses.fields(ImageRecord)}
            return SkimageSource().load(ImageRecord(**{k: v for k, v in record.items() if k in fields}))
        raise ValueError(f"cannot load probe image {record.get('image_id')!r}: no file path and not a scikit-image sample")

    @torch.no_grad()
    def monosemanticity(self, batch_size: int = 32) -> dict:
        """MS (METHODS §4.2) of every SAE feature and every raw channel of the layer over a seeded probe sample, with
        the `ms_encoder`'s embedding of each image. Cached in work/ms.json (recomputed for another encoder)."""
        from nacosae.backbones import load_backbone, ms_encoder

        backbone_name = self.sae.cfg.provenance.get("backbone", "backbone")
        spec, ms_layer, caveat = ms_encoder(backbone_name, self.cfg.ms_encoder, self.cfg.ms_layer)
        path = self.work / "ms.json"
        if path.is_file() and _read_json(path).get("encoder") == f"{spec}/{ms_layer}":
            return _read_json(path)
        encoder = self.backbone if spec == backbone_name else load_backbone(spec)
        recs = ms_sample(self.store.images, self.cfg.ms_images, self.cfg.ms_seed)
        n = len(recs)
        emb_NE = ms_embeddings(encoder, ms_layer, (self.load_probe_image(r) for r in recs), batch_size, self.progress, n)
        refs = [store_ref(r) for r in recs]
        report = monosemanticity_report(self.table.rows(refs), self.table.raw_rows(refs), emb_NE,
                                        alive_S=~self.stats.dead_S, named=self.features)
        out = {"schema_version": SCHEMA_VERSION, "n_images": n, "ms_seed": self.cfg.ms_seed,
               "encoder": f"{spec}/{ms_layer}", "encoder_caveat": caveat, **report}
        atomic_write_json(path, out)
        return out


# ================================================================================================ the merge step
def _grid(T: int) -> tuple[int, int]:
    side = round(math.sqrt(T))
    return (side, side) if side * side == T else (1, T)


def _f(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def assemble_results(run: NamingRun, all_features: bool = False, image_loader: Callable | None = None) -> tuple[list, list, list, dict]:
    """(features rows, images rows, runs rows, summary) for `nacosae.results.write_results`.

    Rows: the named features, or every feature with `all_features` (unattempted features have null names). Images: every
    image a row refers to (top images, MILS renders, CoSy renders), as ≤ 224 px PNG. Summary: the comparison tables,
    MS summary and settings (also stored as the runs row's `evaluation_json`).
    """
    from nacosae.results import feature_stats_row, runs_row, thumbnail_bytes

    cfg, stats = run.cfg, run.stats
    names = {m: run.names(m) for m in METHODS}
    evals = run.evaluations()
    ms = run.monosemanticity()
    T = stats.tokens_per_image
    gh, gw = _grid(T)
    by_ref = {store_ref(r): r for r in run.store.images}
    bank_info = {}
    for bank in (run.search_bank, run.eval_bank):
        for p, d, lab in zip(bank.paths, bank.descriptions, bank.labels):
            bank_info[str(p)] = (d, lab)

    def image_id(ref: str) -> str:
        if ref in by_ref:
            return by_ref[ref]["image_id"]
        p = Path(ref)
        try:
            return f"openclipart/{p.relative_to(OPENCLIPART_DIR)}"
        except ValueError:
            return ref

    wanted: dict[str, str] = {}  # image_id → ref
    vocab_ok, vocab_reason = run.vocab_applicable()
    feats = list(range(stats.d_sae)) if all_features else sorted(run.features)
    rows = []
    for j in feats:
        row = feature_stats_row(stats, j, lambda i: image_id(store_ref(run.probe_record(i))), (gh, gw))
        row.update(sae_id=run.sae_id, ms=_f(ms["ms_S"][j]), ms_encoder=f"{ms['encoder']} ({ms['encoder_caveat']})")
        for i, _ in stats.top_images(j)[: stats.config.top_n]:
            r = store_ref(run.probe_record(i))
            wanted[image_id(r)] = r
        aucs, method_names = {}, {}
        ev = evals.get(j, {})
        for m in METHODS:
            rec = names[m].get(j)
            method_names[m] = rec["name"] if rec else None
            e = ev.get(m)
            row[f"name_{m}"] = method_names[m]
            row[f"cosy_auc_{m}"] = _f(e["auc"]) if e else None
            row[f"cosy_mad_{m}"] = _f(e["mad"]) if e else None
            row[f"cosy_render_ids_{m}"] = [image_id(r) for r in e["render_refs"]] if e else None
            for r in (e["render_refs"] if e else []):
                wanted[image_id(r)] = r
            aucs[m] = e["auc"] if e else None
            if m in MILS_METHODS:
                hist = [{"iteration": c["iteration"], "prompt": c["prompt"], "score": c["score"],
                         "render_ids": [image_id(r) for r in c["refs"]]} for c in rec["candidates"]] if rec else None
                row[f"{m}_history"] = hist
                row[f"{m}_scores_by_iteration"] = rec["scores_by_iteration"] if rec else None
                for c in (rec["candidates"] if rec else []):
                    for r in c["refs"]:
                        wanted[image_id(r)] = r
        attempted = any(method_names[m] for m in PUBLISHABLE)
        row["name"], row["name_method"] = publish(aucs, method_names, cfg.threshold) if attempted else (None, None)
        rows.append(row)

    load = image_loader or (lambda ref: run.load_probe_image(by_ref[ref]) if ref in by_ref else load_thumbnail(ref, run.thumb_dir))
    images = []
    for iid, ref in tqdm(sorted(wanted.items()), desc="images", unit="img", disable=not run.progress):
        rec = by_ref.get(ref)
        desc, lab = bank_info.get(ref, (None, None))
        images.append({"image_id": iid, "image": {"bytes": thumbnail_bytes(load(ref)), "path": None},
                       "kind": "probe" if rec else "bank",
                       "label": rec.get("label") if rec else lab, "description": rec.get("description") if rec else desc,
                       "source": rec.get("source") if rec else "openclipart", "prompt": None, "seed": None, "generator": None})

    named = [r for r in rows if r["name"] is not None]
    all_methods = [m for m in ("mils", "top_label", "random") if any(r[f"cosy_auc_{m}"] is not None for r in named)]
    gemma_methods = ["mils_gemma"] + all_methods if any(r["cosy_auc_mils_gemma"] is not None for r in named) else []
    summary = {
        "sae_id": run.sae_id, "n_features_named": len(named), "threshold": cfg.threshold,
        "n_published": sum(r["name"] not in (None, UNNAMED) for r in named),
        "published_by_method": {m: sum(r["name_method"] == m for r in named) for m in PUBLISHABLE},
        "table_all": comparison_table(named, all_methods, cfg.threshold), "methods_all": all_methods,
        "table_gemma_subset": comparison_table(named, gemma_methods, cfg.threshold) if gemma_methods else [],
        "paired": [p for a, b in (("mils", "top_label"), ("mils", "random"), ("top_label", "random"), ("mils_gemma", "mils"),
                                  ("mils_gemma", "random"))
                   if (p := paired_difference(named, a, b)) is not None],
        "methods_gemma_subset": gemma_methods,
        "aggregation": f"{stats.aggregation} over the {gh}×{gw} tokens of each image",
        "eval": {"renders_per_name": cfg.n_eval_renders, "eval_seeds": list(cfg.eval_seeds), "n_control": cfg.n_control,
                 "control": "seeded sample of probe images outside the eval half of the bank",
                 "bank_search_images": len(run.search_bank), "bank_eval_images": len(run.eval_bank),
                 "bank_split_seed": cfg.bank_seed, "render_template": cfg.render_template,
                 "generator": "retrieval from Open Clip Art by all-MiniLM-L6-v2 description similarity"},
        "ms": {"encoder": ms["encoder"], "caveat": ms["encoder_caveat"], "n_images": ms["n_images"],
               "sae_alive": ms["summary_sae_alive"], "sae_named": ms["summary_sae_named"], "raw_channels": ms["summary_raw"],
               "uniform_weights_ms": ms.get("uniform_weights_ms")},
        "vocab": "applies" if vocab_ok else f"not applicable: {vocab_reason}",
        "mils_ablation": {m: {k: a[k] for k in ("seed_best", "loop_best", "name")}
                          for m in MILS_METHODS if (a := run.mils_ablation(m)) is not None},
        "timing_s": {m: sum(r.get("seconds", 0.0) for r in names[m].values()) for m in MILS_METHODS if names[m]},
        "config": cfg.to_dict(),
    }
    metrics_path = Path(run.cfg.sae).parent / "metrics.json"
    metrics = _read_json(metrics_path) if metrics_path.is_file() else {}
    return rows, images, [runs_row(run.sae_id, run.sae.cfg.to_dict(), metrics, summary)], summary


def missing_work(run: NamingRun) -> list[str]:
    """What a run still lacks: features not named by a method that was started, or named but not evaluated."""
    evals = run.evaluations()
    missing = []
    for m in ("mils", "mils_gemma", "top_label", "random"):
        names = run.names(m)
        if not names and m == "mils_gemma":
            continue  # never started: left out (null columns), not missing
        missing += [f"{m}: feature {j} not named" for j in run.features_for(m) if j not in names]
        missing += [f"{m}: feature {j} not evaluated" for j in run.features_for(m)
                    if j in names and names[j]["name"] and m not in evals.get(j, {})]
    return missing


def build_results(run: NamingRun, out_dir: str | os.PathLike, figures_dir: str | os.PathLike | None = None,
                  all_features: bool = False, allow_partial: bool = False) -> dict:
    """The merge step: all ranks' shards → the results dataset (nacosae.results layout), WORK/summary.json,
    WORK/results.md and the figures (default WORK/figures). Returns the summary."""
    from nacosae.io import atomic_write_text
    from nacosae.results import write_results

    missing = missing_work(run)
    if missing and not allow_partial:
        raise ValueError(f"{len(missing)} gaps, e.g. {missing[:5]}: run name_features.py / evaluate_names.py again (they "
                         "resume), or build with allow_partial")
    rows, images, runs, summary = assemble_results(run, all_features=all_features)
    summary["n_rows"], summary["n_images"] = len(rows), len(images)
    write_results(out_dir, rows, images, runs, card=results_card(summary))
    atomic_write_json(run.work / "summary.json", summary)
    atomic_write_text(run.work / "results.md", results_markdown(summary))

    figures = Path(figures_dir) if figures_dir is not None else run.work / "figures"
    named = [r for r in rows if r["name"] is not None]
    thr = summary["threshold"]
    plot_auc_distributions(named, summary["methods_all"], figures / "auc_all.png", thr,
                           f"held-out CoSy AUC of {len(named)} features (image activation: {run.aggregation} over tokens)")
    if summary["methods_gemma_subset"]:
        plot_auc_distributions(named, summary["methods_gemma_subset"], figures / "auc_gemma_subset.png", thr,
                               "held-out CoSy AUC, the features also named with Gemma-3-270M")
    plot_mils_scores({m: list(run.names(m).values()) for m in MILS_METHODS if run.names(m)}, figures / "mils_scores.png")
    ms = run.monosemanticity()
    plot_ms([ms["ms_S"][j] for j in range(run.stats.d_sae) if not run.stats.dead_S[j]], ms["ms_raw_D"],
            figures / "ms.png", ms["encoder"], baseline=ms.get("uniform_weights_ms"))
    return summary
