"""The offline image bank: described pictures of everyday concepts, split by family (METHODS §3.1b).

    bank = offline_bank()                          # Open Clip Art + Noto Color Emoji + scikit-image photos
    bank.items[i].description, .keywords, .family, .split
    bank.load_image(i) -> PIL RGB
    bank.indices("eval")                           # the evaluation part: never seen by search or selection

No text-to-image model ships on a package registry, so offline the bank stands in for the generator: "rendering" a
prompt retrieves the bank pictures whose descriptions are nearest to it (`nacosae.naming.pool`). This module is the
one owner of the bank's pictures, their descriptions and their splits.

Sources:
- Open Clip Art (Debian `openclipart-png`), the cleaned listing of `nacosae.images.OpenClipArtSource`. Description:
  the readable file name (`nacosae.images.describe_openclipart`: no author, no numbering) reduced to English words a
  person knows (`openclipart_filename_words.txt`, WordNet lemmas) minus file-system words ("icon", "mimetypes"); a
  file name with none falls back to its folder ("big cats").
- Noto Color Emoji (Debian `fonts-noto-color-emoji`), rendered by Pillow at the font's 109 px strike onto white,
  described by the English CLDR annotation (Debian `unicode-cldr-core`): "dog face", keywords "dog | face | pet".
  Skin-tone variants are left out (they repeat a picture in another colour).
- The scikit-image photos (astronaut, cat, coffee, ...), described by hand-checked captions.

Splits are by *family*, never by image, so the held-out parts hold no near-copy of a searched picture (issue 8): two
pictures are one family when they share a normalised description ("star" ×1,379), an icon theme or a numbered series
folder (an icon set, the flags, the AIGA symbols, the road signs), or an emoji base. Families are connected components
of those links; they are dealt to the splits largest first, each to the split furthest below its target share, so the
shares hold even with a few big families; ties are broken by a hash of the family key (seeded), never by file order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
import xml.etree.ElementTree as ET
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nacosae.images import OPENCLIPART_ROOT, cache_dir, describe_openclipart, open_image, pad_to_square
from nacosae.io import atomic_write_json

SPLITS = ("search", "select", "eval")
"""search: the naming loop scores prompts here; select: the final name is chosen here; eval: CoSy only."""
SPLIT_SHARES = {"search": 0.45, "select": 0.2, "eval": 0.35}
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CLDR_DIR = Path("/usr/share/unicode/cldr/common")
EMOJI_STRIKE_PX = 109
"""Noto Color Emoji's only bitmap strike: other sizes fail to load."""
SOURCES = ("openclipart", "emoji", "skimage")
BANK_VERSION = 1
"""Bumped whenever descriptions, families or splits change: pools and results name the bank by `Bank.id`."""

# file names of icon themes describe actions and files, not pictures
_FILESYSTEM_WORDS = {
    "icon", "icons", "mimetypes", "mimetype", "theme", "themes", "application", "applications", "action", "actions",
    "app", "apps", "file", "files", "document", "x", "generic", "format", "default", "symbolic", "status", "emblem",
    "emblems", "places", "devices", "categories", "category", "mime", "stock", "gtk", "gnome", "kde", "small", "large",
    "big", "new", "old", "left", "right", "top", "bottom", "up", "down", "border", "inline", "view", "edit", "insert",
    "go", "text", "object", "media", "png", "svg", "version", "alt", "clip", "art", "clipart", "image", "picture",
}
_NOISE_FOLDERS = {"special", "unsorted", "duplicates", "examples", "miscellany", "generic", "stock", "misc"}
# numbered series: every picture of the folder is one family (a style, not a concept, ties them)
_SERIES_FOLDER = re.compile(r"(-theme$|^aiga|^flags?$|roadsigns|^map_symbols$|^icons$|^gradients$|^patterns$)")
_FUNCTION_WORDS = {"and", "with", "of", "the", "a", "an", "in", "on", "for", "to", "at", "by", "or", "no", "not"}
_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
SKIMAGE_CAPTIONS = {
    "astronaut": ("astronaut", ("astronaut", "person", "woman", "flag", "space suit")),
    "chelsea": ("cat", ("cat", "animal", "pet")),
    "coffee": ("cup of coffee", ("coffee", "cup", "drink")),
    "rocket": ("rocket", ("rocket", "launch", "space")),
    "horse": ("horse silhouette", ("horse", "animal", "silhouette")),
    "camera": ("cameraman", ("man", "camera", "person")),
    "hubble_deep_field": ("galaxies in space", ("galaxy", "space", "star")),
    "immunohistochemistry": ("stained tissue under a microscope", ("tissue", "cell", "microscope")),
    "moon": ("moon surface", ("moon", "crater")),
    "page": ("page of text", ("page", "text", "paper")),
    "text": ("handwritten text", ("text", "writing")),
    "coins": ("coins", ("coin", "money")),
    "retina": ("retina", ("eye", "retina", "blood vessel")),
    "checkerboard": ("checkerboard", ("checkerboard", "pattern")),
    "clock": ("clock", ("clock", "time")),
}


@dataclass(frozen=True)
class BankItem:
    """One picture of the bank."""

    item_id: str
    """Unique and stable: "openclipart/<path below the root>", "emoji/<code points>", "skimage/<name>"."""
    source: str
    """One of `SOURCES`."""
    description: str
    """Clean English: the text a prompt is matched against and a candidate name."""
    keywords: tuple[str, ...]
    """Single English words for the picture (CLDR keywords; description words): candidate names too."""
    label: str
    """A category: the Open Clip Art top folder, "emoji", "photo" (the top-label baseline and purity)."""
    family: str
    """Pictures of one family are in one split."""
    split: str
    """One of `SPLITS`."""
    locator: str
    """How to get the pixels: a file path, the emoji string, a scikit-image name."""


class Bank:
    """The described pictures of `offline_bank`, with their splits; images are decoded lazily (a small LRU cache)."""

    def __init__(self, items: Sequence[BankItem], image_cache_size: int = 256):
        if not items:
            raise ValueError("a bank needs at least one picture")
        ids = [it.item_id for it in items]
        if len(set(ids)) != len(ids):
            raise ValueError("bank item ids must be unique")
        bad = {it.split for it in items} - set(SPLITS)
        if bad:
            raise ValueError(f"unknown splits {sorted(bad)}; splits are {SPLITS}")
        self.items = list(items)
        self._cache: OrderedDict[int, Image.Image] = OrderedDict()
        self._cache_size = image_cache_size

    def __len__(self) -> int:
        return len(self.items)

    @property
    def id(self) -> str:
        """A hash of every id, description, family and split: pools and results record which bank they used."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.item_id}\t{it.description}\t{it.family}\t{it.split}\n".encode())
        return f"bank-v{BANK_VERSION}:{len(self)}:{h.hexdigest()[:16]}"

    def index_of(self, item_id: str) -> int:
        """The index of an item id (KeyError if absent)."""
        if not hasattr(self, "_index"):
            self._index = {it.item_id: i for i, it in enumerate(self.items)}
        return self._index[item_id]

    def indices(self, split: str) -> np.ndarray:
        """Item indices of one split, ascending."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
        return np.array([i for i, it in enumerate(self.items) if it.split == split], dtype=np.int64)

    def prompts(self, split: str) -> list[str]:
        """The bank's own candidate names in one split: every description and keyword, each once, in item order."""
        out = []
        for i in self.indices(split):
            it = self.items[int(i)]
            out.append(it.description)
            out.extend(it.keywords)
        return list(dict.fromkeys(p for p in out if p))

    def load_image(self, i: int) -> Image.Image:
        """Picture i as RGB, padded to a white square (a later resize keeps the whole object, ASSETS.md)."""
        i = int(i)
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        it = self.items[i]
        if it.source == "emoji":
            im = render_emoji(it.locator)
        elif it.source == "skimage":
            import skimage.data

            arr = getattr(skimage.data, it.locator)()
            im = pad_to_square(open_image(arr, where=it.item_id))
        else:
            im = pad_to_square(open_image(it.locator))
            if max(im.size) > 512:
                im = im.resize((512, 512), Image.Resampling.BICUBIC)
        self._cache[i] = im
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return im

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(Path(path), {"bank_version": BANK_VERSION, "items": [asdict(it) for it in self.items]})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Bank":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("bank_version") != BANK_VERSION:
            raise ValueError(f"{path} holds bank version {data.get('bank_version')}, this nacosae makes {BANK_VERSION}")
        return cls([BankItem(**{**d, "keywords": tuple(d["keywords"])}) for d in data["items"]])


# ----------------------------------------------------------------------------------------------------------------
# Descriptions


@lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """English words allowed in a bank description (WordNet lemmas seen in Open Clip Art file names, CLDR keywords
    are English by construction)."""
    from nacosae.naming.vocab import openclipart_filename_words

    return frozenset(openclipart_filename_words()) - _FILESYSTEM_WORDS


def _clean_folder(name: str) -> str:
    name = re.sub(r"[-_]+", " ", name.lower())
    return " ".join(t for t in name.split() if t not in _FILESYSTEM_WORDS and not t.isdigit() and t != "theme")


def openclipart_description(rel_path: str | Path, folder_fallback: bool = True) -> tuple[str, tuple[str, ...]]:
    """(description, keywords) of an Open Clip Art picture from its path below the root.

    `animals/mammals/big_cats/lion_roaring_john_doe_01.png` → ("lion roaring", ("lion", "roaring")); a file name with
    no English word falls back to the nearest folder that names something ("big cats"), else ("", ()).
    """
    parts = Path(rel_path).parts
    allowed = english_words()
    words = [w for w in describe_openclipart(parts[-1]).split() if w in allowed]
    words = list(dict.fromkeys(words))
    if words or not folder_fallback:
        return " ".join(words), tuple(words)
    for folder in reversed(parts[:-1]):
        name = _clean_folder(folder)
        if name and folder.lower() not in _NOISE_FOLDERS and not _SERIES_FOLDER.search(folder.lower()):
            return name, tuple(name.split())
    return "", ()


def _norm_key(text: str) -> str:
    return " ".join(sorted(set(re.sub(r"[^a-z ]+", " ", text.lower()).split())))


# ----------------------------------------------------------------------------------------------------------------
# Emoji


@lru_cache(maxsize=1)
def _emoji_font() -> ImageFont.FreeTypeFont:
    if not EMOJI_FONT.is_file():
        raise FileNotFoundError(f"{EMOJI_FONT} not found: apt-get install fonts-noto-color-emoji")
    return ImageFont.truetype(str(EMOJI_FONT), EMOJI_STRIKE_PX)


def render_emoji(chars: str, size: int = 160) -> Image.Image:
    """One emoji drawn onto a white `size`² RGB square with the font's colour bitmaps (centred)."""
    font = _emoji_font()
    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)
    left, top, right, bottom = draw.textbbox((0, 0), chars, font=font, embedded_color=True)
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), chars, font=font,
              embedded_color=True)
    return im


def _drawn(chars: str) -> bool:
    """Whether the font has a colour picture for `chars` (not blank, not one flat colour, one glyph wide)."""
    im = render_emoji(chars, size=128)
    lo, hi = im.convert("L").getextrema()
    if hi - lo < 30:
        return False
    font = _emoji_font()
    w = ImageDraw.Draw(im).textlength(chars, font=font, embedded_color=True)
    return w <= 1.5 * EMOJI_STRIKE_PX  # a ZWJ sequence the font cannot join draws as several pictures


def emoji_annotations(cldr_dir: str | os.PathLike = CLDR_DIR) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{emoji: (CLDR short name, keywords)} from CLDR's English annotations (+ the derived ones for sequences),
    skin-tone variants left out."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for rel in ("annotations/en.xml", "annotationsDerived/en.xml"):
        path = Path(cldr_dir) / rel
        if not path.is_file():
            if rel.startswith("annotations/"):
                raise FileNotFoundError(f"{path} not found: apt-get install unicode-cldr-core")
            continue
        names, keywords = {}, {}
        for el in ET.parse(path).getroot().iter("annotation"):
            cp = el.get("cp")
            if not cp or set(cp) & _SKIN_TONES:
                continue
            if el.get("type") == "tts":
                names[cp] = (el.text or "").strip()
            else:
                keywords[cp] = tuple(k.strip().lower() for k in (el.text or "").split("|") if k.strip())
        for cp, name in names.items():
            out.setdefault(cp, (name.lower(), keywords.get(cp, ())))
    return out


def _is_emoji(cp: str) -> bool:
    return any(unicodedata.category(c) == "So" or 0x1F000 <= ord(c) <= 0x1FAFF for c in cp)


def emoji_items(cldr_dir: str | os.PathLike = CLDR_DIR, progress: bool = True) -> list[tuple[str, str, tuple[str, ...]]]:
    """(emoji, description, keywords) for every CLDR-annotated emoji the font draws (checked by rendering once;
    the list is cached under `nacosae.images.cache_dir()`)."""
    ann = emoji_annotations(cldr_dir)
    key = hashlib.sha256(("\n".join(sorted(ann)) + str(EMOJI_FONT.stat().st_size)).encode()).hexdigest()[:16]
    cache = cache_dir() / f"emoji_drawn_{key}.json"
    if cache.is_file():
        drawn = set(json.loads(cache.read_text(encoding="utf-8")))
    else:
        from tqdm.auto import tqdm

        cands = [cp for cp in ann if _is_emoji(cp)]
        drawn = {cp for cp in tqdm(cands, desc="emoji: checking the font", disable=not progress) if _drawn(cp)}
        atomic_write_json(cache, sorted(drawn))
    out = []
    for cp, (name, kws) in ann.items():
        if cp not in drawn or not name:
            continue
        # CLDR keywords are English words or short phrases ("cat", "face with tears of joy"): keep them whole,
        # never split into their function words ("and", "with")
        words = tuple(dict.fromkeys(k for k in kws if re.fullmatch(r"[a-z][a-z' -]*[a-z]", k) and k not in _FUNCTION_WORDS))
        out.append((cp, name, words))
    return out


def _emoji_base(cp: str) -> str:
    """The emoji without variation selectors, gender signs and ZWJ parts after the first: its family."""
    return cp.split("\u200d")[0].replace("\ufe0f", "")


# ----------------------------------------------------------------------------------------------------------------
# Families and splits


def family_splits(links: Sequence[Sequence[str]], shares: dict[str, float] = SPLIT_SHARES, seed: int = 0
                  ) -> tuple[list[str], list[str]]:
    """(family, split) per item. `links[i]` are keys of item i; items sharing any key are one family (union-find).

    Families are dealt largest first to the split furthest below its share (ties: seeded hash of the family), so each
    split's share of items is as close to `shares` as the family sizes allow. Raises ValueError on bad shares.
    """
    if set(shares) != set(SPLITS) or any(v <= 0 for v in shares.values()):
        raise ValueError(f"shares must give a positive share to each of {SPLITS}, got {shares}")
    parent = list(range(len(links)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, keys in enumerate(links):
        for k in keys:
            j = first.setdefault(k, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(links)):
        members[find(i)].append(i)
    # a family's name: its most common key (stable), so ids read well in the results
    fam_name = {}
    for root, idx in members.items():
        counts: dict[str, int] = defaultdict(int)
        for i in idx:
            for k in links[i]:
                counts[k] += 1
        fam_name[root] = min(counts, key=lambda k: (-counts[k], k)) if counts else f"item{root}"

    def tiebreak(root):
        return hashlib.sha256(f"{seed}|{fam_name[root]}".encode()).hexdigest()

    total = sum(shares.values())
    target = {s: shares[s] / total * len(links) for s in SPLITS}
    filled = dict.fromkeys(SPLITS, 0)
    split_of = {}
    for root in sorted(members, key=lambda r: (-len(members[r]), tiebreak(r))):
        s = min(SPLITS, key=lambda s: (filled[s] / target[s], SPLITS.index(s)))
        split_of[root] = s
        filled[s] += len(members[root])
    return [fam_name[find(i)] for i in range(len(links))], [split_of[find(i)] for i in range(len(links))]


# ----------------------------------------------------------------------------------------------------------------
# The bank


def offline_bank(sources: Sequence[str] = SOURCES, openclipart_root: str | os.PathLike = OPENCLIPART_ROOT,
                 seed: int = 0, progress: bool = True, max_items: int | None = None) -> Bank:
    """The natural offline bank (module docstring). `max_items`: a seeded subset (tests, quick runs), drawn by family
    so the splits stay family-aware. Raises FileNotFoundError naming the Debian package of a missing source."""
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown bank sources {sorted(unknown)}; choose from {SOURCES}")
    rows: list[tuple[str, str, str, tuple[str, ...], str, str, list[str]]] = []  # id, source, desc, kws, label, loc, links
    if "openclipart" in sources:
        from nacosae.images import OpenClipArtSource

        root = Path(openclipart_root)
        for rec in OpenClipArtSource(root).records():
            rel = Path(rec.path).relative_to(root)
            desc, kws = openclipart_description(rel)
            if not desc:
                continue  # nothing names it ("unsorted/xyz_01.png"): it could never be retrieved by a prompt
            series = [i for i, p in enumerate(rel.parts[:-1]) if _SERIES_FOLDER.search(p.lower())]
            # a series (icon theme, flags) is one family on its own: linking its members by description too would
            # chain every theme that has a "star" icon to the 1,379 stars into one giant family
            links = ["series:" + "/".join(rel.parts[: series[-1] + 1])] if series else [f"desc:{_norm_key(desc)}"]
            rows.append((f"openclipart/{rel.as_posix()}", "openclipart", desc, kws, rel.parts[0], str(rec.path), links))
    if "emoji" in sources:
        for cp, name, kws in emoji_items(progress=progress):
            code = "-".join(f"{ord(c):x}" for c in cp if c != "\ufe0f")
            rows.append((f"emoji/{code}", "emoji", name, kws, "emoji", cp,
                         [f"desc:{_norm_key(name)}", f"emoji:{_emoji_base(cp)}"]))
    if "skimage" in sources:
        for name, (desc, kws) in SKIMAGE_CAPTIONS.items():
            rows.append((f"skimage/{name}", "skimage", desc, kws, "photo", name, [f"desc:{_norm_key(desc)}"]))
    if not rows:
        raise ValueError("the bank is empty: give at least one source")
    families, splits = family_splits([r[6] for r in rows], seed=seed)
    items = [BankItem(r[0], r[1], r[2], r[3], r[4], fam, sp, r[5]) for r, fam, sp in zip(rows, families, splits)]
    if max_items is not None and max_items < len(items):
        rng = np.random.default_rng(seed)
        fams = sorted({it.family for it in items})
        order = rng.permutation(len(fams))
        keep, n = set(), 0
        by_fam = defaultdict(list)
        for it in items:
            by_fam[it.family].append(it)
        for f in (fams[i] for i in order):
            if n >= max_items:
                break
            keep.add(f)
            n += len(by_fam[f])
        items = [it for it in items if it.family in keep]
    return Bank(items)
