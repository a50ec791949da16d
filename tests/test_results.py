"""The results dataset: one schema declaration, written in the Hub layout, read back with `datasets.load_dataset`,
validated, and a card of named sections that keeps what it does not regenerate."""

import io
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nacosae.results import (
    IMAGE_KINDS,
    IMAGE_SPLITS,
    METHODS,
    MILS_METHODS,
    SCHEMA,
    SCHEMA_VERSION,
    TABLES,
    THUMBNAIL_FORMATS,
    UNNAMED_REASONS,
    ValidationError,
    arrow_schema,
    card_sections,
    carried_sections,
    dataset_card,
    load_results,
    merge_card,
    name_methods,
    read_results_folder,
    results_card,
    section,
    split_front_matter,
    table_schema,
    thumbnail_bytes,
    validate_results_folder,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "RESULTS_SCHEMA.md").read_text()
DEMO = ROOT / "demo" / "results"


def _feature_row(j, name="striped cat", **kw):
    row = {
        "sae_id": "efficientnet-lite0/blocks.14", "feature": j, "image_frequency": 0.25, "token_frequency": 0.01,
        "mean_act": 0.5, "max_act": 3.0, "aggregation": "max", "dead": False, "dense": False,
        "hist_edges": [0.0, 2.0, 4.0], "hist_counts": [3, 1], "top_image_ids": ["img/a", "img/b"],
        "top_activations": [3.0, 2.5], "top_heatmaps": [[0.0] * 48 + [3.0], [2.5] + [0.0] * 48], "grid_h": 7, "grid_w": 7,
        "name": name, "name_method": "mils", "name_mils": name, "cosy_auc_mils": 0.8125, "cosy_mad_mils": 1.5,
        "cosy_render_ids_mils": ["img/b"], "name_random": "kettle", "cosy_auc_random": 0.5, "cosy_mad_random": 0.0,
        "candidate_name": name, "name_split_score": 0.75, "name_cosy_auc": 0.8125, "name_cosy_mad": 1.5,
        "ms": 0.25, "ms_encoder": "efficientnet-lite0/pooled",
        "mils_history": [{"iteration": 0, "prompt": "cat", "score": 0.5, "render_ids": ["img/a"]},
                         {"iteration": 1, "prompt": "striped cat", "score": 0.75, "render_ids": ["img/a", "img/b"]}],
        "mils_scores_by_iteration": [0.5, 0.75],
    }
    row.update(kw)
    return row


def _images():
    return [{"image_id": "img/a", "image": thumbnail_bytes(Image.new("RGB", (448, 300), (200, 10, 10))), "kind": "probe",
             "label": "animals", "description": "a red cat", "source": "openclipart"},
            {"image_id": "img/b", "image": Image.new("RGB", (64, 64), (0, 0, 255)), "kind": "bank", "label": "animals",
             "split": "eval", "family": "animals"},
            {"image_id": "emoji/cat", "image": thumbnail_bytes(Image.new("RGB", (72, 72), (250, 200, 0)), fmt="webp"),
             "kind": "emoji", "split": "search", "family": "animal-mammal", "description": "cat face"}]


RUN = {"sae_id": "efficientnet-lite0/blocks.14", "backbone": "efficientnet-lite0", "layer": "blocks.14", "tokens": "spatial",
       "d_in": 192, "d_sae": 1536, "activation": "topk", "k": 24, "val_fvu": 0.2, "val_explained_variance": 0.8,
       "val_l0": 24.0, "val_dead_fraction": 0.0, "n_train_rows": 1000, "provenance_json": "{}", "evaluation_json": "{}"}


def _unnamed_row(j):
    """The pipeline chose a name, but its held-out AUC is below the threshold: the candidate and its scores stay."""
    return _feature_row(j, name="unnamed", name_method=None, unnamed_reason="below_threshold", candidate_name="kettle",
                        name_cosy_auc=0.55, name_split_score=0.6, mils_history=None)


@pytest.fixture
def written(tmp_path):
    rows = [_feature_row(3), _unnamed_row(7)]
    out = write_results(tmp_path / "ds", rows, _images(), [RUN])
    return out, rows


# ------------------------------------------------------------------------------------------------ one schema
def test_one_declaration_makes_both_schemas():
    import datasets

    for t in TABLES:
        arrow = arrow_schema(t)
        assert arrow.names == [c.name for c in SCHEMA[t]]
        features = table_schema(t)
        assert list(features) == arrow.names
        # the datasets features are the arrow schema's own, with the image column decoded as an image
        derived = datasets.Features.from_arrow_schema(pa.schema(list(arrow)))
        for name, feat in features.items():
            if isinstance(feat, datasets.Image):
                assert t == "images" and name == "image"
            else:
                assert feat == derived[name], name
        # and what datasets would write for these features is exactly the declared arrow schema
        assert features.arrow_schema.remove_metadata().equals(arrow.remove_metadata()), t


def test_the_schema_doc_lists_every_column_and_value():
    """docs/RESULTS_SCHEMA.md and the declaration must not drift: every column (per-method ones by their template)."""
    for t in TABLES:
        for col in SCHEMA[t]:
            name = col.name
            for m in sorted(METHODS, key=len, reverse=True):  # templated per-method columns
                name = re.sub(rf"^(name|cosy_auc|cosy_mad|cosy_render_ids)_{m}$", r"\1_<method>", name)
                name = re.sub(rf"^{m}_(history|scores_by_iteration)$", r"<m>_\1", name)
            assert name in DOC, f"{t}.{col.name} is not in docs/RESULTS_SCHEMA.md"
    for value in (*METHODS, *IMAGE_KINDS, *IMAGE_SPLITS, *UNNAMED_REASONS):
        assert f"`{value}`" in DOC, value


# ------------------------------------------------------------------------------------------------ write and read back
def test_round_trip_with_load_dataset(written, tmp_path):
    out, rows = written
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(TABLES)
    ds = load_results(out, "features", cache_dir=tmp_path / "hf")
    assert len(ds) == 2 and ds.column_names == [c.name for c in SCHEMA["features"]]
    for got, want in zip(ds, rows):
        for k, v in want.items():
            if isinstance(v, float):
                assert math.isclose(got[k], v, rel_tol=1e-6), k  # float32 columns
            else:
                assert got[k] == v, k
    # every method has its columns; those not written are null
    first = ds[0]
    for m in METHODS:
        assert f"name_{m}" in first and f"cosy_auc_{m}" in first
    for m in MILS_METHODS:
        assert f"{m}_history" in first
    assert first["name_pool_mils"] is None and first["cosy_auc_top_label"] is None and first["pool_mils_history"] is None
    assert first["unnamed_reason"] is None and ds[1]["unnamed_reason"] == "below_threshold"
    assert ds[1]["candidate_name"] == "kettle" and ds[1]["name_cosy_auc"] == pytest.approx(0.55)

    import datasets

    direct = datasets.load_dataset(str(out), "features", split="train", cache_dir=str(tmp_path / "hf2"))
    assert direct["feature"] == [3, 7]
    # the parquet files carry exactly the declared schema, and its version
    for t in TABLES:
        for f in (out / "data" / t).glob("*.parquet"):
            assert pq.read_schema(f).remove_metadata().equals(arrow_schema(t).remove_metadata())
            assert pq.read_schema(f).metadata[b"nacosae_results_schema"] == str(SCHEMA_VERSION).encode()


def test_a_dataset_from_a_newer_schema_is_refused(written):
    out, _ = written
    f = next((out / "data" / "runs").glob("*.parquet"))
    t = pq.read_table(f)
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, b"nacosae_results_schema": b"99"}), f)
    with pytest.raises(ValidationError, match="schema 99.*upgrade nacosae"):
        read_results_folder(out)


def test_load_dataset_without_a_config_name_reads_features(written, tmp_path):
    """What a Hub user types first; it raised "Config name is missing" without a default config."""
    import datasets

    out, _ = written
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds["feature"] == [3, 7]


@pytest.mark.skipif(not DEMO.is_dir(), reason="no bundled demo")
def test_the_bundled_demo_loads_without_a_config_name_and_validates(tmp_path):
    import datasets

    ds = datasets.load_dataset(str(DEMO), split="train", cache_dir=str(tmp_path / "hf"))
    assert "top_image_ids" in ds.column_names  # the features table
    summary = validate_results_folder(DEMO)  # an older dataset: read into the current schema, valid
    assert summary["rows"]["features"] == len(ds)
    tables = read_results_folder(DEMO)
    rows = tables["features"].select(["name", "unnamed_reason"]).to_pylist()
    # every feature was attempted (issue 8): a row is named, or says why not
    assert all((r["name"] != "unnamed") == (r["unnamed_reason"] is None) for r in rows)
    assert tables["images"].schema.names == arrow_schema("images").names


def test_images_load_as_pil_at_most_224_px(written, tmp_path):
    out, _ = written
    images = load_results(out, "images", cache_dir=tmp_path / "hf")
    by_id = {r["image_id"]: r for r in images}
    a, b, e = by_id["img/a"]["image"], by_id["img/b"]["image"], by_id["emoji/cat"]
    assert isinstance(a, Image.Image) and a.size == (224, 150)  # aspect kept, longer side 224
    assert a.convert("RGB").getpixel((10, 10)) == (200, 10, 10)
    assert b.size == (64, 64) and by_id["img/b"]["kind"] == "bank" and by_id["img/b"]["split"] == "eval"
    assert e["kind"] == "emoji" and e["split"] == "search" and e["family"] == "animal-mammal"
    assert e["image"].format == "WEBP" and a.format == "PNG"
    runs = load_results(out, "runs", cache_dir=tmp_path / "hf")
    assert runs[0]["d_sae"] == 1536 and runs[0]["evaluation_json"] == "{}"


def test_thumbnail_formats_are_those_the_doc_names():
    """One function encodes every picture; the schema doc names exactly its formats (the demo ships WebP)."""
    images_row = next(line for line in DOC.splitlines() if line.startswith("| image |"))
    for fmt in THUMBNAIL_FORMATS.values():
        assert fmt.replace("WEBP", "WebP") in images_row
        with Image.open(io.BytesIO(thumbnail_bytes(Image.new("RGB", (300, 30)), 100, fmt.lower()))) as im:
            assert im.format == fmt and im.size == (100, 10)
    with pytest.raises(ValueError, match="thumbnail format"):
        thumbnail_bytes(Image.new("RGB", (8, 8)), fmt="jpeg")
    if DEMO.is_dir():
        cells = pq.read_table(next((DEMO / "data" / "images").glob("*.parquet")), columns=["image"]).column("image")
        with Image.open(io.BytesIO(cells[0].as_py()["bytes"])) as im:
            assert im.format in THUMBNAIL_FORMATS.values()


def test_rewrite_replaces_the_whole_dataset(written, tmp_path):
    out, _ = written
    write_results(out, [_feature_row(11, top_image_ids=["img/a"], top_activations=[3.0], top_heatmaps=[[0.0] * 49],
                                     cosy_render_ids_mils=[], mils_history=None)], _images()[:1], [RUN])
    ds = load_results(out, "features", cache_dir=tmp_path / "hf")
    assert ds["feature"] == [11]
    assert not list(out.parent.glob(".ds.*"))  # no temporary or old folder left behind


def test_card_has_a_config_per_table_and_features_is_the_default(written):
    out, _ = written
    meta, _ = split_front_matter((out / "README.md").read_text())
    configs = {c["config_name"]: c for c in meta["configs"]}
    assert sorted(configs) == sorted(TABLES)
    for t in TABLES:
        assert configs[t]["data_files"] == [{"split": "train", "path": f"data/{t}/*.parquet"}]
        assert configs[t].get("default", False) is (t == "features")
    custom = dataset_card("# Title\n\nbody", extra_yaml="license: other")
    assert custom.startswith("---\nlicense: other\nconfigs:") and custom.rstrip().endswith("body")


def test_bad_rows_are_refused(tmp_path):
    imgs = _images()
    cases = [
        (dict(features=[_feature_row(1, nmae="typo")]), "RESULTS_SCHEMA"),
        (dict(features=[_feature_row(1), _feature_row(1)]), "unique"),
        (dict(images=[{**imgs[0], "kind": "photo"}, *imgs[1:]]), "kind"),
        (dict(images=[{**imgs[0], "split": "train"}, *imgs[1:]]), "split"),
        (dict(images=[{**imgs[0], "image": thumbnail_bytes(Image.new("RGB", (4, 4))).replace(b"PNG", b"XYZ")}, *imgs[1:]]),
         "does not decode"),
        (dict(features=[_feature_row(1, unnamed_reason="boring")]), "unnamed_reason 'boring'"),
        (dict(features=[_feature_row(1, unnamed_reason="dead")]), "on a feature whose name is 'striped cat'"),
        (dict(features=[_feature_row(1, name_method="magic")]), "name_method 'magic'"),
        (dict(features=[_feature_row(1, name_cosy_auc=1.5)]), "outside"),
        (dict(features=[_feature_row(1, top_image_ids=["img/a", "img/zzz"])]), "missing from images"),
        (dict(card="# no front matter"), "configs"),
        (dict(card="---\nconfigs:\n- config_name: features\n  data_files: data/features/*.parquet\n---\n"), "configs"),
    ]
    for i, (kw, message) in enumerate(cases):
        args = dict(features=[_feature_row(1)], images=imgs, runs=[RUN], card=None) | kw
        with pytest.raises(ValidationError, match=message):
            write_results(tmp_path / f"d{i}", **args)
        assert not (tmp_path / f"d{i}").exists() and not list(tmp_path.glob(f".d{i}.*"))  # nothing written
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    with pytest.raises(ValidationError, match="is JPEG"):
        write_results(tmp_path / "jpeg", [_feature_row(1)], [{**imgs[0], "image": jpeg.getvalue()}, *imgs[1:]], [RUN])
    with pytest.raises(FileNotFoundError, match="README"):
        (tmp_path / "empty").mkdir()
        load_results(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown table"):
        load_results(tmp_path / "empty", "galleries")


def test_name_methods_are_those_with_names(written):
    out, _ = written
    feats = read_results_folder(out)["features"]
    assert name_methods(feats) == ["mils", "random"]  # every column is there; only these hold names
    assert name_methods(feats.schema.names) == list(METHODS)


# ------------------------------------------------------------------------------------------------ the card
def test_card_sections_survive_an_update():
    protocol = "## How names were evaluated\n- held-out renders, threshold 0.7"
    card = dataset_card("# My title\n" + protocol, extra_yaml="license: mit", section_name="protocol a/b")
    assert card_sections(card) == {"protocol a/b": "# My title\n" + protocol}
    meta, body = split_front_matter(card)
    hand = f"---\nlicense: mit\nconfigs: {meta['configs']}\n---\nHand-written intro.\n{body}\nHand-written outro.\n"
    merged = merge_card(hand, {"pretty_name": "x", "tags": ["a"]}, {"overview": "# Generated v1"})
    again = merge_card(merged, {"pretty_name": "y"}, {"overview": "# Generated v2"})
    meta2, body2 = split_front_matter(again)
    assert meta2["license"] == "mit" and meta2["pretty_name"] == "y" and meta2["tags"] == ["a"]
    assert card_sections(again) == {"protocol a/b": "# My title\n" + protocol, "overview": "# Generated v2"}
    assert body2.index("Hand-written intro.") < body2.index("protocol a/b") < body2.index("Hand-written outro.")
    assert "Generated v1" not in again
    # edits inside a regenerated section are replaced; the section keeps its place
    edited = again.replace("# Generated v2", "# Generated v2\nedited by hand")
    third = merge_card(edited, {}, {"overview": "# Generated v3"})
    assert "edited by hand" not in third and third.index("protocol a/b") < third.index("Generated v3")
    # a card written entirely by hand keeps its body; only the metadata is ours
    by_hand = "---\nlicense: mit\n---\n# My own card\nNothing generated here.\n"
    meta4, body4 = split_front_matter(merge_card(by_hand, {"pretty_name": "z"}, {"overview": "# Generated"}))
    assert body4 == "# My own card\nNothing generated here.\n" and meta4 == {"license": "mit", "pretty_name": "z"}
    with pytest.raises(ValueError, match="section name"):
        section("bad>name", "x")


def test_an_old_generated_block_becomes_the_overview_section(written):
    old = ("---\nlicense: other\n---\nIntro.\n<!-- nacosae:generated:start (edits between these two markers are replaced "
           "on the next publish) -->\n# old generated\n<!-- nacosae:generated:end -->\nOutro.\n")
    out, _ = written
    tables = read_results_folder(out)
    new = results_card(tables, "me/results", existing=old, carried={"protocol x": "how"})
    _, body = split_front_matter(new)
    assert "old generated" not in body and "nacosae:generated" not in body
    assert body.index("Intro.") < body.index("nacosae:section overview") < body.index("Outro.")
    assert list(card_sections(new)) == ["overview", "protocol x"]
    if DEMO.is_dir():  # the bundled demo's card carries its evaluation protocol as a named section
        demo_card = (DEMO / "README.md").read_text()
        assert list(carried_sections(demo_card, ["s"])) == ["evaluation-protocol"]
    assert carried_sections("---\na: 1\n---\n# Built before sections\nprotocol text\n", ["x/y"]) == {
        "protocol x/y": "# Built before sections\nprotocol text"}


def test_load_results_never_serves_a_stale_build(tmp_path):
    """`datasets` caches a local folder by its name and files: a rebuilt dataset in the same place must load anew."""
    from nacosae.results import load_results, write_results

    rows = [{"sae_id": "s", "feature": j, "image_frequency": 0.1, "token_frequency": 0.1, "mean_act": 0.0,
             "max_act": 1.0, "aggregation": "max", "dead": False, "dense": False, "hist_edges": [], "hist_counts": [],
             "top_image_ids": [], "top_activations": [], "top_heatmaps": [], "grid_h": 1, "grid_w": 1,
             "name": "unnamed", "name_method": None} for j in range(3)]
    runs = [{"sae_id": "s", "backbone": "b", "layer": "l", "tokens": "t", "d_in": 2, "d_sae": 3, "activation": "topk",
             "k": 1, "val_fvu": 0.1, "val_explained_variance": 0.9, "val_l0": 1.0, "val_dead_fraction": 0.0,
             "n_train_rows": 10, "provenance_json": "{}"}]
    out = tmp_path / "results"
    write_results(out, rows, [], runs)
    assert [r["name"] for r in load_results(out)] == ["unnamed"] * 3
    rows[1].update(name="dog", name_method="pool_mils")
    write_results(out, rows, [], runs)
    assert [r["name"] for r in load_results(out)] == ["unnamed", "dog", "unnamed"]


def test_overlay_takes_the_naming_outcome_as_one_block():
    """A feature the statistics call dense but naming named: the overlay must not keep the base's `dense` reason
    beside the new name (validation refuses that row, and `make demo --quick` failed on it)."""
    from nacosae.results import overlay_results, rows_to_table, validate_results_tables

    def feature(**kw):
        return {"sae_id": "s", "feature": 0, "image_frequency": 0.9, "token_frequency": 0.5, "mean_act": 1.0,
                "max_act": 2.0, "aggregation": "max", "dead": False, "dense": True, "hist_edges": [], "hist_counts": [],
                "top_image_ids": [], "top_activations": [], "top_heatmaps": [], "grid_h": 1, "grid_w": 1, **kw}

    run = [{"sae_id": "s", "backbone": "b", "layer": "l", "tokens": "t", "d_in": 2, "d_sae": 1, "activation": "topk",
            "k": 1, "val_fvu": 0.1, "val_explained_variance": 0.9, "val_l0": 1.0, "val_dead_fraction": 0.0,
            "n_train_rows": 10, "provenance_json": "{}"}]
    base = {"features": rows_to_table("features", [feature(name="unnamed", unnamed_reason="dense", name_top_label="x")]),
            "images": rows_to_table("images", []), "runs": rows_to_table("runs", run)}
    extra = {"features": rows_to_table("features", [feature(name="dog", name_method="pool_mils", name_cosy_auc=0.8)]),
             "images": rows_to_table("images", []), "runs": rows_to_table("runs", run)}
    merged = overlay_results(base, extra)
    row = merged["features"].to_pylist()[0]
    assert row["name"] == "dog" and row["unnamed_reason"] is None and row["name_top_label"] == "x"
    validate_results_tables(merged, check_images=False)
