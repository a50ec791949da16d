"""The app's serving layer as plain functions, on real parts: EfficientNet-Lite0 with a small random-weight SAE on
blocks.14 (its statistics from the 19 scikit-image photos), a tiny open_clip CLIP for the zero-shot path, and the
offline naming loop on a small Open Clip Art bank. Bad input raises ServeError with a message for the user."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nacosae import serve
from nacosae.backbones import load_backbone
from nacosae.features import FeatureStatsConfig, compute_feature_stats
from nacosae.images import SkimageSource
from nacosae.publish import load_sae_entry, publish_results, publish_saes
from nacosae.results import tables_from_stats
from nacosae.sae import SAE, SAEConfig
from nacosae.serve import ServeError, Source



def build_source(root: Path, bb, layer: str, tokens: str, images, records, d_sae: int, k: int, grid, seed: int = 0,
                 sae_cfg_edit=None) -> Source:
    """Train nothing: a random SAE scaled to the layer, its stats over `images`, both repos in --local-dir layout."""
    torch.manual_seed(seed)
    acts_NTD = bb.activations(bb.preprocess_batch(images), layer, tokens)
    sae = SAE(SAEConfig(d_in=acts_NTD.shape[-1], d_sae=d_sae, k=k, provenance=bb.provenance(layer, tokens)))
    sae.init_from_data(acts_NTD.reshape(-1, acts_NTD.shape[-1]))
    sae.save_pretrained(root / "trained")
    stats = compute_feature_stats(sae, [(torch.arange(len(images)), acts_NTD)], FeatureStatsConfig(top_n=4), progress=False)
    entry = load_sae_entry(root / "trained", metrics={"val_fvu": 0.5, "val_explained_variance": 0.5, "val_l0": k,
                                                      "val_dead_fraction": 0.0})
    tables = tables_from_stats(stats, records, entry.config, entry.metrics, entry.sae_id, grid, max_px=64,
                               load_image=lambda rec: images[rec["image_idx"]], progress=False)
    publish_saes([entry], "test/saes", local_dir=root / "sae")
    publish_results(tables, "test/results", local_dir=root / "results")
    return Source(str(root / "sae"), str(root / "results")), sae, stats


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """As the app runs: on a busy 2-core machine two OpenMP threads make each backbone pass ~10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photos():
    src = SkimageSource()
    recs = src.records()
    images = [src.load(r) for r in recs]
    records = [{"image_idx": i, "image_id": r.image_id, "path": None, "source": "skimage", "label": r.label,
                "description": r.description} for i, r in enumerate(recs)]
    return images, records


@pytest.fixture(scope="module")
def effnet():
    return load_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def eff(tmp_path_factory, effnet, photos):
    images, records = photos
    source, sae, stats = build_source(tmp_path_factory.mktemp("eff"), effnet, "blocks.14", "spatial", images, records,
                                      d_sae=48, k=6, grid=(7, 7))
    ex = serve.open_explorer(source)
    return ex, ex.sae_ids[0], sae, stats


def test_browse_search_sort_filter(eff):
    ex, sid, _, stats = eff
    assert sid == "efficientnet-lite0/blocks.14" and ex.warnings == []
    full = ex.browse(sid, hide_dead=False, sort="feature")
    assert full["feature"].tolist() == list(range(48))
    by_freq = ex.browse(sid, sort="frequency", hide_dead=False)
    freqs = [float(stats.image_frequency_S[j]) for j in by_freq["feature"]]
    assert freqs == sorted(freqs, reverse=True)
    alive = ex.browse(sid, hide_dead=True)
    assert set(alive["feature"]) == {j for j in range(48) if not stats.dead_S[j]}
    not_dense = ex.browse(sid, hide_dead=True, hide_dense=True)
    assert not any(stats.dense_S[j] for j in not_dense["feature"])
    assert ex.browse(sid, "#7", hide_dead=False)["feature"].tolist() == [7]
    label = ex.frame(sid).loc[int(alive["feature"].iloc[0]), "name_top_label"]
    hits = ex.browse(sid, label, hide_dead=False)
    assert len(hits) and all(label in n for n in hits["name"])
    assert len(ex.browse(sid, "no-such-name-anywhere")) == 0
    with pytest.raises(ServeError, match="sort must be one of"):
        ex.browse(sid, sort="best")
    with pytest.raises(ServeError, match="unknown SAE"):
        ex.browse("other/sae")


def test_feature_page_matches_the_stats(eff, photos):
    ex, sid, _, stats = eff
    j = int(ex.browse(sid, sort="frequency")["feature"].iloc[-1])
    page = ex.feature_page(sid, j)
    assert page.feature == j and page.sae_id == sid and page.name == ex.frame(sid).at[j, "display_name"]
    top = stats.top_images(j)[:4]
    assert len(page.gallery) == len(top)
    assert [it.score for it in page.gallery] == pytest.approx([v for _, v in top], abs=1e-3)
    assert all(it.image.size[0] == it.image.size[1] for it in page.gallery)  # EfficientNet pads: its box is a square
    for iid, (i, _) in zip(ex.row(sid, j)["top_image_ids"], top):  # stored as the images are (≤ 64 px), never padded
        w, h = photos[0][i].size
        f = min(1, 64 / max(w, h))
        assert abs(ex.image(iid).size[0] - w * f) <= 1 and abs(ex.image(iid).size[1] - h * f) <= 1
    assert page.stats["image_frequency"] == pytest.approx(float(stats.image_frequency_S[j]))
    assert page.histogram["images"].sum() == int(stats.image_fire_count_S[j])
    assert page.names["method"].tolist() == ["top_label"] and page.mils_history.empty
    assert ex.feature_page(sid, j) is page  # cached: switching back costs nothing
    dead = [d for d in range(48) if stats.dead_S[d]]
    if dead:
        dp = ex.feature_page(sid, dead[0])
        assert dp.gallery == [] and dp.stats["dead"] and dp.histogram.empty
    with pytest.raises(ServeError, match="has no feature 48"):
        ex.feature_page(sid, 48)
    with pytest.raises(ServeError, match="whole number"):
        ex.row(sid, "seven")


def test_what_fires_is_the_direct_computation(eff, effnet, photos):
    ex, sid, sae, stats = eff
    images, _ = photos
    res = ex.what_fires(sid, images[2], top=5)  # the cat, a probe image: nothing exceeds its probe-set max
    with torch.no_grad():
        codes_TS = sae.encode(effnet.activations(effnet.preprocess_batch([images[2]]), "blocks.14", "spatial"))[0]
    act_S = codes_TS.amax(0)
    rel_S = torch.where(stats.act_max_S > 0, act_S / stats.act_max_S.clamp(min=1e-12), torch.zeros_like(act_S))
    expected = rel_S.argsort(descending=True)[:5].tolist()
    assert res.features == [j for j in expected if act_S[j] > 0]
    assert res.table["activation"].tolist() == pytest.approx([round(float(act_S[j]), 3) for j in res.features], abs=1e-3)
    assert (res.table["relative"] <= 1.0 + 1e-3).all()
    assert [it.feature for it in res.items] == res.features and res.items[0].image.size[0] == res.items[0].image.size[1]
    with pytest.raises(ServeError, match="upload an image first"):
        ex.what_fires(sid, None)
    with pytest.raises(ServeError, match="top must be"):
        ex.what_fires(sid, images[0], top=0)


def test_steer_interventions(eff, effnet, photos):
    ex, sid, sae, _ = eff
    image = photos[0][2]
    with torch.no_grad():
        codes_TS = sae.encode(effnet.activations(effnet.preprocess_batch([image]), "blocks.14", "spatial"))[0]
    silent = int((codes_TS.amax(0) == 0).nonzero()[0])
    firing = int(codes_TS.amax(0).argmax())
    # ablating a feature that is silent on the image, or adding 0, changes nothing: the SAE error is added back
    for mode, j, v in (("ablate", silent, 0.0), ("add", firing, 0.0)):
        r = ex.steer(sid, image, j, mode, v)
        assert r.changes["change"].abs().max() < 1e-4, (mode, r.changes)
        assert list(r.before) == list(r.after)[: len(r.before)] or r.before.keys() == r.after.keys()
    # clamping to a large value at every token: METHODS §5, decode(f with f_j := v) + (h − x̂)
    r = ex.steer(sid, image, firing, "clamp", 50.0)
    pixels = effnet.preprocess_batch([image])

    def edit(h):
        codes = sae.encode(h)
        err = h - sae.decode(codes)
        codes[..., firing] = 50.0
        return sae.decode(codes) + err

    with torch.no_grad():
        p1 = torch.softmax(effnet.forward_with_edit(pixels, "blocks.14", edit)[0], -1)
    names = effnet.class_names
    for label, p in r.after.items():
        assert p == pytest.approx(float(p1[names.index(label)]), abs=1e-5)
    assert r.changes["change"].abs().max() > 1e-3 and r.feature == firing and r.mode == "clamp" and r.value == 50.0
    with pytest.raises(ServeError, match="mode must be"):
        ex.steer(sid, image, firing, "boost", 1.0)
    with pytest.raises(ServeError, match="number"):
        ex.steer(sid, image, firing, "clamp", "lots")


def test_zero_shot_steering_on_a_tiny_clip(tmp_path, photos):
    folder = tmp_path / "oc_tiny"
    folder.mkdir()
    cfg = {"model_cfg": {"embed_dim": 32, "quick_gelu": True,
                         "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
           "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    bb = load_backbone(f"open_clip:local-dir:{folder}")
    images, records = photos
    # the app rebuilds the backbone from the provenance: random init must come out the same, so share the instance
    serve._BACKBONES.put(json.dumps([bb.name, bb.weights, "cpu"]), bb)
    source, sae, _ = build_source(tmp_path, bb, "resblocks.1", "patches", images, records, d_sae=32, k=4, grid=(4, 4))
    ex = serve.open_explorer(source)
    sid = ex.sae_ids[0]
    labels = ["a cat", "a rocket", "coins"]
    with torch.no_grad():
        codes_TS = sae.encode(bb.activations(bb.preprocess_batch([images[2]]), "resblocks.1", "patches"))[0]
    silent = int((codes_TS.amax(0) == 0).nonzero()[0])
    r = ex.steer(sid, images[2], silent, "ablate", 0, labels=labels)
    assert set(r.before) == set(labels) and sum(r.before.values()) == pytest.approx(1.0, abs=1e-5)
    assert r.changes["change"].abs().max() < 1e-4  # only the patch tokens go through the SAE; CLS is untouched
    r = ex.steer(sid, images[2], int(codes_TS.amax(0).argmax()), "add", 30.0, labels=labels)
    assert "zero-shot over 3 labels" in r.scores
    with pytest.raises(ServeError, match="at least two comma-separated labels"):
        ex.steer(sid, images[2], silent, "ablate", 0, labels=["cat"])
    fires = ex.what_fires(sid, images[2], top=3)
    assert len(fires.items) == len(fires.features) > 0
    # a 96×32 image: CLIP's preprocessing sees its centre 32×32, so each heatmap covers x 32..64 of the image itself
    # (issue 9: it was drawn over the padded 96×96 square, i.e. on pixels the model never saw)
    assert ex.token_box(sid, (96, 32)) == (32.0, 0.0, 64.0, 32.0)
    wide = Image.new("RGB", (96, 32), (255, 255, 255))
    wide.paste(images[2].resize((32, 32)), (32, 0))
    fires = ex.what_fires(sid, wide, top=3)
    assert fires.items
    for it in fires.items:
        arr = np.asarray(it.image).astype(int)
        assert it.image.size == (96, 32)
        dimmed = (np.abs(arr - 172) <= 2).all(-1)  # heatmap_overlay greys what no token saw: 0.35·255 + 0.65·127.5
        assert dimmed[:, :32].all() and dimmed[:, 64:].all() and not dimmed[:, 32:64].all()
    # the feature page places a top image's stored heatmap the same way (a thumbnail stored as the image itself)
    iid = ex.images.column("image_id")[0].as_py()
    ex._image_cache.put(iid, Image.new("RGB", (96, 32), (255, 255, 255)))
    page_image = np.asarray(ex._overlay(sid, iid, [1.0] * 16, (4, 4), 1.0)).astype(int)
    dimmed = (np.abs(page_image - 172) <= 2).all(-1)
    assert page_image.shape == (32, 96, 3) and dimmed[:, :32].all() and dimmed[:, 64:].all() and not dimmed[:, 32:64].any()


# ------------------------------------------------------------------------------------------------ bad sources
def _copy_source(eff_ex, root: Path) -> tuple[Path, Path, str]:
    sae_dir, res_dir = root / "sae", root / "results"
    shutil.copytree(eff_ex.source.sae_repo, sae_dir)
    shutil.copytree(eff_ex.source.results_repo, res_dir)
    return sae_dir, res_dir, eff_ex.sae_ids[0]


def test_bad_sources_give_clear_errors(eff, tmp_path, monkeypatch):
    ex, *_ = eff
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ServeError, match="cannot load the results dataset 'nobody/no-such-results'"):
        serve.Explorer(Source("nobody/no-such-saes", "nobody/no-such-results"))
    with pytest.raises(ServeError, match="no folder|not look like"):
        serve.Explorer(Source(str(tmp_path / "missing"), "./no/such/folder"))

    # a results dataset whose SAE is missing from the SAE repo (wrong subfolder)
    sae_dir, res_dir, sid = _copy_source(ex, tmp_path / "a")
    shutil.rmtree(sae_dir / sid)
    with pytest.raises(ServeError, match=r"no usable SAE[\s\S]*no subfolder efficientnet-lite0/blocks.14"):
        serve.Explorer(Source(str(sae_dir), str(res_dir)))

    # an SAE whose config disagrees with its results (other backbone, other width)
    sae_dir, res_dir, sid = _copy_source(ex, tmp_path / "b")
    cfg = json.loads((sae_dir / sid / "config.json").read_text())
    cfg["provenance"]["backbone"] = "open_clip:ViT-B-16"
    cfg["d_in"] = 100
    (sae_dir / sid / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ServeError, match=r"does not match its results .*backbone.*d_in: SAE has 100"):
        serve.Explorer(Source(str(sae_dir), str(res_dir)))


def test_sae_that_does_not_fit_the_layer(tmp_path, effnet, photos):
    """Config and results agree, but the SAE reads 100-d activations and blocks.14 gives 192: refused on load."""
    images, records = photos
    root = tmp_path
    sae = SAE(SAEConfig(d_in=100, d_sae=8, k=2, provenance={**effnet.provenance("blocks.14", "spatial"), "d": 100}))
    sae.save_pretrained(root / "trained")
    entry = load_sae_entry(root / "trained")
    from nacosae.features import FeatureStatsAccumulator

    acc = FeatureStatsAccumulator(8, 49, FeatureStatsConfig(top_n=2))  # results of 8 silent features
    acc.update(torch.arange(2), torch.zeros(2, 49, 8))
    tables = tables_from_stats(acc.result(), records[:2], entry.config, {}, entry.sae_id, (7, 7), progress=False)
    publish_saes([entry], "t/s", local_dir=root / "sae")
    publish_results(tables, "t/r", local_dir=root / "results")
    ex = serve.Explorer(Source(str(root / "sae"), str(root / "results")))
    with pytest.raises(ServeError, match="reads d_in=100 activations but the layer gives 192"):
        ex.what_fires(ex.sae_ids[0], images[0])


def test_unknown_backbone_is_refused():
    with pytest.raises(ServeError, match="cannot rebuild"):
        serve.backbone_for({"backbone": "my-private-cnn", "layer": "x"})


def test_bad_uploads(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ServeError, match="this image cannot be used: .*not an image"):
        serve.check_image(str(text))
    with pytest.raises(ServeError, match="upload an image first"):
        serve.check_image(None)
    with pytest.raises(ServeError, match="expected an image"):
        serve.check_image(42)
    im = serve.check_image(np.zeros((20, 30, 4), dtype=np.uint8))  # RGBA array: composited to RGB
    assert im.mode == "RGB" and im.size == (30, 20)


# ------------------------------------------------------------------------------------------------ live naming
from conftest import CONCEPTS, WordEmbedder, planted_bank  # noqa: E402


@pytest.fixture
def planted(eff, tmp_path, monkeypatch):
    """The eff source with a planted render pool shipped next to its SAE repo (`<root>/naming/<sae_id>/pool`): live
    feature f_c fires on bank concept c, noisily; every other feature at random."""
    from nacosae.naming.engine import EngineConfig
    from nacosae.naming.pool import RenderPool

    ex, sid, _, stats = eff
    monkeypatch.setenv("NACOSAE_CACHE", str(tmp_path / "cache"))
    bank = planted_bank(tmp_path / "pictures")
    cfg = EngineConfig(n_images=5, n_eval_images=5, n_controls=20, n_best=4, n_select=4, min_gain=-1.0)  # every round runs
    serve.use_naming_bank(bank, WordEmbedder(), cfg)
    live = [j for j in range(48) if not stats.dead_S[j]][: len(CONCEPTS)]
    g = torch.Generator().manual_seed(0)
    codes = torch.rand(len(bank), 48, generator=g) * (torch.rand(len(bank), 48, generator=g) > 0.7)
    for i, it in enumerate(bank.items):
        codes[i, live] = 0.0
        codes[i, live[CONCEPTS.index(it.description.split()[1])]] = 1.0 + torch.rand(1, generator=g).item()
    folder = Path(ex.source.sae_repo).parent / "naming" / sid / "pool"
    shutil.rmtree(folder, ignore_errors=True)
    pool = RenderPool.open(folder, ex.pool_meta(sid))
    pool.add(ex._pool_rows(bank), codes)
    yield ex, sid, live, bank, cfg
    serve.use_naming_bank()  # other tests get the default bank again
    shutil.rmtree(folder.parent.parent.parent, ignore_errors=True)


def test_live_naming_runs_the_offline_engine_in_rounds(planted):
    """A live request runs NamingEngine.mils for [j] on the shipped pool with the offline seeds and hints, one round
    per call, its state a small JSON dict; chunked, it names and scores exactly as one uninterrupted engine call."""
    from nacosae.naming import VocabularyProposer, load_vocabulary
    from nacosae.naming.run import feature_hints

    ex, sid, live, bank, cfg = planted
    status = ex.pool_status(sid)
    assert status.shipped and status.complete and status.n_total == len(bank)
    # not "dog": a word the bag-of-words embedder does not know ties with every picture and retrieves the first ones,
    # which are dogs
    j = live[CONCEPTS.index("boat")]
    state = ex.start_live_naming(sid, j, "vocabulary", rounds=2, proposals=3)
    views = []
    while not state["done"]:
        state = ex.live_naming_step(state, budget_s=0)
        json.dumps(state)  # JSON-able: what the visitor's gr.State holds
        views.append(ex.live_naming_view(state))
        assert len(views) <= 3
    assert [(v.rounds_done, v.step) for v in views] == [(1, "round"), (2, "done")]
    last = views[-1]
    assert "boat" in last.name.split() and last.cosy_auc > 0.8 and last.published and last.threshold == cfg.threshold
    assert last.best[0][0] == pytest.approx(float(last.curve["best score"].max())) and 0 < len(last.gallery) <= 8
    assert last.hints == feature_hints(bank, ex.naming_engine(sid)[1], j)[:8] and "boat" in last.hints[0]
    assert set(state) == {"version", "sae_id", "feature", "proposer", "n_rounds", "n_proposals", "rounds", "done",
                          "result", "elapsed_s"} and len(json.dumps(state)) < 2000
    # the same engine in one call: same name, same held-out AUC
    bank_, pool, engine = ex.naming_engine(sid)
    import copy
    import dataclasses

    once = copy.copy(engine)
    once.cfg = dataclasses.replace(engine.cfg, n_rounds=2, n_proposals=3)
    res = once.mils([j], bank.prompts("search"), VocabularyProposer(load_vocabulary()), None, shared=True,
                    hints={j: feature_hints(bank, pool, j)}, progress=False)
    assert res.names[j] == state["result"]["name"] and res.auc[j] == pytest.approx(state["result"]["cosy_auc"])
    # a budget: several rounds in one call, and a finished state stays finished
    again = ex.live_naming_step(ex.start_live_naming(sid, j, "vocabulary", 2, 3), budget_s=600)
    assert again["done"] and again["result"] == state["result"]
    assert ex.live_naming_step(again) == again


def test_live_naming_refuses_bad_requests(planted, eff):
    ex, sid, live, bank, _ = planted
    stats = eff[3]
    dead = [d for d in range(48) if stats.dead_S[d]]
    if dead:
        with pytest.raises(ServeError, match="never fired"):
            ex.start_live_naming(sid, dead[0])
    with pytest.raises(ServeError, match="has no feature"):
        ex.start_live_naming(sid, 10**6)
    with pytest.raises(ServeError, match="unknown proposer"):
        ex.start_live_naming(sid, live[0], "gpt-9")
    with pytest.raises(ServeError, match="rounds must be in 1..10"):
        ex.start_live_naming(sid, live[0], "vocabulary", rounds=0)
    with pytest.raises(ServeError, match="new prompts per round must be in"):
        ex.start_live_naming(sid, live[0], "vocabulary", 2, 500)
    with pytest.raises(ServeError, match="not valid"):
        ex.live_naming_step({"rounds": "x"})
    silent = [j for j in range(48) if not stats.dead_S[j] and j not in live]
    pool = ex.naming_engine(sid)[1]
    never = [j for j in silent if not float(pool.dense()[:, j].max()) > 0]
    if never:
        with pytest.raises(ServeError, match="fires on none of the"):
            ex.live_naming_step(ex.start_live_naming(sid, never[0]))


def test_pool_is_built_in_chunks_where_none_was_shipped(eff, effnet, tmp_path, monkeypatch):
    """No shipped pool: the bank is encoded into the cache folder in atomic chunks (a call stops after its budget,
    the next goes on); codes equal the offline encoder's, and `nacosae name`'s bank_pool accepts the folder as its own."""
    from nacosae.naming.bank import SKIMAGE_CAPTIONS, Bank, BankItem
    from nacosae.naming.run import bank_pool, encode_fn

    ex, sid, sae, _ = eff
    monkeypatch.setenv("NACOSAE_CACHE", str(tmp_path / "cache"))
    names = sorted(SKIMAGE_CAPTIONS)[:9]
    bank = Bank([BankItem(f"skimage/{n}", "skimage", SKIMAGE_CAPTIONS[n][0], SKIMAGE_CAPTIONS[n][1], "photo", n,
                          ("search", "select", "eval")[i % 3], n) for i, n in enumerate(names)])
    serve.use_naming_bank(bank, WordEmbedder())
    try:
        assert ex.pool_status(sid).n_done == 0 and not ex.pool_status(sid).shipped
        st = ex.build_pool(sid, budget_s=0, chunk=4)
        assert (st.n_done, st.n_total, st.complete) == (4, 9, False)
        st = ex.build_pool(sid, budget_s=600, chunk=4)
        assert st.complete and ex.pool_status(sid).complete
        pool, shipped, _ = ex._pool(sid)
        assert not shipped and str(tmp_path / "cache") in str(pool.folder)
        want = encode_fn(effnet, "blocks.14", "spatial", sae, "max")([bank.load_image(i) for i in range(len(bank))])
        got = pool.codes([pool.row_of(it.item_id) for it in bank.items])
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3)  # the pool keeps float16 values
        again = bank_pool(bank, effnet, "blocks.14", "spatial", sae, pool.folder, progress=False)  # no mismatch, no work
        assert len(again) == len(bank)
    finally:
        serve.use_naming_bank()


DEMO = Path(__file__).resolve().parents[1] / "demo"


def test_live_naming_through_the_real_demo():
    """The bundled demo with its shipped pool: the offline bank, MiniLM retrieval and the WordNet proposer, one round."""
    sae_ids = [p.parent.relative_to(DEMO / "naming").as_posix() for p in (DEMO / "naming").glob("**/pool/meta.json")]
    if not sae_ids:
        pytest.skip("the demo ships no render pool yet (demo/naming/<sae_id>/pool)")
    ex = serve.open_explorer(Source(str(DEMO / "sae"), str(DEMO / "results")))
    sid = sae_ids[0][: -len("/pool")] if sae_ids[0].endswith("/pool") else sae_ids[0]
    status = ex.pool_status(sid)
    assert status.shipped and status.complete, status
    j = int(ex.browse(sid, sort="frequency")["feature"].iloc[len(ex.browse(sid)) // 2])
    state = ex.start_live_naming(sid, j, "vocabulary", rounds=1, proposals=4)
    while not state["done"]:
        state = ex.live_naming_step(state, budget_s=0)
    view = ex.live_naming_view(state)
    assert view.name and view.cosy_auc is not None and 0 <= view.cosy_auc <= 1 and view.gallery


def test_app_handlers_turn_errors_into_messages(monkeypatch, tmp_path):
    """app.py's handlers as plain functions: bad input becomes gr.Error, a naming run past its time limit stops with
    the best so far, and the app keeps its source."""
    import gradio as gr

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import app

    key, sid = app.START.source.key, app.START.sae_ids[0]
    with pytest.raises(gr.Error, match="upload an image first"):
        app.what_fires(key, sid, None, 8)
    with pytest.raises(gr.Error, match="cannot download dataset repo 'nobody/no-such-results'"):
        app.load_source("nobody/no-such-saes", "nobody/no-such-results", "", "score", True, True)
    for bad in ("/etc", "/etc/hostname", app.DEMO.sae_repo, "../demo/sae", "~/x"):  # the visitor's box takes Hub ids only
        with pytest.raises(gr.Error) as info:
            app.load_source(bad, app.DEMO.results_repo, "", "score", True, True)
        _reveals_nothing(info.value.message, bad, app.ROOT)
    with pytest.raises(gr.Error, match="choose a feature"):
        app.steer(key, sid, Image.new("RGB", (32, 32)), None, "clamp", 1.0, "")
    table = app.browse(key, sid, "", "score", True, True)
    feature = int(table["feature"].iloc[0])
    out = app.open_feature(key, sid, feature)
    assert out[0] == feature and f"#{feature}" in out[1]
    # uploads arrive as Gradio's raw file payload (preprocess=False), so unreadable files get serve's message
    photo = tmp_path / "cat.png"
    SkimageSource().load(SkimageSource().records()[2]).save(photo)
    gallery, fires_table, feats = app.what_fires(key, sid, {"path": str(photo), "meta": {"_type": "gradio.FileData"}}, 4)
    assert len(gallery) == len(feats) == len(fires_table) > 0
    before, after, changes, note = app.steer(key, sid, {"path": str(photo)}, feats[0], "ablate", 0, "")
    assert len(before) == 5 and sum(before.values()) <= 1 and f"#{feats[0]}" in note
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(gr.Error, match="this image cannot be used"):
        app.what_fires(key, sid, {"path": str(bad)}, 4)
    with pytest.raises(gr.Error, match="never fired|has no feature"):
        list(app.live_naming(key, sid, 10**6, "vocabulary", 1, 2, 60, None))
    with pytest.raises(gr.Error, match="unknown proposer"):
        list(app.live_naming(key, sid, feature, "gpt-9", 1, 2, 60, None))


# ------------------------------------------------------------------------------------------------ concurrency
def test_concurrent_requests_each_get_their_own_answer(eff, photos):
    """The app serves several requests at once with one explorer, SAE and backbone: what-fires and steering on 8
    different images from 8 threads started together each equal the same request made alone (issue 9: 'layer did
    not run' errors, and once another request's result)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    ex, sid, _, _ = eff
    images = photos[0][:8]
    alone_fires = [ex.what_fires(sid, im, top=4) for im in images]
    features = [r.features[0] for r in alone_fires]
    alone_steer = [ex.steer(sid, im, j, "clamp", 5.0) for im, j in zip(images, features)]
    assert len({tuple(r.features) for r in alone_fires}) > 1  # the images really differ

    barrier = threading.Barrier(8)

    def job(k):
        if k < 8:
            barrier.wait(timeout=60)
        i = k % 8
        if k % 2:
            return i, "steer", ex.steer(sid, images[i], features[i], "clamp", 5.0)
        return i, "fires", ex.what_fires(sid, images[i], top=4)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(job, range(32), timeout=600))
    for i, kind, got in results:
        if kind == "fires":
            want = alone_fires[i]
            assert got.features == want.features and got.table.equals(want.table), i
            for a, b in zip(got.items, want.items):
                assert np.abs(np.asarray(a.image).astype(int) - np.asarray(b.image).astype(int)).max() <= 1
        else:
            want = alone_steer[i]
            assert list(got.before) == list(want.before) and list(got.after) == list(want.after), i
            assert np.allclose(list(got.after.values()), list(want.after.values()), atol=1e-5)
            assert got.changes["label"].tolist() == want.changes["label"].tolist()


# ------------------------------------------------------------------------------------------------ visitors' input
def _reveals_nothing(msg: str, *paths) -> None:
    """A message shown to a visitor: no absolute or home path, and none of the given server paths."""
    import re

    assert not re.search(r"(^|[\s'\"(=])(~|\.{0,2})/[\w.]", msg), msg
    for p in paths:
        assert str(p) not in msg, msg


BAD_REPOS = ["/etc", "/etc/hostname", "..", "../demo/sae", "~/data", "~root/x", "./demo/sae", "demo/../../etc",
             "/root/.cache/huggingface", "C:\\Windows/x", "a/b/c", "https://huggingface.co/owner/name", "owner name/x", ""]


@pytest.mark.parametrize("repo", BAD_REPOS)
def test_visitor_repos_must_be_hub_ids(repo, eff):
    """Local paths, '..', absolute paths, '~' and URLs are refused before anything looks at the disk, and the
    message is the same whether the path exists or not, and shows no path."""
    ex, *_ = eff
    for sae_repo, results_repo in ((repo, "owner/results"), ("owner/saes", repo), (repo, ex.source.results_repo)):
        with pytest.raises(ServeError) as info:
            serve.visitor_source(sae_repo, results_repo)
        _reveals_nothing(str(info.value), *([repo] if repo else []), ex.source.results_repo)


def test_visitor_cannot_open_server_folders(eff, monkeypatch):
    """A visitor naming a folder the server has in the results layout gets nothing from it: the explorer's own
    folders (absolute) are refused, and 'demo/sae', a valid Hub id that is also a folder of this checkout, goes to the
    Hub only (offline here: refused, with no path in the message)."""
    ex, *_ = eff
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for sae_repo, results_repo in ((ex.source.sae_repo, ex.source.results_repo), ("demo/sae", "demo/results")):
        with pytest.raises(ServeError) as info:
            serve.open_explorer(serve.visitor_source(sae_repo, results_repo))
        _reveals_nothing(str(info.value), ex.source.sae_repo, ex.source.results_repo, Path.cwd())
    assert "cannot download dataset repo 'demo/results'" in str(info.value)
    assert not any(e.source.visitor for e in serve._EXPLORERS.values())
    with pytest.raises(ServeError, match="no longer loaded"):
        serve.explorer("o-not-a-source")


def test_visitor_download_size_is_checked_before_downloading():
    """The size check reads the Hub's listing (here a fake `dataset_info(files_metadata=True)`): only the files the
    app would download count, and past the cap the message gives the sizes and what to do."""
    from types import SimpleNamespace as NS

    from nacosae.hub import RESULTS_REPO_FILES, SAE_REPO_FILES, RepoRefused, check_download_size, download_size

    info = NS(siblings=[NS(rfilename="README.md", size=2_000), NS(rfilename="data/features/part-00000.parquet", size=3_000_000),
                        NS(rfilename="data/images/part-00000.parquet", size=900_000_000),
                        NS(rfilename="raw/huge.tar", size=50_000_000_000)])  # not a file the app reads: not counted
    assert download_size(info, RESULTS_REPO_FILES) == (903_002_000, 3)
    assert check_download_size(info, RESULTS_REPO_FILES, 10**9, "owner/results", "a results dataset") == 903_002_000
    with pytest.raises(RepoRefused, match=r"'owner/results' holds 903 MB of a results dataset files, more than .* \(512 MB\)"):
        check_download_size(info, RESULTS_REPO_FILES, serve.MAX_VISITOR_RESULTS_BYTES, "owner/results", "a results dataset")
    with pytest.raises(RepoRefused, match="none of the files of an SAE repo"):
        check_download_size(NS(siblings=info.siblings[1:]), SAE_REPO_FILES, 10**9, "owner/results", "an SAE repo")
    sae_info = NS(siblings=[NS(rfilename="vit/layer.9/config.json", size=900), NS(rfilename="vit/layer.9/model.safetensors", size=None)])
    with pytest.raises(RepoRefused, match="did not give this repo's file sizes"):
        check_download_size(sae_info, SAE_REPO_FILES, 10**9, "owner/saes", "an SAE repo")
    with pytest.raises(RepoRefused, match="did not list"):
        download_size(NS(), SAE_REPO_FILES)


def test_visitor_saes_use_only_the_operators_backbones():
    for name in ("hf:/etc", "hf:../models/clip", "open_clip:local-dir:/srv/models", "open_clip:ViT-bigG-14", "hf:someone/huge-model"):
        with pytest.raises(ServeError, match="backbone that this app does not load") as info:
            serve.backbone_for({"backbone": name, "weights": "x"}, visitor=True)
        _reveals_nothing(str(info.value), name)


def test_public_message_strips_server_paths():
    msg = serve.public_message("cannot read /root/.cache/huggingface/x.parquet or ~/y or ../z; see owner/name and "
                               "https://huggingface.co/datasets/owner/name, 1/2 of it")
    assert msg == ("cannot read <path> or <path> or <path>; see owner/name and https://huggingface.co/datasets/owner/name, "
                   "1/2 of it")
