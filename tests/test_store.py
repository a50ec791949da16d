"""The activation store: round trips through real shards on disk, the streaming reader's guarantees, clear errors."""

import json
import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from nacosae.backbones import load_backbone
from nacosae.extract import extract
from nacosae.images import FolderSource
from nacosae.store import ActivationStore, StoreError


# ---------------------------------------------------------------- a tiny real backbone and image folder
def to_16px(img):
    """Preprocessing of the tiny backbone: 16×16 RGB in [0, 1] (module level, so DataLoader workers can pickle it)."""
    return torch.from_numpy(np.asarray(img.convert("RGB").resize((16, 16)), dtype=np.float32) / 255).permute(2, 0, 1)


def tiny_backbone(seed: int = 0, d: int = 8, gain: float = 1.0):
    """A two-conv CNN with random weights through load_backbone('module'): 16×16 RGB → 4×4 map, T=16 spatial tokens."""
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, d, 3, stride=2, padding=1), relu=nn.ReLU(),
                                    conv2=nn.Conv2d(d, d, 3, stride=2, padding=1)))
    with torch.no_grad():
        net.conv2.weight.mul_(gain)
    return load_backbone("module", model=net, preprocess=to_16px, name="tiny-cnn", weights=f"random-seed{seed}-gain{gain:g}",
                         input_shape=(3, 16, 16))


def write_images(folder, n, seed=0, bad=()):
    """n small random PNGs in label folders a/ (first half) and b/, so sorted path order is index order; those in
    `bad` are cut in half (the header reads, the pixels do not). Returns the paths in source order."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / ("a" if i < n // 2 else "b") / f"{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        s = int(rng.integers(12, 40))
        Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(p)
        if i in bad:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        paths.append(p)
    return paths


def folder_source(paths, **kw):
    return FolderSource(paths[0].parent.parent, name="imgs", use_cache=False, progress=False, **kw)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("imgs"), 60)


@pytest.fixture(scope="module")
def store(images, tmp_path_factory):
    # 3 images per shard (48 rows / 16 tokens): 20 shards, batches of 2 images
    return extract(folder_source(images), tiny_backbone(), "conv2", "spatial", tmp_path_factory.mktemp("s") / "store",
                   batch_size=2, shard_rows=48, progress=False)


def all_rows(store):
    return torch.cat([a.reshape(-1, store.d) for _, a in store.iter_images(1000)])


def sorted_rows(x_ND):
    """Rows in a canonical order, so two row multisets compare with torch.equal."""
    x = x_ND.double()
    for col in reversed(range(x.shape[1])):
        x = x[torch.argsort(x[:, col], stable=True)]
    return x


# ---------------------------------------------------------------- layout and round trip
def test_store_layout_and_values_match_the_backbone(store, images):
    meta = json.loads((store.path / "meta.json").read_text())
    assert meta["complete"] and meta["schema_version"] == 1 and meta["dtype"] == "float16"
    assert (meta["d"], meta["tokens_per_image"], meta["n_images"], meta["n_rows"]) == (8, 16, 60, 960)
    assert meta["provenance"]["layer"] == "conv2" and meta["provenance"]["backbone"] == "tiny-cnn"
    assert meta["source"]["name"] == "imgs" and meta["skipped"] == []
    assert len(meta["shards"]) == 20 and all(s["n_rows"] == 48 for s in meta["shards"])
    assert sorted(p.name for p in (store.path / "shards").glob("*.safetensors"))[0] == "rank000-000000.safetensors"
    assert len(store) == 960 and store.d == 8
    assert [r["image_idx"] for r in store.images] == list(range(60))
    assert store.images[5]["path"] == str(images[5]) and store.images[5]["label"] == "a"
    assert store.images[30]["image_id"] == "imgs/b/0030.png" and store.images[30]["label"] == "b"

    acts_ND, img_N, tok_N = store.acts_for_images([7, 3])
    bb = tiny_backbone()
    want = bb.activations(torch.stack([bb.preprocess(Image.open(images[i])) for i in (7, 3)]), "conv2", "spatial")
    assert torch.allclose(acts_ND, want.reshape(-1, 8).half().float())
    assert img_N.tolist() == [7] * 16 + [3] * 16 and tok_N.tolist() == list(range(16)) * 2


def test_iter_images_in_order_and_blocks(store):
    blocks = list(store.iter_images(batch_images=7))
    assert [len(i) for i, _ in blocks] == [7] * 8 + [4]
    assert torch.cat([i for i, _ in blocks]).tolist() == list(range(60))
    assert blocks[0][1].shape == (7, 16, 8) and blocks[0][1].dtype == torch.float32
    acts, _, _ = store.acts_for_images(list(range(7, 14)))
    assert torch.equal(blocks[1][1].reshape(-1, 8), acts)


# ---------------------------------------------------------------- streaming reader
def test_one_epoch_yields_every_row_once(store):
    ref = sorted_rows(all_rows(store))
    # chunk_rows 20 cuts images (16 rows) and shards (48 rows) mid-way; 1024 makes each shard one chunk
    for shuffle in (False, True):
        for buffer_rows, chunk_rows in ((100, 20), (7, 7), (2048, 1024), (2**17, 1024)):
            batches = list(store.iter_batches(50, shuffle=shuffle, n_epochs=1, buffer_rows=buffer_rows, chunk_rows=chunk_rows))
            assert all(b.shape == (50, 8) and b.dtype == torch.float32 for b in batches[:-1]) and len(batches[-1]) == 960 % 50
            assert torch.equal(sorted_rows(torch.cat(batches)), ref)
    assert len(list(store.iter_batches(50, n_epochs=1, drop_last=True))) == 960 // 50
    x = next(store.iter_batches(50, device="meta"))
    assert x.device.type == "meta" and x.shape == (50, 8) and x.dtype == torch.float32


def test_reader_argument_errors(store):
    with pytest.raises(ValueError, match="must be positive"):
        next(store.iter_batches(50, buffer_rows=0))
    with pytest.raises(ValueError, match="raise buffer_rows or lower chunk_rows"):
        next(store.iter_batches(50, buffer_rows=100, chunk_rows=200))
    with pytest.raises(StoreError, match="no rows"):
        next(store.iter_batches(50, rows=[]))


def test_shuffle_is_seeded_and_changes_per_epoch(store):
    a = torch.cat(list(store.iter_batches(64, seed=1, n_epochs=2)))
    b = torch.cat(list(store.iter_batches(64, seed=1, n_epochs=2)))
    c = torch.cat(list(store.iter_batches(64, seed=2, n_epochs=2)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[:960], a[960:])  # epoch 2 is another order ...
    assert torch.equal(sorted_rows(a[:960]), sorted_rows(a[960:]))  # ... of the same rows
    for chunk_rows in (20, 1024):
        unordered = torch.cat(list(store.iter_batches(64, shuffle=False, n_epochs=1, buffer_rows=2 * chunk_rows,
                                                      chunk_rows=chunk_rows)))
        assert torch.equal(unordered, all_rows(store))  # shuffle=False is image order
    endless = store.iter_batches(100)  # n_epochs=None streams forever
    assert sum(len(next(endless)) for _ in range(25)) == 2500


def watch_loads(store, monkeypatch):
    """Count shard tensors alive at any moment: a weakref finaliser per loaded tensor (real loads, not a fake)."""
    live, peak = [0], [0]
    real = ActivationStore._load_shard

    def dec():
        live[0] -= 1

    def load(self, j, names=("acts_ND", "image_idx_N", "token_idx_N")):
        out = real(self, j, names)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(out["acts_ND"], dec)
        return out

    monkeypatch.setattr(ActivationStore, "_load_shard", load)
    return peak


def test_readers_load_one_shard_at_a_time(store, monkeypatch):
    peak = watch_loads(store, monkeypatch)
    store.sample(500, seed=0)
    store.acts_for_images([0, 59, 30])
    for _ in store.iter_images(5):
        pass
    assert peak[0] == 1  # the buffer holds copies; raw shards are dropped right after copying


def test_batch_reader_reads_chunk_slices_from_shards_opened_once(store, monkeypatch):
    """iter_batches never loads a whole shard: it reads chunk-sized slices, opening each shard once per iteration."""
    import nacosae.store as store_mod

    watch_loads(store, monkeypatch)
    whole = []
    monkeypatch.setattr(ActivationStore, "_load_shard", lambda self, j, names=(): whole.append(j))
    opens, reads = [], []
    real_open, real_read = store_mod.safe_open, ActivationStore._read_chunk

    def counting_open(path, framework):
        opens.append(path)
        return real_open(path, framework=framework)

    def sized_read(self, shards, j, lo, hi, n, mask):
        out = real_read(self, shards, j, lo, hi, n, mask)
        reads.append((hi - lo, len(out)))
        return out

    monkeypatch.setattr(store_mod, "safe_open", counting_open)
    monkeypatch.setattr(ActivationStore, "_read_chunk", sized_read)
    _, val = store.split(0.5, seed=0)
    for rows, n_rows, n_shards in ((None, 960, 20), (val, store.n_rows_in(val), len({i // 3 for i in val}))):
        opens.clear()
        got = sum(len(b) for b in store.iter_batches(32, n_epochs=3, buffer_rows=64, chunk_rows=20, rows=rows))
        assert got == 3 * n_rows and whole == []
        assert len(opens) == len(set(opens)) == n_shards  # each shard with selected rows opened once for 3 epochs
    assert reads and all(n <= 20 for _, n in reads)
    assert all(span == n for span, n in reads[:len(reads) // 2])  # no selection: a chunk is exactly its rows


def category_store(path, n_shards=16, rows_per_shard=2048, tokens=16, n_categories=8):
    """A store whose images come in category order, as a source listing folders does: column 0 holds the image index
    (exact in float16 up to 2048 images), column 1 the image's category, columns 2.. noise."""
    from nacosae.store import StoreWriter, finalize_store

    per = rows_per_shard // tokens
    n_img = n_shards * per
    assert n_img <= 2048, "image indices must stay exact in float16"
    run = {"provenance": {"backbone": "categories"}, "dtype": "float16", "n_images_total": n_img, "source": "cat",
           "world_size": 1}
    w = StoreWriter(path, run, 0, 0, n_img)
    g = torch.Generator().manual_seed(0)
    for k in range(n_shards):
        ids = torch.arange(k * per, (k + 1) * per)
        img_N = ids.repeat_interleave(tokens)
        acts_ND = torch.randn(rows_per_shard, 4, generator=g)
        acts_ND[:, 0] = img_N
        acts_ND[:, 1] = img_N * n_categories // n_img
        w.write_shard(acts_ND.half(), img_N, torch.arange(tokens).repeat(per), [{"image_idx": int(i)} for i in ids],
                      (k + 1) * per, [])
    w.mark_done()
    assert finalize_store(path)
    return ActivationStore(path)


def test_shuffled_batches_mix_the_whole_store(tmp_path):
    """Images in category order (16 shards, 2 categories each): every batch must draw on most shards and have the
    category mean of the store. A reader that shuffles within a few shards at a time fails both."""
    store = category_store(tmp_path / "cat")
    n_shards, per_shard_img = len(store.shards), store.shards[0]["n_images"]
    all_cat = all_rows(store)[:, 1].double()
    mean, std = all_cat.mean().item(), all_cat.std().item()
    # 128-row chunks: 256 chunks; a buffer holds 64 of them (a quarter of the store)
    batches = list(store.iter_batches(512, seed=0, n_epochs=2, buffer_rows=64 * 128, chunk_rows=128, drop_last=True))
    assert len(batches) == 2 * len(store) // 512
    assert torch.equal(sorted_rows(torch.cat(batches[:64])), sorted_rows(all_rows(store)))  # still each row once
    for x_BD in batches:
        shards_hit = torch.unique(x_BD[:, 0].long() // per_shard_img)
        assert len(shards_hit) >= 0.75 * n_shards, shards_hit
        # A batch mean over chunks of one category each: within ~4 sd of a 64-of-256-chunk draw (sd 0.25 here).
        assert abs(x_BD[:, 1].double().mean().item() - mean) < 0.45 * std
    # An i.i.d. reader would pass these too; the within-shard-group reader does not (4 of 16 shards per batch).


def write_random_store(path, n_shards, rows_per_shard, d, tokens=16):
    """A store of random float16 rows written through the real writer (fast: no backbone)."""
    from nacosae.store import StoreWriter, finalize_store

    n_img = n_shards * rows_per_shard // tokens
    run = {"provenance": {"backbone": "random"}, "dtype": "float16", "n_images_total": n_img, "source": "random", "world_size": 1}
    w = StoreWriter(path, run, 0, 0, n_img)
    per = rows_per_shard // tokens
    g = torch.Generator().manual_seed(0)
    for k in range(n_shards):
        ids = list(range(k * per, (k + 1) * per))
        w.write_shard(torch.randn(rows_per_shard, d, generator=g).half(), torch.tensor(ids).repeat_interleave(tokens),
                      torch.arange(tokens).repeat(per), [{"image_idx": i} for i in ids], (k + 1) * per, [])
    w.mark_done()
    assert finalize_store(path)
    return ActivationStore(path)


RSS_PROBE = """
import sys, torch
from nacosae.store import ActivationStore
def rss():  # anonymous resident memory, bytes: the mapped shards' pages are file cache (RssFile), not the reader's
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
store = ActivationStore(sys.argv[1])
next(iter(store.iter_images(1)))  # warm up torch's lazy initialisation on a one-shard read
list(store.iter_batches(256, n_epochs=1, rows=[0]))
base, peak, n = rss(), 0, 0
for x in store.iter_batches(256, n_epochs=1, buffer_rows=int(sys.argv[2])):
    peak, n = max(peak, rss()), n + len(x)
assert n == len(store)
print(peak - base)
"""


def test_reader_memory_is_bounded_by_the_buffer(tmp_path):
    """Real resident memory of a reader process: buffer_rows' worth, whatever the store's size (24 shards)."""
    import os
    import subprocess
    import sys

    store = write_random_store(tmp_path / "big", n_shards=24, rows_per_shard=4096, d=256)
    shard_bytes = 4096 * 256 * 2
    # Large blocks straight from mmap, so freed buffers leave the resident set at once and RSS tracks live tensors.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    growth = {}
    for n in (2, 8):  # buffer_rows of n shards' worth
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(store.path), str(n * 4096)],
                             capture_output=True, text=True, check=True, env=env)
        growth[n] = int(out.stdout.split()[-1]) / shard_bytes
    # The buffer plus at most one batch of carried-over rows; a reader that loaded the store would show 24.
    assert growth[2] < 2 + 1, growth
    assert 8 - 1 < growth[8] < 8 + 1, growth


# ---------------------------------------------------------------- selections
def test_split_by_image_and_rows(store):
    train, val = store.split(0.25, seed=3)
    assert len(val) == 15 and len(train) == 45 and not set(train) & set(val)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(60))
    assert np.array_equal(store.split(0.25, seed=3)[1], val)
    assert store.n_rows_in(val) == 15 * 16
    got = torch.cat(list(store.iter_batches(37, rows=val, n_epochs=1)))
    assert torch.equal(sorted_rows(got), sorted_rows(store.acts_for_images(val)[0]))
    blocks = list(store.iter_images(4, rows=val))
    assert torch.cat([i for i, _ in blocks]).tolist() == val.tolist()
    with pytest.raises(ValueError, match="image indices"):
        store.n_rows_in([60])


def test_sample_draws_distinct_real_rows(store):
    x = store.sample(300, seed=0)
    assert x.shape == (300, 8) and x.dtype == torch.float32
    assert torch.equal(x, store.sample(300, seed=0)) and not torch.equal(x, store.sample(300, seed=1))
    rows = {tuple(r) for r in all_rows(store).tolist()}
    assert all(tuple(r) in rows for r in x.tolist())
    assert len({tuple(r) for r in x.tolist()}) == 300  # without replacement (all store rows are distinct)
    _, val = store.split(0.5, seed=0)
    val_rows = {tuple(r) for r in store.acts_for_images(val)[0].tolist()}
    assert all(tuple(r) in val_rows for r in store.sample(100, rows=val).tolist())
    with pytest.raises(ValueError, match="cannot sample"):
        store.sample(961)


def test_sample_covers_all_shards_uniformly(store):
    # 900 of 960 rows: every shard (48 rows) must contribute about 45; a biased sampler would not.
    x = store.sample(900, seed=0)
    first_shard = {tuple(r) for r in store.acts_for_images([0, 1, 2])[0].tolist()}
    assert 35 <= sum(tuple(r) in first_shard for r in x.tolist()) <= 48


def test_acts_for_unknown_image_is_an_error(store):
    with pytest.raises(KeyError, match="no rows"):
        store.acts_for_images([61])


# ---------------------------------------------------------------- errors that say what to do
def test_open_errors(tmp_path, store):
    with pytest.raises(FileNotFoundError, match="no activation store"):
        ActivationStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ActivationStore(tmp_path / "empty")

    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    meta_text = (copy / "meta.json").read_text()
    (copy / "meta.json").write_text(meta_text[:50])
    with pytest.raises(StoreError, match="not valid JSON"):
        ActivationStore(copy)
    meta = json.loads(meta_text)
    (copy / "meta.json").write_text(json.dumps({**meta, "schema_version": 99}))
    with pytest.raises(StoreError, match="schema_version 99"):
        ActivationStore(copy)
    (copy / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(copy)
    (copy / "meta.json").write_text(meta_text)
    (copy / meta["shards"][3]["file"]).unlink()
    with pytest.raises(StoreError, match="not on disk"):
        ActivationStore(copy)


def test_corrupt_shard_is_reported(tmp_path, store):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    (copy / store.shards[0]["file"]).write_bytes(b"garbage")
    with pytest.raises(StoreError, match="corrupt"):
        ActivationStore(copy).acts_for_images([0])
    with pytest.raises(StoreError, match="corrupt"):
        next(ActivationStore(copy).iter_batches(8))


def test_float16_overflow_is_an_error_not_inf(tmp_path, images):
    loud = tiny_backbone(gain=1e6)
    with pytest.raises(StoreError, match="bfloat16"):
        extract(folder_source(images), loud, "conv2", "spatial", tmp_path / "s", max_images=4, progress=False)
    s = extract(folder_source(images), loud, "conv2", "spatial", tmp_path / "s32", max_images=4, dtype="float32", progress=False)
    assert s.meta["dtype"] == "float32" and torch.isfinite(s.sample(64)).all() and s.sample(64).abs().max() > 65504
    assert torch.equal(sorted_rows(torch.cat(list(s.iter_batches(10, n_epochs=1, chunk_rows=7)))), sorted_rows(all_rows(s)))
