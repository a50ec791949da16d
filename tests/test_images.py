"""Image sources and image hygiene, on real files written to tmp_path and on the real Open Clip Art folder."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nacosae.images import (
    OPENCLIPART_ROOT,
    BadImageError,
    ConcatSource,
    FolderSource,
    HFDatasetSource,
    ImageRecord,
    OpenClipArtSource,
    SkimageSource,
    describe_openclipart,
    is_blank,
    open_image,
    pad_to_square,
)


def _noise(w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.fixture()
def folder(tmp_path):
    """A small folder of real image files: good ones, copies, and every kind of bad one."""
    root = tmp_path / "imgs"
    (root / "cats" / "tabby").mkdir(parents=True)
    (root / "dogs").mkdir()
    _noise(64, 48, 0).save(root / "cats" / "a.png")
    # RGBA: an opaque red square on a fully transparent background
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (10, 10, 30, 30))
    rgba.save(root / "cats" / "tabby" / "rgba.png")
    _noise(50, 50, 1, mode="L").save(root / "dogs" / "grey.png")
    # a byte-identical copy and a pixel-identical copy with other bytes (another compression level)
    (root / "dogs" / "zz_copy_bytes.png").write_bytes((root / "cats" / "a.png").read_bytes())
    Image.open(root / "cats" / "a.png").save(root / "dogs" / "zz_copy_pixels.png", compress_level=0)
    Image.new("RGB", (60, 60), (255, 255, 255)).save(root / "dogs" / "blank.png")
    _noise(8, 8, 2).save(root / "dogs" / "tiny.png")
    (root / "dogs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    good = io.BytesIO()
    _noise(80, 80, 3).save(good, format="PNG")
    (root / "dogs" / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


# -- single images ---------------------------------------------------------------------------------------------


def test_open_image_composites_alpha_onto_white(folder):
    img = open_image(folder / "cats" / "tabby" / "rgba.png")
    assert img.mode == "RGB" and img.size == (40, 40)
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent → white, not black
    assert img.getpixel((20, 20)) == (255, 0, 0)


def test_open_image_partial_alpha_blends():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    r, g, b = open_image(img).getpixel((0, 0))
    assert r == g == b and 125 <= r <= 129  # half black over white


def test_open_image_converts_grey_palette_cmyk_and_16bit(tmp_path):
    assert open_image(_noise(10, 10, 0, mode="L")).mode == "RGB"
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png")
    assert open_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("CMYK", (10, 10), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert open_image(tmp_path / "c.jpg").mode == "RGB"
    Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16)).save(tmp_path / "i16.png")
    assert open_image(tmp_path / "i16.png").getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped


@pytest.mark.parametrize(
    "name,kwargs,keyword",
    [("corrupt.png", {}, "corrupt"), ("truncated.png", {}, "truncated"), ("tiny.png", {"min_size": 32}, "tiny"),
     ("grey.png", {"max_pixels": 1000}, "bomb"), ("missing.png", {}, "missing")],
)
def test_open_image_bad_images_raise_with_reason(folder, name, kwargs, keyword):
    with pytest.raises(BadImageError) as e:
        open_image(folder / "dogs" / name, **kwargs)
    assert e.value.reason.startswith(keyword)
    assert name in e.value.path


def test_open_image_takes_every_form_of_a_record_and_names_it_in_errors(tmp_path):
    img = _noise(6, 4, 0)
    img.save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    want = np.asarray(img)
    for form in (tmp_path / "a.png", str(tmp_path / "a.png"), data, bytearray(data), {"bytes": data, "path": None},
                 {"bytes": None, "path": str(tmp_path / "a.png")}, img, np.asarray(img)):
        out = open_image(form)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), want), type(form)
    assert open_image(img) is not img  # the caller's image is never handed back to be modified
    # arrays: a bool mask, grey uint16 (bit depth), float RGB in [0, 1], RGBA onto white
    assert open_image(np.array([[True, False]])).getpixel((0, 0)) == (255, 255, 255)
    assert open_image(np.full((2, 2), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    assert open_image(np.full((2, 2, 3), 0.5, np.float32)).getpixel((0, 0)) == (128, 128, 128)
    assert open_image(np.zeros((2, 2, 4), np.uint8)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(BadImageError, match=r"^upload\.png: corrupt: not an image"):
        open_image(b"not an image", where="upload.png")
    with pytest.raises(BadImageError, match=r"^<bytes>: corrupt"):
        open_image(b"not an image")
    with pytest.raises(BadImageError, match="neither bytes nor path"):
        open_image({"bytes": None, "path": None}, where="ds/train/3")
    with pytest.raises(BadImageError, match="shape"):
        open_image(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(BadImageError, match="got int"):
        open_image(42)


def test_pad_to_square_keeps_whole_image():
    img = Image.new("RGB", (40, 10), (255, 0, 0))
    sq = pad_to_square(img)
    assert sq.size == (40, 40)
    assert sq.getpixel((20, 0)) == (255, 255, 255) and sq.getpixel((20, 20)) == (255, 0, 0)
    assert np.asarray(sq).reshape(-1, 3).tolist().count([255, 0, 0]) == 400  # every red pixel kept
    assert pad_to_square(Image.new("RGB", (5, 5))).size == (5, 5)


def test_is_blank():
    assert is_blank(Image.new("RGB", (5, 5), (10, 20, 30)))
    assert not is_blank(_noise(5, 5, 0))


# -- folder ----------------------------------------------------------------------------------------------------


def test_folder_source_lists_sorted_with_parent_labels_and_skips_bad_when_iterating(folder):
    src = FolderSource(folder, use_cache=False)
    recs = src.records()
    rels = [r.image_id.split("/", 1)[1] for r in recs]
    assert rels == sorted(rels) and "dogs/notes.txt" not in rels
    assert len(src) == 9
    by_name = {Path(r.path).name: r for r in recs}
    assert by_name["rgba.png"].label == "cats/tabby" and by_name["grey.png"].label == "dogs"
    assert recs[0].image_id == "imgs/cats/a.png" and recs[0].source == "imgs"
    out = list(src)
    assert all(img.mode == "RGB" for _, img in out)
    assert len(out) == 7  # corrupt and truncated skipped, not raised
    reasons = dict((Path(p).name, r) for p, r in src.skipped)
    assert reasons["corrupt.png"].startswith("corrupt") and reasons["truncated.png"].startswith("truncated")
    list(src)  # a second pass does not report twice
    assert len(src.skipped) == 2


def test_folder_source_label_modes(folder):
    top = {Path(r.path).name: r for r in FolderSource(folder, label_from="top", use_cache=False).records()}
    assert top["rgba.png"].label == "cats" and top["rgba.png"].subcategory == "tabby"
    assert all(r.label is None for r in FolderSource(folder, label_from=None, use_cache=False).records())
    flat = FolderSource(folder / "dogs", recursive=False, use_cache=False)
    assert all(r.label is None for r in flat.records()) and len(flat) == 7
    with pytest.raises(ValueError, match="label_from"):
        FolderSource(folder, label_from="grandparent")
    with pytest.raises(FileNotFoundError):
        FolderSource(folder / "nope")


def test_folder_source_clean_dedupes_and_skips_then_caches(folder, tmp_path, monkeypatch):
    kw = dict(clean=True, dedupe=True, skip_blank=True, min_size=32, cache=tmp_path / "cache", num_workers=1,
              progress=False)
    src = FolderSource(folder, **kw)
    kept = [Path(r.path).name for r in src.records()]
    assert kept == ["a.png", "rgba.png", "grey.png"]
    assert len(list(src)) == len(src) == 3  # after cleaning, len() is what iteration yields
    reasons = {Path(p).name: r for p, r in src.skipped}
    assert reasons["zz_copy_bytes.png"] == "duplicate: same file bytes as cats/a.png"
    assert reasons["zz_copy_pixels.png"] == "duplicate: same pixels as cats/a.png"  # other bytes, same pixels
    assert reasons["blank.png"].startswith("blank") and reasons["tiny.png"].startswith("tiny")
    assert src.skip_summary() == {"duplicate": 2, "blank": 1, "tiny": 1, "corrupt": 1, "truncated": 1}
    assert len(list((tmp_path / "cache" / "image_index").glob("imgs-*.json"))) == 1

    # the second listing comes from the cache: nothing is decoded again
    def boom(*a, **k):
        raise AssertionError("index rebuilt although cached")

    monkeypatch.setattr(FolderSource, "_build_index", boom)
    again = FolderSource(folder, **kw)
    assert [r.path for r in again.records()] == [r.path for r in src.records()]
    assert again.skip_summary() == src.skip_summary()
    # a changed file invalidates the cache
    _noise(64, 64, 9).save(folder / "cats" / "b.png")
    with pytest.raises(AssertionError, match="rebuilt"):
        FolderSource(folder, **kw).records()


def test_folder_source_clean_in_worker_processes_matches_in_process(folder, tmp_path):
    for i in range(70):  # enough files for the process pool to be used
        _noise(33, 33, 100 + i).save(folder / "cats" / f"n{i:03d}.png")
    kw = dict(clean=True, dedupe=True, skip_blank=True, min_size=32, use_cache=False, progress=False)
    one = FolderSource(folder, num_workers=1, **kw)
    two = FolderSource(folder, num_workers=2, **kw)
    assert one.records() == two.records() and one.skipped == two.skipped


# -- datasets --------------------------------------------------------------------------------------------------


def test_hf_dataset_source_imagefolder(tmp_path):
    for label, seeds in (("cat", (0, 1)), ("dog", (2,))):
        (tmp_path / "ds" / "train" / label).mkdir(parents=True)
        for s in seeds:
            _noise(20, 20, s).save(tmp_path / "ds" / "train" / label / f"{s}.png")
    src = HFDatasetSource(tmp_path / "ds", split="train", label_column="label")
    assert len(src) == 3
    recs = src.records()
    assert [r.label for r in recs] == ["cat", "cat", "dog"]
    assert [r.image_id for r in recs] == ["ds/train/0", "ds/train/1", "ds/train/2"]
    items = list(src)
    assert len(items) == 3 and items[0][1].mode == "RGB" and items[0][1].size == (20, 20)
    assert np.array_equal(np.asarray(src.load(recs[2])), np.asarray(_noise(20, 20, 2)))


def test_hf_dataset_source_parquet_with_caption_and_a_corrupt_row(tmp_path):
    import datasets

    def png(seed):
        b = io.BytesIO()
        _noise(16, 16, seed).save(b, format="PNG")
        return {"bytes": b.getvalue(), "path": None}

    rows = {"image": [png(0), {"bytes": b"garbage", "path": None}, png(1)], "caption": ["one", "bad", "two"]}
    feats = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    src = HFDatasetSource(str(tmp_path / "pq"), description_column="caption", name="pq")
    assert [r.description for r in src.records()] == ["one", "bad", "two"]
    got = [r.description for r, _ in src]
    assert got == ["one", "two"]
    assert src.skipped[0][0] == "pq/train/1" and src.skipped[0][1].startswith("corrupt")
    streamed = HFDatasetSource(str(tmp_path / "pq"), description_column="caption", streaming=True, name="pq")
    assert [r.description for r, _ in streamed] == ["one", "two"]
    with pytest.raises(ValueError, match="no column"):
        HFDatasetSource(str(tmp_path / "pq"), label_column="label")


def test_hf_dataset_source_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no local dataset"):
        HFDatasetSource(str(tmp_path / "nope"))


# -- scikit-image, concat --------------------------------------------------------------------------------------


def test_skimage_source():
    src = SkimageSource(["chelsea", "horse", "camera"])
    items = list(src)
    assert [r.label for r, _ in items] == ["chelsea", "horse", "camera"]
    assert items[0][1].size == (451, 300) and all(img.mode == "RGB" for _, img in items)
    assert set(np.unique(np.asarray(items[1][1]))) <= {0, 255}  # the binary horse became black/white RGB
    assert len(SkimageSource()) >= 15
    with pytest.raises(ValueError, match="valid"):
        SkimageSource(["lena"])


def test_concat_source(folder):
    a = FolderSource(folder / "cats", use_cache=False)
    both = ConcatSource([a, SkimageSource(["coffee"])])
    assert len(both) == len(a) + 1
    ids = [r.image_id for r in both.records()]
    assert ids[-1] == "skimage/coffee" and len(set(ids)) == len(ids)
    assert [r.image_id for r, _ in both] == ids
    assert both.load(both.records()[-1]).size == (600, 400)
    with pytest.raises(ValueError, match="two sources"):
        ConcatSource([SkimageSource(["coffee"]), SkimageSource(["coffee"])]).records()


def test_image_record_requires_id():
    with pytest.raises(ValueError):
        ImageRecord(image_id="", source="x")


# -- Open Clip Art ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "filename,expected",
    [("siringa_architetto_franc_01.png", "siringa"), ("full_moon_dan_gerhards_01.png", "full moon"),
     ("kallisti-grenade_2_nurbl_01.png", "kallisti grenade"), ("star_95pt06step.png", "star"),
     ("aiga_escalator_down_.png", "escalator down"), ("box_juliane_krug_s.png", "box"),
     ("medicina_dottore_archite_01.png", "medicina dottore"), ("arrow1_sergio_luiz_arauj_01.png", "arrow"),
     ("gnome-mime-application-pdf.png", "application pdf"), ("3d_box_01.png", "3d box"),
     ("map_of_norway_jarno_vasa_01.png", "map of norway"), ("television_peterm_.png", "television")],
)
def test_describe_openclipart(filename, expected):
    assert describe_openclipart(filename) == expected


needs_openclipart = pytest.mark.skipif(
    not Path(OPENCLIPART_ROOT).is_dir(), reason=f"{OPENCLIPART_ROOT} absent: apt-get install openclipart-png"
)


@needs_openclipart
def test_openclipart_source_subset(tmp_path):
    src = OpenClipArtSource(categories=["science", "geography"], cache=tmp_path, num_workers=1, progress=False)
    recs = src.records()
    assert 100 < len(recs) < 200
    assert {r.label for r in recs} == {"science", "geography"}
    by_id = {r.image_id: r for r in recs}
    assert len(by_id) == len(recs)
    siringa = by_id["openclipart/science/medicine/siringa_architetto_franc_01.png"]
    assert siringa.description == "siringa" and siringa.subcategory == "medicine"
    # science/astronomy/southen_cross_01.png links to the geography copy: dropped, the first in path order kept
    assert "openclipart/geography/astronomy/southen_cross_01.png" in by_id
    assert "openclipart/science/astronomy/southen_cross_01.png" not in by_id
    assert src.skip_summary().get("duplicate", 0) >= 2
    for record, img in list(src)[:3]:
        assert img.mode == "RGB" and min(img.size) >= 32 and not is_blank(img)


@needs_openclipart
def test_openclipart_unknown_category():
    with pytest.raises(ValueError, match="valid"):
        OpenClipArtSource(categories=["dinosaurs"])


@pytest.mark.slow
@needs_openclipart
def test_openclipart_full_listing_cached(tmp_path):
    import time

    src = OpenClipArtSource(cache=tmp_path, progress=False)
    recs = src.records()
    summary = src.skip_summary()
    assert 6500 < len(recs) < 7000 and summary["duplicate"] > 1200 and summary["bomb"] >= 1
    t = time.perf_counter()
    assert len(OpenClipArtSource(cache=tmp_path).records()) == len(recs)
    assert time.perf_counter() - t < 3.0


def test_subset_source_is_seeded_and_spans_the_source():
    from nacosae.images import SkimageSource, SubsetSource

    full = SkimageSource()
    a, b = SubsetSource(full, 4, seed=1), SubsetSource(full, 4, seed=1)
    assert [r.image_id for r in a.records()] == [r.image_id for r in b.records()]
    assert len(a) == 4 and set(r.image_id for r in a.records()) <= set(r.image_id for r in full.records())
    assert SubsetSource(full, 10_000).records() == full.records()
    record = a.records()[0]
    assert a.load(record).mode == "RGB"
