"""Image sources and the hygiene of single images: the first arrow of the data flow (images → backbone).

A source is an iterable of `(ImageRecord, PIL.Image RGB)` in a deterministic order, with `len()`, `records()`
(metadata only, no decoding), `load(record)` and `skipped`, the `(path, reason)` list of what it dropped. Bad
images never crash a long run: they are skipped and reported. Reasons start with one keyword (`corrupt`,
`truncated`, `tiny`, `bomb`, `blank`, `duplicate`, `missing`) so `skip_summary()` can count them.

    src = ConcatSource([OpenClipArtSource(), SkimageSource()])
    for record, img in src: ...

Every image, whatever its source and whoever asks (extraction, evaluation, publishing, the app, the generators), is
decoded by one function, `open_image`: EXIF orientation applied, the first frame of an animation, 16/32-bit grey
scaled (not clipped), transparency composited onto white, grey/palette/CMYK converted to RGB; bad files raise
`BadImageError` naming the file. Hygiene of a folder (ASSETS.md, "What a trial run showed"): pixel-identical copies are dropped (the first in sorted path order is kept), one-colour images are
skipped, images under `min_size` px on a side and decompression bombs are skipped and recorded. The cleaned index of a
folder is cached as JSON (`$NACOSAE_CACHE` or `~/.cache/nacosae/`), keyed by the files' names, sizes and mtimes and by
the cleaning settings, so the second listing is instant.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import struct
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
WHITE = (255, 255, 255)
# PIL warns above MAX_IMAGE_PIXELS (~89.5 MP) and refuses (DecompressionBombError) above twice that. We refuse the same
# files but from the header, before decoding, and report them; a larger max_pixels also needs PIL's limit raised.
DEFAULT_MAX_PIXELS = 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)
OPENCLIPART_ROOT = "/usr/share/openclipart/png"
_INDEX_VERSION = 1  # bump when the cleaning logic changes: invalidates cached indexes
_DATA = Path(__file__).parent / "data"


class BadImageError(ValueError):
    """An image that cannot be used: `path` (or "<PIL image>") and a `reason` starting with a keyword."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class ImageRecord:
    """Metadata of one image of a source; JSON-serialisable (`asdict`)."""

    image_id: str
    """Unique and stable across runs: `{source}/{relative path}` or `{source}/{split}/{index}`."""
    source: str
    """Name of the source that yields it (e.g. "openclipart", "skimage", a folder name, a dataset id)."""
    path: str | None = None
    """File path for file-based sources, else None."""
    index: int | None = None
    """Row index for dataset sources, else None."""
    label: str | None = None
    """Class label (parent folder, top-level category, dataset label) or None."""
    description: str | None = None
    """Short human-readable description (from the file name, a caption column, ...) or None."""
    subcategory: str | None = None
    """Finer folder path below the label (Open Clip Art: e.g. "mammals/horses"), or None."""

    def __post_init__(self):
        if not self.image_id or not self.source:
            raise ValueError("ImageRecord needs a non-empty image_id and source")


# ---------------------------------------------------------------------------------------------------------------
# single images: how an image record becomes pixels (the one owner: `open_image`)

_GREY_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_EXIF_ORIENTATION = 0x0112  # PIL.ExifTags.Base.Orientation; 1 = upright, 2..8 = flipped and/or rotated


def _scale_to_uint8(arr, mode: str):
    """8-bit version of a high-depth grey array (float64 in, uint8 out): scaled, never clipped.

    The scale is the declared bit depth where the mode has one (I;16*: 0..65535), else the first of these ranges that
    holds every value: 0..255 (8-bit data in a 32-bit container), 0..65535 (16-bit data, e.g. a 16-bit TIFF read as
    "I"), 0..1 for float data; values outside all of them are stretched over their own min..max.
    """
    import numpy as np

    if not np.isfinite(arr).all():
        raise ValueError("corrupt: NaN or infinite pixel values")  # caught and reported by open_image
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        lo_top, top = 0.0, 65535.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        lo_top, top = 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        lo_top, top = 0.0, 255.0
    elif lo >= 0 and hi <= 65535:
        lo_top, top = 0.0, 65535.0
    else:
        lo_top, top = lo, hi if hi > lo else lo + 1.0
    return ((arr - lo_top) * (255.0 / (top - lo_top))).round().astype(np.uint8)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The pixel-mode step of `open_image`, for an image already decoded: any PIL mode → RGB.

    Transparency (an alpha channel, or a `tRNS` / GIF transparent index on a palette, grey or RGB image) is
    composited onto `background`; 16-bit, 32-bit and float grey are scaled to 8 bits (`_scale_to_uint8`), never
    clipped; CMYK, YCbCr, LAB, HSV and 1-bit go through PIL's conversion. Callers outside this module use
    `open_image`, which also applies the EXIF orientation and the size guards.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _GREY_HIGH_DEPTH:
        import numpy as np

        img = Image.fromarray(_scale_to_uint8(np.asarray(img, dtype=np.float64), img.mode), mode="L")
    if "transparency" in img.info and img.mode in ("P", "L", "RGB", "1"):
        img = img.convert("RGBA")  # PIL turns the transparent index / colour into alpha 0
    if img.mode in ("RGBa", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))  # alpha blend: partial transparency blends into the background
        return out
    return img.convert("RGB")


def _array_image(arr) -> Image.Image:
    """A numpy array (H, W) or (H, W, C ∈ {1, 3, 4}) as a PIL image: bool → 0/255, uint8 as is, other dtypes
    through the high-depth grey scaling of `to_rgb` (per array, so colour channels keep their ratios)."""
    import numpy as np

    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"corrupt: an array of shape {arr.shape} is not an image (need (H, W) or (H, W, 1|3|4))")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16 and arr.ndim == 2:
        return Image.fromarray(arr)  # mode I;16: scaled by its bit depth in to_rgb
    elif arr.dtype != np.uint8:
        mode = "F" if np.issubdtype(arr.dtype, np.floating) else "I;16" if arr.dtype == np.uint16 else "I"
        arr = _scale_to_uint8(arr.astype(np.float64), mode)
    return Image.fromarray(np.ascontiguousarray(arr))


def open_image(image, min_size: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS, where: str | None = None) -> Image.Image:
    """An image record, fully decoded, as an upright RGB PIL image: the one way nacosae turns an image into pixels.

    image: a file path (str or os.PathLike), encoded bytes (bytes / bytearray / memoryview), a binary file object,
        a `datasets.Image` value (`{"bytes": ..., "path": ...}`, as with `decode=False`), a PIL image or a numpy
        array (H, W) / (H, W, C).
    where: the name errors give for the image (default: the path, else "<bytes>", "<PIL image>", "<array>"); pass
        a record id, or a bare file name where the full path must not be shown (uploads).

    What every caller gets, whatever the file (tests/test_image_corpus.py):
      - the EXIF (or XMP) orientation applied, as `datasets` and browsers do (`PIL.ImageOps.exif_transpose`);
      - the first frame of an animated GIF / WebP / APNG or multi-page TIFF;
      - 16-bit, 32-bit and float grey scaled to 8 bits by bit depth or range, never clipped (`to_rgb`);
      - transparency (alpha, palette or grey/RGB `tRNS`) composited onto white; CMYK etc. converted to RGB.
    A new image object is returned; a PIL image passed in is not modified (an animated one is rewound to frame 0).

    Raises `BadImageError` (its `reason` starts with a keyword) for a missing file (`missing`), a file PIL cannot
    identify or decode, or NaN pixels (`corrupt`), a truncated file (`truncated`), a side shorter than `min_size`
    (`tiny`), or more than `max_pixels` pixels (`bomb`: checked from the header, before decoding).
    """
    import io

    import numpy as np

    if isinstance(image, dict):  # datasets.Image(decode=False) value
        if image.get("bytes") is not None:
            image = image["bytes"]
        elif image.get("path"):
            image = image["path"]
        else:
            raise BadImageError(where or "<dataset value>", "corrupt: a datasets image value with neither bytes nor path")
    if where is None:
        where = (str(image) if isinstance(image, (str, os.PathLike)) else "<PIL image>" if isinstance(image, Image.Image)
                 else "<array>" if isinstance(image, np.ndarray) else str(getattr(image, "name", "<bytes>")))
    opened = None
    try:
        if isinstance(image, Image.Image):
            img = image
        elif isinstance(image, np.ndarray):
            img = _array_image(image)
        elif isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(image, "read"):
            fp = io.BytesIO(image) if isinstance(image, (bytes, bytearray, memoryview)) else image
            with warnings.catch_warnings():  # our own max_pixels check below replaces PIL's warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = opened = Image.open(fp)
        else:
            raise BadImageError(where, f"corrupt: expected a path, bytes, a PIL image or an array, got {type(image).__name__}")
        w, h = img.size
        if w * h > max_pixels:
            raise BadImageError(where, f"bomb: {w}x{h} = {w * h / 1e6:.0f} MP > max_pixels={max_pixels / 1e6:.0f} MP")
        if min(w, h) < min_size:
            raise BadImageError(where, f"tiny: {w}x{h} px, a side < min_size={min_size}")
        if getattr(img, "n_frames", 1) > 1 and img.tell() != 0:
            img.seek(0)  # the first frame, as a thumbnail or `datasets` shows it
        img.load()
        out = img
        if img.getexif().get(_EXIF_ORIENTATION, 1) in range(2, 9):  # exif_transpose copies even when upright
            out = ImageOps.exif_transpose(img)
        out = to_rgb(out)
        if out is img:  # never hand back the caller's object, nor the one closed below
            out = img.copy()
        return out
    except BadImageError:
        raise
    except FileNotFoundError as e:
        raise BadImageError(where, f"missing: {e.strerror or e}") from e
    except Image.DecompressionBombError as e:
        raise BadImageError(where, f"bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise BadImageError(where, "corrupt: not an image PIL can identify") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        msg = str(e)
        kind = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise BadImageError(where, msg if msg.startswith("corrupt:") else f"{kind}: {msg}") from e
    finally:
        if opened is not None:
            opened.close()


load_rgb = open_image  # the former name, kept for callers that still import it


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = WHITE) -> Image.Image:
    """Centre `img` on a `fill` square of side max(w, h): resizing then keeps the whole object (no centre crop)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill if img.mode == "RGB" else fill[0])
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def is_blank(img: Image.Image, tol: int = 8) -> bool:
    """True when every channel's max − min ≤ `tol` (one colour, e.g. white-on-transparent clip art on white)."""
    return all(hi - lo <= tol for lo, hi in img.getextrema())


def pixel_digest(img: Image.Image) -> str:
    """Hash of the decoded RGB pixels and size: equal for pixel-identical copies whatever their file bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.size}{img.mode}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def cache_dir() -> Path:
    """`$NACOSAE_CACHE` or `~/.cache/nacosae`."""
    return Path(os.environ.get("NACOSAE_CACHE") or Path.home() / ".cache" / "nacosae")


# ---------------------------------------------------------------------------------------------------------------
# sources


class ImageSource:
    """Base class: subclasses set `name` and implement `records()` and `_open(record)`."""

    name: str = "source"

    def __init__(self):
        self._skipped: dict[str, str] = {}  # path → reason, in the order found

    def records(self) -> list[ImageRecord]:
        raise NotImplementedError

    def _open(self, record: ImageRecord) -> Image.Image:
        raise NotImplementedError

    def load(self, record: ImageRecord) -> Image.Image:
        """The RGB image of one record (raises `BadImageError`)."""
        return self._open(record)

    def __len__(self) -> int:
        return len(self.records())

    def __iter__(self) -> Iterator[tuple[ImageRecord, Image.Image]]:
        for record in self.records():
            try:
                img = self.load(record)
            except BadImageError as e:
                self._skipped.setdefault(record.path or record.image_id, e.reason)
                continue
            yield record, img

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """`(path or id, reason)` for every image dropped while listing or iterating."""
        return list(self._skipped.items())

    def skip_summary(self) -> dict[str, int]:
        """Counts of skipped images by reason keyword, e.g. {"duplicate": 1296, "bomb": 4, "tiny": 21}."""
        return dict(Counter(reason.split(":")[0] for _, reason in self.skipped))


class FolderSource(ImageSource):
    """Image files under `root`, in sorted relative-path order.

    `label_from`: "parent" (the parent folder relative to root, e.g. "animals/mammals"), "top" (the first folder
    below root) or None. With `clean=True` every image is decoded once while listing (cached) to drop bad, tiny and,
    with `skip_blank`, one-colour images, so that `len()` equals what iteration yields; otherwise bad files are only
    found (and skipped) when iterated. `dedupe`: drop byte-identical files (and with `clean`, pixel-identical ones),
    keeping the first in sorted path order.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        recursive: bool = True,
        label_from: str | None = "parent",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        clean: bool = False,
        dedupe: bool = False,
        skip_blank: bool = False,
        min_size: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        blank_tol: int = 8,
        use_cache: bool = True,
        cache: str | os.PathLike | None = None,
        num_workers: int | None = None,
        name: str | None = None,
        progress: bool = True,
    ):
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (or is not a folder)")
        if label_from not in ("parent", "top", None):
            raise ValueError(f"label_from={label_from!r}: choose 'parent', 'top' or None")
        if skip_blank and not clean:
            raise ValueError("skip_blank=True needs clean=True (blank images are found by decoding while listing)")
        if min_size < 1 or max_pixels < 1 or blank_tol < 0:
            raise ValueError("min_size and max_pixels must be >= 1, blank_tol >= 0")
        self.recursive, self.label_from = recursive, label_from
        self.extensions = tuple(e.lower() for e in extensions)
        self.clean, self.dedupe, self.skip_blank = clean, dedupe, skip_blank
        self.min_size, self.max_pixels, self.blank_tol = min_size, max_pixels, blank_tol
        self.use_cache = use_cache
        self.cache = Path(cache) if cache is not None else None
        self.num_workers = num_workers
        self.progress = progress
        self.name = name or self.root.name
        self._records: list[ImageRecord] | None = None

    # -- listing -------------------------------------------------------------------------------------------------
    def _list_files(self) -> list[str]:
        """Relative posix paths of image files (symlinks included, broken ones skipped), sorted."""
        out = []
        for top in self._walk_roots():
            walker = os.walk(top) if self.recursive else [(top, [], os.listdir(top))]
            for dirpath, dirnames, filenames in walker:
                rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
                prefix = "" if rel_dir == "." else rel_dir + "/"
                for f in filenames:
                    if f.lower().endswith(self.extensions) and os.path.isfile(os.path.join(dirpath, f)):
                        out.append(prefix + f)  # isfile follows symlinks: False for broken ones
        return sorted(out)

    def _walk_roots(self) -> list[str]:
        return [str(self.root)]

    def _label(self, rel: str) -> tuple[str | None, str | None]:
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if self.label_from is None or not parent:
            return None, None
        if self.label_from == "parent":
            return parent, None
        top, _, rest = parent.partition("/")
        return top, rest or None

    def _describe(self, rel: str) -> str | None:
        return None

    def _make_record(self, rel: str) -> ImageRecord:
        label, sub = self._label(rel)
        return ImageRecord(
            image_id=f"{self.name}/{rel}", source=self.name, path=str(self.root / rel), label=label,
            description=self._describe(rel), subcategory=sub,
        )

    def _settings(self) -> dict:
        return {
            "version": _INDEX_VERSION, "root": str(self.root.resolve()), "recursive": self.recursive,
            "extensions": list(self.extensions), "clean": self.clean, "dedupe": self.dedupe,
            "skip_blank": self.skip_blank, "min_size": self.min_size, "max_pixels": self.max_pixels,
            "blank_tol": self.blank_tol,
        }

    def _cache_path(self, files: list[str]) -> Path:
        h = hashlib.blake2b(digest_size=12)
        h.update(json.dumps(self._settings(), sort_keys=True).encode())
        for rel in files:  # names, sizes and mtimes: a changed file invalidates the index
            st = os.stat(self.root / rel)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return (self.cache or cache_dir()) / "image_index" / f"{self.name}-{h.hexdigest()}.json"

    def _index(self) -> tuple[list[str], dict[str, str]]:
        """(kept relative paths, {relative path: skip reason}), from the cache when it is there."""
        files = self._list_files()
        if not (self.clean or self.dedupe):
            return files, {}
        path = self._cache_path(files) if self.use_cache else None
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                return data["kept"], data["skipped"]
            except (json.JSONDecodeError, KeyError):
                pass  # a damaged cache file is rebuilt below
        kept, skipped = self._build_index(files)
        if path is not None:
            from nacosae.io import atomic_write_json  # imported here: nacosae.io pulls in torch, workers need not

            atomic_write_json(path, {"settings": self._settings(), "kept": kept, "skipped": skipped})
        return kept, skipped

    def _build_index(self, files: list[str]) -> tuple[list[str], dict[str, str]]:
        skipped: dict[str, str] = {}
        # fast path: byte hashes (symlinks and copies) need no decoding
        first_by_bytes: dict[str, str] = {}
        unique = []
        for rel in files:
            digest = _file_digest(str(self.root / rel))
            if self.dedupe and digest in first_by_bytes:
                skipped[rel] = f"duplicate: same file bytes as {first_by_bytes[digest]}"
                continue
            first_by_bytes.setdefault(digest, rel)
            unique.append(rel)
        if not self.clean:
            return unique, skipped
        args = [(str(self.root / rel), self.min_size, self.max_pixels, self.blank_tol) for rel in unique]
        results = _map(_inspect, args, self.num_workers, desc=f"checking {self.name} images", progress=self.progress)
        kept = []
        first_by_pixels: dict[str, str] = {}
        for rel, (reason, digest, blank) in zip(unique, results):
            if reason is None and blank and self.skip_blank:
                reason = "blank: one colour"
            if reason is None and self.dedupe and digest in first_by_pixels:
                reason = f"duplicate: same pixels as {first_by_pixels[digest]}"
            if reason is not None:
                skipped[rel] = reason
                continue
            first_by_pixels.setdefault(digest, rel)
            kept.append(rel)
        return kept, skipped

    def records(self) -> list[ImageRecord]:
        if self._records is None:
            kept, skipped = self._index()
            for rel, reason in skipped.items():
                self._skipped.setdefault(str(self.root / rel), reason)
            self._records = [self._make_record(rel) for rel in kept]
        return list(self._records)

    def _open(self, record: ImageRecord) -> Image.Image:
        return open_image(record.path, min_size=self.min_size, max_pixels=self.max_pixels)


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


def _inspect(args) -> tuple[str | None, str | None, bool]:
    """Worker: (skip reason or None, pixel digest, is blank) of one file."""
    path, min_size, max_pixels, blank_tol = args
    try:
        img = open_image(path, min_size=min_size, max_pixels=max_pixels)
    except BadImageError as e:
        return e.reason, None, False
    return None, pixel_digest(img), is_blank(img, blank_tol)


def _map(fn, args: list, num_workers: int | None, desc: str, progress: bool) -> list:
    """`[fn(a) for a in args]` with a tqdm bar, in `num_workers` processes (None: up to 4, 0 or 1: in-process)."""
    from tqdm.auto import tqdm

    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    bar = dict(total=len(args), desc=desc, disable=not progress, unit="img")
    if num_workers <= 1 or len(args) < 64:
        return [fn(a) for a in tqdm(args, **bar)]
    import multiprocessing as mp

    # spawn, not fork: the caller may hold torch/OpenMP threads, which do not survive a fork
    with ProcessPoolExecutor(num_workers, mp_context=mp.get_context("spawn")) as pool:
        return list(tqdm(pool.map(fn, args, chunksize=16), **bar))


# ---------------------------------------------------------------------------------------------------------------
# Open Clip Art


@lru_cache(maxsize=1)
def _openclipart_authors() -> dict[str, list[tuple[str, ...]]]:
    """Author names seen in Open Clip Art file names (nacosae/data/openclipart_authors.txt) as token tuples,
    grouped by their first token."""
    by_first: dict[str, list[tuple[str, ...]]] = {}
    for line in (_DATA / "openclipart_authors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            name = tuple(line.split())
            by_first.setdefault(name[0], []).append(name)
    return by_first


# tokens that describe the icon set or file format rather than the content
_NOISE = {"aiga", "bb", "gnome", "mime", "gtk", "stock", "svg", "png", "clipart", "openclipart", "by", "bw", "bwh", "ooo"}
_PARTICLES = {"de", "di", "da", "van", "von", "der", "del", "the"}


def _trailing_author(tokens: list[str], truncated: bool) -> int:
    """How many trailing tokens form (the start of) an author name; the last may be cut short by truncation."""
    authors = _openclipart_authors()
    for m in range(min(3, len(tokens) - 1), 0, -1):  # longest match first; never eat the whole description
        tail = tokens[-m:]
        if m == 1 and truncated and len(tail[0]) >= 3:
            candidates = [n for first, names in authors.items() if first.startswith(tail[0]) for n in names]
        else:
            candidates = authors.get(tail[0], [])
        for name in candidates:
            if len(name) < m or list(name[: m - 1]) != tail[:-1]:
                continue
            last, full = tail[-1], name[m - 1]
            if last == full or (truncated and len(last) >= 2 and full.startswith(last)):
                # one token alone counts only when it is a whole one-word author name, or a cut first name ≥ 3 chars
                if m >= 2 or len(name) == 1 or (last == full and len(last) >= 4) or (truncated and len(last) >= 3):
                    return m
    return 0


def describe_openclipart(filename: str) -> str:
    """A readable description from an Open Clip Art file name: words only, without the author, numbers, extension.

    Names follow "{title}_{author}_{NN}.png" with the stem cut at 24 characters, so the author is often truncated
    ("siringa_architetto_franc_01.png" → "siringa"). Non-English titles stay as they are.
    """
    stem = re.sub(r"\.[A-Za-z0-9]+$", "", filename)
    truncated = len(re.sub(r"_+\d*[a-z]?$", "", stem)) >= 22  # cut at 24 characters, before the "_NN" suffix
    tokens = []
    for tok in re.split(r"[_\-\s.+,()]+", stem.lower()):
        if not tok:
            continue
        if re.fullmatch(r"[a-z]+\d+[a-z]?", tok):  # "arrow1", "home9", "v16": strip the number
            tok = re.sub(r"\d+[a-z]?$", "", tok)
        elif re.search(r"\d", tok) and re.search(r"[a-z]", tok) and not re.fullmatch(r"\d[a-z]+|\d+[a-z]{2,}", tok):
            continue  # "95pt06step", "01r", "01a": numbering, not words ("3d", "8port" stay)
        tokens.append(tok)
    changed = True
    while changed and tokens:
        changed = False
        while len(tokens) > 1 and (tokens[-1].isdigit() or len(tokens[-1]) == 1 or tokens[-1] in _NOISE | _PARTICLES):
            tokens.pop()
            changed = True
        m = _trailing_author(tokens, truncated)
        if m:
            del tokens[-m:]
            truncated = False  # only the original last token can be cut short
            changed = True
    tokens = [t for t in tokens if t not in _NOISE and not t.isdigit() and len(t) > 1]
    return " ".join(tokens)


class OpenClipArtSource(FolderSource):
    """The Open Clip Art Library PNGs (Debian `openclipart-png`), cleaned (ASSETS.md).

    label = top-level category folder ("animals"), subcategory = the folders below it ("mammals/horses"),
    description = the file name made readable (`describe_openclipart`). Cleaning while listing (cached): RGBA
    composited onto white, byte- and pixel-identical copies dropped (first in sorted path order kept; 1,296 copies in
    the full set), one-colour images and images under `min_size` px skipped, decompression bombs skipped, all of it in
    `skipped`. `categories` restricts the listing to some top-level folders.
    """

    def __init__(
        self,
        root: str | os.PathLike = OPENCLIPART_ROOT,
        dedupe: bool = True,
        categories: Sequence[str] | None = None,
        min_size: int = 32,
        skip_blank: bool = True,
        **kwargs,
    ):
        if not Path(root).is_dir():
            raise FileNotFoundError(
                f"Open Clip Art not found at {root}: install the Debian package (apt-get install openclipart-png) "
                "or pass root= to where its png/ folder is"
            )
        self.categories = sorted(categories) if categories is not None else None
        kwargs.setdefault("name", "openclipart")
        super().__init__(root, recursive=True, label_from="top", extensions=(".png",), clean=True, dedupe=dedupe,
                         skip_blank=skip_blank, min_size=min_size, **kwargs)
        if self.categories is not None:
            missing = [c for c in self.categories if not (self.root / c).is_dir()]
            if missing:
                valid = sorted(p.name for p in self.root.iterdir() if p.is_dir())
                raise ValueError(f"unknown Open Clip Art categories {missing}; valid: {valid}")

    def _walk_roots(self) -> list[str]:
        if self.categories is None:
            return [str(self.root)]
        return [str(self.root / c) for c in self.categories]

    def _settings(self) -> dict:
        return {**super()._settings(), "categories": self.categories}

    def _describe(self, rel: str) -> str | None:
        desc = describe_openclipart(rel.rsplit("/", 1)[-1])
        if not desc:  # nothing readable in the name: fall back on the innermost folder
            desc = rel.rsplit("/", 2)[-2].replace("_", " ") if "/" in rel else None
        return desc


# ---------------------------------------------------------------------------------------------------------------
# scikit-image sample photos

SKIMAGE_DESCRIPTIONS = {
    "astronaut": "portrait of an astronaut in a spacesuit with a flag",
    "camera": "a man with a camera on a tripod",
    "chelsea": "a tabby cat",
    "coffee": "a cup of coffee on a saucer",
    "coins": "old coins",
    "horse": "black silhouette of a horse",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "stained tissue under a microscope",
    "moon": "the surface of the moon",
    "page": "a scanned page of printed text",
    "rocket": "a rocket on a launch pad",
    "text": "printed text",
    "retina": "a photograph of a human retina",
    "clock": "a wall clock",
    "colorwheel": "a colour wheel",
    "logo": "the scikit-image logo",
    "brick": "a brick wall",
    "grass": "grass",
    "gravel": "gravel",
}


class SkimageSource(ImageSource):
    """scikit-image's bundled sample images (no download); label = the name, description = a short caption."""

    name = "skimage"

    def __init__(self, names: Sequence[str] | None = None):
        super().__init__()
        self.names = list(names) if names is not None else list(SKIMAGE_DESCRIPTIONS)
        unknown = [n for n in self.names if n not in SKIMAGE_DESCRIPTIONS]
        if unknown:
            raise ValueError(f"unknown scikit-image samples {unknown}; valid: {sorted(SKIMAGE_DESCRIPTIONS)}")

    def records(self) -> list[ImageRecord]:
        return [
            ImageRecord(image_id=f"skimage/{n}", source="skimage", label=n, description=SKIMAGE_DESCRIPTIONS[n])
            for n in self.names
        ]

    def _open(self, record: ImageRecord) -> Image.Image:
        import skimage.data

        return open_image(getattr(skimage.data, record.label)(), where=record.image_id)  # "horse" is a bool mask


# ---------------------------------------------------------------------------------------------------------------
# datasets


class HFDatasetSource(ImageSource):
    """Rows of a `datasets` dataset: a Hub id (on machines that reach the Hub) or a local folder (imagefolder,
    parquet, ...) or data-file path, loaded with `datasets.load_dataset`.

    Images are decoded here (not by `datasets`) so a corrupt row is skipped and reported, not raised. `label_column`
    of type ClassLabel gives the class name; `description_column` an optional caption. With `streaming=True`,
    `len()` comes from the dataset's metadata and `records()` walks the stream.
    """

    def __init__(
        self,
        path_or_id: str | os.PathLike,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = None,
        description_column: str | None = None,
        streaming: bool = False,
        name: str | None = None,
        min_size: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        **load_kwargs,
    ):
        super().__init__()
        import datasets

        self.path_or_id, self.split = str(path_or_id), split
        self.image_column, self.label_column, self.description_column = image_column, label_column, description_column
        self.streaming = streaming
        self.min_size, self.max_pixels = min_size, max_pixels
        self.name = name or self.path_or_id.rstrip("/").rsplit("/", 1)[-1]
        if self.path_or_id.startswith(("/", "./", "../", "~")) and not Path(self.path_or_id).expanduser().exists():
            raise FileNotFoundError(f"no local dataset folder or file {self.path_or_id!r}")
        try:
            ds = datasets.load_dataset(self.path_or_id, split=split, streaming=streaming, **load_kwargs)
        except datasets.exceptions.DatasetNotFoundError as e:
            raise FileNotFoundError(
                f"no dataset {self.path_or_id!r}: neither a local folder/file nor a Hub dataset id "
                "(or it is private: set HF_TOKEN, or the Hub is unreachable)"
            ) from e
        except ValueError as e:
            if "split" in str(e).lower():
                raise ValueError(f"dataset {self.path_or_id!r} has no split {split!r} ({e})") from e
            raise
        features = ds.features or {}
        for col in (image_column, label_column, description_column):
            if col is not None and features and col not in features:
                raise ValueError(f"dataset {self.path_or_id!r} has no column {col!r}; columns: {list(features)}")
        if isinstance(features.get(image_column), datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        label_feature = features.get(label_column) if label_column else None
        self._label_names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
        self._ds = ds
        self._records: list[ImageRecord] | None = None

    def _record(self, i: int, row: dict) -> ImageRecord:
        label = row.get(self.label_column) if self.label_column else None
        if label is not None and self._label_names is not None:
            label = self._label_names[label]
        desc = row.get(self.description_column) if self.description_column else None
        return ImageRecord(
            image_id=f"{self.name}/{self.split}/{i}", source=self.name, index=i,
            label=None if label is None else str(label), description=None if desc is None else str(desc),
        )

    def _meta_rows(self) -> Iterable[dict]:
        cols = [c for c in (self.label_column, self.description_column) if c]
        if self.streaming:
            return ({c: row.get(c) for c in cols} for row in self._ds)
        if not cols:
            return ({} for _ in range(len(self._ds)))
        return self._ds.select_columns(cols)  # metadata only: no image bytes read

    def records(self) -> list[ImageRecord]:
        if self._records is None:
            self._records = [self._record(i, row) for i, row in enumerate(self._meta_rows())]
        return list(self._records)

    def __len__(self) -> int:
        if not self.streaming:
            return len(self._ds)
        info = getattr(self._ds, "info", None)
        splits = getattr(info, "splits", None) or {}
        if self.split in splits and splits[self.split].num_examples:
            return splits[self.split].num_examples
        return len(self.records())

    def _decode(self, value, where: str) -> Image.Image:
        """datasets.Image(decode=False) values ({"bytes": ..., "path": ...}) or PIL images, via `open_image`."""
        if not isinstance(value, (dict, Image.Image)):
            raise BadImageError(where, f"corrupt: no image in column {self.image_column!r} ({type(value).__name__})")
        return open_image(value, self.min_size, self.max_pixels, where=where)

    def _open(self, record: ImageRecord) -> Image.Image:
        if self.streaming:
            raise TypeError("a streaming dataset cannot load one record: iterate over the source instead")
        return self._decode(self._ds[record.index][self.image_column], record.image_id)

    def __iter__(self):
        if not self.streaming:
            yield from super().__iter__()
            return
        for i, row in enumerate(self._ds):
            record = self._record(i, row)
            try:
                img = self._decode(row[self.image_column], record.image_id)
            except BadImageError as e:
                self._skipped.setdefault(record.image_id, e.reason)
                continue
            yield record, img


# ---------------------------------------------------------------------------------------------------------------


class ConcatSource(ImageSource):
    """Several sources one after the other (e.g. Open Clip Art + scikit-image); image ids must not collide."""

    def __init__(self, sources: Sequence[ImageSource]):
        super().__init__()
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        self.sources = list(sources)
        self.name = "+".join(s.name for s in self.sources)
        self._owner: dict[str, ImageSource] | None = None

    def records(self) -> list[ImageRecord]:
        out, owner = [], {}
        for s in self.sources:
            for r in s.records():
                if r.image_id in owner:
                    raise ValueError(f"image id {r.image_id!r} appears in two sources: give them distinct name=")
                owner[r.image_id] = s
                out.append(r)
        self._owner = owner
        return out

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __iter__(self):
        self.records()  # checks that ids are unique before a long run starts
        for s in self.sources:
            yield from s

    def _open(self, record: ImageRecord) -> Image.Image:
        if self._owner is None:
            self.records()
        return self._owner[record.image_id].load(record)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [item for s in self.sources for item in s.skipped]


class SubsetSource(ImageSource):
    """A seeded random subset of another source (for quick runs that still span every category)."""

    def __init__(self, source: ImageSource, n: int, seed: int = 0):
        super().__init__()
        self.source, self.name = source, f"{source.name}[{n}@{seed}]"
        records = source.records()
        keep = sorted(random.Random(seed).sample(range(len(records)), min(n, len(records))))
        self._records = [records[i] for i in keep]

    def records(self):
        return list(self._records)

    def _open(self, record):
        return self.source.load(record)

    @property
    def skipped(self):
        return self.source.skipped + super().skipped


SOURCE_SPECS = "openclipart | skimage | folder:PATH | hf:ID_OR_PATH | A+B (one after the other)"


def source_from_spec(spec: str, *, split: str = "train", image_column: str = "image",
                     label_column: str | None = None) -> ImageSource:
    """The image source a `--source` value names (extraction and training from a backbone stream read it alike):
    `openclipart` (Debian openclipart-png), `skimage` (scikit-image's sample photos), `folder:PATH` (image files,
    label = parent folder), `hf:ID_OR_PATH` (a `datasets` dataset; `split`, `image_column`, `label_column` apply), or
    several joined by `+` (e.g. `openclipart+skimage`, the offline default's images). Raises ValueError for another
    spec."""
    if "+" in spec and not spec.startswith(("folder:", "hf:")):
        return ConcatSource([source_from_spec(part, split=split, image_column=image_column, label_column=label_column)
                             for part in spec.split("+")])
    if spec == "openclipart":
        return OpenClipArtSource()
    if spec == "skimage":
        return SkimageSource()
    if spec.startswith("folder:"):
        return FolderSource(spec[len("folder:"):])
    if spec.startswith("hf:"):
        return HFDatasetSource(spec[len("hf:"):], split=split, image_column=image_column, label_column=label_column)
    raise ValueError(f"unknown image source {spec!r}: use {SOURCE_SPECS}")


def records_to_json(records: Sequence[ImageRecord]) -> list[dict]:
    """Records as plain dicts (for meta files)."""
    return [asdict(r) for r in records]
