"""Images → activation store: the resumable, data-parallel extraction loop.

Image i of the source (in its fixed order, first `max_images`) gets global index i. Rank r of W owns the contiguous
slice [i_r, i_{r+1}) with i_r = r·N // W and writes shards over consecutive chunks of `shard_rows // T` images of it,
each chunk cut into batches of `batch_size`. Chunk and batch boundaries depend only on (N, W, the resume point),
so a resumed run recomputes exactly the batches the killed run would have: same rows, same numbers.

Several (layer, tokens) targets share one pass (`extract_many`): each image is decoded, preprocessed and run through
the backbone once, and each target has its own store with its own shard grid, progress files and resume point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from nacosae.store import DTYPES, META_NAME, ActivationStore, StoreError, StoreWriter, _read_json, check_same_run, finalize_store

# Decoding errors that make one image unusable without saying anything about the rest of the run.
# DecompressionBombError is not an OSError; UnidentifiedImageError is.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Mixed precision of the backbone's forward pass: None (float32) or a torch.autocast dtype.
AUTOCAST = (None, "bfloat16")


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): as given, else from an initialised `torch.distributed`, else env RANK/WORLD_SIZE, else (0, 1)."""
    import torch.distributed as dist

    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = int(os.environ.get("RANK", 0)) if rank is None else rank
            world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


def rank_slice(n_images: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of image indices owned by `rank` (sizes differ by at most one)."""
    return n_images * rank // world_size, n_images * (rank + 1) // world_size


def _record_dict(image_idx: int, record: Any) -> dict[str, Any]:
    """The images-table row of one image: every field of its ImageRecord (or of a dict / plain object)."""
    if dataclasses.is_dataclass(record):
        row = dataclasses.asdict(record)
    elif isinstance(record, dict):
        row = dict(record)
    else:
        row = {k: getattr(record, k, None) for k in ("image_id", "source", "path", "label", "description")}
    row = {k: (str(v) if isinstance(v, Path) else v) for k, v in row.items()}
    return {"image_idx": int(image_idx), **row}


def _skip(image_idx: int | None, record: Any, error: Exception) -> dict[str, Any]:
    """A skip report: where the image is and why it failed (BadImageError carries a keyword reason)."""
    path = getattr(error, "path", None) or getattr(record, "path", None) or getattr(record, "image_id", None)
    reason = getattr(error, "reason", None) or f"{type(error).__name__}: {error}"
    return {"image_idx": image_idx, "path": None if path is None else str(path), "reason": reason}


def _random_access(source: Any) -> bool:
    """Sources with `records()` + `load(record)` (nacosae.images) are read by index: ranks decode only their images."""
    return callable(getattr(source, "records", None)) and callable(getattr(source, "load", None)) \
        and not getattr(source, "streaming", False)


class _Images(Dataset):
    """Image i → (i, images-table row, pixels_CHW), or (i, skip report, None) for an image that cannot be read."""

    def __init__(self, source: Any, records: list, preprocess):
        self.source, self.records, self.preprocess = source, records, preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        try:
            pixels_CHW = self.preprocess(self.source.load(record))
        except IMAGE_ERRORS as e:
            return i, _skip(i, record, e), None
        return i, _record_dict(i, record), pixels_CHW


def _collate(items):
    """Keep the readable images stacked and the unreadable ones as skip reports."""
    ok = [(i, row, px) for i, row, px in items if px is not None]
    skipped = [row for _, row, px in items if px is None]
    pixels_BCHW = torch.stack([px for _, _, px in ok]) if ok else None
    return [i for i, _, _ in items], [row for _, row, _ in ok], pixels_BCHW, skipped


def _iterable_batches(source: Iterable, preprocess, batches: list[list[int]]):
    """The DataLoader path's output for a source that can only be walked (e.g. a streaming dataset): every rank
    walks it from the start (decoding is the source's), and preprocesses only its own images."""
    wanted = iter(batches)
    batch = next(wanted, None)
    items = []
    for i, (record, pil) in enumerate(source):
        if batch is None:
            return
        if i < batch[0]:
            continue
        try:
            items.append((i, _record_dict(i, record), preprocess(pil)))
        except IMAGE_ERRORS as e:
            items.append((i, _skip(i, record, e), None))
        if i == batch[-1]:
            yield _collate(items)
            items, batch = [], next(wanted, None)
    if batch is not None:
        raise StoreError(f"the source ended before image {batch[-1]}, which this run expected (it said it had more images)")


def _source_id(source: Any, records: list | None) -> dict[str, Any]:
    """What identifies the image list: its name and, when listed, a digest of its image ids and paths in order
    (a resumed run over another folder or a re-ordered listing would otherwise mix images silently)."""
    name = str(getattr(source, "name", None) or type(source).__name__)
    if records is None:
        return {"name": name}
    digest = hashlib.blake2b(digest_size=16)
    for r in records:
        digest.update(f"{getattr(r, 'image_id', r)}\0{getattr(r, 'path', None)}\n".encode())
    return {"name": name, "images_blake2b": digest.hexdigest()}


def _source_skipped(source: Any) -> list[dict[str, Any]]:
    """The source's own skip list (files dropped while listing or iterating), as skip reports without an index."""
    return [{"image_idx": None, "path": str(path), "reason": str(reason)} for path, reason in getattr(source, "skipped", [])]


@dataclasses.dataclass(frozen=True)
class Target:
    """One store of an extraction: the activations of `layer` with token choice `tokens`, written to `out_dir`."""

    layer: str
    tokens: str
    out_dir: str | os.PathLike


def store_dirs(root: str | os.PathLike, targets: Sequence[tuple[str, str]]) -> list[Path]:
    """The folder of each (layer, tokens) store of a many-layer extraction under `root`: `root/LAYER`, or
    `root/LAYER-TOKENS` for a layer asked with several token choices (so `--layer blocks.14,features` gives the
    stores runs/acts/blocks.14 and runs/acts/features). Raises ValueError for a repeated (layer, tokens) pair."""
    targets = [tuple(t) for t in targets]
    if len(set(targets)) != len(targets):
        raise ValueError(f"a (layer, tokens) pair is asked twice in {targets}: list each once")
    n_choices = Counter(layer for layer, _ in targets)
    return [Path(root) / (layer if n_choices[layer] == 1 else f"{layer}-{tokens}") for layer, tokens in targets]


def extract(
    source: Any,
    backbone: Any,
    layer: str,
    tokens: str,
    out_dir: str | os.PathLike,
    batch_size: int = 32,
    shard_rows: int = 2**16,
    dtype: str = "float16",
    max_images: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    autocast: str | None = None,
) -> ActivationStore | None:
    """Extract `backbone`'s activations at (`layer`, `tokens`) for every image of `source` into the store `out_dir`.

    source: an image source of nacosae.images (`records()`, `load(record)`, `len()`, `skipped`): read by index, each
        rank decoding only its own images; or any iterable of (record, PIL image) (then `len()` or `max_images` must
        bound it, and every rank walks it from the start).
    backbone: `preprocess(pil) -> (C, H, W)`, `activations(pixels_BCHW, layer, tokens) -> (B, T, D)`,
        `provenance(layer, tokens) -> dict` (nacosae.backbones).
    shard_rows: rows per shard (rounded down to whole images, at least one image per shard).
    dtype: how activations are stored: 'float16' (half the disk of float32), 'bfloat16' or 'float32'.
    rank, world_size: default from torch.distributed, else env RANK / WORLD_SIZE (torchrun, accelerate), else 0 / 1.
    num_workers: DataLoader processes decoding and preprocessing images (0: in this process).
    autocast: None (the forward in float32) or 'bfloat16': the forward runs under
        `torch.autocast(device_type, dtype=torch.bfloat16)` (matmuls and convolutions in bf16: about 3 significant
        digits, much faster where the hardware has bf16 units); the activations are then stored in `dtype` as usual.
        Recorded in the store's provenance ('autocast', present only when set), so a resumed or reopened store
        refuses a run with another autocast. Other values raise ValueError.

    Re-running with the same arguments resumes after the last shard written; a store made from another backbone,
    layer, tokens, dtype, autocast or image list is an error. Unreadable images are skipped and listed in meta.json ('skipped').
    Returns the finished store; None on a rank whose peers (launched without torch.distributed) are still running,
    in which case the last rank to finish completes the store (or call `finalize_store(out_dir)`).
    Several layers at once, from one forward pass per image: `extract_many`.
    """
    return extract_many(source, backbone, [Target(layer, tokens, out_dir)], batch_size=batch_size, shard_rows=shard_rows,
                        dtype=dtype, max_images=max_images, rank=rank, world_size=world_size, num_workers=num_workers,
                        device=device, progress=progress, autocast=autocast)[0]


def extract_many(
    source: Any,
    backbone: Any,
    targets: Sequence[Target | tuple[str, str, str | os.PathLike]],
    batch_size: int = 32,
    shard_rows: int = 2**16,
    dtype: str = "float16",
    max_images: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    autocast: str | None = None,
) -> list[ActivationStore | None]:
    """`extract` for several (layer, tokens, out_dir) targets at once: each image is decoded and preprocessed once and
    runs through the backbone once (`backbone.activations_multi`, which stops after the deepest asked layer), and
    every target gets its own store, equal to the one `extract` would write for it alone (the same shards, the same
    rows up to the rounding of the storage dtype).

    Each store resumes on its own: a run killed between two stores' shard writes recomputes, on re-run, only the
    images some store still lacks, and a store already complete is not recomputed (so adding a layer to a finished
    run costs the forward passes of the new layer only). Arguments as `extract` (`autocast` too: the one forward of
    every batch runs under it); returns one store (or None) per target.
    """
    import torch.distributed as dist

    targets = [t if isinstance(t, Target) else Target(*t) for t in targets]
    if not targets:
        raise ValueError("no targets: pass at least one (layer, tokens, out_dir)")
    if len({(t.layer, t.tokens) for t in targets}) != len(targets):
        raise ValueError(f"a (layer, tokens) pair is asked twice in {[(t.layer, t.tokens) for t in targets]}: list each once")
    dirs = [Path(t.out_dir).resolve() for t in targets]
    if len(set(dirs)) != len(dirs):
        raise ValueError(f"two targets write into the same folder ({[str(d) for d in dirs]}): give each its own out_dir")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _check_autocast(autocast)
    if batch_size <= 0 or shard_rows <= 0:
        raise ValueError(f"batch_size and shard_rows must be positive, got {batch_size}, {shard_rows}")
    if max_images is not None and max_images <= 0:
        raise ValueError(f"max_images must be positive or None, got {max_images}")
    rank, world_size = resolve_rank(rank, world_size)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    records = source.records() if _random_access(source) else None
    n_source = len(records) if records is not None else (len(source) if hasattr(source, "__len__") else None)
    if n_source is None and max_images is None:
        raise ValueError("this source has no length: pass max_images to bound the extraction")
    n_images = n_source if max_images is None else (max_images if n_source is None else min(max_images, n_source))
    if n_images <= 0:
        raise ValueError(f"nothing to extract: the source has {n_source} images")
    if records is not None:
        records = records[:n_images]
    source_id = _source_id(source, records)

    start, stop = rank_slice(n_images, rank, world_size)
    runs = []
    for t in targets:  # every target checked before any folder is made: a bad layer in a list leaves no half store
        provenance = backbone.provenance(t.layer, t.tokens)
        if autocast is not None:  # only when set: stores written before autocast existed keep their provenance
            provenance = {**provenance, "autocast": autocast}
        runs.append({"provenance": provenance, "dtype": dtype, "n_images_total": n_images,
                     "source": source_id, "world_size": world_size})
        _check_not_nested(Path(t.out_dir))
    jobs, complete = [], []
    for t, run in zip(targets, runs, strict=True):
        out_dir = Path(t.out_dir)
        meta_path = out_dir / META_NAME
        if meta_path.exists():
            meta = _read_json(meta_path, "store metadata")
            if meta.get("complete"):
                # Finished already: any world size may reopen it, but never with other activations.
                check_same_run(out_dir, meta, run, keys=("provenance", "dtype", "n_images_total", "source"))
                complete.append(True)
                continue
        complete.append(False)
        writer = StoreWriter(out_dir, run, rank, start, stop)
        if not writer.done:
            jobs.append(_Job(t, writer))
    if all(complete):
        return [ActivationStore(t.out_dir) for t in targets]

    if jobs:
        if records is not None:
            dataset = _Images(source, records, backbone.preprocess)
            make_loader = lambda batches: DataLoader(dataset, batch_sampler=batches, collate_fn=_collate,  # noqa: E731
                                                     num_workers=num_workers)
        else:
            make_loader = lambda batches: _iterable_batches(source, backbone.preprocess, batches)  # noqa: E731
        _extract_slice(make_loader, backbone, jobs, stop, batch_size, shard_rows, dtype, device, progress, autocast)
        for job in jobs:
            job.writer.mark_done(_source_skipped(source))

    if distributed:
        dist.barrier()
        if rank == 0:
            for t in targets:
                finalize_store(t.out_dir)
        dist.barrier()
        return [ActivationStore(t.out_dir) for t in targets]
    return [ActivationStore(t.out_dir) if finalize_store(t.out_dir) else None for t in targets]


def _is_store(path: Path) -> bool:
    """Whether `path` is an activation store's folder, finished or not (`StoreWriter` makes meta.json and progress/)."""
    return (path / META_NAME).is_file() and (path / "progress").is_dir()


def _check_not_nested(out_dir: Path) -> None:
    """ValueError when a store would be written inside another store's folder, or into a folder that holds stores
    (the --out of a many-layer extraction given again with one layer): stores are never nested or mixed."""
    out_dir = out_dir.resolve()
    if _is_store(out_dir):
        return  # a resume or a reopen: the store's own checks apply
    for parent in out_dir.parents:
        if _is_store(parent):
            raise ValueError(f"{parent} is an activation store: a store's folder holds no other store; write the "
                             f"store {out_dir.name!r} into a folder outside it")
    inner = sorted(p.name for p in out_dir.iterdir() if p.is_dir() and _is_store(p)) if out_dir.is_dir() else []
    if inner:
        raise ValueError(f"{out_dir} holds activation stores ({', '.join(inner)}), as the folder of a many-layer "
                         "extraction does; with one layer the output folder is the store itself: give it a folder of its own "
                         f"(e.g. {out_dir}/<layer>)")


def _check_autocast(autocast: str | None) -> None:
    if autocast not in AUTOCAST:
        raise ValueError(f"autocast must be one of {list(AUTOCAST)} (None: the forward in float32), got {autocast!r}")


def _activations(backbone, pixels_BCHW: torch.Tensor, targets: Sequence[tuple[str, str]],
                 autocast: str | None = None) -> list[torch.Tensor]:
    """The targets' (B, T, D) activations: one pass through `activations_multi` when the backbone has it and there
    are several targets, else one `activations` call per target (any object with `activations` works).
    autocast: None, or 'bfloat16' to run the forward under `torch.autocast` on the backbone's device type (its
    `device`, else the pixels'); the activations come back as the backbone gives them (float32 for nacosae's).
    Raises ValueError for another autocast."""
    _check_autocast(autocast)
    if autocast is None:
        context = contextlib.nullcontext()
    else:
        device_type = torch.device(getattr(backbone, "device", pixels_BCHW.device)).type
        context = torch.autocast(device_type, dtype=torch.bfloat16)
    with context:
        if len(targets) > 1 and callable(getattr(backbone, "activations_multi", None)):
            return backbone.activations_multi(pixels_BCHW, targets)
        return [backbone.activations(pixels_BCHW, layer, tokens) for layer, tokens in targets]


class _Job:
    """One target's side of the loop: its writer, where it resumes, and the rows of its shard being filled."""

    def __init__(self, target: Target, writer: StoreWriter):
        self.target, self.writer = target, writer
        self.begin = writer.next_image  # first image this store still needs
        self.T = writer.state["tokens_per_image"]
        self.images_per_shard = self.shard_end = None
        self.acts, self.img_ids, self.rows, self.skipped = [], [], [], []

    @property
    def layer_tokens(self) -> tuple[str, str]:
        return self.target.layer, self.target.tokens

    def shard_ends(self, stop: int) -> list[int]:
        """This store's shard ends: the fixed grid image_start + m·images_per_shard, and the slice's end."""
        first = self.writer.state["image_start"]
        return [*range(first + self.images_per_shard, stop, self.images_per_shard), stop]

    def add(self, acts_BTD: torch.Tensor, positions: list[int], batch_rows: list[dict], store_dtype, dtype: str) -> None:
        T = self.T
        if acts_BTD.ndim != 3 or acts_BTD.shape[0] != len(batch_rows) or acts_BTD.shape[1] != T:
            raise StoreError(f"backbone returned activations of shape {tuple(acts_BTD.shape)} at {self.layer_tokens} for "
                             f"{len(batch_rows)} images; expected (B, T={T}, D)")
        stored_BTD = acts_BTD.to("cpu", store_dtype)
        if not torch.isfinite(stored_BTD).all():
            raise StoreError(f"non-finite activations at {self.layer_tokens} for images {positions[0]}..{positions[-1]} in "
                             f"{dtype}: the backbone gives NaN/inf, or values beyond float16's ±65504 (then use "
                             "dtype='bfloat16' or 'float32')")
        self.acts.append(stored_BTD)
        self.img_ids += [r["image_idx"] for r in batch_rows]
        self.rows += batch_rows

    def flush(self, stop: int, store_dtype) -> None:
        """Write the shard of images [writer.next_image, shard_end) and move to the next one."""
        if self.acts:
            acts_NTD = torch.cat(self.acts)
            n, T, D = acts_NTD.shape
            image_idx_N = torch.tensor(self.img_ids, dtype=torch.int64).repeat_interleave(T)
            token_idx_N = torch.arange(T, dtype=torch.int32).repeat(n)
            self.writer.write_shard(acts_NTD.reshape(n * T, D), image_idx_N, token_idx_N, self.rows, self.shard_end,
                                    self.skipped)
        else:  # every image of this chunk was skipped: record that, write no shard
            empty = torch.empty(0)
            self.writer.write_shard(torch.empty(0, 0, dtype=store_dtype), empty, empty, [], self.shard_end, self.skipped)
        self.acts, self.img_ids, self.rows, self.skipped = [], [], [], []
        self.shard_end = min(self.shard_end + self.images_per_shard, stop)


def _extract_slice(make_loader, backbone, jobs: list[_Job], stop: int, batch_size: int, shard_rows: int, dtype: str,
                   device, progress: bool, autocast: str | None = None) -> None:
    """Run this rank's remaining images through the backbone once, each batch for every store that still needs it,
    each store writing its shards as they fill."""
    jobs = [job for job in jobs if job.begin < stop]  # a store killed after its last shard only needs mark_done
    if not jobs:
        return
    begin = min(job.begin for job in jobs)
    first = jobs[0].writer.state["image_start"]
    store_dtype = DTYPES[dtype]
    rank = jobs[0].writer.rank
    bar = tqdm(total=stop - first, initial=begin - first, unit="img", disable=not progress,
               desc=f"extract rank {rank}" + (f" ({len(jobs)} stores)" if len(jobs) > 1 else ""))
    # Shards are fixed chunks of image indices of shard_rows // T images. T comes from the shards already written,
    # else from one image (run again in the loop: simpler than special-casing it, and one image is cheap).
    unknown = [job for job in jobs if not job.T]
    if unknown:
        probed = _probe_tokens(make_loader, backbone, [job.layer_tokens for job in unknown],
                               min(job.begin for job in unknown), stop, device, autocast)
        for job, T in zip(unknown, probed, strict=True):
            job.T = T
    for job in jobs:
        job.images_per_shard = max(1, shard_rows // job.T)
        job.shard_end = next(e for e in job.shard_ends(stop) if e > job.begin)
    # A batch never straddles any store's shard end (or resume point): batches are cut from the union of the stores'
    # fixed grids, so they depend only on (N, W, the grids, the resume point). A resumed run recomputes exactly the
    # batches the killed run would have, and one store alone is cut exactly as `extract` cuts it.
    cuts = sorted({e for job in jobs for e in job.shard_ends(stop) if e > begin} | {job.begin for job in jobs} - {begin})
    batches, s = [], begin
    for e in cuts:
        batches += [list(range(b, min(b + batch_size, e))) for b in range(s, e, batch_size)]
        s = e

    with torch.inference_mode():
        for positions, batch_rows, pixels_BCHW, batch_skipped in make_loader(batches):
            live = [job for job in jobs if positions[0] >= job.begin]
            if pixels_BCHW is not None:
                outs = _activations(backbone, pixels_BCHW.to(device), [job.layer_tokens for job in live], autocast)
                for job, acts_BTD in zip(live, outs, strict=True):
                    job.add(acts_BTD, positions, batch_rows, store_dtype, dtype)
            bar.update(len(positions))
            for job in live:
                job.skipped += batch_skipped
                if positions[-1] + 1 == job.shard_end:
                    job.flush(stop, store_dtype)
            bar.set_postfix(shards=sum(len(job.writer.state["shards"]) for job in jobs),
                            skipped=len(jobs[0].writer.state["skipped"]))
    bar.close()
    for job in jobs:
        if job.writer.next_image != stop:
            raise StoreError(f"rank {rank} stopped at image {job.writer.next_image} of {stop} for {job.layer_tokens}: the "
                             "source yielded fewer images than it said")


def _probe_tokens(make_loader, backbone, targets: list[tuple[str, str]], begin: int, stop: int, device,
                  autocast: str | None = None) -> list[int]:
    """Tokens per image T of each target, from the first readable image of this rank's slice (one forward pass)."""
    for i in range(begin, stop):
        for _, _, pixels_BCHW, _ in make_loader([[i]]):
            if pixels_BCHW is not None:
                with torch.inference_mode():
                    return [int(a.shape[1]) for a in _activations(backbone, pixels_BCHW[:1].to(device), targets, autocast)]
    return [1] * len(targets)  # no readable image in the slice: every chunk is empty, so its size does not matter
