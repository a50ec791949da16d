"""Figure saving for the lab: matplotlib off-screen, files written atomically."""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nacosae.io import atomic_write_bytes  # noqa: E402


def save_fig(fig, path: str | os.PathLike, dpi: int = 130) -> None:
    """Render `fig` to PNG (or the format of the suffix) in memory, write it atomically, close the figure."""
    buf = io.BytesIO()
    fmt = str(path).rsplit(".", 1)[-1].lower()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
