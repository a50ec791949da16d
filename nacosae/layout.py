"""Where a run keeps its files: the one owner of run folder paths (scripts, evaluation, publishing and the app ask it).

    run = RunLayout("runs/offline_default")
    run.acts("blocks.14")        runs/offline_default/acts/blocks.14        activation store
    run.sae("blocks.14")         runs/offline_default/sae/blocks.14         training folder (checkpoints, curves)
    run.sae_weights("blocks.14") runs/offline_default/sae/blocks.14/sae     the trained SAE (safetensors + config)
    run.sweep("features", "k16-expansion4")
                                 runs/offline_default/sweep/features/k16-expansion4   one SAE of a sweep (its training
                                 folder; its statistics in .../stats)
    run.stats("blocks.14")       runs/offline_default/stats/blocks.14       feature statistics (+ ".raw": raw channels)
    run.naming("blocks.14")      runs/offline_default/naming/blocks.14      naming work folder (state, report)
    run.pool("blocks.14")        runs/offline_default/naming/blocks.14/pool the render pool (METHODS §3.1b)
    run.results("blocks.14")     runs/offline_default/results/blocks.14     the results dataset (Hub layout)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_LAYER = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @staticmethod
    def _part(layer: str) -> str:
        if not _LAYER.match(layer or ""):
            raise ValueError(f"layer {layer!r} cannot name a run folder: use letters, digits, '.', '_' and '-'")
        return layer

    def acts(self, layer: str) -> Path:
        return self.root / "acts" / self._part(layer)

    def sae(self, layer: str) -> Path:
        return self.root / "sae" / self._part(layer)

    def sae_weights(self, layer: str) -> Path:
        return self.sae(layer) / "sae"

    def sweep(self, layer: str, label: str) -> Path:
        return self.root / "sweep" / self._part(layer) / self._part(label)

    def stats(self, layer: str, raw: bool = False) -> Path:
        return self.root / "stats" / (self._part(layer) + (".raw" if raw else ""))

    def naming(self, layer: str) -> Path:
        return self.root / "naming" / self._part(layer)

    def pool(self, layer: str) -> Path:
        return self.naming(layer) / "pool"

    def results(self, layer: str) -> Path:
        return self.root / "results" / self._part(layer)

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def summary_json(self) -> Path:
        return self.root / "results.json"

    @property
    def summary_md(self) -> Path:
        return self.root / "results.md"
