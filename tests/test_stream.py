"""No-store mode: a backbone stream holds the rows a store of the same images holds, within its memory bound; token
subsampling; train_many from a stream (the store run's files, resume after a kill); unreadable images skipped; the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nacosae import train as train_module
from nacosae.backbones import load_backbone
from nacosae.cli import main as nacosae_main
from nacosae.extract import extract
from nacosae.sae import SAE
from nacosae.store import split_images
from nacosae.stream import BackboneStream
from nacosae.train import TrainConfig, train_many
from test_store import folder_source, tiny_backbone, write_images

BAD = {6, 30}  # truncated files: the header reads, the pixels do not


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("imgs"), 41, bad=BAD)


@pytest.fixture(scope="module")
def store(images, tmp_path_factory):
    """The float32 store of the same images and backbone (conv2 spatial: 16 tokens of 8 channels per image)."""
    return extract(folder_source(images), tiny_backbone(), "conv2", "spatial", tmp_path_factory.mktemp("s") / "store",
                   batch_size=3, shard_rows=80, dtype="float32", progress=False)


def stream(images, **kw):
    return BackboneStream(folder_source(images), tiny_backbone(), "conv2", "spatial",
                          **{"buffer_rows": 64, "image_batch_size": 4, **kw})


def match(x_ND, ref_ND, atol=1e-5):
    """The index of each row of x_ND in ref_ND (nearest row, which must be within `atol`: the backbone's numbers
    differ by float rounding with the images batched differently)."""
    dist = torch.cdist(x_ND.double(), ref_ND.double())
    near, idx = dist.min(1)
    assert near.max() < atol, near.max()
    return idx


def store_rows(store):
    """(rows, image index of each row) of the whole store."""
    x, img, _ = store.acts_for_images(store.image_idx)
    return x, img


def test_one_epoch_holds_the_rows_of_the_store_within_the_buffer_bound(images, store):
    s = stream(images)
    x = torch.cat(list(s.iter_batches(16, n_epochs=1)))
    ref, _ = store_rows(store)
    assert x.shape == ref.shape == (39 * 16, 8)
    assert sorted(match(x, ref).tolist()) == list(range(len(ref)))  # the same multiset of rows: each once
    assert 64 <= s.peak_buffer_rows <= 64 + 4 * 16  # buffer_rows + one image batch
    # Unreadable images: skipped and reported as the store reports them; the stream goes on.
    assert s.skipped == store.meta["skipped"] and [r["image_idx"] for r in s.skipped] == sorted(BAD)
    # Mixed: a batch draws from the buffer's ~10 images, not from one image batch of 4.
    _, img = store_rows(store)
    first = next(iter(stream(images, buffer_rows=160).iter_batches(16, n_epochs=1)))
    assert len(set(img[match(first, ref)].tolist())) > 4


def test_validation_reads_every_token_in_image_order_as_the_store(images, store):
    _, val = store.split(0.3, seed=0)
    s = stream(images, tokens_per_image=3)  # subsampling is for training only
    x = torch.cat(list(s.iter_batches(10, shuffle=False, n_epochs=1, rows=val)))
    ref = torch.cat(list(store.iter_batches(10, shuffle=False, n_epochs=1, rows=val)))
    assert torch.allclose(x, ref, atol=1e-5)
    # The split rule is the store's: over every image of the source (a store splits the images it holds).
    assert all(np.array_equal(a, b) for a, b in zip(s.split(0.3, seed=4), split_images(np.arange(41), 0.3, 4), strict=True))


def test_tokens_per_image_subsamples_each_image_anew_every_epoch(images, store):
    s = stream(images, tokens_per_image=5)
    assert s.n_rows_in() == 41 * 5 and s.n_rows_in([0, 1, 2]) == 15
    ref, img = store_rows(store)
    x = torch.cat(list(s.iter_batches(16, n_epochs=2)))
    idx = match(x, ref)
    per_image = np.bincount(img[idx].numpy(), minlength=41)
    assert (per_image[sorted(set(range(41)) - BAD)] == 10).all()  # 5 tokens of each image per epoch
    n_distinct = len(set(idx.tolist()))
    assert n_distinct > 39 * 5 + 39 * 2  # the second epoch drew other tokens (the same ones would give 39 * 5)
    again = torch.cat(list(stream(images, tokens_per_image=5).iter_batches(16, n_epochs=2)))
    assert torch.equal(x, again)  # seeded: the same stream again
    init = s.sample(50, seed=0, rows=np.arange(20))
    assert init.shape == (50, 8) and (img[match(init, ref)] < 20).all()


def test_bad_settings_are_refused(images):
    with pytest.raises(ValueError, match="tokens_per_image must be in"):
        stream(images, tokens_per_image=17)
    with pytest.raises(ValueError, match="at least 2 × batch_size"):
        next(stream(images).iter_batches(40))
    with pytest.raises(ValueError, match="records\\(\\) and load\\(\\)"):
        BackboneStream([], tiny_backbone(), "conv2", "spatial")
    with pytest.raises(ValueError, match="autocast must be one of"):
        stream(images, autocast="float16")


def test_autocast_is_extractions_and_is_recorded(images, store):
    s = stream(images, autocast="bfloat16")
    assert s.provenance == {**store.provenance, "autocast": "bfloat16"}
    assert s.label == "stream:tiny-cnn/conv2/spatial?source=imgs&autocast=bfloat16"
    x = torch.cat(list(s.iter_batches(16, shuffle=False, n_epochs=1)))
    ref, _ = store_rows(store)
    assert x.shape == ref.shape and not torch.equal(x, ref)
    assert torch.allclose(x, ref, atol=0.05 * ref.abs().max())  # bf16: ~3 significant digits


def cfg(out_dir, label, **kw):
    base = dict(store=label, out_dir=str(out_dir), expansion=4, k=4, batch_size=32, n_epochs=6, checkpoint_every=5,
                log_every=2, warmup_steps=5, val_fraction=0.2)
    return TrainConfig(**{**base, **kw})


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")}


def test_train_from_a_stream_writes_a_store_runs_files_and_resumes_after_a_kill(images, store, tmp_path, monkeypatch,
                                                                                 capsys):
    s = stream(images)
    (_, from_store), = train_many([cfg(tmp_path / "store", str(store.path))], progress=False)
    real = train_module._Run.checkpoint

    def power_cut(self, step):
        if step == 10:
            raise RuntimeError("power cut")
        real(self, step)

    monkeypatch.setattr(train_module._Run, "checkpoint", power_cut)
    out = tmp_path / "stream"
    with pytest.raises(RuntimeError, match="power cut"):
        train_many([cfg(out, s.label)], progress=False, sources={s.label: s})
    monkeypatch.setattr(train_module._Run, "checkpoint", real)
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 5
    capsys.readouterr()
    s2 = stream(images)  # a fresh process would build a fresh stream
    (sae, metrics), = train_many([cfg(out, s2.label)], progress=True, sources={s2.label: s2})
    assert f"resuming {out} at step 5/" in capsys.readouterr().out
    assert files(out) == files(tmp_path / "store")  # sae/, metrics.json, history.jsonl, curves.png, train_config.json
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == metrics["n_steps"] - 1
    assert metrics["n_steps"] == int(6 * 33 * 16 / 32)  # 41 images, 8 held out; every image counts (two are unreadable)
    # As good as the store run (0.16 and 0.19 here; other batches, so not the same numbers).
    assert metrics["val_fvu"] < 0.5 and abs(metrics["val_fvu"] - from_store["val_fvu"]) < 0.1, (metrics, from_store)
    loaded = SAE.from_pretrained(out / "sae")
    assert loaded.cfg.provenance["store"] == s.label == "stream:tiny-cnn/conv2/spatial?source=imgs"
    assert loaded.cfg.provenance["layer"] == "conv2" and loaded.cfg.provenance["backbone"] == "tiny-cnn"


# ---------------------------------------------------------------- the CLI, with the real EfficientNet-Lite0
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """12 small PNGs (one of them corrupt) in two label folders."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(12):
        p = root / ("x" if i < 6 else "y") / f"{i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(p)
    (root / "y" / "11.png").write_bytes(b"not a png")
    return root


def test_cli_trains_from_the_backbone_without_a_store(photos, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--from-backbone", "efficientnet-lite0", "--layer", "blocks.14", "--tokens", "spatial",
            "--source", f"folder:{photos}", "--out-dir", str(out), "--expansion", "2", "--k", "8", "--batch-size", "64",
            "--n-epochs", "2", "--val-fraction", "0.25", "--image-batch-size", "4", "--buffer-rows", "256",
            "--tokens-per-image", "25"]
    assert nacosae_main(args) == 0
    said = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train_rows"] == 9 * 25 and metrics["d_in"] == 192 and metrics["val_fvu"] < 1.0
    assert "1 unreadable image(s) skipped" in said and "11.png" in said
    prov = SAE.from_pretrained(out / "sae").cfg.provenance
    assert prov == {**prov, "backbone": "efficientnet-lite0", "layer": "blocks.14", "tokens": "spatial",
                    "store": f"stream:efficientnet-lite0/blocks.14/spatial?source=folder:{photos}&tokens_per_image=25"}
    assert prov["preprocessing"] == load_backbone("efficientnet-lite0").provenance("blocks.14", "spatial")["preprocessing"]


@pytest.mark.parametrize("extra, message", [
    (["--store", "somewhere"], "not both"),
    ([], "needs --layer"),
])
def test_cli_refuses_bad_combinations(photos, tmp_path, capsys, extra, message):
    argv = ["train", "--from-backbone", "efficientnet-lite0", "--source", f"folder:{photos}", "--out-dir", str(tmp_path), *extra]
    with pytest.raises(SystemExit) as e:
        nacosae_main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_needs_a_store_or_a_backbone(tmp_path, capsys):
    with pytest.raises(SystemExit):
        nacosae_main(["train", "--out-dir", str(tmp_path)])
    assert "give --store (or --from-backbone, no store)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        nacosae_main(["train", "--store", "x", "--layer", "blocks.14", "--out-dir", str(tmp_path)])
    assert "--layer belongs to --from-backbone" in capsys.readouterr().err


def test_a_source_with_no_readable_image_names_the_files_and_why(tmp_path):
    """A folder of a zero-byte file, a text file named .png and a PNG header with no image: the one-line error says
    which files and why (a CLI user has no `.skipped` attribute to look at)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "a" / "text.png").write_text("hello")
    (tmp_path / "a" / "header.png").write_bytes(b"\x89PNG\r\n\x1a\nxx")
    from nacosae.images import FolderSource

    s = BackboneStream(FolderSource(tmp_path, name="bad", use_cache=False, progress=False), tiny_backbone(), "conv2",
                       "spatial", buffer_rows=64, image_batch_size=4)
    with pytest.raises(ValueError, match=r"could be read \(3 skipped, e\.g\. .*empty\.png: corrupt"):
        s.sample(10)
    with pytest.raises(ValueError, match=r"\(3 images\) could be read \(3 skipped, e\.g\. .*header\.png"):
        next(s.iter_batches(16))
