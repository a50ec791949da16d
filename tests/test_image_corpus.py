"""A generated corpus of awkward image files, run through every way nacosae reads an image: `open_image`, a
`FolderSource` into an activation store (extraction), `HFDatasetSource`, and the app's upload check.

Each file is either read correctly (equal to an expected image built independently of nacosae: by numpy, or by
`datasets`' own decoder for JPEGs) or reported by its name. Bugs the corpus catches in the code before `open_image`:
EXIF-rotated photos came out sideways; float TIFFs in [0, 1] came out black; 32-bit grey was clipped at 65535;
grey and RGB PNGs with a `tRNS` colour key kept the key colour instead of white; an animated image handed over at a
later frame gave that frame; the upload check showed the server's path of the uploaded file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from nacosae.extract import extract
from nacosae.images import BadImageError, FolderSource, HFDatasetSource, open_image
from test_store import tiny_backbone, to_16px

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@dataclass
class Case:
    write: Callable[[Path], None]
    expected: Callable[[Path], np.ndarray] | None  # (H, W, 3) uint8 the file must decode to; None: must be reported
    atol: int = 0  # JPEG: a decoder may round differently
    reason: str | None = None  # the keyword a bad file is reported with


def _halves(w=60, h=30):
    """Left half red, right half blue: a rotation or a flip shows."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = RED
    a[:, w // 2:] = BLUE
    return a


def _datasets_decode(path: Path) -> np.ndarray:
    """What a `datasets` user gets for this file (it applies the EXIF orientation itself)."""
    import datasets

    return np.asarray(datasets.Image().decode_example({"path": str(path), "bytes": None}).convert("RGB"))


def _exif_jpeg(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(_halves()).save(path, exif=exif, quality=95)


def _exif_png(path):
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90° counter-clockwise to display"
    Image.fromarray(_halves(20, 10)).save(path, exif=exif)


GRADIENT16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
DARK16 = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (4, 1))  # 16-bit values all ≤ 255: nearly black
FLOAT01 = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (4, 1))
INT32 = np.tile(np.arange(64, dtype=np.int32) * 20_000, (4, 1))  # up to 1.26 M: beyond 16 bits


def _grey(a_HW) -> np.ndarray:
    return np.repeat(np.asarray(a_HW, np.uint8)[..., None], 3, axis=2)


def _palette_trns(path):
    """Index 0 fully transparent (black in the palette), 1 opaque red, 2 half-transparent green."""
    im = Image.new("P", (12, 6), 0)
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0, 0, 0] * 253)
    for x in range(4, 8):
        for y in range(6):
            im.putpixel((x, y), 1)
    for x in range(8, 12):
        for y in range(6):
            im.putpixel((x, y), 2)
    im.save(path, transparency=bytes([0, 255, 128]))


def _palette_expected(_):
    a = np.zeros((6, 12, 3), np.uint8)
    a[:, :4] = WHITE
    a[:, 4:8] = RED
    a[:, 8:] = (127, 255, 127)  # 128/255 green over white
    return a


def _rgb_key(path):
    im = Image.new("RGB", (10, 10), (0, 0, 0))
    im.paste(RED, (3, 3, 7, 7))
    im.save(path, transparency=(0, 0, 0))  # tRNS colour key: black is transparent


def _rgb_key_expected(_):
    a = np.full((10, 10, 3), 255, np.uint8)
    a[3:7, 3:7] = RED
    return a


def _animated(fmt):
    def write(path):
        frames = [Image.new("RGB", (12, 12), c) for c in (RED, GREEN, BLUE)]
        kw = {"lossless": True} if fmt == "WEBP" else {}
        frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **kw)
    return write


def _solid(colour, shape=(12, 12)):
    return lambda _: np.broadcast_to(np.asarray(colour, np.uint8), (*shape, 3)).copy()


def _truncated(fmt):
    def write(path):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return write


CORPUS: dict[str, Case] = {
    "exif_rotated.jpg": Case(_exif_jpeg, _datasets_decode),
    "exif_rotated.png": Case(_exif_png, lambda _: np.rot90(_halves(20, 10)).copy()),
    "grey16_gradient.png": Case(lambda p: Image.fromarray(GRADIENT16).save(p),
                                lambda _: _grey(GRADIENT16.astype(np.float64) * 255 / 65535 + 0.5), atol=1),
    "grey16_dark.png": Case(lambda p: Image.fromarray(DARK16).save(p),
                            lambda _: _grey(DARK16.astype(np.float64) * 255 / 65535 + 0.5), atol=1),
    "float_0_1.tif": Case(lambda p: Image.fromarray(FLOAT01, mode="F").save(p),
                          lambda _: _grey(FLOAT01.astype(np.float64) * 255 + 0.5), atol=1),
    "int32_wide.tif": Case(lambda p: Image.fromarray(INT32).save(p),
                           lambda _: _grey(INT32 / INT32.max() * 255 + 0.5), atol=1),
    "palette_trns.png": Case(_palette_trns, _palette_expected, atol=1),
    "rgb_colour_key.png": Case(_rgb_key, _rgb_key_expected),
    "grey_colour_key.png": Case(lambda p: Image.new("L", (8, 8), 0).save(p, transparency=0), _solid(WHITE, (8, 8))),
    "cmyk.jpg": Case(lambda p: Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(p, quality=95), _solid(RED), atol=2),
    "animated.gif": Case(_animated("GIF"), _solid(RED)),
    "animated.webp": Case(_animated("WEBP"), _solid(RED)),
    "animated.png": Case(_animated("PNG"), _solid(RED)),
    "one_pixel.png": Case(lambda p: Image.new("RGB", (1, 1), (12, 34, 56)).save(p), _solid((12, 34, 56), (1, 1))),
    "truncated.png": Case(_truncated("PNG"), None, reason="truncated"),
    "truncated.jpg": Case(_truncated("JPEG"), None, reason="truncated"),
    "not_an_image.png": Case(lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3), None, reason="corrupt"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "awkward"
    root.mkdir()
    for name, case in CORPUS.items():
        case.write(root / name)
    return root


def assert_decoded(name: str, got: Image.Image, corpus: Path):
    case = CORPUS[name]
    want = case.expected(corpus / name)
    assert got.mode == "RGB", name
    arr = np.asarray(got)
    assert arr.shape == want.shape, f"{name}: decoded {arr.shape[1]}×{arr.shape[0]}, expected {want.shape[1]}×{want.shape[0]}"
    diff = np.abs(arr.astype(int) - want.astype(int)).max()
    assert diff <= case.atol, f"{name}: pixels differ by up to {diff} from the expected image"


# -- open_image ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CORPUS))
def test_open_image_reads_or_reports_every_file(corpus, name):
    case = CORPUS[name]
    if case.expected is None:
        with pytest.raises(BadImageError) as e:
            open_image(corpus / name)
        assert e.value.reason.startswith(case.reason) and e.value.path == str(corpus / name)
        assert name in str(e.value)
        return
    assert_decoded(name, open_image(corpus / name), corpus)
    # the same file as bytes, as a datasets value and as an open file decodes the same
    data = (corpus / name).read_bytes()
    assert np.array_equal(np.asarray(open_image(data)), np.asarray(open_image(corpus / name)))
    assert np.array_equal(np.asarray(open_image({"bytes": data, "path": None})), np.asarray(open_image(corpus / name)))
    with open(corpus / name, "rb") as f:
        assert np.array_equal(np.asarray(open_image(f)), np.asarray(open_image(corpus / name)))


def test_exif_photo_comes_out_upright_like_datasets_decodes_it(corpus):
    im = open_image(corpus / "exif_rotated.jpg")
    assert im.size == (30, 60)  # stored 60×30, displayed 30×60
    assert im.getpixel((15, 5))[0] > 200 and im.getpixel((15, 55))[2] > 200  # red on top, blue below
    # a PIL image opened without the rotation (as a caller may hand it over) is turned upright too, and not modified
    raw = Image.open(corpus / "exif_rotated.jpg")
    assert open_image(raw).size == (30, 60) and raw.size == (60, 30)


def test_animated_image_at_a_later_frame_gives_the_first(corpus):
    im = Image.open(corpus / "animated.gif")
    im.seek(2)  # blue
    assert open_image(im).getpixel((0, 0)) == RED


def test_16bit_is_scaled_by_bit_depth_not_clipped(corpus):
    row = np.asarray(open_image(corpus / "grey16_gradient.png"))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row.astype(int)) >= 0)
    assert len(np.unique(row)) > 200  # a gradient, not a clipped ramp that saturates after the first 255 values


def test_wide_int32_is_stretched_not_clipped(corpus):
    row = np.asarray(open_image(corpus / "int32_wide.tif"))[0, :, 0]
    assert len(np.unique(row)) == 64 and row[-1] == 255  # clipping at 65535 left 4 distinct values


def test_non_finite_float_pixels_are_reported():
    arr = np.zeros((4, 4), np.float32)
    arr[1, 1] = np.nan
    with pytest.raises(BadImageError, match="corrupt: NaN"):
        open_image(Image.fromarray(arr, mode="F"), where="nan.tif")


# -- extraction: FolderSource into a store ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(corpus, tmp_path_factory):
    src = FolderSource(corpus, name="awkward", use_cache=False, progress=False)
    return extract(src, tiny_backbone(), "conv2", "spatial", tmp_path_factory.mktemp("store") / "store",
                   batch_size=4, shard_rows=64, dtype="float32", progress=False)


def test_extraction_reads_or_reports_every_file(corpus, store):
    kept = {Path(r["path"]).name: r["image_idx"] for r in store.images}
    skipped = {Path(s["path"]).name: s["reason"] for s in store.meta["skipped"]}
    assert set(kept) | set(skipped) == set(CORPUS) and not set(kept) & set(skipped)
    for name, case in CORPUS.items():
        if case.expected is None:
            assert skipped[name].startswith(case.reason), (name, skipped[name])
    bb = tiny_backbone()
    for name, idx in kept.items():
        want_px = to_16px(Image.fromarray(CORPUS[name].expected(corpus / name)))
        want_TD = bb.activations(want_px[None], "conv2", "spatial")[0]
        got_TD = store.acts_for_images([idx])[0]
        # JPEG decoders differ by a level or two; a sideways or black image differs by far more
        tol = 0.05 if CORPUS[name].atol else 1e-4
        assert torch.allclose(got_TD, want_TD, atol=tol), f"{name}: the store holds other pixels than the file's"


def test_hf_dataset_source_decodes_like_datasets(corpus, tmp_path):
    folder = tmp_path / "ds" / "train"
    folder.mkdir(parents=True)
    names = ["exif_rotated.jpg", "palette_trns.png", "grey16_gradient.png", "one_pixel.png"]
    for name in names:
        (folder / name).write_bytes((corpus / name).read_bytes())
    src = HFDatasetSource(tmp_path / "ds", split="train")
    got = {Path(src._ds[r.index]["image"]["path"]).name: img for r, img in src}
    assert sorted(got) == sorted(names) and not src.skipped
    for name in names:
        assert_decoded(name, got[name], corpus)


# -- the app's upload check ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CORPUS))
def test_upload_check_reads_or_reports_every_file_by_name_only(corpus, name):
    from nacosae.serve import ServeError, check_image

    case = CORPUS[name]
    if case.expected is None:
        with pytest.raises(ServeError) as e:
            check_image(str(corpus / name))
        msg = str(e.value)
        assert name in msg and case.reason in msg
        assert str(corpus) not in msg  # the server's folders stay private
        return
    assert_decoded(name, check_image(str(corpus / name)), corpus)
