"""The results dataset: named and evaluated SAE features as parquet tables in the Hub dataset repo layout.

    write_results("runs/results/blocks.14", features=rows, images=image_rows, runs=run_rows, card=card_text)
    ds = load_results("runs/results/blocks.14", "features")          # = datasets.load_dataset(path, "features")["train"]

Layout (docs/RESULTS_SCHEMA.md; identical locally and on the Hub):

    README.md                        dataset card; its YAML `configs:` maps each table to its parquet files
    data/features/part-00000.parquet one row per (SAE, feature)
    data/images/part-00000.parquet   every image a feature row refers to (PNG bytes, ≤ 224 px)
    data/runs/part-00000.parquet     one row per SAE

The column types are fixed here (`table_schema`), so every build gives the same schema whatever the rows hold (a
method that did not run is a null column, not a missing one), and the app can rely on it. The whole folder is
written beside the target and swapped in at the end: a killed build leaves the previous dataset intact.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

SCHEMA_VERSION = 1
TABLES = ("features", "images", "runs")
METHODS = ("mils", "mils_gemma", "top_label", "random", "vocab")
"""Every naming method has `name_<m>`, `cosy_auc_<m>`, `cosy_mad_<m>`, `cosy_render_ids_<m>` columns (null where the
method did not run or does not apply)."""
MILS_METHODS = ("mils", "mils_gemma")
"""Methods with a MILS loop: they also have `<m>_history` and `<m>_scores_by_iteration`."""
IMAGE_KINDS = ("probe", "bank", "render")
UNNAMED = "unnamed"
MAX_IMAGE_SIDE = 224
ROWS_PER_SHARD = {"features": 2000, "images": 2000, "runs": 1000}


def table_schema(table: str):
    """The `datasets.Features` of one table (docs/RESULTS_SCHEMA.md)."""
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    def List(x):  # noqa: N802 - `[x]` is a list feature in every datasets version (datasets.List only since 4.0)
        return [x]

    f32, i32, s = Value("float32"), Value("int32"), Value("string")
    if table == "features":
        cols: dict[str, Any] = {
            "sae_id": s, "feature": i32,
            "image_frequency": f32, "token_frequency": f32, "mean_act": f32, "max_act": f32, "aggregation": s,
            "dead": Value("bool"), "dense": Value("bool"),
            "hist_edges": List(f32), "hist_counts": List(Value("int64")),
            "top_image_ids": List(s), "top_activations": List(f32), "top_heatmaps": List(List(f32)),
            "grid_h": i32, "grid_w": i32,
            "name": s, "name_method": s,
        }
        for m in METHODS:
            cols.update({f"name_{m}": s, f"cosy_auc_{m}": f32, f"cosy_mad_{m}": f32, f"cosy_render_ids_{m}": List(s)})
        cols.update({"ms": f32, "ms_encoder": s})
        history = List({"iteration": i32, "prompt": s, "score": f32, "render_ids": List(s)})
        for m in MILS_METHODS:
            cols.update({f"{m}_history": history, f"{m}_scores_by_iteration": List(f32)})
        return Features(cols)
    if table == "images":
        return Features({"image_id": s, "image": ImageFeature(), "kind": s, "label": s, "description": s, "source": s,
                         "prompt": s, "seed": i32, "generator": s})
    if table == "runs":
        cols = {"sae_id": s, "backbone": s, "layer": s, "tokens": s, "d_in": i32, "d_sae": i32, "activation": s,
                "k": i32, "val_fvu": f32, "val_explained_variance": f32, "val_l0": f32, "val_dead_fraction": f32,
                "n_train_rows": Value("int64"), "provenance_json": s, "evaluation_json": s}
        return Features(cols)
    raise ValueError(f"unknown table {table!r}; the results dataset has {TABLES}")


def image_png(image: Image.Image, max_side: int = MAX_IMAGE_SIDE) -> bytes:
    """PNG bytes of an RGB copy of `image`, at most `max_side` px on its longer side (aspect kept)."""
    im = image.convert("RGB")
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _check_rows(table: str, rows: Sequence[dict], schema) -> list[dict]:
    """Rows with every schema column (missing ones → None); unknown columns are an error (a typo would vanish)."""
    out = []
    cols = set(schema)
    for i, row in enumerate(rows):
        extra = set(row) - cols
        if extra:
            raise ValueError(f"{table} row {i} has columns {sorted(extra)} that docs/RESULTS_SCHEMA.md does not define; "
                             f"add them to nacosae.results.table_schema (and the schema doc) or drop them")
        out.append({c: row.get(c) for c in schema})
    if table == "images":
        for row in out:
            if row["kind"] not in IMAGE_KINDS:
                raise ValueError(f"image {row['image_id']!r} has kind {row['kind']!r}; kinds are {IMAGE_KINDS}")
            if not isinstance(row["image"], (dict, Image.Image, bytes)):
                raise TypeError(f"image {row['image_id']!r} has no picture (give PNG bytes, a PIL image or {{'bytes': ...}})")
            if isinstance(row["image"], bytes):
                row["image"] = {"bytes": row["image"], "path": None}
    key = {"features": ("sae_id", "feature"), "images": ("image_id",), "runs": ("sae_id",)}[table]
    seen = set()
    for row in out:
        k = tuple(row[c] for c in key)
        if None in k:
            raise ValueError(f"{table} rows need {key}; got a row with {dict(zip(key, k))}")
        if k in seen:
            raise ValueError(f"{table} has two rows for {dict(zip(key, k))}: the key must be unique")
        seen.add(k)
    return out


def _card_yaml(extra_yaml: str = "") -> str:
    lines = ["---"]
    if extra_yaml.strip():
        lines.append(extra_yaml.strip())
    lines.append("configs:")
    for t in TABLES:
        lines += [f"- config_name: {t}", "  data_files:", "  - split: train", f"    path: data/{t}/*.parquet"]
        if t == "features":
            lines.append("  default: true")
    lines.append("---")
    return "\n".join(lines) + "\n"


def dataset_card(body: str, extra_yaml: str = "") -> str:
    """README.md text: YAML front matter (`extra_yaml` lines, e.g. licence and tags, then `configs:` per table) + body."""
    return _card_yaml(extra_yaml) + "\n" + body.strip() + "\n"


def write_results(out_dir: str | os.PathLike, features: Sequence[dict], images: Sequence[dict], runs: Sequence[dict],
                  card: str | None = None) -> Path:
    """Write the three tables (+ the card) as a dataset folder in the Hub layout; replaces `out_dir` as a whole.

    `card`: the README.md text (see `dataset_card`); it must carry the `configs:` front matter, or `load_dataset(path,
    "features")` cannot find the tables. Default: a minimal card.
    """
    from datasets import Dataset

    out_dir = Path(out_dir)
    card = card if card is not None else dataset_card("# nacosae results\n\nSee docs/RESULTS_SCHEMA.md for the columns.")
    if "configs:" not in card.split("---")[1 if card.startswith("---") else 0]:
        raise ValueError("the dataset card needs YAML front matter with `configs:` (build it with nacosae.results.dataset_card)")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for table, rows in (("features", features), ("images", images), ("runs", runs)):
            schema = table_schema(table)
            rows = _check_rows(table, rows, schema)
            step = ROWS_PER_SHARD[table]
            n_shards = max(1, -(-len(rows) // step))
            (tmp / "data" / table).mkdir(parents=True)
            for i in range(n_shards):
                ds = Dataset.from_list(rows[i * step:(i + 1) * step], features=schema)
                ds.to_parquet(str(tmp / "data" / table / f"part-{i:05d}.parquet"))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        # swap: the old dataset stays readable until the new one is complete
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_results(path_or_repo_id: str | os.PathLike, table: str = "features", revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None):
    """One table of a results dataset (a local folder or a Hub dataset repo id) as a `datasets.Dataset`
    (`cache_dir`: where `datasets` keeps its Arrow cache; default its own)."""
    from datasets import load_dataset

    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; the results dataset has {TABLES}")
    path = Path(path_or_repo_id)
    if path.exists() and not (path / "README.md").is_file():
        raise FileNotFoundError(f"{path} has no README.md: not a results dataset folder (build one with "
                                "hub_scripts/build_results.py)")
    return load_dataset(str(path_or_repo_id), table, revision=revision, split="train",
                        cache_dir=None if cache_dir is None else str(cache_dir))
