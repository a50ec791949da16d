"""The results dataset: written in the Hub layout, read back with `datasets.load_dataset(folder, "<table>")`."""

import math

import pytest
from PIL import Image

from nacosae.results import METHODS, MILS_METHODS, TABLES, dataset_card, image_png, load_results, table_schema, write_results


def _feature_row(j, name="striped cat", **kw):
    row = {
        "sae_id": "efficientnet-lite0/blocks.14", "feature": j, "image_frequency": 0.25, "token_frequency": 0.01,
        "mean_act": 0.5, "max_act": 3.0, "aggregation": "max", "dead": False, "dense": False,
        "hist_edges": [0.0, 2.0, 4.0], "hist_counts": [3, 1], "top_image_ids": ["img/a", "img/b"],
        "top_activations": [3.0, 2.5], "top_heatmaps": [[0.0] * 48 + [3.0], [2.5] + [0.0] * 48], "grid_h": 7, "grid_w": 7,
        "name": name, "name_method": "mils", "name_mils": name, "cosy_auc_mils": 0.8125, "cosy_mad_mils": 1.5,
        "cosy_render_ids_mils": ["img/b"], "name_random": "kettle", "cosy_auc_random": 0.5, "cosy_mad_random": 0.0,
        "ms": 0.25, "ms_encoder": "efficientnet-lite0/pooled",
        "mils_history": [{"iteration": 0, "prompt": "cat", "score": 0.5, "render_ids": ["img/a"]},
                         {"iteration": 1, "prompt": "striped cat", "score": 0.75, "render_ids": ["img/a", "img/b"]}],
        "mils_scores_by_iteration": [0.5, 0.75],
    }
    row.update(kw)
    return row


def _images():
    return [{"image_id": "img/a", "image": image_png(Image.new("RGB", (448, 300), (200, 10, 10))), "kind": "probe",
             "label": "animals", "description": "a red cat", "source": "openclipart"},
            {"image_id": "img/b", "image": Image.new("RGB", (64, 64), (0, 0, 255)), "kind": "bank", "label": "animals"}]


RUN = {"sae_id": "efficientnet-lite0/blocks.14", "backbone": "efficientnet-lite0", "layer": "blocks.14", "tokens": "spatial",
       "d_in": 192, "d_sae": 1536, "activation": "topk", "k": 24, "val_fvu": 0.2, "val_explained_variance": 0.8,
       "val_l0": 24.0, "val_dead_fraction": 0.0, "n_train_rows": 1000, "provenance_json": "{}", "evaluation_json": "{}"}


@pytest.fixture
def written(tmp_path):
    rows = [_feature_row(3), _feature_row(7, name="unnamed", name_method=None, mils_history=None)]
    out = write_results(tmp_path / "ds", rows, _images(), [RUN])
    return out, rows


def test_round_trip_with_load_dataset(written, tmp_path):
    out, rows = written
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(TABLES)
    ds = load_results(out, "features", cache_dir=tmp_path / "hf")
    assert len(ds) == 2 and set(ds.column_names) == set(table_schema("features"))
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
    assert first["name_mils_gemma"] is None and first["cosy_auc_top_label"] is None and first["mils_gemma_history"] is None

    import datasets

    direct = datasets.load_dataset(str(out), "features", split="train", cache_dir=str(tmp_path / "hf2"))
    assert direct["feature"] == [3, 7]


def test_images_load_as_pil_at_most_224_px(written, tmp_path):
    out, _ = written
    images = load_results(out, "images", cache_dir=tmp_path / "hf")
    by_id = {r["image_id"]: r for r in images}
    a, b = by_id["img/a"]["image"], by_id["img/b"]["image"]
    assert isinstance(a, Image.Image) and a.size == (224, 150)  # aspect kept, longer side 224
    assert a.convert("RGB").getpixel((10, 10)) == (200, 10, 10)
    assert b.size == (64, 64) and by_id["img/b"]["kind"] == "bank"
    runs = load_results(out, "runs", cache_dir=tmp_path / "hf")
    assert runs[0]["d_sae"] == 1536 and runs[0]["evaluation_json"] == "{}"


def test_rewrite_replaces_the_whole_dataset(written, tmp_path):
    out, _ = written
    write_results(out, [_feature_row(11)], _images()[:1], [RUN])
    ds = load_results(out, "features", cache_dir=tmp_path / "hf")
    assert ds["feature"] == [11]
    assert not list(out.parent.glob(".ds.*"))  # no temporary or old folder left behind


def test_card_has_a_config_per_table(written):
    out, _ = written
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    for t in TABLES:
        assert f"config_name: {t}" in front and f"path: data/{t}/*.parquet" in front
    custom = dataset_card("# Title\n\nbody", extra_yaml="license: other")
    assert custom.startswith("---\nlicense: other\nconfigs:") and custom.rstrip().endswith("body")


def test_bad_rows_are_refused(tmp_path):
    with pytest.raises(ValueError, match="RESULTS_SCHEMA"):
        write_results(tmp_path / "a", [_feature_row(1, nmae="typo")], _images(), [RUN])
    with pytest.raises(ValueError, match="unique"):
        write_results(tmp_path / "b", [_feature_row(1), _feature_row(1)], _images(), [RUN])
    with pytest.raises(ValueError, match="kind"):
        write_results(tmp_path / "c", [_feature_row(1)], [{**_images()[0], "kind": "photo"}], [RUN])
    with pytest.raises(ValueError, match="configs"):
        write_results(tmp_path / "d", [_feature_row(1)], _images(), [RUN], card="# no front matter")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.*"))
    with pytest.raises(FileNotFoundError, match="README"):
        (tmp_path / "empty").mkdir()
        load_results(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown table"):
        load_results(tmp_path / "empty", "galleries")
