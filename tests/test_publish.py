"""Hub artifacts: the SAE model repo and the results dataset, in --local-dir mode (the exact repo layout), read back
with the same loaders the Hub path uses (`SAE.from_pretrained`, `datasets.load_dataset`); card updates that keep
hand edits; validation that refuses broken artifacts; the upload as one commit after validation."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from nacosae.features import FeatureStatsAccumulator, FeatureStatsConfig
from nacosae.publish import load_sae_entry, publish_results, publish_saes, upload_staged, validate_sae_repo
from nacosae.results import (
    ValidationError,
    card_sections,
    dataset_card,
    overlay_results,
    read_results_folder,
    shrink_results,
    split_front_matter,
    tables_from_stats,
    validate_results_folder,
    validate_results_tables,
    write_results_tables,
)
from nacosae.sae import SAE, SAEConfig

ROOT = Path(__file__).resolve().parents[1]
SID = "efficientnet-lite0/blocks.14"
PROV = {"backbone": "efficientnet-lite0", "backbone_kind": "efficientnet", "layer": "blocks.14", "tokens": "spatial", "d": 8,
        "n_tokens": 4, "weights": "imagenet (test)"}  # as Backbone.provenance writes it (the app's heatmaps need the kind)
LABELS = ["cat", "cat", "dog", "car", "cat", "dog", "car", "car", "tree", "cat"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run in the offline-default layout: sae/<layer>/sae (+ metrics.json), stats/<layer>, acts/<layer>/images.jsonl."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=2, provenance=PROV))
    sae.save_pretrained(root / "sae" / "blocks.14" / "sae")
    metrics = {"val_fvu": 0.25, "val_explained_variance": 0.75, "val_l0": 2.0, "val_dead_fraction": 0.0625}
    (root / "sae" / "blocks.14" / "metrics.json").write_text(json.dumps(metrics))
    records = []
    (root / "img").mkdir()
    for i, lab in enumerate(LABELS):
        p = root / "img" / f"{i}.png"
        Image.new("RGB", (40 + 4 * i, 30), (20 * i, 100, 200 - 10 * i)).save(p)
        records.append({"image_idx": i, "image_id": f"test/{i}.png", "path": str(p), "label": lab,
                        "description": f"a {lab} number {i}", "source": "test"})
    (root / "acts" / "blocks.14").mkdir(parents=True)
    (root / "acts" / "blocks.14" / "images.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    g = torch.Generator().manual_seed(1)
    codes_NTS = torch.rand(10, 4, 16, generator=g) * (torch.rand(10, 4, 16, generator=g) > 0.6)
    codes_NTS[:, :, 3] = 0  # feature 3 is dead
    codes_NTS[:, :, 5] = 0
    codes_NTS[[0, 1, 4, 9], 0, 5] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # feature 5: the four "cat" images
    acc = FeatureStatsAccumulator(16, 4, FeatureStatsConfig(top_n=4, n_bins=8))
    acc.update(torch.arange(10), codes_NTS)
    stats = acc.result()
    stats.save(root / "stats" / "blocks.14")
    return root, records, stats, metrics


@pytest.fixture(scope="module")
def tables(run):
    root, records, stats, _ = run
    entry = load_sae_entry(root / "sae" / "blocks.14" / "sae")
    return tables_from_stats(stats, records, entry.config, entry.metrics, entry.sae_id, (2, 2), top_n=3, max_px=32,
                             progress=False)


def test_sae_repo_layout_card_and_round_trip(run, tmp_path):
    root, *_ = run
    entry = load_sae_entry(root / "sae" / "blocks.14" / "sae")
    assert entry.sae_id == SID and entry.metrics["val_fvu"] == 0.25  # metrics.json read from the parent folder
    out = publish_saes([entry], "me/saes", local_dir=tmp_path / "repo", results_repo="me/results")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["README.md", f"{SID}/config.json", f"{SID}/metrics.json", f"{SID}/model.safetensors"]
    loaded = SAE.from_pretrained(out, subfolder=SID)  # what `SAE.from_pretrained("me/saes", subfolder=SID)` reads
    original = SAE.from_pretrained(root / "sae" / "blocks.14" / "sae")
    for name, t in original.state_tensors().items():
        assert torch.equal(t, loaded.state_tensors()[name])
    meta, body = split_front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "nacosae" and meta["base_model"] == "timm/tf_efficientnet_lite0.in1k"
    assert meta["datasets"] == ["me/results"] and "sparse-autoencoder" in meta["tags"] and "fvu" in meta["metrics"]
    fvu = [m for r in meta["model-index"][0]["results"] for m in r["metrics"] if m["type"] == "fvu"]
    assert fvu and fvu[0]["value"] == 0.25
    assert f'SAE.from_pretrained("me/saes", subfolder="{SID}")' in body and "| 8 → 16 |" in body
    assert validate_sae_repo(out) == [SID]


def test_card_update_keeps_hand_edits(run, tmp_path):
    root, *_ = run
    entry = load_sae_entry(root / "sae" / "blocks.14" / "sae")
    out = publish_saes([entry], "me/saes", local_dir=tmp_path / "repo")
    card = (out / "README.md").read_text()
    meta, body = split_front_matter(card)
    # a person adds metadata, text above and below the generated block, and edits inside it
    meta["license"] = "apache-2.0"
    meta["tags"].append("my-tag")
    inside = body.split("<!-- nacosae:section overview -->")[1].split("<!-- nacosae:end overview -->")[0]
    edited_body = "Intro by hand.\n" + body.replace(inside, inside + "\nedited inside\n") + "\nOutro by hand.\n"
    import yaml

    (out / "README.md").write_text(f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n{edited_body}")
    entry.metrics["val_fvu"] = 0.125  # a retrained SAE
    publish_saes([entry], "me/saes", local_dir=out)
    new_meta, new_body = split_front_matter((out / "README.md").read_text())
    assert new_meta["license"] == "apache-2.0" and "my-tag" in new_meta["tags"] and new_meta["library_name"] == "nacosae"
    assert "Intro by hand." in new_body and "Outro by hand." in new_body
    assert "edited inside" not in new_body and "| 0.125 |" in new_body  # the generated block is regenerated

    # a card written entirely by hand (no markers) keeps its whole body; only the metadata is updated
    (out / "README.md").write_text("---\nlicense: mit\n---\n# My own card\nNothing generated here. from_pretrained\n")
    publish_saes([entry], "me/saes", local_dir=out)
    meta3, body3 = split_front_matter((out / "README.md").read_text())
    assert body3 == "# My own card\nNothing generated here. from_pretrained\n"
    assert meta3["license"] == "mit" and meta3["library_name"] == "nacosae"


def test_sae_repo_validation_refuses_broken_folders(run, tmp_path):
    root, *_ = run
    out = publish_saes([load_sae_entry(root / "sae" / "blocks.14" / "sae")], "me/saes", local_dir=tmp_path / "repo")
    (out / SID / "model.safetensors").unlink()
    with pytest.raises(ValidationError, match="model.safetensors"):
        validate_sae_repo(out)
    out2 = publish_saes([load_sae_entry(root / "sae" / "blocks.14" / "sae")], "me/saes", local_dir=tmp_path / "repo2")
    (out2 / SID).rename(out2 / "efficientnet-lite0" / "blocks.13")
    with pytest.raises(ValidationError, match="does not match the SAE's provenance"):
        validate_sae_repo(out2)
    (out2 / "efficientnet-lite0" / "blocks.13").rename(out2 / SID)
    (out2 / "README.md").write_text("---\ntags: [x]\n---\nno snippet\n")
    with pytest.raises(ValidationError, match="library_name") as e:
        validate_sae_repo(out2)
    assert "loading snippet" in str(e.value)
    bad = SAE(SAEConfig(d_in=8, d_sae=16, k=2, provenance={"tokens": "spatial"}))
    bad.save_pretrained(tmp_path / "noprov")
    with pytest.raises(ValidationError, match="provenance lacks"):
        load_sae_entry(tmp_path / "noprov")


def test_results_dataset_loads_with_load_dataset(run, tables, tmp_path):
    from datasets import load_dataset

    stats = run[2]
    out = publish_results(tables, "me/results", local_dir=tmp_path / "ds", sae_repo="me/saes")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "README.md", "data/features/part-00000.parquet", "data/images/part-00000.parquet", "data/runs/part-00000.parquet"]
    feats = load_dataset(str(out), "features", split="train")
    assert load_dataset(str(out), split="train")["feature"] == feats["feature"]  # features: the default config
    images = load_dataset(str(out), "images", split="train")
    runs = load_dataset(str(out), "runs", split="train")
    assert len(feats) == 16 and len(runs) == 1 and runs[0]["sae_id"] == SID and runs[0]["d_sae"] == 16
    assert abs(runs[0]["val_fvu"] - 0.25) < 1e-6
    by_id = {r["image_id"]: r for r in images}
    assert isinstance(images[0]["image"], Image.Image) and max(images[0]["image"].size) <= 32
    f5 = feats[5]
    assert f5["top_image_ids"] == ["test/0.png", "test/1.png", "test/4.png"]  # top_n=3 of the four planted images
    assert f5["name_method"] is None and f5["unnamed_reason"] is None and feats[3]["unnamed_reason"] == "dead"
    assert f5["top_activations"] == pytest.approx([4.0, 3.0, 2.0]) and f5["name_top_label"] == "cat" and f5["name"] == "unnamed"
    assert f5["top_heatmaps"][0] == pytest.approx([4.0, 0, 0, 0]) and (f5["grid_h"], f5["grid_w"]) == (2, 2)
    assert f5["image_frequency"] == pytest.approx(0.4) and sum(f5["hist_counts"]) == 4
    assert len(f5["hist_edges"]) == len(f5["hist_counts"]) + 1
    f3 = feats[3]
    assert f3["dead"] and f3["top_image_ids"] == [] and f3["image_frequency"] == 0
    assert all(i in by_id for r in feats for i in r["top_image_ids"])
    for j in range(16):  # the frequencies are the stats' own
        assert feats[j]["image_frequency"] == pytest.approx(float(stats.image_frequency_S[j]))
    assert validate_results_folder(out)["rows"] == {"features": 16, "images": len(images), "runs": 1}


def _corrupt(tables, table, column, fn):
    rows = tables[table].to_pylist()
    fn(rows)
    return {**tables, table: pa.Table.from_pylist(rows, schema=tables[table].schema)}


@pytest.mark.parametrize("table, change, message", [
    ("features", lambda rows: rows[5].update(top_image_ids=["nope", *rows[5]["top_image_ids"][1:]]), "missing from images"),
    ("features", lambda rows: rows[5].update(top_activations=rows[5]["top_activations"][::-1]), "descending"),
    ("features", lambda rows: rows[5].update(top_heatmaps=[m[:3] for m in rows[5]["top_heatmaps"]]), "grid_h"),
    ("features", lambda rows: rows.append(dict(rows[0])), "duplicate row"),
    ("features", lambda rows: rows[0].update(sae_id="other/layer"), "not in runs"),
    ("features", lambda rows: rows[0].update(feature=99), "out of 0..15"),
    ("features", lambda rows: rows[5].update(name=""), "empty name"),
    ("features", lambda rows: rows[3].update(top_image_ids=["test/0.png"], top_activations=[1.0],
                                            top_heatmaps=[[1.0, 0, 0, 0]]), "marked dead"),
    ("images", lambda rows: rows[0].update(image={"bytes": b"not an image", "path": None}), "does not decode"),
    ("images", lambda rows: rows.append(dict(rows[0])), "duplicate image_id"),
    ("runs", lambda rows: rows[0].update(provenance_json="{oops"), "not JSON"),
])
def test_results_validation_names_the_problem(tables, table, change, message):
    validate_results_tables(tables)  # the fixture itself is valid
    with pytest.raises(ValidationError, match=message):
        validate_results_tables(_corrupt(tables, table, None, change))


def test_results_validation_missing_column_and_nothing_written(tables, tmp_path):
    broken = {**tables, "features": tables["features"].drop_columns(["top_heatmaps"])}
    with pytest.raises(ValidationError, match="missing column 'top_heatmaps'"):
        publish_results(broken, "me/results", local_dir=tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


class RecordingHfApi:
    """Stands in for the Hub (unreachable here): records the calls, and the staged files at upload time."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, files, kwargs))
        return type("CommitInfo", (), {"oid": "abc"})()


def test_upload_is_one_commit_of_the_validated_folder(run, tables, tmp_path, monkeypatch):
    import huggingface_hub

    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    staged = publish_results(tables, "me/results", dry_run=True, local_dir=tmp_path / "unused")
    try:
        upload_staged(staged, "me/results", "dataset", "msg", delete_patterns=["data/**/*.parquet"])
    finally:
        import shutil

        shutil.rmtree(staged)
    kinds = [c[0] for c in RecordingHfApi.calls]
    assert kinds == ["create_repo", "upload_folder"]
    _, repo, files, kwargs = RecordingHfApi.calls[1]
    assert repo == "me/results" and kwargs["repo_type"] == "dataset" and kwargs["delete_patterns"] == ["data/**/*.parquet"]
    assert files == ["README.md", "data/features/part-00000.parquet", "data/images/part-00000.parquet",
                     "data/runs/part-00000.parquet"]
    assert not any("token" in k for k in kwargs)  # the token is huggingface_hub's business, never passed around


def test_shrink_results_keeps_a_valid_smaller_dataset(tables):
    small = shrink_results(tables, top_n=1, max_px=16, image_format="webp", progress=False)
    validate_results_tables(small)
    feats = small["features"].to_pylist()
    assert all(len(r["top_image_ids"]) <= 1 and len(r["top_heatmaps"]) == len(r["top_image_ids"]) for r in feats)
    used = {i for r in feats for i in r["top_image_ids"]}
    assert set(small["images"].column("image_id").to_pylist()) == used
    import io

    for cell in small["images"].column("image").to_pylist():
        with Image.open(io.BytesIO(cell["bytes"])) as im:
            assert im.format == "WEBP" and max(im.size) <= 16


def test_build_demo_script_writes_both_repos(run, tmp_path):
    from nacosae.serve import Source, open_explorer

    root, *_ = run
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, str(ROOT / "hub_scripts" / "build_demo.py"), "--run", str(root), "--out", str(out),
                          "--results", str(tmp_path / "none"), "--top-n", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0 and "has no data" in res.stderr  # an explicit --results folder must exist
    res = subprocess.run([sys.executable, str(ROOT / "hub_scripts" / "build_demo.py"), "--run", str(root), "--out", str(out),
                          "--top-n", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert validate_sae_repo(out / "sae") == [SID]
    summary = validate_results_folder(out / "results")
    assert summary["sae_ids"] == [SID]
    tables = read_results_folder(out / "results")
    assert max(len(x) for x in tables["features"].column("top_image_ids").to_pylist()) == 2
    ex = open_explorer(Source(str(out / "sae"), str(out / "results")))
    cats = ex.browse(SID, "cat")
    assert ex.sae_ids == [SID] and 5 in cats["feature"].tolist() and all("cat" in n for n in cats["name"])


def _named_extra(tables):
    """A naming run's results for feature 5 only: a MILS name (published) and a second loop variant, with one render."""
    row = next(r for r in tables["features"].to_pylist() if r["feature"] == 5)
    row.update(name="cat face", name_method="mils", name_mils="cat face", cosy_auc_mils=0.9, cosy_mad_mils=2.5,
               cosy_render_ids_mils=["render/cat-1"], name_mils_gemma="kitten", cosy_auc_mils_gemma=0.8, cosy_mad_mils_gemma=1.0,
               mils_history=[{"iteration": 0, "prompt": "cat", "score": 0.7, "render_ids": ["render/cat-1"]},
                             {"iteration": 1, "prompt": "cat face", "score": 0.8, "render_ids": ["test/0.png"]}],
               mils_scores_by_iteration=[0.7, 0.8],
               mils_gemma_history=[{"iteration": 0, "prompt": "kitten", "score": 0.6, "render_ids": []}],
               mils_gemma_scores_by_iteration=[0.6], ms=0.42, ms_encoder="test encoder")
    import io

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buf, format="PNG")
    images = pa.Table.from_pylist([{"image_id": "render/cat-1", "image": {"bytes": buf.getvalue(), "path": None}, "kind": "render",
                                    "prompt": "cat", "seed": 0, "generator": "test"}])
    return {"features": pa.Table.from_pylist([row]), "images": images, "runs": tables["runs"]}


def test_overlay_results_and_the_app_reads_them(run, tables, tmp_path):
    from nacosae.serve import Source, open_explorer

    merged = overlay_results(tables, _named_extra(tables))
    validate_results_tables(merged)
    rows = {r["feature"]: r for r in merged["features"].to_pylist()}
    assert len(rows) == 16 and rows[5]["name"] == "cat face" and rows[5]["name_top_label"] == "cat"  # base columns kept
    assert rows[4]["name"] == "unnamed" and rows[4]["name_mils"] is None
    assert "render/cat-1" in merged["images"].column("image_id").to_pylist()
    small = shrink_results(merged, top_n=2, renders_per_feature=1, progress=False)  # only "cat face" keeps its renders
    validate_results_tables(small)
    r5 = next(r for r in small["features"].to_pylist() if r["feature"] == 5)
    assert [h["render_ids"] for h in r5["mils_history"]] == [[], ["test/0.png"]] and r5["cosy_render_ids_mils"] == []
    assert "render/cat-1" not in small["images"].column("image_id").to_pylist()

    root, *_ = run
    publish_saes([load_sae_entry(root / "sae" / "blocks.14" / "sae")], "me/saes", local_dir=tmp_path / "sae")
    publish_results(merged, "me/results", local_dir=tmp_path / "results")
    ex = open_explorer(Source(str(tmp_path / "sae"), str(tmp_path / "results")))
    assert ex.methods == ["mils", "mils_gemma", "top_label"] and ex.histories == ["mils_history", "mils_gemma_history"]
    top = ex.browse(SID, sort="score")
    assert top["feature"].iloc[0] == 5 and top["CoSy AUC"].iloc[0] == 0.9 and top["MS"].iloc[0] == 0.42
    assert ex.browse(SID, "kitten")["feature"].tolist() == [5]  # search covers every method's name
    page = ex.feature_page(SID, 5)
    assert page.name == "cat face" and page.name_method == "mils"
    assert page.stats["ms"] == pytest.approx(0.42) and page.stats["ms_encoder"] == "test encoder"
    assert page.names.set_index("method").loc["mils", "published"]
    assert page.names.set_index("method").loc["mils_gemma", "name"] == "kitten"
    assert page.mils_history["prompt"].tolist() == ["cat face", "cat", "kitten"]
    assert len(page.mils_gallery) == 2 and set(page.mils_curve["method"]) == {"mils", "mils_gemma"}
    assert "unnamed (top label: " in ex.feature_page(SID, 4).name

    other = _named_extra(tables)
    other["runs"] = pa.Table.from_pylist([{**tables["runs"].to_pylist()[0], "val_fvu": 0.5}], schema=tables["runs"].schema)
    with pytest.raises(ValidationError, match="computed with another SAE"):
        overlay_results(tables, other)


@pytest.mark.skipif(not (ROOT / "demo" / "results").is_dir(), reason="no bundled demo: run hub_scripts/build_demo.py")
def test_space_deploy_assembles_the_space_repo(tmp_path):
    import gradio

    out = tmp_path / "space"
    res = subprocess.run([sys.executable, str(ROOT / "space_config" / "deploy.py"), "--out", str(out), "--sae-repo", "me/saes",
                          "--results-repo", "me/results"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    meta, _ = split_front_matter((out / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__ and meta["app_file"] == "app.py"
    assert meta["models"] == ["me/saes"] and meta["datasets"] == ["me/results"] and meta["python_version"]
    assert json.loads((out / "space_config" / "defaults.json").read_text())["sae_repo"] == "me/saes"
    assert set((out / "packages.txt").read_text().split()) == {"openclipart-png", "fonts-noto-color-emoji", "unicode-cldr-core",
                                                                "wordnet-base", "dataset-fashion-mnist"}
    assert (out / "nacosae" / "serve.py").is_file() and not list(out.rglob("__pycache__"))
    assert validate_results_folder(out / "demo" / "results")["sae_ids"] == validate_sae_repo(out / "demo" / "sae")


# Licence ids the Hub accepts (https://huggingface.co/docs/hub/repositories-licenses; a subset) and the relations its
# model tree knows for `base_model` (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model).
HUB_LICENSES = {"apache-2.0", "mit", "cc-by-4.0", "cc-by-sa-4.0", "cc0-1.0", "bsd-3-clause", "openrail", "cc-by-nc-4.0"}
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}


def test_cards_pass_the_hubs_metadata_rules(run, tables, tmp_path):
    """Both cards parsed by huggingface_hub's own card and metadata classes (the parsing the Hub's widgets rely on;
    `RepoCard.validate` needs the network): real licence ids, a pipeline tag that fits, `base_model` as an adapter,
    a model-index that parses into EvalResults, and `configs` with a default."""
    from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

    root, *_ = run
    entry = load_sae_entry(root / "sae" / "blocks.14" / "sae")
    out = publish_saes([entry], "me/saes", local_dir=tmp_path / "repo", results_repo="me/results")
    card = ModelCard.load(out / "README.md", ignore_metadata_errors=False)
    d = card.data
    assert d.license in HUB_LICENSES and d.pipeline_tag == "image-feature-extraction" and d.library_name == "nacosae"
    assert d.base_model == "timm/tf_efficientnet_lite0.in1k" and d.to_dict()["base_model_relation"] in BASE_MODEL_RELATIONS
    assert {e.metric_type for e in d.eval_results} == {"fvu", "explained_variance", "l0", "dead_fraction"}
    assert all(e.task_type == "feature-extraction" for e in d.eval_results)
    again = ModelCardData(**{k: v for k, v in d.to_dict().items() if k != "model-index"}, eval_results=d.eval_results,
                          model_name=d.model_name)
    assert again.to_dict() == d.to_dict()  # what the metadata class writes is what we wrote
    # an owner's own licence survives a re-publish; a new card gets ours
    meta, body = split_front_matter(card.content)
    import yaml

    (out / "README.md").write_text(f"---\n{yaml.safe_dump({**meta, 'license': 'mit'}, sort_keys=False)}---\n{body}")
    publish_saes([entry], "me/saes", local_dir=out, results_repo="me/results")
    assert ModelCard.load(out / "README.md").data.license == "mit"

    ds = publish_results(tables, "me/results", local_dir=tmp_path / "ds", sae_repo="me/saes")
    dcard = DatasetCard.load(ds / "README.md", ignore_metadata_errors=False)
    assert dcard.data.license in HUB_LICENSES and "license_name" not in dcard.data.to_dict()
    configs = dcard.data.to_dict()["configs"]
    assert [c["config_name"] for c in configs if c.get("default")] == ["features"]
    assert DatasetCardData(**dcard.data.to_dict()).to_dict() == dcard.data.to_dict()
    assert "keep their own licences" in dcard.content


def test_the_protocol_section_reaches_the_published_card(run, tables, tmp_path):
    """build_results.py writes the evaluation protocol into the results folder's card; publishing it (the script, as a
    user runs it) must carry that section, keep hand edits of the target's card, and keep both on a later publish."""
    root, *_ = run
    results = tmp_path / "results"
    write_results_tables(tables, results)
    protocol = "## How names were evaluated\n- Control: 10 images.\n- threshold 0.7"
    (results / "README.md").write_text(dataset_card("# Named features\n" + protocol, section_name=f"protocol {SID}"))
    hub = tmp_path / "hub"
    cmd = [sys.executable, str(ROOT / "hub_scripts" / "publish_results.py"), "--results", str(results), "--local-dir",
           str(hub), "--repo-id", "me/results"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    sections = card_sections((hub / "README.md").read_text())
    assert list(sections) == ["overview", f"protocol {SID}"] and protocol in sections[f"protocol {SID}"]
    # a person edits the published card; a later publish (statistics only: nothing to carry) keeps both
    card = (hub / "README.md").read_text().replace("<!-- nacosae:section overview -->", "Curated by hand.\n\n"
                                                   "<!-- nacosae:section overview -->")
    (hub / "README.md").write_text(card)
    res = subprocess.run([sys.executable, str(ROOT / "hub_scripts" / "publish_results.py"), "--from-stats", str(root),
                          "--local-dir", str(hub), "--repo-id", "me/results", "--max-px", "32"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    text = (hub / "README.md").read_text()
    assert "Curated by hand." in text and protocol in card_sections(text)[f"protocol {SID}"]
    assert validate_results_folder(hub)["sae_ids"] == [SID]

    # the upload path stages the same card (dry run: the folder that would be uploaded)
    staged = publish_results(tables, "me/results", local_dir=hub, dry_run=True, carried={"protocol other": "text"})
    try:
        assert set(card_sections((staged / "README.md").read_text())) == {"overview", f"protocol {SID}", "protocol other"}
    finally:
        import shutil

        shutil.rmtree(staged)
