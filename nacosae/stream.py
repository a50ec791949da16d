"""No-store mode: train SAEs straight from a backbone's activations as they are produced, through an in-memory
shuffle buffer, when the disk cannot hold a store (docs/scale.md, "No-store mode").

`BackboneStream` stands in for an `ActivationStore` in `nacosae.train.train_many` (pass it as
`train_many(cfgs, sources={label: stream})`): the same duck-typed reader (`d`, `meta`, `split`, `n_rows_in`, `sample`,
`iter_batches`), so the training loop, checkpoints, resume, validation, many SAEs per stream and torchrun data
parallel are the store path's own code. Images are read with extraction's DataLoader path (`_Images`, `_collate`:
the same decoding, preprocessing and skip reports) and run through the backbone with extraction's `_activations`, so
one epoch of the stream holds exactly the rows a float32 store of the same images would (tests/test_stream.py).

The shuffle buffer (the "mixing buffer" of streaming SAE trainers): images come in a seeded random order per epoch,
`image_batch_size` at a time; their rows are written into free slots of one preallocated buffer; once it holds
`buffer_rows` rows, a seeded permutation of its rows yields batches until about half of it is left, and those slots
are refilled. Rows are thus mixed across ~buffer_rows / T images (T rows per image) rather than one image batch,
and memory is bounded: the buffer holds at most buffer_rows + one image batch of rows (`peak_buffer_rows` records
it), plus the batch being yielded. Validation (`shuffle=False`) reads images in index order with no buffer.

What a store run has that this one does not: the activations are recomputed every epoch (the backbone's forward,
not the disk, bounds the rate), the buffer's contents are not checkpointed (a resumed run draws a fresh seeded order,
as a store run does, and refills the buffer: the up to buffer_rows rows the killed run's buffer held are dropped),
and an image that cannot be read is known only when reached (`n_rows_in` counts every image; `skipped` lists the
reports).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from nacosae.extract import _activations, _check_autocast, _collate, _Images, _random_access, _source_id, _source_skipped
from nacosae.store import split_images


def stream_label(backbone: str, layer: str, tokens: str, source: str | None = None, tokens_per_image: int | None = None,
                 max_images: int | None = None, autocast: str | None = None) -> str:
    """The `store` field of the TrainConfigs trained from a stream: `stream:BACKBONE/LAYER/TOKENS`, then what else
    picks its rows (`?source=...&tokens_per_image=...&max_images=...&autocast=...`, each only when given), so a run
    resumed with another stream is refused by the run-config check as one with another store is."""
    label = f"stream:{backbone}/{layer}/{tokens}"
    query = [f"{k}={v}" for k, v in (("source", source), ("tokens_per_image", tokens_per_image),
                                     ("max_images", max_images), ("autocast", autocast)) if v is not None]
    return label + ("?" + "&".join(query) if query else "")


class BackboneStream:
    """Activations of `backbone` at (`layer`, `tokens`) over the images of `source`, produced as they are read.

        stream = BackboneStream(OpenClipArtSource(), load_backbone("efficientnet-lite0"), "blocks.14", "spatial")
        train_many([TrainConfig(store=stream.label, out_dir="runs/sae")], sources={stream.label: stream})

    source: a nacosae.images source (`records()`, `load(record)`; image i of `records()` has index i, as in a store);
        a source that can only be iterated has no random access per epoch: extract a store from it instead.
    backbone: a nacosae backbone (`preprocess`, `activations`, `provenance`).
    tokens_per_image: None: every token of the choice is a row (as in a store); else a seeded random subset of this
        many tokens of each image, drawn anew for every image and epoch (more images per buffer, fewer correlated
        rows). Training only: validation reads every token (see `iter_batches`).
    buffer_rows: rows the shuffle buffer mixes (float32 on `device`: buffer_rows × d × 4 bytes, e.g. 2**17 rows of
        d 768 take 400 MB); at least 2 × the batch size.
    image_batch_size: images per forward pass. num_workers: DataLoader processes decoding and preprocessing.
    max_images: only the first N images of the source. device: where the backbone runs and the buffer lives.
    autocast: None (the forward in float32) or 'bfloat16' (the forward under torch.autocast, as extraction's
        `autocast`; recorded in the provenance).
    label: the stream's name in TrainConfig.store (default: `stream_label` of its settings).

    Raises ValueError for a source without random access, an empty source, a tokens_per_image outside [1, T] or
    non-positive sizes. Unreadable images never stop a run: they are skipped and reported in `skipped`.
    """

    def __init__(self, source: Any, backbone: Any, layer: str, tokens: str, *, tokens_per_image: int | None = None,
                 buffer_rows: int = 2**17, image_batch_size: int = 32, num_workers: int = 0,
                 max_images: int | None = None, device: str | torch.device = "cpu", autocast: str | None = None,
                 label: str | None = None):
        if not _random_access(source):
            raise ValueError(f"{type(source).__name__} can only be iterated: training from a backbone stream reads images "
                             "by index in a new order every epoch, so it needs a source with records() and load() "
                             "(nacosae.images); or extract a store from this one")
        if buffer_rows <= 0 or image_batch_size <= 0 or num_workers < 0:
            raise ValueError(f"buffer_rows and image_batch_size must be positive and num_workers >= 0, got {buffer_rows}, "
                             f"{image_batch_size}, {num_workers}")
        if max_images is not None and max_images <= 0:
            raise ValueError(f"max_images must be positive or None, got {max_images}")
        _check_autocast(autocast)
        records = source.records()
        records = records if max_images is None else records[:max_images]
        if not records:
            raise ValueError(f"the source {getattr(source, 'name', type(source).__name__)!r} has no images")
        provenance = backbone.provenance(layer, tokens)
        if autocast is not None:  # as a store records it, so an SAE's provenance says the same either way
            provenance = {**provenance, "autocast": autocast}
        T, d = int(provenance["n_tokens"]), int(provenance["d"])
        if tokens_per_image is not None and not 0 < tokens_per_image <= T:
            raise ValueError(f"tokens_per_image must be in [1, {T}] ({layer} {tokens} has {T} tokens per image), got "
                             f"{tokens_per_image}")
        self.source, self.backbone, self.layer, self.tokens = source, backbone, layer, tokens
        self.records = records
        self.tokens_per_image = tokens_per_image
        self.buffer_rows, self.image_batch_size, self.num_workers = buffer_rows, image_batch_size, num_workers
        self.device, self.autocast = torch.device(device), autocast
        self.d, self.n_tokens = d, T
        self.rows_per_image = tokens_per_image or T  # rows a training epoch takes from each image
        self.label = label or stream_label(provenance.get("backbone", type(backbone).__name__), layer, tokens,
                                           source=getattr(source, "name", None), tokens_per_image=tokens_per_image,
                                           max_images=max_images, autocast=autocast)
        self.meta: dict[str, Any] = {
            "provenance": provenance, "layer": layer, "tokens": tokens, "d": d, "n_tokens": T,
            "tokens_per_image": self.rows_per_image, "n_images_total": len(records), "source": _source_id(source, records),
            "stream": {"tokens_per_image": tokens_per_image, "buffer_rows": buffer_rows, "image_batch_size": image_batch_size},
        }
        self.peak_buffer_rows = 0  # the most rows the shuffle buffer has held (the memory bound, checked by the tests)
        self.n_images_read = 0  # images run through the backbone so far (all epochs, validation and init sample too)
        self._skipped: dict[int, dict[str, Any]] = {}  # image index → skip report, each image once

    def __repr__(self) -> str:
        return (f"BackboneStream({self.label!r}, images={len(self.records)}, d={self.d}, T={self.n_tokens}, "
                f"rows_per_image={self.rows_per_image}, buffer_rows={self.buffer_rows})")

    @property
    def provenance(self) -> dict[str, Any]:
        return self.meta["provenance"]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Skip reports ({image_idx, path, reason}) of the images found unreadable so far, by index, then those the
        source dropped while listing (image_idx None): the `skipped` list a store's meta.json has."""
        return [self._skipped[i] for i in sorted(self._skipped)] + _source_skipped(self.source)

    # ---------------------------------------------------------------- selections by image (as ActivationStore)
    def split(self, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(train_image_idx, val_image_idx), disjoint and sorted: `nacosae.store.split_images` over every image of the
        source (a store splits the images it holds, so with unreadable images the two splits differ)."""
        return split_images(np.arange(len(self.records)), val_fraction, seed)

    def _select(self, rows) -> np.ndarray:
        """Sorted unique image indices of a `rows=` selection (None: every image). Raises ValueError out of range."""
        n = len(self.records)
        if rows is None:
            return np.arange(n)
        sel = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
        if sel.size and (sel[0] < 0 or sel[-1] >= n):
            raise ValueError(f"rows must be image indices in [0, {n}), got values in [{sel[0]}, {sel[-1]}]")
        return sel

    def n_rows_in(self, rows=None) -> int:
        """Rows one training epoch takes from these images: `rows_per_image` each. Every image counts, readable or
        not (which ones are unreadable is known only once read), so a run's step count does not depend on what an
        earlier pass found, and a resumed run has the step count of the run it resumes."""
        return len(self._select(rows)) * self.rows_per_image

    # ---------------------------------------------------------------- producing rows
    def _image_rows(self, order: np.ndarray, subsample: bool, gen: torch.Generator | None) -> Iterator[Tensor]:
        """(m, D) float32 rows on `device`, one image batch at a time, images in `order`; with `subsample` each image
        gives `tokens_per_image` tokens drawn with `gen` (image-major: the rows of one image, then the next)."""
        batches = [order[i:i + self.image_batch_size].tolist() for i in range(0, len(order), self.image_batch_size)]
        loader = DataLoader(_Images(self.source, self.records, self.backbone.preprocess), batch_sampler=batches,
                            collate_fn=_collate, num_workers=self.num_workers)
        k = self.tokens_per_image if subsample else None
        for _, _, pixels_BCHW, skipped in loader:
            for report in skipped:
                self._skipped.setdefault(report["image_idx"], report)
            if pixels_BCHW is None:
                continue
            with torch.no_grad():
                acts_BTD = _activations(self.backbone, pixels_BCHW.to(self.device), [(self.layer, self.tokens)],
                                        self.autocast)[0]
            B = pixels_BCHW.shape[0]
            if tuple(acts_BTD.shape) != (B, self.n_tokens, self.d):
                raise ValueError(f"the backbone returned activations of shape {tuple(acts_BTD.shape)} at {self.layer} "
                                 f"{self.tokens} for {B} images; its provenance says (B, T={self.n_tokens}, D={self.d})")
            self.n_images_read += B
            if k is not None and k < self.n_tokens:
                # A uniform k-subset per image: the first k of a random permutation of its T tokens.
                pick_BK = torch.rand(B, self.n_tokens, generator=gen).argsort(dim=1)[:, :k].to(acts_BTD.device)
                acts_BTD = acts_BTD.gather(1, pick_BK[:, :, None].expand(-1, -1, self.d))
            yield acts_BTD.reshape(-1, self.d).to(self.device, torch.float32)

    def _skip_summary(self, n: int = 3) -> str:
        """'K skipped, e.g. PATH: REASON; ...' for an error message (the whole list is `skipped`)."""
        reports = [self._skipped[i] for i in sorted(self._skipped)]
        return f"{len(reports)} skipped" + (", e.g. " + "; ".join(f"{r['path']}: {r['reason']}" for r in reports[:n])
                                             if reports else "")

    @staticmethod
    def _generator(rng: np.random.Generator) -> torch.Generator:
        return torch.Generator().manual_seed(int(rng.integers(2**62)))

    def sample(self, n: int, seed: int = 0, rows=None) -> Tensor:
        """(m, D) float32 rows, m <= n (e.g. to initialise an SAE): the training rows (`tokens_per_image` subsampling
        included) of the first images of a seeded order of `rows`, until n rows; fewer only when the images run out.
        Costs the forward of about n / rows_per_image images. Raises ValueError when no image of `rows` is readable."""
        if n <= 0:
            raise ValueError(f"cannot sample {n} rows")
        rng = np.random.default_rng([seed, 2])
        order = rng.permutation(self._select(rows))
        # Only as many images as n rows need (plus one batch's margin for unreadable ones), not the whole order.
        need = -(-n // self.rows_per_image) + self.image_batch_size
        parts, filled = [], 0
        while filled < n and len(order):
            head, order = order[:need], order[need:]
            for rows_MD in self._image_rows(head, subsample=True, gen=self._generator(rng)):
                parts.append(rows_MD[:n - filled].cpu())
                filled += len(parts[-1])
                if filled >= n:
                    break
        if not filled:
            raise ValueError(f"no image of the selection could be read ({self._skip_summary()})")
        out_ND = torch.cat(parts)
        return out_ND[torch.from_numpy(rng.permutation(len(out_ND)))]

    def iter_batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, n_epochs: int | None = None, rows=None,
                     device: str | torch.device = "cpu", drop_last: bool = False) -> Iterator[Tensor]:
        """Yield float32 (B, D) batches of the images `rows` (None: all), as `ActivationStore.iter_batches` does.

        shuffle=True (training): each epoch runs the images through the backbone in a seeded random order (seeded by
        (seed, epoch)), `tokens_per_image` rows of each when set, through the shuffle buffer (module docstring); the
        buffer carries over from one epoch into the next. shuffle=False (validation): the images in index order, every
        token of the choice (no subsampling, so a validation FVU compares with a store run's), no buffer.
        `n_epochs=None` streams forever; otherwise the buffer is drained at the end and the last, partial batch is
        yielded unless `drop_last`. Raises ValueError for bad sizes, an empty selection, or an epoch in which no image
        could be read (it would never yield).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if shuffle and self.buffer_rows < 2 * batch_size:
            raise ValueError(f"buffer_rows ({self.buffer_rows}) must be at least 2 × batch_size ({batch_size}): the buffer "
                             "yields from half of its rows at a time; raise buffer_rows or lower the batch size")
        if n_epochs is not None and n_epochs < 0:
            raise ValueError(f"n_epochs must be >= 0 or None, got {n_epochs}")
        sel = self._select(rows)
        if not len(sel):
            raise ValueError("the selection has no images: `rows` names no image of this stream")
        batches = self._shuffled(sel, batch_size, seed, n_epochs, drop_last) if shuffle else \
            self._in_order(sel, batch_size, n_epochs, drop_last)
        for x_BD in batches:
            yield x_BD.to(device)

    def _epochs(self, sel: np.ndarray, seed: int, n_epochs: int | None, shuffle: bool) -> Iterator[Tensor]:
        """The rows of every epoch, one image batch at a time."""
        epoch = 0
        while n_epochs is None or epoch < n_epochs:
            rng = np.random.default_rng([seed, 0, epoch])
            n_rows = 0
            for rows_MD in self._image_rows(rng.permutation(sel) if shuffle else sel, subsample=shuffle,
                                            gen=self._generator(rng)):
                n_rows += len(rows_MD)
                yield rows_MD
            if not n_rows:
                raise ValueError(f"no image of the selection ({len(sel)} images) could be read ({self._skip_summary()})")
            epoch += 1

    def _in_order(self, sel, batch_size: int, n_epochs, drop_last: bool) -> Iterator[Tensor]:
        pending = torch.empty(0, self.d, device=self.device)
        for rows_MD in self._epochs(sel, 0, n_epochs, shuffle=False):
            pending = torch.cat([pending, rows_MD])
            n_full = len(pending) // batch_size * batch_size
            for i in range(0, n_full, batch_size):
                yield pending[i:i + batch_size]
            pending = pending[n_full:]
        if len(pending) and not drop_last:
            yield pending

    def _shuffled(self, sel, batch_size: int, seed: int, n_epochs, drop_last: bool) -> Iterator[Tensor]:
        # One buffer, allocated once; rows go into free slots, so nothing is compacted or copied but the batches.
        capacity = self.buffer_rows + self.image_batch_size * self.rows_per_image
        buf_ND = torch.empty(capacity, self.d, device=self.device)
        free = np.arange(capacity)  # slots to fill, in order
        filled = np.empty(0, dtype=np.int64)  # slots holding rows not yet yielded
        keep = self.buffer_rows // 2  # rows left in the buffer after each draw, mixed with the next images' rows
        mix = np.random.default_rng([seed, 1])

        def draw(n_out: int) -> Iterator[Tensor]:
            nonlocal free, filled
            perm = mix.permutation(filled)
            for i in range(0, n_out, batch_size):
                yield buf_ND[torch.from_numpy(perm[i:i + batch_size]).to(self.device)]  # a copy: the slot may refill
            free, filled = np.concatenate([free, perm[:n_out]]), perm[n_out:]

        for rows_MD in self._epochs(sel, seed, n_epochs, shuffle=True):
            slots, free = free[:len(rows_MD)], free[len(rows_MD):]
            buf_ND[torch.from_numpy(slots).to(self.device)] = rows_MD
            filled = np.concatenate([filled, slots])
            self.peak_buffer_rows = max(self.peak_buffer_rows, len(filled))
            if len(filled) >= self.buffer_rows:
                yield from draw((len(filled) - keep) // batch_size * batch_size)
        if not drop_last:
            yield from draw(len(filled))  # the end of the last epoch: everything left, the last batch partial
        else:
            yield from draw(len(filled) // batch_size * batch_size)
