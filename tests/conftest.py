"""Shared test helpers: starting the real app on a free local port."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(args: list[str], cwd: Path, env: dict, log: Path, timeout_s: float = 120.0):
    """`python app.py ARGS --host 127.0.0.1 --port P` in `cwd`; yields (url, seconds until it answered HTTP), stops it
    after, and prints the end of its log (fails the test with the log when it does not start)."""
    port = free_port()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "app.py", *args, "--host", "127.0.0.1", "--port", str(port)], cwd=cwd,
                                env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                    pytest.fail(f"the app did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(log.read_text()[-3000:])


# ---------------------------------------------------------------------------------------------------------------
# A planted naming bank: 8 concepts × 12 styles × 3 splits, the style is the family (every split holds every concept)
CONCEPTS = ["dog", "car", "tree", "house", "apple", "guitar", "boat", "clock"]
STYLES = ["red", "blue", "small", "big", "green", "old", "striped", "shiny", "dark", "bright", "wooden", "cartoon"]


def planted_bank(folder: Path | None = None):
    """The planted bank. With `folder`, each picture is a small PNG file there in its concept's colour (an
    "openclipart" item the app can load); without, items have no pixels (the engine needs only codes)."""
    from PIL import Image

    from nacosae.naming.bank import SPLITS, Bank, BankItem

    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for i, c in enumerate(CONCEPTS):
            Image.new("RGB", (16, 12), (30 * i, 255 - 30 * i, 128)).save(folder / f"{c}.png")
    source = "openclipart" if folder is not None else "test"
    return Bank([BankItem(f"x/{split}/{c}/{s}", source, f"{s} {c}", (s, c), c, f"{split}:{s}", split,
                          str(folder / f"{c}.png") if folder is not None else "")
                 for split in SPLITS for c in CONCEPTS for s in STYLES])


class WordEmbedder:
    """A deterministic bag-of-words text embedder over the planted words (+ `extra`): the engine's retrieval needs
    only `encode` and `id`; MiniLM runs in the end-to-end tests."""

    id = "bow"

    def __init__(self, extra: tuple[str, ...] = ()):
        self.vocab = {w: i for i, w in enumerate(CONCEPTS + STYLES + list(extra))}

    def encode(self, texts):
        import torch

        out = torch.zeros(len(texts), len(self.vocab) + 1)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, self.vocab.get(w, len(self.vocab))] += 1
        return torch.nn.functional.normalize(out + 1e-6, dim=1)
