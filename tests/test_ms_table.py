"""MS with several image encoders side by side (hub_scripts/ms_table.py, `nacosae ms`): the real EfficientNet-Lite0
store and backbone, the real Lite2 encoder, a random SAE; the table equals `monosemanticity_report` computed directly."""

import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from nacosae import cli
from nacosae.backbones import load_backbone
from nacosae.evaluate import ms_embeddings, ms_sample
from nacosae.extract import extract
from nacosae.features import aggregate_tokens
from nacosae.images import ConcatSource, FolderSource, SkimageSource, open_image
from nacosae.metrics import monosemanticity_report
from nacosae.sae import SAE, SAEConfig

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ms_table", ROOT / "hub_scripts" / "ms_table.py")
ms_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ms_table)


@pytest.fixture(scope="module")
def effnet():
    torch.set_num_threads(1)
    return load_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def store(effnet, tmp_path_factory):
    """24 crops of scikit-image photos as files, then 2 scikit-image samples without a file (never MS images)."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    for i in range(24):
        arr = getattr(skimage.data, names[i % 4])()
        y, x = (i * 37) % (arr.shape[0] - 96), (i * 53) % (arr.shape[1] - 96)
        p = root / names[i % 4] / f"{i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(np.ascontiguousarray(arr[y:y + 96, x:x + 96])).save(p)
    src = ConcatSource([FolderSource(root, use_cache=False, progress=False), SkimageSource(["horse", "camera"])])
    return extract(src, effnet, "blocks.14", "spatial", tmp_path_factory.mktemp("s") / "store", batch_size=8,
                   shard_rows=49 * 5, progress=False)


@pytest.fixture(scope="module")
def sae(store):
    torch.manual_seed(0)
    return SAE(SAEConfig(d_in=192, d_sae=96, k=8, provenance=dict(store.provenance)))


def direct(store, sae, effnet, recs, encoder):
    """What the table should say for one encoder, computed from the parts without the script."""
    x_ND, _, _ = store.acts_for_images([r["image_idx"] for r in recs])
    N = len(recs)
    with torch.no_grad():
        codes_NTS = sae.encode(x_ND).reshape(N, 49, -1)
    acts_NS = aggregate_tokens(codes_NTS, "max")
    raw_ND = aggregate_tokens(x_ND.reshape(N, 49, -1), "max")
    bb = effnet if encoder == "own" else load_backbone("efficientnet-lite2")
    with torch.no_grad():
        emb_NE = torch.cat([bb.activations(bb.preprocess(open_image(r["path"]))[None], "pooled", "mean")[:, 0]
                            for r in recs])
    return monosemanticity_report(acts_NS, raw_ND, emb_NE, alive_S=acts_NS.amax(0) > 0)


def close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    return a == b


def test_table_equals_the_report_computed_directly(store, sae, effnet, tmp_path):
    out = tmp_path / "ms"
    res = ms_table.ms_table(store, sae, "own,efficientnet-lite2", out, n_images=16, seed=3, progress=False)
    recs = ms_sample(store.images, 16, 3)
    assert res["image_idx"] == [r["image_idx"] for r in recs] and len(recs) == 16
    assert all(r.get("path") for r in recs)
    for enc, name in (("own", "efficientnet-lite0/pooled"), ("efficientnet-lite2", "efficientnet-lite2/pooled")):
        got = res["encoders"][enc]
        assert got["encoder"] == name
        want = direct(store, sae, effnet, recs, enc)
        assert close({k: got[k] for k in want}, want), enc
    assert "not an independent encoder" in res["encoders"]["own"]["caveat"]
    assert "same architecture family" in res["encoders"]["efficientnet-lite2"]["caveat"]
    sp = res["spearman"]["own vs efficientnet-lite2"]
    assert -1 <= sp["sae"]["rho"] <= 1 and sp["raw"]["n"] == 192
    # what was written is what was returned; the table has one row per encoder
    assert close(json.loads((out / "ms.json").read_text()), json.loads(json.dumps(res)))
    md = (out / "ms.md").read_text()
    assert md.count("\n| own (") == 1 and md.count("\n| efficientnet-lite2 (") == 1 and "Spearman" in md
    # a re-run reads both embeddings from the cache and gives the same numbers
    again = ms_table.ms_table(store, sae, "own,efficientnet-lite2", out, n_images=16, seed=3, progress=False)
    assert all(e["embed_seconds"] is None for e in again["encoders"].values())
    assert close({k: v for k, v in again["encoders"]["own"].items() if k != "embed_seconds"},
                 {k: v for k, v in res["encoders"]["own"].items() if k != "embed_seconds"})


def test_bad_encoder_and_mismatched_sae_give_clear_errors(store, sae, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown MS encoder 'clip'; choose one of \['auto', 'dinov2', 'efficientnet-lite2'"):
        ms_table.ms_table(store, sae, "own,clip", tmp_path / "a", n_images=4, progress=False)
    with pytest.raises(ValueError, match="trained on backbone 'efficientnet-lite2' but the store .* 'efficientnet-lite0'"):
        ms_table.ms_table(store, SAE(SAEConfig(d_in=192, d_sae=8, k=2, provenance={"backbone": "efficientnet-lite2"})),
                          "efficientnet-lite2", tmp_path / "b", n_images=4, progress=False)
    with pytest.raises(ValueError, match="repeats"):
        ms_table.ms_table(store, sae, "own,own", tmp_path / "c", n_images=4, progress=False)
    with pytest.raises(ValueError, match="reads 64-d inputs but the store .* holds 192-d"):
        ms_table.ms_table(store, SAE(SAEConfig(d_in=64, d_sae=8, k=2)), "own", tmp_path / "d", n_images=4, progress=False)
    assert not any((tmp_path / x).exists() for x in "abcd")  # refused before any work
    sae_dir = tmp_path / "sae"
    sae.save_pretrained(sae_dir)
    code = cli.main(["ms", "--store", str(store.path), "--sae", str(sae_dir), "--encoders", "own,clip",
                     "--out", str(tmp_path / "e"), "--no-progress"])
    assert code == cli.USER_ERROR_EXIT
    assert capsys.readouterr().err.startswith("nacosae ms: error: unknown MS encoder 'clip'")


def test_ms_embeddings_batches_lazily_and_ms_sample_is_the_seeded_file_sample(store, effnet):
    recs = ms_sample(store.images, 7, seed=1)
    file_recs = sorted((r for r in store.images if r.get("path")), key=lambda r: r["image_idx"])
    assert recs == random.Random(1).sample(file_recs, 7)  # the draw NamingRun.monosemanticity made before
    assert len(ms_sample(store.images, 1000, 0)) == 24  # every file image, no scikit-image sample
    images = [open_image(r["path"]) for r in recs]
    one = torch.cat([effnet.activations(effnet.preprocess(im)[None], "pooled", "mean")[:, 0] for im in images])
    got = ms_embeddings(effnet, "pooled", iter(images), batch_size=3, progress=False)  # 3 + 3 + a partial 1
    assert got.shape == (7, 1280) and got.dtype == torch.float32
    assert torch.allclose(got, one, atol=1e-5)
    with pytest.raises(ValueError, match="no images"):
        ms_embeddings(effnet, "pooled", [], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        ms_embeddings(effnet, "pooled", images, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="n_images"):
        ms_sample(store.images, 0)


def test_cls_aggregation_without_a_cls_token_and_a_single_image_are_refused(store, sae, tmp_path, capsys):
    """A CNN store's spatial tokens have no CLS token ('cls' would score the top-left patch), and the MS needs two
    images: both refused before any work, in one line."""
    with pytest.raises(ValueError, match="aggregation 'cls' needs a CLS token, but the store .* 'spatial' tokens"):
        ms_table.ms_table(store, sae, "own", tmp_path / "a", n_images=4, aggregation="cls", progress=False)
    with pytest.raises(ValueError, match=r"n_images must be ≥ 2 \(the MS sums over pairs of images\), got 1"):
        ms_table.ms_table(store, sae, "own", tmp_path / "b", n_images=1, progress=False)
    assert not any((tmp_path / x).exists() for x in "ab")
    sae_dir = tmp_path / "sae"
    sae.save_pretrained(sae_dir)
    code = cli.main(["ms", "--store", str(store.path), "--sae", str(sae_dir), "--encoders", "own", "--aggregation",
                     "cls", "--out", str(tmp_path / "c"), "--no-progress"])
    assert code == cli.USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.startswith("nacosae ms: error: aggregation 'cls' needs a CLS token") and err.count("\n") == 1


def test_help_shows_the_example_command_on_two_lines():
    """The module docstring is the --help text: its example's line continuation must reach the reader."""
    assert "--store runs/offline_default/acts/blocks.14 \\\n        --sae demo/sae" in ms_table.__doc__
