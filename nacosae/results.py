"""The results dataset: named and evaluated SAE features as parquet tables in the Hub dataset repo layout.

This module alone owns the dataset: its schema (one declaration, `SCHEMA`, from which both the parquet schema and
the `datasets.Features` are made), the row builders, validation, the writer, the reader and the dataset card.
`nacosae.publish` only stages and uploads what is built here; the app reads through here.

    write_results("runs/results/blocks.14", features=rows, images=image_rows, runs=run_rows, card=card_text)
    ds = load_results("runs/results/blocks.14", "features")        # = datasets.load_dataset(path, "features")["train"]
    tables = read_results_folder("demo/results")                   # {table: pyarrow.Table}, in the current schema

Layout (docs/RESULTS_SCHEMA.md; identical locally and on the Hub):

    README.md                        dataset card; its YAML `configs:` maps each table to its parquet files
                                     (`features` is the default config, so `load_dataset(path, split="train")` works)
    data/features/part-00000.parquet one row per (SAE, feature)
    data/images/part-00000.parquet   every image a feature row refers to (PNG or WebP thumbnails, ≤ 224 px)
    data/runs/part-00000.parquet     one row per SAE

Every table is written with every column of the schema, whatever the rows hold (a method that did not run is a
null column, not a missing one), and tables read from an older dataset are brought to the current schema (missing
optional columns become nulls), so the app can rely on the columns. A folder is written beside the target and swapped
in at the end: a killed build leaves the previous dataset intact.

The card is made of named sections (`<!-- nacosae:section NAME -->` … `<!-- nacosae:end NAME -->`). An update
replaces only the sections it regenerates: text outside the sections (hand edits) and sections it does not
regenerate (e.g. the evaluation protocol a naming run wrote) stay where they are.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2
"""Stored in every parquet file's metadata (`nacosae_results_schema`); files without it are version 1."""
_VERSION_KEY = b"nacosae_results_schema"
TABLES = ("features", "images", "runs")
METHODS = ("pool_mils", "retrieval", "mils", "mils_gemma", "top_label", "random", "vocab")
"""Every naming method has `name_<m>`, `cosy_auc_<m>`, `cosy_mad_<m>`, `cosy_render_ids_<m>` columns (null where the
method did not run or does not apply)."""
MILS_METHODS = ("pool_mils", "mils", "mils_gemma")
"""Methods with a MILS loop: they also have `<m>_history` and `<m>_scores_by_iteration`."""
IMAGE_KINDS = ("probe", "bank", "render", "emoji")
"""probe: from the probe set; bank: a retrieval-bank image outside it; render: made by a generator; emoji: a rendered
emoji glyph."""
IMAGE_SPLITS = ("search", "select", "eval", "control")
"""Which part of the naming protocol an image belongs to (null: none, e.g. a probe image shown as a top image)."""
UNNAMED = "unnamed"
UNNAMED_REASONS = ("dead", "dense", "below_threshold")
NAMING_OUTCOME = ("name", "name_method", "unnamed_reason", "candidate_name", "name_split_score", "name_cosy_auc",
                  "name_cosy_mad")
"""The columns that say what naming decided for a feature: taken together from one source when tables are overlaid."""
"""Why a feature is `unnamed`: it never fires, it fires on most images, or its chosen name's held-out CoSy AUC is
below the threshold."""
MAX_IMAGE_SIDE = 224
THUMBNAIL_FORMATS = {"png": "PNG", "webp": "WEBP"}
"""Encodings an image cell may hold: PNG (lossless, the default) or WebP (quality 75, for a small bundled demo)."""
ROWS_PER_SHARD = {"features": 2000, "images": 2000, "runs": 1000}
CARD = "README.md"
OVERVIEW = "overview"
"""The card section regenerated from the tables on every publish."""


class ValidationError(ValueError):
    """An artifact that must not be written or published as it is; the message lists every problem found."""


def raise_if_problems(problems: list[str], what: str) -> None:
    """Raise one ValidationError listing `problems` (the first 20), if there are any."""
    if problems:
        shown = problems[:20] + ([f"… and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValidationError(f"{what} is not valid (see docs/RESULTS_SCHEMA.md):\n  - " + "\n  - ".join(shown))


# ================================================================================================ the schema
@dataclass(frozen=True)
class Column:
    """One column of a results table."""

    name: str
    type: pa.DataType
    """Its parquet (Arrow) type; the `datasets` feature is derived from it (`table_schema`)."""
    required: bool = False
    """A table without it is refused; any other column that a table lacks is added as nulls."""


_STR, _I32, _I64, _F32, _BOOL = pa.string(), pa.int32(), pa.int64(), pa.float32(), pa.bool_()
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_HISTORY = pa.list_(pa.struct([("iteration", _I32), ("prompt", _STR), ("score", _F32), ("render_ids", pa.list_(_STR))]))
_IMAGE_COLUMNS = {"images": ("image",)}


def _declare() -> dict[str, tuple[Column, ...]]:
    def req(name, t):
        return Column(name, t, required=True)

    features = [
        req("sae_id", _STR), req("feature", _I32),
        req("image_frequency", _F32), req("token_frequency", _F32), req("mean_act", _F32), req("max_act", _F32),
        req("aggregation", _STR), req("dead", _BOOL), req("dense", _BOOL),
        req("hist_edges", pa.list_(_F32)), req("hist_counts", pa.list_(_I64)),
        req("top_image_ids", pa.list_(_STR)), req("top_activations", pa.list_(_F32)),
        req("top_heatmaps", pa.list_(pa.list_(_F32))), req("grid_h", _I32), req("grid_w", _I32),
        req("name", _STR), req("name_method", _STR),
        Column("unnamed_reason", _STR), Column("candidate_name", _STR), Column("name_split_score", _F32),
        Column("name_cosy_auc", _F32), Column("name_cosy_mad", _F32),
    ]
    for m in METHODS:
        features += [Column(f"name_{m}", _STR), Column(f"cosy_auc_{m}", _F32), Column(f"cosy_mad_{m}", _F32),
                     Column(f"cosy_render_ids_{m}", pa.list_(_STR))]
    features += [Column("ms", _F32), Column("ms_encoder", _STR)]
    for m in MILS_METHODS:
        features += [Column(f"{m}_history", _HISTORY), Column(f"{m}_scores_by_iteration", pa.list_(_F32))]
    images = [req("image_id", _STR), req("image", _IMAGE), req("kind", _STR)]
    images += [Column(c, t) for c, t in (("label", _STR), ("description", _STR), ("source", _STR), ("prompt", _STR),
                                         ("seed", _I32), ("generator", _STR), ("split", _STR), ("family", _STR))]
    runs = [req(c, t) for c, t in (("sae_id", _STR), ("backbone", _STR), ("layer", _STR), ("tokens", _STR), ("d_in", _I32),
                                   ("d_sae", _I32), ("activation", _STR), ("k", _I32), ("val_fvu", _F32),
                                   ("val_explained_variance", _F32), ("val_l0", _F32), ("val_dead_fraction", _F32),
                                   ("n_train_rows", _I64), ("provenance_json", _STR))]
    runs.append(Column("evaluation_json", _STR))
    return {"features": tuple(features), "images": tuple(images), "runs": tuple(runs)}


SCHEMA: dict[str, tuple[Column, ...]] = _declare()
"""THE declaration of the results dataset (docs/RESULTS_SCHEMA.md describes each column)."""
_ARROW = {t: pa.schema([(c.name, c.type) for c in cols]) for t, cols in SCHEMA.items()}
KEYS = {"features": ("sae_id", "feature"), "images": ("image_id",), "runs": ("sae_id",)}


def _need_table(table: str) -> tuple[Column, ...]:
    if table not in SCHEMA:
        raise ValueError(f"unknown table {table!r}; the results dataset has {TABLES}")
    return SCHEMA[table]


def columns(table: str) -> list[str]:
    """The column names of `table`, in schema order."""
    return [c.name for c in _need_table(table)]


def table_schema(table: str):
    """The `datasets.Features` of one table, derived from `SCHEMA` (image columns as `datasets.Image`)."""
    import datasets

    feats = datasets.Features.from_arrow_schema(pa.schema([(c.name, c.type) for c in _need_table(table)]))
    for c in _IMAGE_COLUMNS.get(table, ()):
        feats[c] = datasets.Image()
    return feats


def hf_features_metadata(table: str) -> dict[bytes, bytes]:
    """The parquet schema metadata `datasets` reads, so `load_dataset` decodes the image column as images."""
    return {b"huggingface": json.dumps({"info": {"features": table_schema(table).to_dict()}}).encode()}


def arrow_schema(table: str) -> pa.Schema:
    """The Arrow schema of one table, derived from `SCHEMA`. The parquet files also carry `hf_features_metadata`,
    added when they are written (it needs `datasets`, a second of import that reading the tables, e.g. when the app
    starts, does without)."""
    return _ARROW[table] if table in _ARROW else pa.schema([(c.name, c.type) for c in _need_table(table)])


def _compatible(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether a column of type `have` holds values of `want` (null, other widths, large lists/strings)."""
    if pa.types.is_null(have) or have == want:
        return True
    if pa.types.is_integer(want):
        return pa.types.is_integer(have)
    if pa.types.is_floating(want):
        return pa.types.is_floating(have) or pa.types.is_integer(have)
    for is_kind in (pa.types.is_string, pa.types.is_binary, pa.types.is_boolean):
        if is_kind(want):
            return is_kind(have) or (is_kind is pa.types.is_string and pa.types.is_large_string(have)) or (
                is_kind is pa.types.is_binary and pa.types.is_large_binary(have))
    if pa.types.is_list(want):
        return (pa.types.is_list(have) or pa.types.is_large_list(have)) and _compatible(have.value_type, want.value_type)
    if pa.types.is_struct(want):
        if not pa.types.is_struct(have):
            return False
        fields = {have.field(i).name: have.field(i).type for i in range(have.num_fields)}
        return set(fields) <= {want.field(i).name for i in range(want.num_fields)} and all(
            _compatible(t, want.field(n).type) for n, t in fields.items())
    return False


def _schema_problems(table: str, t: pa.Table) -> list[str]:
    declared = {c.name: c for c in _need_table(table)}
    problems = [f"{table}: column {c!r} is not in the schema (a typo? add it to nacosae.results.SCHEMA and "
                "docs/RESULTS_SCHEMA.md, or drop it)" for c in t.schema.names if c not in declared]
    for c in declared.values():
        if c.name not in t.schema.names:
            if c.required:
                problems.append(f"{table}: missing column {c.name!r} ({c.type})")
        elif not _compatible(t.schema.field(c.name).type, c.type):
            problems.append(f"{table}.{c.name}: type {t.schema.field(c.name).type}, expected {c.type}")
    return problems


def conform(table: str, t: pa.Table) -> pa.Table:
    """`t` in the current schema of `table`: columns in schema order, optional ones it lacks added as nulls, types cast.
    Raises ValidationError for an unknown column, a missing required one or a type that does not fit."""
    raise_if_problems(_schema_problems(table, t), f"the {table} table")
    schema = arrow_schema(table)
    cols = []
    for f in schema:
        if f.name in t.schema.names:
            col = t.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


# ================================================================================================ images
def thumbnail_bytes(image, max_px: int = MAX_IMAGE_SIDE, fmt: str = "png") -> bytes:
    """The one encoder of the dataset's pictures: an RGB copy of `image` (PIL), at most `max_px` on its longer side
    (aspect kept), as optimised PNG (lossless: the default) or WebP at quality 75 (about 5× smaller on clip art: what
    keeps a bundled demo of thousands of images under 10 MB). Formats: `THUMBNAIL_FORMATS`. The picture is stored as
    it is (never padded): the app places heatmaps with the backbone's own geometry (`nacosae.backbones.token_box`).
    `image`: anything `nacosae.images.open_image` decodes (raises its `BadImageError`)."""
    from PIL import Image

    from nacosae.images import open_image

    if fmt not in THUMBNAIL_FORMATS:
        raise ValueError(f"thumbnail format must be one of {tuple(THUMBNAIL_FORMATS)}, got {fmt!r}")
    im = open_image(image)
    if max(im.size) > max_px:
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", optimize=True)
    else:
        im.save(buf, format="WEBP", quality=75, method=6)
    return buf.getvalue()


def _image_cell(value, image_id) -> dict[str, Any]:
    from PIL import Image

    if isinstance(value, Image.Image):
        return {"bytes": thumbnail_bytes(value), "path": None}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, dict) and value.get("bytes"):
        return {"bytes": value["bytes"], "path": None}
    raise ValidationError(f"image {image_id!r} has no picture (give encoded bytes from thumbnail_bytes, a PIL image or "
                          "{'bytes': ...})")


# ================================================================================================ row builders
def rows_to_table(table: str, rows: Sequence[dict[str, Any]]) -> pa.Table:
    """A table in the schema from row dicts (missing columns → null; PIL images → PNG thumbnails). Raises
    ValidationError for a column the schema does not define (a typo would otherwise vanish)."""
    names = columns(table)
    known = set(names)
    out = []
    for i, row in enumerate(rows):
        extra = set(row) - known
        if extra:
            raise ValidationError(f"{table} row {i} has columns {sorted(extra)} that docs/RESULTS_SCHEMA.md does not define; "
                                  "add them to nacosae.results.SCHEMA (and the schema doc) or drop them")
        r = {c: row.get(c) for c in names}
        for c in _IMAGE_COLUMNS.get(table, ()):
            r[c] = _image_cell(r[c], r.get("image_id"))
        out.append(r)
    return pa.Table.from_pylist(out, schema=arrow_schema(table))


def _f32(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def feature_stats_row(stats, j: int, image_id_of: Callable[[int], str], grid_hw: tuple[int, int],
                      top_n: int | None = None) -> dict:
    """The columns of feature `j` that come from its statistics alone (`nacosae.features.FeatureStats`): frequencies,
    activation summary, histogram, top images (`image_id_of(image_idx)` gives their ids) with heatmaps rounded to
    float16's 3 significant digits (plenty for a heatmap; several times smaller parquet). Names are left to the
    caller; `sae_id` too."""
    top = stats.top_images(j)[: top_n or stats.config.top_n]
    dead = bool(stats.dead_S[j])
    maps = stats.top_maps_SKT[j, : len(top)].numpy()
    return {
        "sae_id": None, "feature": int(j),
        "image_frequency": float(stats.image_frequency_S[j]), "token_frequency": float(stats.token_frequency_S[j]),
        "mean_act": float(stats.mean_act_S[j]), "max_act": 0.0 if dead else float(stats.act_max_S[j]),
        "aggregation": stats.aggregation, "dead": dead, "dense": bool(stats.dense_S[j]),
        "hist_edges": [] if dead else stats.hist_edges(j).numpy().astype(np.float32).tolist(),
        "hist_counts": [] if dead else stats.hist_counts_SH[j].numpy().tolist(),
        "top_image_ids": [image_id_of(i) for i, _ in top], "top_activations": [float(v) for _, v in top],
        "top_heatmaps": [np.float32(np.float16(m)).tolist() for m in maps], "grid_h": grid_hw[0], "grid_w": grid_hw[1],
    }


def runs_row(sae_id: str, config: dict[str, Any], metrics: dict[str, Any], evaluation: dict[str, Any] | None = None) -> dict:
    """The `runs` row of one SAE from its config.json dict, its training metrics and (optionally) how its names were
    evaluated."""
    prov = config.get("provenance", {})
    return {"sae_id": sae_id, "backbone": prov.get("backbone"), "layer": prov.get("layer"), "tokens": prov.get("tokens"),
            "d_in": config["d_in"], "d_sae": config["d_sae"], "activation": config.get("activation"), "k": config.get("k"),
            "val_fvu": _f32(metrics.get("val_fvu")), "val_explained_variance": _f32(metrics.get("val_explained_variance")),
            "val_l0": _f32(metrics.get("val_l0")), "val_dead_fraction": _f32(metrics.get("val_dead_fraction")),
            "n_train_rows": prov.get("n_train_rows", metrics.get("n_train_rows")),
            "provenance_json": json.dumps(prov, sort_keys=True),
            "evaluation_json": None if evaluation is None else json.dumps(evaluation, sort_keys=True)}


def runs_table(rows: Iterable[tuple[str, dict[str, Any], dict[str, Any]]]) -> pa.Table:
    """The `runs` table from (sae_id, config.json dict, metrics dict) triples."""
    return rows_to_table("runs", [runs_row(sid, cfg, m) for sid, cfg, m in rows])


def load_record_image(rec: dict[str, Any]):
    """The RGB image of a store's `images.jsonl` record: its file, or a scikit-image sample by name."""
    from nacosae.images import ImageRecord, SkimageSource, open_image

    if rec.get("path"):
        return open_image(rec["path"], where=rec.get("image_id"))
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
                      load_image: Callable | None = None, image_format: str = "png", progress: bool = True
                      ) -> dict[str, pa.Table]:
    """A results dataset from feature statistics alone (no naming run yet): names are `unnamed` (reason `dead`,
    `dense` or null), `name_top_label` is the majority label of the top images; CoSy, MS and MILS columns are null.

    stats: `nacosae.features.FeatureStats`; images: the store's `images.jsonl` records (image_idx, image_id, path,
    label, description, source); load_image(record) -> PIL (default: `load_record_image`)."""
    from tqdm.auto import tqdm

    by_idx = {int(r["image_idx"]): r for r in images}
    T = stats.tokens_per_image
    if grid_hw[0] * grid_hw[1] != T:
        raise ValueError(f"grid_hw={grid_hw} has {grid_hw[0] * grid_hw[1]} cells but the stats have {T} tokens per image")
    idx_of = {r["image_id"]: i for i, r in by_idx.items()}
    rows, used = [], {}
    for j in range(stats.d_sae):
        row = feature_stats_row(stats, j, lambda i: by_idx[i]["image_id"], grid_hw, top_n)
        idx = [idx_of[k] for k in row["top_image_ids"]]
        used.update(dict.fromkeys(idx))
        reason = "dead" if row["dead"] else "dense" if row["dense"] else None
        row.update(sae_id=sae_id, name=UNNAMED, name_method=None, unnamed_reason=reason,
                   name_top_label=majority_label([by_idx[i].get("label") for i in idx]) if idx else None)
        rows.append(row)

    load_image = load_image or load_record_image
    image_rows = []
    for i in tqdm(sorted(used), desc="thumbnails", disable=not progress):
        rec = by_idx[i]
        # the image as it is: the app places a heatmap over the pixels the backbone saw (backbones.token_box)
        image_rows.append({"image_id": rec["image_id"], "kind": "probe",
                           "image": thumbnail_bytes(load_image(rec), max_px, image_format),
                           **{c: rec.get(c) for c in ("label", "description", "source")}})
    return {"features": rows_to_table("features", rows), "images": rows_to_table("images", image_rows),
            "runs": runs_table([(sae_id, sae_config, metrics)])}


# ================================================================================================ columns a table holds
def name_methods(table_or_columns: pa.Table | Iterable[str]) -> list[str]:
    """The naming methods a features table holds, in `METHODS` order: for a table, those with at least one name;
    for column names, those with a `name_<method>` column."""
    if isinstance(table_or_columns, pa.Table):
        t = table_or_columns
        return [m for m in METHODS if f"name_{m}" in t.schema.names and t.column(f"name_{m}").null_count < t.num_rows]
    cols = set(table_or_columns)
    return [m for m in METHODS if f"name_{m}" in cols]


def history_columns(table_or_columns: pa.Table | Iterable[str]) -> list[str]:
    """The MILS prompt-history columns (`<m>_history` for m in `MILS_METHODS`) a features table holds (for a table:
    those with at least one history), `mils_history` first."""
    if isinstance(table_or_columns, pa.Table):
        t = table_or_columns
        cols = [c for c in t.schema.names if c.endswith("_history") and t.column(c).null_count < t.num_rows]
    else:
        cols = [c for c in table_or_columns if c.endswith("_history")]
    order = {f"{m}_history": i for i, m in enumerate(MILS_METHODS)}
    return sorted(cols, key=lambda c: (c != "mils_history", order.get(c, len(order)), c))


# ================================================================================================ validation
def validate_results_tables(tables: dict[str, pa.Table], check_images: bool = True) -> dict[str, Any]:
    """Check the three tables against the schema and each other; returns a summary (rows per table, SAE ids).
    Raises ValidationError listing every problem.

    Checks: the columns (`SCHEMA`: required ones present, types that fit, no unknown ones); keys unique ((sae_id,
    feature), image_id, sae_id) and every sae_id in `runs`; features in 0..d_sae-1; list lengths consistent (top
    images / activations / heatmaps, heatmap = grid_h·grid_w values, histogram edges = counts + 1); top activations
    descending; dead features without top images; names not empty, a published name with its method, an
    `unnamed_reason` only on unnamed features and from `UNNAMED_REASONS`; CoSy AUCs in [0, 1]; every image id a
    feature refers to (top images, MILS renders, CoSy renders) present in `images`; image kinds and splits from
    `IMAGE_KINDS` / `IMAGE_SPLITS`; images decodable, in a format of `THUMBNAIL_FORMATS` (`check_images`)."""
    missing = [t for t in TABLES if t not in tables]
    raise_if_problems([f"missing table {t!r}" for t in missing], "results dataset")
    raise_if_problems([p for name in TABLES for p in _schema_problems(name, tables[name])], "results dataset")
    tables = {name: conform(name, tables[name]) for name in TABLES}
    problems: list[str] = []

    runs = tables["runs"].to_pydict()
    d_sae = dict(zip(runs["sae_id"], runs["d_sae"]))
    for k, n in Counter(runs["sae_id"]).items():
        if n > 1:
            problems.append(f"runs: sae_id {k!r} appears {n} times (the key must be unique)")
    for sid, prov, ev in zip(runs["sae_id"], runs["provenance_json"], runs["evaluation_json"]):
        for what, text in (("provenance_json", prov), ("evaluation_json", ev)):
            try:
                json.loads(text) if text else None
            except json.JSONDecodeError as e:
                problems.append(f"runs: {what} of {sid!r} is not JSON ({e})")

    images = tables["images"]
    image_ids = images.column("image_id").to_pylist()
    id_set = set(image_ids)
    dup = [k for k, n in Counter(image_ids).items() if n > 1]
    if dup:
        problems.append(f"images: {len(dup)} duplicate image_id (the key must be unique), e.g. {dup[:3]}")
    if None in id_set:
        problems.append("images: null image_id")
    for col, allowed in (("kind", IMAGE_KINDS), ("split", IMAGE_SPLITS)):
        found = set(images.column(col).to_pylist()) - {None} if col == "split" else set(images.column(col).to_pylist())
        if not found <= set(allowed):
            problems.append(f"images.{col} must be one of {allowed}, found {sorted(map(str, found - set(allowed)))}")
    if check_images:
        problems += _image_problems(image_ids, images.column("image").to_pylist())

    f = tables["features"]
    names = ("sae_id", "feature", "dead", "image_frequency", "top_image_ids", "top_activations", "top_heatmaps", "grid_h",
             "grid_w", "hist_edges", "hist_counts", "name", "name_method", "unnamed_reason")
    cols = {c: f.column(c).to_pylist() for c in names}
    histories = [f.column(c).to_pylist() for c in history_columns(f.schema.names)]
    render_cols = [f.column(f"cosy_render_ids_{m}").to_pylist() for m in METHODS]
    auc_cols = {c: f.column(c).to_pylist() for c in ["name_cosy_auc", *(f"cosy_auc_{m}" for m in METHODS)]}
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
            problems.append(f"{where}: duplicate row (the key (sae_id, feature) must be unique)")
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
        name, method, reason = cols["name"][i], cols["name_method"][i], cols["unnamed_reason"][i]
        if name == "":
            problems.append(f"{where}: empty name (use '{UNNAMED}', or null for a feature no method tried)")
        elif name not in (None, UNNAMED) and method not in METHODS:
            problems.append(f"{where}: a published name with name_method {method!r}, not one of {METHODS}")
        if reason is not None and reason not in UNNAMED_REASONS:
            problems.append(f"{where}: unnamed_reason {reason!r} is not one of {UNNAMED_REASONS}")
        elif reason is not None and name != UNNAMED:
            problems.append(f"{where}: unnamed_reason {reason!r} on a feature whose name is {name!r}")
        for c, vals in auc_cols.items():
            if vals[i] is not None and not 0.0 <= vals[i] <= 1.0:
                problems.append(f"{where}: {c} = {vals[i]} is outside [0, 1]")
        unknown_refs += [r for r in ids if r not in id_set]
        for col in render_cols:
            unknown_refs += [r for r in (col[i] or []) if r not in id_set]
        for hist in histories:
            for rec in hist[i] or []:
                unknown_refs += [r for r in (rec.get("render_ids") or []) if r not in id_set]
    if unknown_refs:
        problems.append(f"features refer to {len(unknown_refs)} image ids missing from images, e.g. {unknown_refs[:3]}")
    raise_if_problems(problems, "results dataset")
    return {"rows": {t: tables[t].num_rows for t in TABLES}, "sae_ids": sorted(d_sae)}


def _sniff_format(data: bytes) -> str | None:
    """The container format of encoded image bytes from their signature ("PNG", "WEBP", "JPEG", "GIF"; None)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def _image_problems(image_ids: Sequence[str], cells: Sequence[dict | None]) -> list[str]:
    from nacosae.images import BadImageError, open_image

    problems = []
    formats = set(THUMBNAIL_FORMATS.values())
    for iid, cell in zip(image_ids, cells):
        data = (cell or {}).get("bytes")
        if not data:
            problems.append(f"images: {iid!r} has no embedded bytes")
            continue
        fmt = _sniff_format(bytes(data[:16]))
        if fmt is None:
            problems.append(f"images: {iid!r} does not decode (its bytes are no PNG, WebP, JPEG or GIF file)")
            continue
        if fmt not in formats:
            problems.append(f"images: {iid!r} is {fmt}; the dataset holds {sorted(formats)} (nacosae.results.thumbnail_bytes)")
            continue
        try:
            open_image(data, where=iid)  # the decoder every reader uses: what it refuses, the app could not show
        except BadImageError as e:
            problems.append(f"images: {iid!r} does not decode ({e.reason})")
    return problems


# ================================================================================================ the card
_SECTION_START = "<!-- nacosae:section {} -->"
_SECTION_END = "<!-- nacosae:end {} -->"
_SECTION_RE = re.compile(r"<!-- nacosae:section (?P<name>[^>]+?) -->\n?(?P<text>.*?)\n?<!-- nacosae:end (?P=name) -->", re.S)
# the block older versions generated (one unnamed section): it becomes the `overview` section on the next update
_LEGACY_RE = re.compile(r"<!-- nacosae:generated:start[^>]*-->.*?<!-- nacosae:generated:end -->", re.S)


def section(name: str, text: str) -> str:
    """`text` between the markers of section `name` (letters, digits, spaces and `._:/-`)."""
    if not re.fullmatch(r"[A-Za-z0-9 ._:/-]+", name) or name != name.strip():
        raise ValueError(f"section name {name!r}: use letters, digits, spaces and ._:/- only")
    return f"{_SECTION_START.format(name)}\n{text.strip()}\n{_SECTION_END.format(name)}"


def card_sections(card: str) -> dict[str, str]:
    """The named sections of a card (name → text, in card order)."""
    return {m["name"]: m["text"].strip() for m in _SECTION_RE.finditer(split_front_matter(card)[1])}


def carried_sections(card: str | None, sae_ids: Sequence[str] = ()) -> dict[str, str]:
    """The sections of a results folder's card to carry into the published card: every named section but the
    overview (regenerated from the tables). A card without sections (written before sections existed, or by hand)
    gives its whole body outside the old generated block, as one section `protocol <sae ids>`."""
    if not card:
        return {}
    sections = card_sections(card)
    if sections:
        return {k: v for k, v in sections.items() if k != OVERVIEW}
    body = _LEGACY_RE.sub("", split_front_matter(card)[1]).strip()
    return {f"protocol {', '.join(sae_ids)}".strip(): body} if body else {}


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(YAML front matter as a dict, the rest of the card). Raises ValidationError for front matter that is not a
    YAML mapping."""
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


def merge_card(existing: str | None, meta: dict[str, Any], sections: dict[str, str],
               defaults: dict[str, Any] | None = None) -> str:
    """The card to write: `existing` (None: a new card) with its metadata updated by `meta` (other keys kept; tags
    merged), `defaults` only where the card has no value yet (a licence its owner chose stays), and the named
    `sections` in place: a section the card has is replaced where it stands, a new one is appended; the old unnamed
    generated block becomes the first new section. Text outside the sections and sections not in `sections` are kept
    as they are. A card with a body but no nacosae marker at all was written by hand: only its metadata is updated."""
    import yaml

    if existing is None:
        merged_meta, body = {**(defaults or {}), **meta}, ""
    else:
        old_meta, body = split_front_matter(existing)
        merged_meta = {**(defaults or {}), **old_meta, **meta}
        if isinstance(old_meta.get("tags"), list):
            merged_meta["tags"] = list(dict.fromkeys([*meta.get("tags", []), *old_meta["tags"]]))
    have = {m["name"] for m in _SECTION_RE.finditer(body)}
    by_hand = body.strip() and not have and not _LEGACY_RE.search(body)
    for name, text in {} if by_hand else sections.items():
        block = section(name, text)
        if name in have:
            body = _SECTION_RE.sub(lambda m, b=block, n=name: b if m["name"] == n else m.group(0), body)
        elif _LEGACY_RE.search(body):
            body = _LEGACY_RE.sub(lambda m, b=block: b, body, count=1)
        else:
            body = f"{body.rstrip()}\n\n{block}\n" if body.strip() else f"\n{block}\n"
    front = yaml.safe_dump(merged_meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n{body}"


def card_configs() -> list[dict[str, Any]]:
    """The card's `configs:` entries: one per table, `features` the default (so `load_dataset(path, split=...)`
    without a config name reads it)."""
    return [{"config_name": t, "data_files": [{"split": "train", "path": f"data/{t}/*.parquet"}],
             **({"default": True} if t == "features" else {})} for t in TABLES]


def dataset_card(body: str, extra_yaml: str = "", section_name: str | None = None) -> str:
    """README.md text: YAML front matter (`extra_yaml`, e.g. licence and tags, then `configs:`) + `body`, wrapped in
    the named section `section_name` when given (so a later publish keeps it)."""
    import yaml

    meta = yaml.safe_load(extra_yaml) if extra_yaml.strip() else {}
    if not isinstance(meta, dict):
        raise ValueError(f"extra_yaml must be YAML mapping lines, got {extra_yaml!r}")
    meta = {**meta, "configs": card_configs()}
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    text = section(section_name, body) if section_name else body.strip()
    return f"---\n{front}---\n\n{text}\n"


RESULTS_LICENSE = "apache-2.0"
"""The results dataset's licence (a Hub licence id): nacosae's. Its pictures are Open Clip Art (public domain, CC0),
Noto Color Emoji drawings (Apache-2.0) and scikit-image's sample photos (public domain / CC0 / free to use, as
scikit-image lists them), each named by the image's `source`; the card says so."""


def results_card_meta() -> dict[str, Any]:
    """The front matter keys nacosae owns in a results card (the licence: `results_card_defaults`)."""
    return {"configs": card_configs(), "pretty_name": "nacosae SAE feature results",
            "tags": ["sparse-autoencoder", "interpretability", "feature-naming", "nacosae"]}


def results_card_defaults() -> dict[str, Any]:
    """Front matter set only where the card has none: the licence (an owner's own choice stays)."""
    return {"license": RESULTS_LICENSE}


def results_overview(tables: dict[str, pa.Table], repo_id: str, sae_repo: str | None = None) -> str:
    """The `overview` section: what the tables hold, one line per SAE, how to load them."""
    from nacosae import __version__

    runs = tables["runs"].to_pylist()
    feats = tables["features"]
    sids = feats.column("sae_id").to_pylist()
    n_feat = Counter(sids)
    named = Counter(s for s, n in zip(sids, feats.column("name").to_pylist()) if n not in (None, UNNAMED))
    methods = name_methods(feats)
    shown = {"PNG": "PNG", "WEBP": "WebP"}
    formats = sorted({shown.get(f, f) for c in tables["images"].column("image").to_pylist()[:50] if (f := _format_of(c))})

    def fmt(x, spec):
        return spec.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "–"

    rows = "\n".join(f"| `{r['sae_id']}` | {r['backbone']} | {r['layer']} | {r['d_in']} → {r['d_sae']} | "
                     f"{fmt(r['val_fvu'], '{:.3f}')} | {fmt(r['val_l0'], '{:.1f}')} | {n_feat[r['sae_id']]} | "
                     f"{named[r['sae_id']]} |" for r in runs)
    first = runs[0]["sae_id"] if runs else "efficientnet-lite0/blocks.14"
    where = f"in [`{sae_repo}`](https://huggingface.co/{sae_repo})" if sae_repo else "published with nacosae"
    return f"""# SAE feature results (nacosae {__version__})

Per-feature statistics, names and name scores for the sparse autoencoders
{where}. Three tables (configs; `features` is the default):

- `features`: one row per (SAE, feature): firing frequencies, activation histogram, top images with per-token heatmaps,
  the published `name` (or `{UNNAMED}`, with `unnamed_reason`), every method's name ({', '.join(f'`{m}`' for m in methods)
  or 'none yet'}), CoSy AUC/MAD on held-out images, Monosemanticity Score, and the MILS prompt history.
- `images`: every image a feature row refers to, embedded as {' or '.join(formats) or 'PNG'} thumbnails.
- `runs`: one row per SAE: its quality metrics, provenance and how its names were evaluated.

| SAE | backbone | layer | d_in → d_sae | FVU (val) | L0 | features | named |
|---|---|---|---|---|---|---|---|
{rows}

## Load

```python
from datasets import load_dataset

features = load_dataset("{repo_id}", split="train")               # the default config: features
images = load_dataset("{repo_id}", "images", split="train")
row = features.filter(lambda r: r["sae_id"] == "{first}" and r["feature"] == 0)[0]
```

Licence: {RESULTS_LICENSE} (the tables). Pictures keep their own licences, named by each image's `source`: Open Clip Art
(public domain, CC0), Noto Color Emoji drawings (Apache-2.0, rendered from Debian `fonts-noto-color-emoji`) and the
scikit-image sample photos (public domain or CC0, as scikit-image lists them)."""


def _format_of(cell: dict | None) -> str | None:
    return _sniff_format(bytes(((cell or {}).get("bytes") or b"")[:16]))


def results_card(tables: dict[str, pa.Table], repo_id: str, sae_repo: str | None = None, existing: str | None = None,
                 carried: dict[str, str] | None = None) -> str:
    """README.md of the results dataset: `existing` (the target's card, None for a new one) updated with our front
    matter (`configs:` with `features` the default), the `overview` section regenerated from `tables`, and the
    `carried` sections (e.g. the evaluation protocol from the results folder's own card: `carried_sections`)."""
    sections = {OVERVIEW: results_overview(tables, repo_id, sae_repo), **(carried or {})}
    return merge_card(existing, results_card_meta(), sections, results_card_defaults())


def _card_problems(card: str | None) -> list[str]:
    if card is None:
        return ["no README.md (dataset card)"]
    meta, _ = split_front_matter(card)
    configs = {c.get("config_name"): c for c in meta.get("configs") or [] if isinstance(c, dict)}
    problems = []
    for t in TABLES:
        if t not in configs:
            problems.append(f"README.md configs: lacks config {t!r}")
        elif f"data/{t}/" not in json.dumps(configs[t].get("data_files")):
            problems.append(f"README.md configs: {t!r} does not point at data/{t}/")
    defaults = [name for name, c in configs.items() if c.get("default")]
    if defaults != ["features"]:
        problems.append(f"README.md configs: the default config must be 'features' (found {defaults or 'none'}), or "
                        "load_dataset(path, split='train') fails with 'Config name is missing'")
    return problems


# ================================================================================================ writing and reading
def write_results_tables(tables: dict[str, pa.Table], folder: str | os.PathLike, rows_per_shard: int | None = None) -> Path:
    """`data/<table>/part-XXXXX.parquet` (zstd, in the schema, with the `datasets` features as metadata) for each
    table, into `folder` as it is (the staging step; `write_results_folder` is the atomic one). Old parquet files of a
    table are removed first: the folder then holds exactly these tables."""
    folder = Path(folder)
    for name in TABLES:
        t = conform(name, tables[name])
        # the features metadata lets load_dataset decode the image column; the version lets a reader refuse a newer one
        t = t.replace_schema_metadata({**hf_features_metadata(name), _VERSION_KEY: str(SCHEMA_VERSION).encode()})
        d = folder / "data" / name
        if d.exists():
            for old in d.glob("*.parquet"):
                old.unlink()
        d.mkdir(parents=True, exist_ok=True)
        step = rows_per_shard or ROWS_PER_SHARD[name]
        for s in range(max(1, math.ceil(t.num_rows / step))):
            pq.write_table(t.slice(s * step, step), d / f"part-{s:05d}.parquet", compression="zstd")
    return folder


def write_results_folder(tables: dict[str, pa.Table], out_dir: str | os.PathLike, card: str,
                         rows_per_shard: int | None = None, check_images: bool = True) -> Path:
    """Validate the tables, then write them with `card` as README.md into a folder beside `out_dir` and swap it in:
    `out_dir` is replaced as a whole, and a killed write leaves the previous dataset intact."""
    raise_if_problems(_card_problems(card), "the dataset card")
    validate_results_tables(tables, check_images=check_images)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write_results_tables(tables, tmp, rows_per_shard)
        (tmp / CARD).write_text(card, encoding="utf-8")
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def write_results(out_dir: str | os.PathLike, features: Sequence[dict], images: Sequence[dict], runs: Sequence[dict],
                  card: str | None = None) -> Path:
    """Write the three tables from row dicts (+ the card) as a dataset folder in the Hub layout; replaces `out_dir`
    as a whole (`write_results_folder`). Rows may omit columns (null); unknown columns, duplicate keys, dangling image
    ids and the other problems `validate_results_tables` finds raise ValidationError before anything is written.

    `card`: the README.md text (see `dataset_card`); its front matter must carry `configs:` with `features` the
    default. Default: a minimal card."""
    card = card if card is not None else dataset_card("# nacosae results\n\nSee docs/RESULTS_SCHEMA.md for the columns.")
    tables = {"features": rows_to_table("features", features), "images": rows_to_table("images", images),
              "runs": rows_to_table("runs", runs)}
    return write_results_folder(tables, out_dir, card)


def read_results_folder(folder: str | os.PathLike, tables: Sequence[str] = TABLES,
                        columns: dict[str, list[str]] | None = None) -> dict[str, pa.Table]:
    """The tables of a results dataset folder (the Hub repo layout): `data/<table>/*.parquet`, concatenated in file
    order and brought to the current schema (`conform`: columns an older dataset lacks are nulls). `columns` reads
    only those columns of a table (e.g. skip the image bytes); such a table is not conformed."""
    folder = Path(folder)
    out = {}
    for t in tables:
        files = sorted((folder / "data" / t).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{folder} has no data/{t}/*.parquet: not a results dataset written by nacosae "
                                    "(see docs/RESULTS_SCHEMA.md)")
        cols = (columns or {}).get(t)
        parts = [pq.read_table(f, columns=cols) for f in files]
        version = max(int((p.schema.metadata or {}).get(_VERSION_KEY, b"1")) for p in parts)
        if version > SCHEMA_VERSION:
            raise ValidationError(f"{folder}/data/{t} was written with results schema {version}; this nacosae reads up to "
                                  f"{SCHEMA_VERSION}: upgrade nacosae")
        table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
        out[t] = table if cols else conform(t, table)
    return out


def validate_results_folder(folder: str | os.PathLike, check_images: bool = True) -> dict[str, Any]:
    """Validate a results dataset folder: its card's `configs:` (one per table, `features` the default) and its tables
    (`validate_results_tables`). Returns the summary; raises ValidationError."""
    folder = Path(folder)
    card = folder / CARD
    raise_if_problems(_card_problems(card.read_text(encoding="utf-8") if card.is_file() else None), f"results dataset {folder}")
    return validate_results_tables(read_results_folder(folder), check_images=check_images)


def load_results(path_or_repo_id: str | os.PathLike, table: str = "features", revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None):
    """One table of a results dataset (a local folder or a Hub dataset repo id) as a `datasets.Dataset`
    (`cache_dir`: where `datasets` keeps its Arrow cache; default its own)."""
    from datasets import load_dataset

    _need_table(table)
    path = Path(path_or_repo_id)
    if path.exists() and not (path / CARD).is_file():
        raise FileNotFoundError(f"{path} has no README.md: not a results dataset folder (build one with "
                                "hub_scripts/build_results.py)")
    # a local folder is rewritten in place by every build, and `datasets` keys its Arrow cache of a local folder by
    # the folder's name and files, not their contents: it would serve the previous build (seen with datasets 5.2)
    # (and the split sizes recorded for another folder of the same name would fail the checks)
    local = {"download_mode": "force_redownload", "verification_mode": "no_checks"} if path.exists() else {}
    return load_dataset(str(path_or_repo_id), table, revision=revision, split="train",
                        cache_dir=None if cache_dir is None else str(cache_dir), **local)


# ================================================================================================ combining datasets
def concat_results(parts: Sequence[dict[str, pa.Table]]) -> dict[str, pa.Table]:
    """Several results datasets as one (images deduplicated by id, first kept)."""
    out = {}
    for t in TABLES:
        tab = pa.concat_tables([conform(t, p[t]) for p in parts]) if len(parts) > 1 else conform(t, parts[0][t])
        if t == "images" and len(parts) > 1:
            first: dict[str, int] = {}
            for i, k in enumerate(tab.column("image_id").to_pylist()):
                first.setdefault(k, i)
            tab = tab.take(sorted(first.values()))
        out[t] = tab
    return out


def _feature_key(r: dict[str, Any]) -> tuple[str, int]:
    return r["sae_id"], int(r["feature"])


def overlay_results(base: dict[str, pa.Table], extra: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """`base` (e.g. `tables_from_stats`: every feature) with the feature rows of `extra` (e.g. a naming run that
    covered some features) in place of its own (the base's values kept where the extra row has null), images united
    (extra first), runs rows of `extra` in place of `base`'s. Refuses an `extra` made for another SAE (other width or
    training run)."""
    base = {t: conform(t, base[t]) for t in TABLES}
    extra = {t: conform(t, extra[t]) for t in TABLES}
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

    def merge(t: str, key) -> pa.Table:
        base_rows = base[t].to_pylist()
        extra_rows = {key(r): r for r in extra[t].to_pylist()}
        rows = [extra_rows.pop(key(r), r) for r in base_rows] + list(extra_rows.values())
        if t == "features":
            by_key = {key(r): r for r in base_rows}
            for r in rows:  # keep the base's values (e.g. name_top_label) where the extra row has none
                named_here = r.get("name") is not None  # then its naming outcome is one block: a null means "none"
                for c, v in by_key.get(key(r), {}).items():
                    if r.get(c) is None and not (named_here and c in NAMING_OUTCOME):
                        r[c] = v
        return pa.Table.from_pylist(rows, schema=arrow_schema(t))

    return {"features": merge("features", _feature_key), "images": merge("images", lambda r: r["image_id"]),
            "runs": merge("runs", lambda r: r["sae_id"])}


def shrink_results(tables: dict[str, pa.Table], top_n: int | None = None, max_px: int = 128,
                   renders_per_feature: int | None = None, image_format: str = "png", keep_cosy_renders: bool = False,
                   progress: bool = True) -> dict[str, pa.Table]:
    """A smaller copy of a results dataset (for a bundled demo): at most `top_n` top images per feature, the renders
    of only the `renders_per_feature` best MILS prompts of each feature (the other prompts keep their text and score,
    with no render ids), no CoSy evaluation renders unless `keep_cosy_renders`, only the images still referred to,
    re-encoded as ≤ `max_px` thumbnails (`image_format`, see `thumbnail_bytes`)."""
    from tqdm.auto import tqdm

    from nacosae.images import open_image

    feats = conform("features", tables["features"])
    hist_cols = history_columns(feats.schema.names)
    cosy_cols = [f"cosy_render_ids_{m}" for m in METHODS]
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
    images = conform("images", tables["images"])
    ids = images.column("image_id").to_pylist()
    images = images.take([i for i, k in enumerate(ids) if k in used])
    new_cells = []
    for cell, iid in tqdm(list(zip(images.column("image").to_pylist(), images.column("image_id").to_pylist())),
                          desc="thumbnails", disable=not progress):
        # as it is (older datasets stored probe thumbnails padded to a square; those stay as they were stored)
        new_cells.append({"bytes": thumbnail_bytes(open_image(cell["bytes"], where=iid), max_px, image_format), "path": None})
    col = images.schema.get_field_index("image")
    images = images.set_column(col, images.schema.field(col), pa.array(new_cells, type=images.schema.field(col).type))
    return {"features": pa.Table.from_pylist(rows, schema=feats.schema), "images": images,
            "runs": conform("runs", tables["runs"])}
