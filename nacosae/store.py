"""Activation store: safetensors shards + `meta.json`, read back as a bounded-memory, shuffled batch stream.

Folder layout (every file written atomically with `nacosae.io`; a shard is listed only once fully written):

    meta.json                                   schema, provenance, dtype, d, tokens_per_image, shards, skipped, complete
    images.jsonl                                one line per extracted image: image_idx + its ImageRecord fields
    shards/rank{r:03d}-{i:06d}.safetensors      acts_ND (stored dtype), image_idx_N (int64), token_idx_N (int32)
    shards/rank{r:03d}-{i:06d}.images.jsonl     that shard's images (merged into images.jsonl by `finalize_store`)
    progress/rank{r:03d}.json                   one rank's resume state, rewritten after each shard

Rows inside a shard are image-major (the T tokens of one image, then the next image). Each rank owns a contiguous
slice of image indices and writes shards over consecutive ranges of it, so shards sorted by `image_start` are the
store in image order. Shapes use suffixes: N rows (or images), T tokens per image, D channels, B batch.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from nacosae import __version__
from nacosae.io import atomic_save_safetensors, atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1
META_NAME = "meta.json"
IMAGES_NAME = "images.jsonl"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# What must match for two runs to write into the same store (world_size only while the store is incomplete).
RUN_KEYS = ("provenance", "dtype", "n_images_total", "source", "world_size")


class StoreError(ValueError):
    """A store that cannot be opened or extended as asked: missing, corrupt, incomplete, or made by another run."""


def shard_file(rank: int, index: int) -> str:
    """Path of one shard relative to the store folder."""
    return f"shards/rank{rank:03d}-{index:06d}.safetensors"


def progress_file(rank: int) -> str:
    return f"progress/rank{rank:03d}.json"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON ({e}): the {what} is corrupt; delete the store folder and extract "
                         "again") from e
    if not isinstance(obj, dict):
        raise StoreError(f"{path} does not hold a JSON object: the {what} is corrupt")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema_version {version!r}; this nacosae ({__version__}) reads store schema {SCHEMA_VERSION}. "
            "Re-extract the store with this version, or install the nacosae version that wrote it"
        )
    return obj


def _run_diff(old: dict[str, Any], new: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """Names of the run settings that differ (compared as JSON so tuples and lists are equal)."""
    norm = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731
    return [k for k in keys if norm(old.get(k)) != norm(new.get(k))]


def check_same_run(path: Path, stored: dict[str, Any], run: dict[str, Any], keys: Sequence[str] = RUN_KEYS) -> None:
    """Raise `StoreError` when `run` would write activations of another kind into the store at `path`."""
    diff = _run_diff(stored, run, keys)
    if diff == ["world_size"]:
        raise StoreError(f"{path} is a half-finished extraction by {stored['world_size']} process(es); resume it with the "
                         f"same number (this run has {run['world_size']}), or delete the folder to start over")
    if diff:
        parts = []
        for k in diff:
            old, new = stored.get(k), run.get(k)
            if isinstance(old, dict) and isinstance(new, dict):  # name only the fields that differ
                sub = _run_diff(old, new, sorted(set(old) | set(new)))
                old, new = {s: old.get(s) for s in sub}, {s: new.get(s) for s in sub}
            parts.append(f"{k}: store has {old!r}, this run asks for {new!r}")
        raise StoreError(
            f"{path} holds activations from a different extraction ({'; '.join(parts)}). "
            "Choose another output folder, or delete this one to start over; stores are never mixed"
        )


# ==================================================================== writing (one object per rank)
class StoreWriter:
    """One rank's side of an extraction: writes its shards and an atomically rewritten progress file.

    The progress file is the resume point: it lists the shards that are fully on disk and the first image index
    not yet covered. A process killed mid-shard leaves at most an unlisted shard file, which the resumed run
    overwrites.
    """

    def __init__(self, out_dir: str | os.PathLike, run: dict[str, Any], rank: int, image_start: int, image_stop: int):
        self.path = Path(out_dir)
        self.run = {k: run[k] for k in RUN_KEYS}
        self.rank = rank
        meta_path = self.path / META_NAME
        if meta_path.exists():
            check_same_run(self.path, _read_json(meta_path, "store metadata"), self.run)
        prog_path = self.path / progress_file(rank)
        if prog_path.exists():
            state = _read_json(prog_path, "progress file")
            check_same_run(self.path, state["run"], self.run)
            if (state["image_start"], state["image_stop"]) != (image_start, image_stop):
                raise StoreError(f"{prog_path} covers images [{state['image_start']}, {state['image_stop']}), this rank now "
                                 f"gets [{image_start}, {image_stop}): same source and world size are needed to resume")
        else:
            state = {"schema_version": SCHEMA_VERSION, "run": self.run, "rank": rank, "image_start": image_start,
                     "image_stop": image_stop, "next_image": image_start, "d": None, "tokens_per_image": None,
                     "shards": [], "skipped": [], "done": False}
            atomic_write_json(prog_path, state)
        if not meta_path.exists():
            # Written first so that opening a half-made store says "incomplete", not "no store here". Every rank
            # may write it: the content is the same run record, and the write is atomic.
            atomic_write_json(meta_path, {"schema_version": SCHEMA_VERSION, "library": "nacosae", "library_version": __version__,
                                          **self.run, "complete": False})
        self.state = state

    @property
    def next_image(self) -> int:
        """First image index of this rank's slice that no written shard covers yet."""
        return self.state["next_image"]

    @property
    def done(self) -> bool:
        return self.state["done"]

    def write_shard(self, acts_ND: Tensor, image_idx_N: Tensor, token_idx_N: Tensor, images: list[dict[str, Any]],
                    image_stop: int, skipped: list[dict[str, Any]]) -> None:
        """Persist the images [next_image, image_stop): their rows (possibly none, if all were skipped), table and skips."""
        state = self.state
        dtype = DTYPES[self.run["dtype"]]
        if acts_ND.dtype != dtype:
            raise TypeError(f"shard activations are {acts_ND.dtype}, the store holds {dtype}")
        if not image_stop > state["next_image"] or image_stop > state["image_stop"]:
            raise ValueError(f"shard end {image_stop} outside ({state['next_image']}, {state['image_stop']}]")
        n_rows = acts_ND.shape[0]
        entry = None
        if n_rows:
            d, n_img = acts_ND.shape[1], len(images)
            if n_rows % n_img:
                raise ValueError(f"{n_rows} rows for {n_img} images: every image must have the same number of tokens")
            t = n_rows // n_img
            for key, value in (("d", d), ("tokens_per_image", t)):
                if state[key] is not None and state[key] != value:
                    raise StoreError(f"{key} changed from {state[key]} to {value} within one extraction")
                state[key] = value
            name = shard_file(self.rank, len(state["shards"]))
            atomic_save_safetensors(self.path / name, {"acts_ND": acts_ND, "image_idx_N": image_idx_N.to(torch.int64),
                                                       "token_idx_N": token_idx_N.to(torch.int32)},
                                    metadata={"format": "pt", "schema_version": str(SCHEMA_VERSION)})
            atomic_write_text(self.path / _images_sidecar(name), "".join(json.dumps(r, sort_keys=True) + "\n" for r in images))
            entry = {"file": name, "rank": self.rank, "n_rows": n_rows, "n_images": n_img,
                     "image_start": state["next_image"], "image_stop": image_stop}
        # Only now, with the shard and its table on disk, does the progress file list them.
        state = {**state, "shards": state["shards"] + ([entry] if entry else []), "skipped": state["skipped"] + list(skipped),
                 "next_image": image_stop}
        atomic_write_json(self.path / progress_file(self.rank), state)
        self.state = state

    def mark_done(self, source_skipped: Sequence[dict[str, Any]] = ()) -> None:
        """Record that this rank's slice is complete, with the images its source dropped before indexing them
        (duplicates, blanks, ...: reports with image_idx None)."""
        if self.state["next_image"] != self.state["image_stop"]:
            raise RuntimeError(f"rank {self.rank} stopped at image {self.state['next_image']} of {self.state['image_stop']}")
        self.state = {**self.state, "source_skipped": list(source_skipped), "done": True}
        atomic_write_json(self.path / progress_file(self.rank), self.state)


def _images_sidecar(shard_name: str) -> str:
    return shard_name.removesuffix(".safetensors") + ".images.jsonl"


def finalize_store(out_dir: str | os.PathLike) -> bool:
    """Merge the per-rank progress files into `meta.json` + `images.jsonl` and mark the store complete.

    Returns False (and changes nothing) while some rank has not finished; True once the store is complete.
    Safe to call from several processes: every call writes the same files atomically.
    """
    path = Path(out_dir)
    meta_path = path / META_NAME
    if not meta_path.exists():
        raise StoreError(f"{path} has no {META_NAME}: no extraction was started there")
    meta0 = _read_json(meta_path, "store metadata")
    if meta0.get("complete"):
        return True
    world_size = meta0["world_size"]
    states = []
    for r in range(world_size):
        p = path / progress_file(r)
        if not p.exists():
            return False
        state = _read_json(p, "progress file")
        if not state["done"]:
            return False
        check_same_run(path, meta0, state["run"])
        states.append(state)
    shards = sorted((s for st in states for s in st["shards"]), key=lambda s: s["image_start"])
    if not shards:
        raise StoreError(f"no image of the source could be read ({sum(len(st['skipped']) for st in states)} skipped): "
                         f"see the 'skipped' lists in {path / 'progress'}")
    for key in ("d", "tokens_per_image"):
        values = {st[key] for st in states if st[key] is not None}
        if len(values) != 1:
            raise StoreError(f"ranks disagree on {key}: {sorted(values)}")
    lines = []
    for s in shards:
        lines.append((path / _images_sidecar(s["file"])).read_text())
    skipped = sorted((k for st in states for k in st["skipped"]), key=lambda k: k["image_idx"])
    seen = set()  # every rank saw the same listing: keep each source-level skip once
    for k in (k for st in states for k in st.get("source_skipped", [])):
        if (k["path"], k["reason"]) not in seen:
            seen.add((k["path"], k["reason"]))
            skipped.append(k)
    atomic_write_text(path / IMAGES_NAME, "".join(lines))
    meta = {
        "schema_version": SCHEMA_VERSION, "library": "nacosae", "library_version": __version__,
        **{k: meta0[k] for k in RUN_KEYS},
        "layer": meta0["provenance"].get("layer"), "tokens": meta0["provenance"].get("tokens"),
        "d": next(st["d"] for st in states if st["d"] is not None),
        "tokens_per_image": next(st["tokens_per_image"] for st in states if st["tokens_per_image"] is not None),
        "n_images": sum(s["n_images"] for s in shards), "n_rows": sum(s["n_rows"] for s in shards),
        "shards": shards, "skipped": skipped, "complete": True,
    }
    atomic_write_json(meta_path, meta)
    return True


# ==================================================================== reading
def split_images(image_idx, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_image_idx, val_image_idx), disjoint and sorted: a seeded split of these image indices, the rule of
    `ActivationStore.split` (and of `nacosae.stream.BackboneStream.split`, so a stream and a store of the same images
    hold out the same ones). Raises ValueError for a val_fraction outside [0, 1)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(np.asarray(image_idx, dtype=np.int64))
    n_val = int(round(val_fraction * len(perm)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(x_ND: Tensor) -> np.ndarray:
    """The raw bits of a CPU tensor as a numpy array sharing its memory (works for bfloat16, which numpy lacks)."""
    return x_ND.view(_SAME_SIZE_INT[x_ND.element_size()]).numpy()


def _take_rows(x_ND: Tensor, idx: np.ndarray) -> Tensor:
    """x_ND[idx] for a CPU tensor, through numpy's take on the raw bits: about 4× faster than torch's fancy indexing
    on float16 rows (and it works for bfloat16, which numpy has no type for)."""
    return torch.from_numpy(_as_bits(x_ND).take(idx, axis=0)).view(x_ND.dtype)


class ActivationStore:
    """A complete store on disk. Nothing is loaded up front beyond `meta.json`; readers hold one shard, or one bounded
    buffer of chunks, at a time.

        store = ActivationStore("runs/acts")
        train_images, val_images = store.split(0.1, seed=0)
        for x_BD in store.iter_batches(4096, rows=train_images, n_epochs=1): ...
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no activation store at {self.path} (not a folder): run hub_scripts/extract.py first")
        meta_path = self.path / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path} has no {META_NAME}: not an activation store written by nacosae")
        meta = _read_json(meta_path, "store metadata")
        if not meta.get("complete"):
            raise StoreError(f"the store at {self.path} is incomplete (the extraction is running or was stopped): re-run "
                             "the same extraction to resume it, or run finalize_store() if every rank has finished")
        required = ("dtype", "d", "tokens_per_image", "n_rows", "n_images", "n_images_total", "shards")
        missing_keys = [k for k in required if k not in meta]
        if missing_keys or meta["dtype"] not in DTYPES:
            raise StoreError(f"{meta_path} lacks {missing_keys} or has an unknown dtype {meta.get('dtype')!r}: corrupt metadata")
        missing = [s["file"] for s in meta["shards"] if not (self.path / s["file"]).is_file()]
        if missing:
            raise StoreError(f"{self.path} lists {len(missing)} shard(s) that are not on disk (e.g. {missing[0]}): "
                             "the store was copied partially; copy it again or re-extract")
        self.meta = meta
        self.d: int = meta["d"]
        self.tokens_per_image: int = meta["tokens_per_image"]
        self.dtype: torch.dtype = DTYPES[meta["dtype"]]
        self.shards: list[dict[str, Any]] = sorted(meta["shards"], key=lambda s: s["image_start"])
        self._starts = np.array([s["image_start"] for s in self.shards], dtype=np.int64)

    def __len__(self) -> int:
        return self.meta["n_rows"]

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, rows={len(self)}, images={self.meta['n_images']}, d={self.d}, "
                f"T={self.tokens_per_image}, dtype={self.meta['dtype']}, shards={len(self.shards)})")

    @property
    def provenance(self) -> dict[str, Any]:
        return self.meta["provenance"]

    @cached_property
    def images(self) -> list[dict[str, Any]]:
        """The images table, ordered by image_idx (only images that have rows; skipped ones are in meta['skipped'])."""
        p = self.path / IMAGES_NAME
        if not p.is_file():
            raise StoreError(f"{self.path} has no {IMAGES_NAME}: the store is corrupt; re-run finalize_store or re-extract")
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return sorted(rows, key=lambda r: r["image_idx"])

    @cached_property
    def image_idx(self) -> np.ndarray:
        """(N_images,) sorted global indices of the images that have rows."""
        idx = np.array([r["image_idx"] for r in self.images], dtype=np.int64)
        if len(idx) != self.meta["n_images"]:
            raise StoreError(f"{IMAGES_NAME} has {len(idx)} images, meta.json says {self.meta['n_images']}: corrupt store")
        return idx

    # ---------------------------------------------------------------- selections by image
    def split(self, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(train_image_idx, val_image_idx), disjoint and sorted: a split by image, so no image is on both sides.

        Pass either to `rows=` of the readers. (Deduplicate images upstream: identical copies are distinct images here.)
        """
        return split_images(self.image_idx, val_fraction, seed)

    def _image_mask(self, rows) -> np.ndarray | None:
        """Boolean mask over global image indices for a `rows=` selection (None = every row)."""
        if rows is None:
            return None
        sel = np.asarray(rows, dtype=np.int64).reshape(-1)
        n_total = self.meta["n_images_total"]
        if sel.size and (sel.min() < 0 or sel.max() >= n_total):
            raise ValueError(f"rows must be image indices in [0, {n_total}), got values in [{sel.min()}, {sel.max()}]")
        mask = np.zeros(n_total, dtype=bool)
        mask[sel] = True
        return mask

    def _rows_per_shard(self, mask: np.ndarray | None) -> np.ndarray:
        """Number of selected rows in each shard, from the images table (no shard is read)."""
        if mask is None:
            return np.array([s["n_rows"] for s in self.shards], dtype=np.int64)
        chosen = self.image_idx[mask[self.image_idx]]
        owner = np.searchsorted(self._starts, chosen, side="right") - 1
        return np.bincount(owner, minlength=len(self.shards)).astype(np.int64) * self.tokens_per_image

    def n_rows_in(self, rows=None) -> int:
        """Rows in a selection of images (`rows=None`: the whole store)."""
        return int(self._rows_per_shard(self._image_mask(rows)).sum())

    # ---------------------------------------------------------------- shard access (one place, so tests can watch it)
    def _load_shard(self, j: int, names: Sequence[str] = ("acts_ND", "image_idx_N", "token_idx_N")) -> dict[str, Tensor]:
        path = self.path / self.shards[j]["file"]
        try:
            with safe_open(path, framework="pt") as f:
                return {name: f.get_tensor(name) for name in names}
        except (SafetensorError, OSError) as e:
            raise StoreError(f"cannot read shard {path}: {e}. The file is corrupt; re-extract the store") from e

    # ---------------------------------------------------------------- chunked reads (memory-mapped slices)
    def _chunk_table(self, mask: np.ndarray | None, chunk_rows: int) -> np.ndarray:
        """(n_chunks, 4) int64 rows (shard, lo, hi, n): each shard's selected rows cut into chunks of `chunk_rows`
        (a shard's last chunk may be shorter); a chunk is the n selected rows among the shard's rows [lo, hi).

        Computed from the images table alone (no shard is read): rows are image-major, T per image, and a shard holds
        its images in index order.
        """
        T = self.tokens_per_image
        owner = np.searchsorted(self._starts, self.image_idx, side="right") - 1  # sorted, as image_idx is
        bounds = np.searchsorted(owner, np.arange(len(self.shards) + 1))
        parts = []
        for j, shard in enumerate(self.shards):
            imgs = self.image_idx[bounds[j]:bounds[j + 1]]
            if len(imgs) * T != shard["n_rows"]:
                raise StoreError(f"{shard['file']} has {shard['n_rows']} rows, {IMAGES_NAME} lists {len(imgs)} images of "
                                 f"{T} tokens for it: corrupt store; re-run finalize_store or re-extract")
            # Positions (within the shard, in images) of the selected images: every image when there is no mask.
            pos = np.arange(len(imgs)) if mask is None else np.flatnonzero(mask[imgs])
            first = np.arange(0, len(pos) * T, chunk_rows)  # index of each chunk's first row among the selected ones
            last = np.minimum(first + chunk_rows, len(pos) * T) - 1
            lo = pos[first // T] * T + first % T  # selected row s is shard row pos[s // T] * T + s % T
            hi = pos[last // T] * T + last % T + 1
            parts.append(np.stack([np.full_like(first, j), lo, hi, last + 1 - first], axis=1))
        return np.concatenate(parts).astype(np.int64)

    def _read_chunk(self, shards: _MappedShards, j: int, lo: int, hi: int, n: int, mask: np.ndarray | None) -> Tensor:
        """The n selected rows among rows [lo, hi) of shard j, in the store dtype, read from its memory map (only the
        bytes of those rows are touched)."""
        acts, image_idx = shards.slices(j)
        if mask is None:
            return acts[lo:hi]
        keep_N = mask[image_idx[lo:hi].numpy()]  # the chunk's image ids, from the shard itself
        if int(keep_N.sum()) != n:
            raise StoreError(f"{self.shards[j]['file']} rows [{lo}, {hi}) hold {int(keep_N.sum())} selected rows, the images "
                             f"table says {n}: corrupt store; re-extract it")
        if n == hi - lo:
            return acts[lo:hi]
        # A selection leaves gaps of whole images: read each run of selected rows on its own.
        edges_R = np.flatnonzero(np.diff(np.concatenate(([0], keep_N.view(np.int8), [0]))))
        return torch.cat([acts[lo + a:lo + b] for a, b in zip(edges_R[::2].tolist(), edges_R[1::2].tolist(), strict=True)])

    # ---------------------------------------------------------------- streaming readers
    def iter_batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, n_epochs: int | None = None, rows=None,
                     device: str | torch.device = "cpu", buffer_rows: int = 2**17, chunk_rows: int = 1024,
                     drop_last: bool = False) -> Iterator[Tensor]:
        """Yield float32 (B, D) batches, streaming: at most `buffer_rows` rows (plus one batch) are in memory at once.

        Every shard's selected rows are cut into chunks of `chunk_rows` rows. Each epoch permutes all chunks of all
        shards (seeded by (seed, epoch)) and fills a buffer with the next chunks, up to `buffer_rows` rows (about
        `buffer_rows // chunk_rows` chunks), so one buffer draws from all over the store rather than from a few shards
        (each a contiguous run of images, which sources list by category); the buffer's rows are yielded in random
        order, and fewer than `batch_size` leftover rows carry over into the next buffer. Mixing is i.i.d. down to the
        chunk: a larger `buffer_rows` or a smaller `chunk_rows` mixes finer; each chunk is one slice of a
        memory-mapped shard, so smaller chunks cost more reads. `shuffle=False` yields the rows in image order.
        `n_epochs=None` streams forever; otherwise the last, partial batch is yielded unless `drop_last`.
        `rows` restricts to the rows of these image indices (e.g. one side of `split`).
        The shards stay memory-mapped while iterating: pages read count in the process's resident set as file cache
        (reclaimable, shared with the OS cache); the reader's own memory is the buffer.
        """
        if batch_size <= 0 or buffer_rows <= 0 or chunk_rows <= 0:
            raise ValueError(f"batch_size, buffer_rows and chunk_rows must be positive, got {batch_size}, {buffer_rows}, "
                             f"{chunk_rows}")
        if chunk_rows > buffer_rows:
            raise ValueError(f"chunk_rows ({chunk_rows}) must be <= buffer_rows ({buffer_rows}): a buffer holds whole "
                             "chunks; raise buffer_rows or lower chunk_rows")
        if n_epochs is not None and n_epochs < 0:
            raise ValueError(f"n_epochs must be >= 0 or None, got {n_epochs}")
        mask = self._image_mask(rows)
        chunks = self._chunk_table(mask, chunk_rows)
        chunks = chunks[chunks[:, 3] > 0]
        if not len(chunks):
            raise StoreError("the selection has no rows: `rows` names no image of this store")
        shards = _MappedShards(self)
        carry_ND = torch.empty(0, self.d, dtype=self.dtype)
        epoch = 0
        while n_epochs is None or epoch < n_epochs:
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(len(chunks)) if shuffle else np.arange(len(chunks))
            for group in _fill_groups(chunks[order, 3], buffer_rows):
                part = chunks[order[group]]
                # One preallocated buffer, filled chunk by chunk: peak memory is the buffer plus one chunk.
                pool_ND = torch.empty(len(carry_ND) + int(part[:, 3].sum()), self.d, dtype=self.dtype)
                pool_ND[:len(carry_ND)] = carry_ND
                filled = len(carry_ND)
                del carry_ND
                # Chunk copies go through numpy: a plain memcpy each, where torch would start a parallel region per
                # chunk, which costs far more than the copy when the cores are busy (e.g. with the training step).
                pool_bits = _as_bits(pool_ND)
                for j, lo, hi, n in part.tolist():
                    pool_bits[filled:filled + n] = _as_bits(self._read_chunk(shards, j, lo, hi, n, mask))
                    filled += n
                del pool_bits
                n_full = filled // batch_size * batch_size
                if shuffle:
                    perm = rng.permutation(filled)
                    for i in range(0, n_full, batch_size):
                        yield _take_rows(pool_ND, perm[i:i + batch_size]).to(device).float()
                    carry_ND = _take_rows(pool_ND, perm[n_full:])
                    del perm
                else:
                    for i in range(0, n_full, batch_size):
                        yield pool_ND[i:i + batch_size].to(device).float()
                    carry_ND = pool_ND[n_full:].clone()
                del pool_ND
            epoch += 1
        if len(carry_ND) and not drop_last:
            yield carry_ND.to(device).float()

    @staticmethod
    def _select(tensors: dict[str, Tensor], mask: np.ndarray | None) -> Tensor:
        acts_ND = tensors["acts_ND"]
        if mask is None:
            return acts_ND
        return acts_ND[torch.from_numpy(mask[tensors["image_idx_N"].numpy()])]

    def sample(self, n: int, seed: int = 0, rows=None) -> Tensor:
        """(n, D) float32 rows drawn uniformly without replacement (e.g. to initialise an SAE), one shard in memory at a time."""
        mask = self._image_mask(rows)
        counts = self._rows_per_shard(mask)
        if not 0 < n <= counts.sum():
            raise ValueError(f"cannot sample {n} rows from a selection of {int(counts.sum())}")
        rng = np.random.default_rng(seed)
        per_shard = rng.multivariate_hypergeometric(counts, n)
        out_ND = torch.empty(n, self.d, dtype=torch.float32)
        filled = 0
        for j in np.flatnonzero(per_shard):
            acts_ND = self._select(self._load_shard(j, ("acts_ND", "image_idx_N")), mask)
            pick = torch.from_numpy(np.sort(rng.choice(len(acts_ND), size=per_shard[j], replace=False)))
            out_ND[filled:filled + len(pick)] = acts_ND[pick].float()
            filled += len(pick)
            del acts_ND  # before the next load, so one shard is resident at a time
        return out_ND[torch.from_numpy(rng.permutation(n))]

    def acts_for_images(self, image_idx: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """(acts_ND float32, image_idx_N, token_idx_N): all rows of these images, in the order asked, tokens in order."""
        want = np.asarray(image_idx, dtype=np.int64).reshape(-1)
        T = self.tokens_per_image
        missing = want[~np.isin(want, self.image_idx)]
        if len(missing):
            raise KeyError(f"images {missing[:5].tolist()} have no rows in this store (skipped or out of range)")
        owner = np.searchsorted(self._starts, want, side="right") - 1
        acts_NTD = torch.empty(len(want), T, self.d, dtype=torch.float32)
        token_NT = torch.empty(len(want), T, dtype=torch.int32)
        for j in np.unique(owner):
            t = self._load_shard(j)
            shard_img = t["image_idx_N"].numpy()[::T]  # image-major rows: one entry per image
            at = np.flatnonzero(owner == j)
            pos = np.searchsorted(shard_img, want[at])
            acts_NTD[at] = t["acts_ND"].view(-1, T, self.d)[torch.from_numpy(pos)].float()
            token_NT[at] = t["token_idx_N"].view(-1, T)[torch.from_numpy(pos)]
            del t
        image_NT = torch.from_numpy(want)[:, None].expand(-1, T)
        return acts_NTD.reshape(-1, self.d), image_NT.reshape(-1).clone(), token_NT.reshape(-1)

    def iter_images(self, batch_images: int = 64, rows=None,
                    device: str | torch.device = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (image_idx_N, acts_NTD float32) blocks of up to `batch_images` whole images, in image order.

        For per-image analyses (feature statistics): one shard in memory at a time, plus one block.
        """
        if batch_images <= 0:
            raise ValueError(f"batch_images must be positive, got {batch_images}")
        mask = self._image_mask(rows)
        T, D = self.tokens_per_image, self.d
        counts = self._rows_per_shard(mask)
        pend_img, pend_acts = [], []
        n_pend = 0
        for j in np.flatnonzero(counts):
            t = self._load_shard(j, ("acts_ND", "image_idx_N"))
            img_N = t["image_idx_N"][::T]
            acts_NTD = t["acts_ND"].view(-1, T, D)
            if mask is not None:
                keep = torch.from_numpy(mask[img_N.numpy()])
                img_N, acts_NTD = img_N[keep], acts_NTD[keep]
            del t
            start = 0
            while start < len(img_N):
                take = min(batch_images - n_pend, len(img_N) - start)
                pend_img.append(img_N[start:start + take])
                pend_acts.append(acts_NTD[start:start + take])
                n_pend += take
                start += take
                if n_pend == batch_images:
                    yield torch.cat(pend_img), torch.cat(pend_acts).to(device).float()
                    pend_img, pend_acts, n_pend = [], [], 0
            # A partial block must not keep this shard alive (as a view) while the next one loads.
            pend_img, pend_acts = [x.clone() for x in pend_img], [x.clone() for x in pend_acts]
            del img_N, acts_NTD
        if n_pend:
            yield torch.cat(pend_img), torch.cat(pend_acts).to(device).float()


def _fill_groups(sizes_C: np.ndarray, buffer_rows: int) -> Iterator[np.ndarray]:
    """Consecutive runs of chunk positions whose sizes sum to at most `buffer_rows` (greedy; every size <= buffer_rows)."""
    start, total = 0, 0
    for i, n in enumerate(sizes_C.tolist()):
        if total + n > buffer_rows:
            yield np.arange(start, i)
            start, total = i, 0
        total += n
    yield np.arange(start, len(sizes_C))


class _MappedShards:
    """The shards one reader iterates over, each opened (memory-mapped) on first use and kept open until the reader
    is dropped, so reading a chunk is one slice of an open map, not a reopen."""

    def __init__(self, store: ActivationStore):
        self.store = store
        self._open: dict[int, tuple[Any, Any, Any]] = {}

    def slices(self, j: int) -> tuple[Any, Any]:
        """(acts_ND, image_idx_N) slice handles of shard j: `handle[a:b]` reads rows [a, b) into a tensor."""
        if j not in self._open:
            shard = self.store.shards[j]
            path = self.store.path / shard["file"]
            try:
                f = safe_open(path, framework="pt")
                acts, image_idx = f.get_slice("acts_ND"), f.get_slice("image_idx_N")
                shapes = acts.get_shape(), image_idx.get_shape()
            except (SafetensorError, OSError) as e:
                raise StoreError(f"cannot read shard {path}: {e}. The file is corrupt; re-extract the store") from e
            if list(shapes[0]) != [shard["n_rows"], self.store.d] or list(shapes[1]) != [shard["n_rows"]]:
                raise StoreError(f"shard {path} holds tensors of shapes {shapes}, meta.json says {shard['n_rows']} rows of "
                                 f"d={self.store.d}: corrupt store; re-extract it")
            self._open[j] = (f, acts, image_idx)
        return self._open[j][1:]
