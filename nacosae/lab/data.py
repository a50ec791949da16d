"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, and a spurious cue planted into it.

The cue is a small bright square in a corner of the 28×28 image. In training it co-occurs with one class
(`p_target` of that class's images carry it, `p_other` of all other images do), so a network can take the
shortcut "mark ⇒ class". The test sets then break the correlation:

    iid      cue planted with the training rates (what a held-out split of the biased data would show)
    clean    no cue anywhere
    flipped  cue on every image that is *not* of the target class, none on the target class
    cued     cue on every image

Images are float32 in [0, 1], shape (N, 1, 28, 28); the background of Fashion-MNIST is 0, so the mark is easy to see.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEFAULT_ROOT = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TEST_SETS = ("iid", "clean", "flipped", "cued")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> np.ndarray:
    """Read one gzip'd IDX file (the MNIST format: magic, dims as big-endian int32, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
    n_dims = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * n_dims)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes; the file is truncated")
    return data.reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike = DEFAULT_ROOT) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64 of one split ('train' 60k or 'test' 10k)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    img_path, lbl_path = (root / name for name in _FILES[split])
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} not found: install the Debian package with `apt-get install dataset-fashion-mnist` "
                "(or point FASHION_MNIST_DIR at a folder with the four idx .gz files)"
            )
    images_NHW = _read_idx(img_path)
    labels_N = _read_idx(lbl_path)
    if images_NHW.shape[0] != labels_N.shape[0]:
        raise ValueError(f"{root}: {images_NHW.shape[0]} images but {labels_N.shape[0]} labels")
    x_N1HW = torch.from_numpy(images_NHW.astype(np.float32) / 255.0).unsqueeze(1)
    return x_N1HW, torch.from_numpy(labels_N.astype(np.int64))


@dataclass(frozen=True)
class CueSpec:
    """A small square mark pasted into each cued image."""

    size: int = 3
    """Side of the square in pixels."""
    row: int = 1
    """Top row of the square (0 = image top)."""
    col: int = 1
    """Left column of the square."""
    value: float = 1.0
    """Pixel value written into the square (images are in [0, 1])."""

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be ≥ 1, got {self.size}")
        if not (0 <= self.row and 0 <= self.col and self.row + self.size <= 28 and self.col + self.size <= 28):
            raise ValueError(f"the {self.size}px cue at ({self.row}, {self.col}) does not fit in a 28×28 image")
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"value must be in [0, 1], got {self.value}")

    def mask(self, height: int = 28, width: int = 28) -> Tensor:
        """(H, W) bool mask of the cue's pixels."""
        m_HW = torch.zeros(height, width, dtype=torch.bool)
        m_HW[self.row : self.row + self.size, self.col : self.col + self.size] = True
        return m_HW


def apply_cue(x_N1HW: Tensor, cue: CueSpec, where_N: Tensor | None = None) -> Tensor:
    """A copy of `x_N1HW` with the cue pasted into the images where `where_N` is True (all images when None)."""
    out_N1HW = x_N1HW.clone()
    m_HW = cue.mask(x_N1HW.shape[-2], x_N1HW.shape[-1])
    if where_N is None:
        where_N = torch.ones(x_N1HW.shape[0], dtype=torch.bool)
    sel = out_N1HW[where_N]
    sel[:, :, m_HW] = cue.value
    out_N1HW[where_N] = sel
    return out_N1HW


def remove_cue(x_N1HW: Tensor, cue: CueSpec) -> Tensor:
    """A copy with the cue's pixels set to 0 (the Fashion-MNIST background); used to build exact no-cue pairs."""
    out_N1HW = x_N1HW.clone()
    out_N1HW[:, :, cue.mask(x_N1HW.shape[-2], x_N1HW.shape[-1])] = 0.0
    return out_N1HW


@dataclass(frozen=True)
class CueDataConfig:
    """How the biased training set and the test sets are built."""

    target_class: int = 6
    """The class the cue co-occurs with in training (6 = Shirt, the hardest class, so the shortcut pays off most)."""
    p_target: float = 0.9
    """Fraction of the target class's training images that carry the cue."""
    p_other: float = 0.01
    """Fraction of every other class's training images that carry the cue."""
    n_train: int = 20000
    """Training images used (a class-stratified random subset of the 60k, to stay within minutes on CPU); 0 = all."""
    n_test: int = 0
    """Test images used (random subset of the 10k); 0 = all."""
    cue: CueSpec = CueSpec()
    """The mark."""
    seed: int = 0
    """Seed for the subset and for which images get the cue."""

    def __post_init__(self):
        if not 0 <= self.target_class < len(CLASSES):
            raise ValueError(f"target_class must be in 0..9, got {self.target_class}")
        for name in ("p_target", "p_other"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if self.n_train < 0 or self.n_test < 0:
            raise ValueError("n_train and n_test must be ≥ 0 (0 = the whole split)")


@dataclass
class CueData:
    """The biased training set and the four test sets (see the module docstring)."""

    cfg: CueDataConfig
    train_x: Tensor
    """(N, 1, 28, 28) training images, cue already planted."""
    train_y: Tensor
    train_cue: Tensor
    """(N,) bool: which training images carry the cue."""
    test_x: Tensor
    """(M, 1, 28, 28) clean test images (no cue)."""
    test_y: Tensor
    test_iid_cue: Tensor
    """(M,) bool: which test images get the cue in the 'iid' set (drawn with the training rates)."""
    extra_x: Tensor
    """Training-split images *not* in the training subset, clean (no cue), shuffled: probe sets and reference models."""
    extra_y: Tensor

    def test_set(self, name: str) -> tuple[Tensor, Tensor]:
        """(images, labels) of one test set: 'iid', 'clean', 'flipped' or 'cued'."""
        if name == "clean":
            return self.test_x, self.test_y
        if name == "iid":
            where = self.test_iid_cue
        elif name == "flipped":
            where = self.test_y != self.cfg.target_class
        elif name == "cued":
            where = torch.ones_like(self.test_y, dtype=torch.bool)
        else:
            raise ValueError(f"test set must be one of {TEST_SETS}, got {name!r}")
        return apply_cue(self.test_x, self.cfg.cue, where), self.test_y


def _draw_cue(y_N: Tensor, cfg: CueDataConfig, gen: torch.Generator) -> Tensor:
    p_N = torch.where(y_N == cfg.target_class, cfg.p_target, cfg.p_other)
    return torch.rand(y_N.shape[0], generator=gen) < p_N


def _stratified_subset(y_N: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """Indices of a class-balanced random subset of size ≈ n (equal share per class)."""
    classes = torch.unique(y_N)
    per = n // len(classes)
    idx = [torch.nonzero(y_N == c).squeeze(1)[torch.randperm(int((y_N == c).sum()), generator=gen)[:per]] for c in classes]
    return torch.cat(idx)[torch.randperm(per * len(classes), generator=gen)]


def make_cue_data(cfg: CueDataConfig = CueDataConfig(), root: str | os.PathLike = DEFAULT_ROOT) -> CueData:
    """Load Fashion-MNIST, take the subsets, plant the cue in training with the configured rates."""
    gen = torch.Generator().manual_seed(cfg.seed)
    all_x, all_y = load_fashion_mnist("train", root)
    test_x, test_y = load_fashion_mnist("test", root)
    train_x, train_y = all_x, all_y
    extra_x, extra_y = all_x[:0], all_y[:0]
    if cfg.n_train:
        if cfg.n_train > all_y.shape[0]:
            raise ValueError(f"n_train={cfg.n_train} exceeds the {all_y.shape[0]} training images")
        idx = _stratified_subset(all_y, cfg.n_train, gen)
        train_x, train_y = all_x[idx], all_y[idx]
        rest = torch.ones(all_y.shape[0], dtype=torch.bool)
        rest[idx] = False
        rest_idx = torch.nonzero(rest).flatten()
        rest_idx = rest_idx[torch.randperm(rest_idx.numel(), generator=gen)]
        extra_x, extra_y = all_x[rest_idx], all_y[rest_idx]
    if cfg.n_test:
        idx = torch.randperm(test_y.shape[0], generator=gen)[: cfg.n_test]
        test_x, test_y = test_x[idx], test_y[idx]
    train_cue = _draw_cue(train_y, cfg, gen)
    train_x = apply_cue(train_x, cfg.cue, train_cue)
    return CueData(cfg, train_x, train_y, train_cue, test_x, test_y, _draw_cue(test_y, cfg, gen), extra_x, extra_y)
