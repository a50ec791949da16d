"""The render pool: every render (or bank picture) encoded once, its image-level code shared by all features (METHODS §3.1b).

    pool = RenderPool.open("runs/naming/pool", sae_meta)      # refuses a pool made for another SAE / layer / bank
    pool.add(rows, codes_NS)                                   # one atomic chunk; a killed run keeps finished chunks
    pool.codes(row_idx) -> (n, d_sae) float32                  # dense view of some renders' codes
    encode_images(images, encoder) -> (n, d_sae)               # backbone + SAE + token aggregation, once per image

One backbone + SAE pass over an image gives the image-level activation of *every* feature, so scoring any prompt for
any feature is a lookup into the pool. A row is one image: `render_id`, the `prompt` and `seed` that made it (for bank
pictures: the item id and its description), its `split` (search / select / eval, METHODS §3.1b) and its code.

Codes are stored sparse, CSR per chunk (all nonzero entries; float16 values, the activation store's precision, and
int16 indices below 32,768 features): small for TopK SAEs (an image-level max over T tokens has at most T·k nonzeros). A chunk is one safetensors file written atomically, its rows' metadata in
the file's header, so a chunk is either whole or absent; `meta.json` names what the codes were made with.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from nacosae.io import atomic_save_safetensors, atomic_write_json

POOL_VERSION = 1


class PoolMismatchError(ValueError):
    """The pool folder was made with another SAE, layer, aggregation or bank."""


class RenderPool:
    """Encoded renders on disk (module docstring). Rows are numbered in the order they were added."""

    def __init__(self, folder: str | os.PathLike, meta: dict[str, Any]):
        self.folder = Path(folder)
        self.meta = meta
        self.d_sae = int(meta["d_sae"])
        self.rows: list[dict[str, Any]] = []
        self._index: dict[str, int] = {}
        self._chunks: list[Tensor] = []  # dense float32 per chunk, cached on read (small: pools hold thousands of rows)
        self._thumbs: dict[int, bytes] = {}
        self._dense: Tensor | None = None
        self._n_chunks = 0

    @classmethod
    def open(cls, folder: str | os.PathLike, meta: dict[str, Any]) -> "RenderPool":
        """Open (or create) the pool in `folder`. `meta` must hold `d_sae` and whatever identifies the codes (SAE hash,
        backbone, layer, tokens, aggregation, bank or generator id). Raises PoolMismatchError if the folder's differ."""
        folder = Path(folder)
        meta = {"pool_version": POOL_VERSION, **meta}
        if "d_sae" not in meta:
            raise ValueError("pool meta needs d_sae")
        path = folder / "meta.json"
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                raise PoolMismatchError(f"the pool in {folder} was made with other settings ({', '.join(diff)} differ: "
                                        f"{ {k: old.get(k) for k in diff} } vs { {k: meta.get(k) for k in diff} }); "
                                        "give another folder or delete it")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, meta)
        pool = cls(folder, meta)
        pool._load()
        return pool

    def _chunk_paths(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.safetensors"))

    def _load(self) -> None:
        for path in self._chunk_paths():
            with safe_open(str(path), "pt") as f:
                rows = json.loads(f.metadata()["rows"])
                indptr, indices, values = f.get_tensor("indptr"), f.get_tensor("indices"), f.get_tensor("values")
                thumbs = _split_bytes(f.get_tensor("thumbs"), f.get_tensor("thumb_offsets")) if "thumbs" in f.keys() else None
            self._append(rows, _csr_to_dense(indptr, indices, values, self.d_sae), thumbs)
            self._n_chunks = max(self._n_chunks, int(path.stem.split("-")[1]) + 1)

    def _append(self, rows: list[dict], dense_NS: Tensor, thumbs: list[bytes] | None = None) -> None:
        for k, r in enumerate(rows):
            self._index[r["render_id"]] = len(self.rows)
            if thumbs is not None and thumbs[k]:
                self._thumbs[len(self.rows)] = thumbs[k]
            self.rows.append(r)
        self._chunks.append(dense_NS)
        self._dense = None

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, render_id: str) -> bool:
        return render_id in self._index

    def row_of(self, render_id: str) -> int:
        """The row number of a render (KeyError if absent)."""
        return self._index[render_id]

    def add(self, rows: Sequence[dict[str, Any]], codes_NS: Tensor, thumbs: Sequence[bytes] | None = None) -> None:
        """Append renders as one atomic chunk. Each row needs `render_id` (unique), `prompt`, `seed`, `split`.
        `thumbs`: encoded thumbnails of the renders (made while the picture is decoded anyway, so the results dataset
        and the app never decode it again). Raises ValueError on a shape mismatch, a duplicate id or non-finite codes."""
        codes_NS = torch.as_tensor(codes_NS, dtype=torch.float32).cpu()
        if codes_NS.ndim != 2 or codes_NS.shape != (len(rows), self.d_sae):
            raise ValueError(f"codes must be ({len(rows)}, {self.d_sae}), got {tuple(codes_NS.shape)}")
        if not torch.isfinite(codes_NS).all():
            raise ValueError("codes hold NaN or inf: the backbone or SAE produced non-finite activations")
        ids = [r["render_id"] for r in rows]
        dup = [i for i in ids if i in self._index] + [i for i in set(ids) if ids.count(i) > 1]
        if dup:
            raise ValueError(f"renders already in the pool: {dup[:5]}")
        if not rows:
            return
        mask = codes_NS != 0
        indptr = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
        # int16 indices where d_sae allows, float16 values (the precision of the activation store): half the bytes
        indices = mask.nonzero()[:, 1].to(torch.int16 if self.d_sae <= 32767 else torch.int32)
        values = codes_NS[mask].half()
        path = self.folder / f"chunk-{self._n_chunks:06d}.safetensors"
        tensors = {"indptr": indptr, "indices": indices, "values": values}
        if thumbs is not None:
            if len(thumbs) != len(rows):
                raise ValueError(f"{len(thumbs)} thumbnails for {len(rows)} renders")
            tensors["thumbs"] = torch.frombuffer(bytearray(b"".join(thumbs)) or bytearray(1), dtype=torch.uint8)
            tensors["thumb_offsets"] = torch.tensor([0, *np.cumsum([len(t) for t in thumbs]).tolist()], dtype=torch.int64)
        atomic_save_safetensors(path, tensors, metadata={"rows": json.dumps(list(rows))})
        self._n_chunks += 1
        self._append(list(rows), _csr_to_dense(indptr, indices, values, self.d_sae),
                     list(thumbs) if thumbs is not None else None)  # as stored, so a re-opened pool gives the same codes

    def dense(self) -> Tensor:
        """All codes, (len(self), d_sae) float32."""
        if self._dense is None:
            self._dense = torch.cat(self._chunks) if self._chunks else torch.zeros(0, self.d_sae)
            self._chunks = [self._dense]
        return self._dense

    def codes(self, row_idx) -> Tensor:
        """Codes of some rows, (n, d_sae) float32."""
        return self.dense()[torch.as_tensor(row_idx, dtype=torch.long)]

    def thumbnail(self, row: int) -> bytes | None:
        """The encoded thumbnail stored with a render, or None."""
        return self._thumbs.get(int(row))

    def rows_where(self, **match) -> list[int]:
        """Row numbers whose metadata equals every `match` item, ascending."""
        return [i for i, r in enumerate(self.rows) if all(r.get(k) == v for k, v in match.items())]

    def nbytes(self) -> int:
        """Bytes on disk."""
        return sum(p.stat().st_size for p in self._chunk_paths())


def _split_bytes(data: Tensor, offsets: Tensor) -> list[bytes]:
    raw = data.numpy().tobytes()
    o = offsets.tolist()
    return [raw[o[i]:o[i + 1]] for i in range(len(o) - 1)]


def _csr_to_dense(indptr: Tensor, indices: Tensor, values: Tensor, d: int) -> Tensor:
    n = indptr.numel() - 1
    out = torch.zeros(n, d)
    rows = torch.repeat_interleave(torch.arange(n), indptr.diff())
    out[rows, indices.long()] = values.float()
    return out


def render_id(source: str, prompt: str, seed: int) -> str:
    """A render's id: a hash of (generator id or bank id, prompt, seed)."""
    return hashlib.sha256(json.dumps([source, prompt, int(seed)]).encode()).hexdigest()[:24]


def sae_fingerprint(sae) -> str:
    """A short hash of an SAE's weights: a pool made with other weights is refused."""
    h = hashlib.sha256()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        h.update(getattr(sae, name).detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def fill_pool(pool: RenderPool, rows: Sequence[dict[str, Any]], load_image: Callable[[int], Any],
              encode: Callable[[list], Tensor], chunk_size: int = 256, progress: bool = True, desc: str = "encoding",
              thumbnail: Callable[[Any], bytes] | None = None) -> int:
    """Encode every row not yet in the pool (`load_image(i)` gives row i's picture), `chunk_size` per atomic chunk;
    `thumbnail(image) -> bytes` stores a thumbnail with each. Returns how many were encoded; a killed call resumes at
    the first missing chunk."""
    from tqdm.auto import tqdm

    todo = [i for i, r in enumerate(rows) if r["render_id"] not in pool]
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not todo)
    for start in range(0, len(todo), chunk_size):
        part = todo[start:start + chunk_size]
        images = [load_image(i) for i in part]
        codes = encode(images)
        pool.add([rows[i] for i in part], codes, [thumbnail(im) for im in images] if thumbnail else None)
        bar.update(len(part))
    bar.close()
    return len(todo)
