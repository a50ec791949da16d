"""The app's serving layer, without any UI: load SAEs and their results dataset once, answer requests as plain data.

    explorer = open_explorer(Source("owner/saes", "owner/results"))      # or two local folders (the Hub layout)
    explorer.browse(sae_id, query="flag", sort="score")                   # pandas DataFrame of features
    explorer.feature_page(sae_id, 123)                                    # FeaturePage: gallery, histogram, names, MILS
    explorer.what_fires(sae_id, pil_image)                                # FiresResult: top features with heatmaps
    explorer.steer(sae_id, pil_image, 123, "clamp", 5.0)                  # SteerResult: outputs before/after
    state = explorer.start_naming(sae_id, 123, cfg)                       # the MILS loop, one chunk at a time:
    state = explorer.naming_step(sae_id, state, cfg, budget_s=0)          #   resumable, so chunks fit a ZeroGPU call
    explorer.naming_view(state)                                           # NamingView: status, history, renders

Everything expensive is loaded once per process and shared by all sessions: the tables (at open), the SAE weights,
the backbone and the naming parts (on first use, under a lock). Handlers never keep models in per-user state.
Bad input raises `ServeError` with a message meant for the user (the app shows it and keeps serving).

Concurrency: the app answers several requests at once with the same explorer, SAEs and backbone. No request stores
anything on them: a backbone reads a layer as a pure function of its input (`nacosae.backbones`, no per-call hook),
an SAE's `encode`/`decode` are pure, and the shared caches here (pages, decoded images) sit behind a lock.

Who may load what: local folders come only from the operator (`Source(...)` built from CLI flags, environment or
space_config). What a visitor types becomes `visitor_source(...)`: two Hub ids, checked and size-capped by
`nacosae.hub.visitor_repo_folder`, which never reads a local path; the backbone such an SAE needs must be one the
operator allows (`VISITOR_BACKBONES`). `public_message` strips server paths from any text shown to a visitor.

Results are data: dataclasses of numbers, strings, tables and images; the app (app.py) turns them into markdown.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nacosae.results import UNNAMED, history_columns, name_methods, read_results_folder

SORTS = ("score", "frequency", "max activation", "monosemanticity", "feature")
"""score: the CoSy AUC of the published name, then MS, then top-image label purity, then frequency (descending)."""
STEER_MODES = ("clamp", "ablate", "add")
PROPOSERS = ("vocabulary", "gemma-3-270m")


class ServeError(ValueError):
    """A request the app cannot serve; the message tells the user what to do."""


MAX_VISITOR_SAE_BYTES = int(float(os.environ.get("NACOSAE_VISITOR_MAX_SAE_MB", "1024")) * 1e6)
"""Largest SAE (config + weights) a visitor-named repo may make the app download (env NACOSAE_VISITOR_MAX_SAE_MB)."""
MAX_VISITOR_RESULTS_BYTES = int(float(os.environ.get("NACOSAE_VISITOR_MAX_RESULTS_MB", "512")) * 1e6)
"""Largest results dataset (card + parquet) a visitor may load (env NACOSAE_VISITOR_MAX_RESULTS_MB)."""
MAX_VISITOR_CONFIG_BYTES = 20_000_000
"""An SAE repo's card and config.json files, read when a visitor opens it."""
VISITOR_BACKBONES = tuple(b.strip() for b in os.environ.get("NACOSAE_VISITOR_BACKBONES", "efficientnet-lite0").split(",")
                          if b.strip())
"""Backbones an SAE from a visitor-named repo may need (env NACOSAE_VISITOR_BACKBONES, comma-separated), besides
those the operator's own sources have loaded: each costs its weights' download and memory."""
MAX_VISITOR_SOURCES = 8
"""Visitor sources kept open at once (least recently opened dropped first)."""

_PATH_RE = re.compile(r"(?<![\w.:/~-])(?:~|\.{1,2})?/[^\s'\"`,;:()\[\]{}<>|]*")


def public_message(text: str) -> str:
    """`text` with every absolute or home-relative file path replaced by '<path>': what a visitor may be shown of an
    error or notice (Hub ids 'owner/name' and URLs stay). The last line of defence; messages are written without
    server paths in the first place."""
    return _PATH_RE.sub("<path>", str(text))


@dataclass(frozen=True)
class Source:
    """Where the artifacts come from: a Hub repo id or a local folder in the Hub layout, for each of the two repos."""

    sae_repo: str
    """SAE model repo (one subfolder per SAE)."""
    results_repo: str
    """Results dataset repo (docs/RESULTS_SCHEMA.md)."""
    revision: str | None = None
    """Hub revision for both (None: main)."""
    label: str = ""
    """How the app names this source ("bundled demo")."""
    visitor: bool = False
    """True when a visitor of the app named the repos (`visitor_source`): Hub ids only, never a local path, downloads
    restricted to the files the app reads and capped in size. False: the operator's (CLI, environment, config)."""

    @property
    def key(self) -> str:
        """An opaque handle of this source (what the app keeps per session; `explorer` looks it up)."""
        ident = json.dumps([self.sae_repo, self.results_repo, self.revision, self.visitor])
        return ("v-" if self.visitor else "o-") + hashlib.sha256(ident.encode()).hexdigest()[:20]


def visitor_source(sae_repo: str, results_repo: str) -> Source:
    """The source a visitor asks for: both must be Hub repo ids 'owner/name' (`nacosae.hub.check_visitor_repo_id`);
    anything else (a local path, '..', '~', a URL) raises ServeError without looking at the disk."""
    from nacosae.hub import RepoRefused, check_visitor_repo_id

    try:
        ids = [check_visitor_repo_id(r) for r in (sae_repo, results_repo)]
    except RepoRefused as e:
        raise ServeError(str(e)) from e
    return Source(ids[0], ids[1], None, label="", visitor=True)


# ================================================================================================ results of one page
@dataclass
class GalleryItem:
    """One picture of a gallery: the image (PIL) and what it shows, for the app to caption."""

    image: Any
    score: float | None = None
    """The feature's activation on a top image, or a prompt's score on a render."""
    label: str | None = None
    """The image's label (top images), or the prompt it renders (MILS renders)."""
    method: str | None = None
    """The naming loop a render comes from ("mils", or a variant)."""


@dataclass
class MILSRun:
    """Summary of one MILS loop's prompt history in the results."""

    method: str
    n_prompts: int
    n_iterations: int
    best_prompt: str
    best_score: float
    name: str | None
    """The name this method gave the feature (None: none cleared its threshold)."""


@dataclass
class FeaturePage:
    sae_id: str
    feature: int
    name: str
    """The name to show: the published one, else 'unnamed (MILS guess: …)' or 'unnamed'."""
    name_method: str | None
    """The method of the published name (None: unnamed)."""
    stats: dict[str, Any]
    """image_frequency, token_frequency (fractions), max_act, mean_act, aggregation, dead, dense, ms, ms_encoder."""
    gallery: list[GalleryItem]
    """Top images with the feature's heatmap over the pixels the backbone saw, best first (score: activation)."""
    histogram: pd.DataFrame
    """Columns `activation` (bin label), `images` (count), in bin order."""
    names: pd.DataFrame
    """One row per naming method: method, name (None: no name), cosy_auc, cosy_mad (NaN: none), published (bool)."""
    mils_runs: list[MILSRun]
    """One per MILS loop the results hold (empty: none ran on this feature)."""
    mils_history: pd.DataFrame
    """method, iteration, prompt, score: every prompt the MILS loop(s) tried, best first."""
    mils_gallery: list[GalleryItem]
    """Renders of the best MILS prompts (score, prompt as label, method)."""
    mils_curve: pd.DataFrame
    """iteration, best score, method."""


@dataclass
class FiringFeature:
    feature: int
    name: str
    activation: float
    """Image-level activation (the results' aggregation over tokens)."""
    relative: float
    """activation / the feature's max on the probe set."""
    image: Any
    """The uploaded image with the feature's heatmap over the pixels the backbone saw (PIL)."""


@dataclass
class FiresResult:
    items: list[FiringFeature]
    """The most active features relative to their probe-set max, most active first."""
    table: pd.DataFrame
    """feature, name, activation, relative: the same as numbers."""

    @property
    def features(self) -> list[int]:
        return [it.feature for it in self.items]


@dataclass
class SteerResult:
    before: dict[str, float]
    """Top outputs (label → probability) of the unmodified run."""
    after: dict[str, float]
    changes: pd.DataFrame
    """label, before, after, change: the labels whose probability moved most (largest change first)."""
    feature: int
    name: str
    mode: str
    value: float
    layer: str
    scores: str
    """What the probabilities are ("imagenet-1k logits, softmax over 1000 classes", "zero-shot over 3 labels")."""


@dataclass
class NamingView:
    step: str
    """"seeding", "iteration" or "done"."""
    iteration: int
    n_iterations: int
    steps_done: int
    steps_total: int
    n_prompts: int
    elapsed_s: float
    best: tuple[float, str] | None
    """(score, prompt) of the best prompt so far."""
    name: str
    history: pd.DataFrame
    """iteration, prompt, score: every prompt tried, best first."""
    gallery: list[GalleryItem]
    """Renders of the best prompts (score, prompt as label)."""
    curve: pd.DataFrame
    done: bool


# ================================================================================================ process-wide caches
# One lock per kind of shared object, so a slow load (a backbone: seconds) never blocks a fast request (a page).
_EXPLORER_LOCK, _BACKBONE_LOCK, _NAMING_LOCK = threading.RLock(), threading.RLock(), threading.RLock()
_EXPLORERS: dict[str, "Explorer"] = {}
_BACKBONES: dict[str, Any] = {}
_NAMING: dict[str, Any] = {}


def open_explorer(source: Source, device: str = "cpu") -> "Explorer":
    """The explorer of a source, built once per process (tables read, SAE configs checked). At most
    `MAX_VISITOR_SOURCES` visitor sources stay open; the operator's stay for the life of the process."""
    ex = _EXPLORERS.get(source.key)
    if ex is not None:
        return ex
    with _EXPLORER_LOCK:
        if source.key not in _EXPLORERS:
            _EXPLORERS[source.key] = Explorer(source, device=device)
            visitors = [k for k, e in _EXPLORERS.items() if e.source.visitor]
            for k in visitors[:-MAX_VISITOR_SOURCES]:  # dicts keep insertion order: the oldest first
                del _EXPLORERS[k]
        return _EXPLORERS[source.key]


def explorer(key: str) -> "Explorer":
    """The open explorer with this `Source.key`. Only looks up: a key never opens anything, so what a session
    holds cannot make the server load a repo or a folder."""
    ex = _EXPLORERS.get(key)
    if ex is None:
        raise ServeError("this source is no longer loaded: load its repos again")
    return ex


def use_naming_generator(generator) -> None:
    """Set the generator live naming renders with (default: retrieval from all of Open Clip Art, built on first use);
    e.g. a `RetrievalGenerator` over a smaller bank, or a `DiffusersGenerator` on a GPU."""
    with _NAMING_LOCK:
        _NAMING["generator"] = generator


def backbone_for(provenance: dict[str, Any], device: str = "cpu", visitor: bool = False):
    """The backbone an SAE was trained on, rebuilt from its provenance (loaded once per process). For an SAE from a
    visitor's repo (`visitor=True`) only a backbone already loaded or listed in `VISITOR_BACKBONES` is used, never a
    local path: its provenance is the visitor's text."""
    from nacosae.backbones import load_backbone

    name, weights = str(provenance.get("backbone") or ""), provenance.get("weights")
    key = json.dumps([name, weights, str(device)])
    with _BACKBONE_LOCK:
        if key in _BACKBONES:
            return _BACKBONES[key]
        if visitor:
            local = name.startswith(("hf:/", "hf:.", "hf:~", "open_clip:local-dir:")) or ".." in name
            if local or name not in VISITOR_BACKBONES:
                raise ServeError("this SAE needs a backbone that this app does not load for a repo named by a "
                                 "visitor (it loads only the backbones its operator chose): run the app yourself "
                                 "with this repo (python app.py --sae-repo ... --results-repo ...)")
        kwargs: dict[str, Any] = {}
        if name.startswith("open_clip:") and not name.startswith(("open_clip:hf-hub:", "open_clip:local-dir:")):
            kwargs["pretrained"] = weights
        elif name.startswith("hf:") and weights and "@" in str(weights) and not Path(name[3:]).exists():
            kwargs["revision"] = str(weights).rsplit("@", 1)[1]
        elif not (name == "efficientnet-lite0" or name.startswith(("open_clip:", "hf:"))):
            raise ServeError(f"the SAE was trained on backbone {name!r}, which the app cannot rebuild from its "
                             "provenance (efficientnet-lite0, open_clip:… and hf:… backbones only)")
        try:
            bb = load_backbone(name, device=device, **kwargs)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ServeError(f"cannot load backbone {name!r} ({weights}): {e}") from e
        _BACKBONES[key] = bb
        return bb


def _histogram_frame(edges: list[float], counts: list[int], max_bars: int = 24) -> pd.DataFrame:
    """The histogram from its first to its last nonempty bin, neighbouring bins merged so at most `max_bars` remain
    (bins are equal-width, so merging keeps the shape)."""
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return pd.DataFrame({"activation": [], "images": []})
    lo, hi = nonzero[0], nonzero[-1] + 1
    step = max(1, math.ceil((hi - lo) / max_bars))
    labels, values = [], []
    for a in range(lo, hi, step):
        b = min(a + step, hi)
        labels.append(f"{edges[a]:.3g}–{edges[b]:.3g}")
        values.append(int(sum(counts[a:b])))
    return pd.DataFrame({"activation": labels, "images": values})


# ================================================================================================ the explorer
class Explorer:
    """One source: its results tables in memory, its SAEs (weights on first use), the backbones they need."""

    def __init__(self, source: Source, device: str = "cpu"):
        from nacosae.hub import RESULTS_REPO_FILES, SAE_CONFIG_FILES, RepoRefused, repo_folder, visitor_repo_folder

        self.source, self.device = source, device
        self.warnings: list[str] = []
        self._roots: dict[str, str] = {}  # local folder → the repo name to say instead (messages never show paths)
        self._sae_root: Path | None = None  # a local folder with the SAE repo's configs (None: operator Hub repo)
        try:
            if source.visitor:
                folder = visitor_repo_folder(source.results_repo, "dataset", RESULTS_REPO_FILES,
                                             MAX_VISITOR_RESULTS_BYTES, "a results dataset")
                self._sae_root = visitor_repo_folder(source.sae_repo, "model", SAE_CONFIG_FILES, MAX_VISITOR_CONFIG_BYTES,
                                                     "an SAE repo")
                self._roots[str(self._sae_root)] = source.sae_repo
            else:
                folder = repo_folder(source.results_repo, "dataset", source.revision)
                if Path(source.sae_repo).expanduser().is_dir():
                    self._sae_root = Path(source.sae_repo).expanduser()
            self._roots[str(folder)] = source.results_repo
            tables = read_results_folder(folder)
        except RepoRefused as e:
            raise ServeError(str(e)) from e
        except (FileNotFoundError, ValueError) as e:  # ValueError: tables that do not fit the results schema
            raise ServeError(f"cannot load the results dataset {source.results_repo!r}: {self._say(e)}") from e
        self.features = tables["features"]
        self.methods = name_methods(self.features)  # the methods and MILS loops this dataset has results of
        self.histories = history_columns(self.features)
        self.images = tables["images"]
        self.runs = {r["sae_id"]: r for r in tables["runs"].to_pylist()}
        self._image_row = {k: i for i, k in enumerate(self.images.column("image_id").to_pylist())}
        self._image_meta = {c: self.images.column(c).to_pylist() for c in ("label", "description", "prompt")
                            if c in self.images.schema.names}
        self._image_cache: OrderedDict[str, Any] = OrderedDict()
        self._row = {(s, int(j)): i for i, (s, j) in enumerate(zip(self.features.column("sae_id").to_pylist(),
                                                                  self.features.column("feature").to_pylist()))}
        self._lock = threading.RLock()  # SAE weights and scorers of this source
        self._cache_lock = threading.Lock()  # the LRU caches below: shared by concurrent requests
        self._frames: dict[str, pd.DataFrame] = {}
        self._aggregation: dict[str, str] = {}
        self._saes: dict[str, Any] = {}
        self._scorers: dict[str, Any] = {}
        self._pages: OrderedDict[tuple[str, int], FeaturePage] = OrderedDict()
        self.sae_configs: dict[str, dict[str, Any]] = {}
        for sid in sorted(self.runs):
            try:
                self.sae_configs[sid] = self._check_sae_config(sid)
            except ServeError as e:
                self.warnings.append(str(e))
        if not self.sae_configs:
            raise ServeError("no usable SAE in this source:\n" + "\n".join(self.warnings or ["the runs table is empty"]))

    # ------------------------------------------------------------------------------------------ loading and checks
    @property
    def sae_ids(self) -> list[str]:
        return list(self.sae_configs)

    def _say(self, error: Exception | str) -> str:
        """An error's text with this source's local folders named by their repos, then `public_message`."""
        text = str(error)
        for folder, repo in self._roots.items():
            text = text.replace(folder, repo)
        return public_message(text)

    def _check_sae_config(self, sae_id: str) -> dict[str, Any]:
        """Read the SAE's config.json (not its weights) and check it against the results' `runs` row."""
        from nacosae.hub import hub_file

        try:
            if self._sae_root is not None:
                path = self._sae_root / sae_id / "config.json"
                if ".." in Path(sae_id).parts or not path.is_file():
                    raise FileNotFoundError(f"{self.source.sae_repo} has no subfolder {sae_id}/ with a config.json")
            else:
                path = Path(hub_file(self.source.sae_repo, "config.json", subfolder=sae_id, revision=self.source.revision))
            cfg = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise ServeError(f"SAE {sae_id!r}: cannot read its config from {self.source.sae_repo!r} ({self._say(e)})") from e
        run, prov = self.runs[sae_id], cfg.get("provenance", {})
        problems = [f"{what}: SAE has {a!r}, results have {b!r}" for what, a, b in (
            ("backbone", prov.get("backbone"), run.get("backbone")), ("layer", prov.get("layer"), run.get("layer")),
            ("d_in", cfg.get("d_in"), run.get("d_in")), ("d_sae", cfg.get("d_sae"), run.get("d_sae"))) if a != b]
        if problems:
            raise ServeError(f"SAE {sae_id!r} in {self.source.sae_repo!r} does not match its results in "
                             f"{self.source.results_repo!r} ({'; '.join(problems)}): publish both from the same run")
        return cfg

    def _need(self, sae_id: str) -> dict[str, Any]:
        if sae_id not in self.sae_configs:
            raise ServeError(f"unknown SAE {sae_id!r}; this source has {self.sae_ids}")
        return self.sae_configs[sae_id]

    def backbone(self, sae_id: str):
        return backbone_for(self._need(sae_id).get("provenance", {}), self.device, visitor=self.source.visitor)

    def _weights_folder(self, sae_id: str) -> tuple[str, str | None]:
        """(path_or_repo_id, subfolder) for `SAE.from_pretrained`: for a visitor's repo, a snapshot of this SAE's
        config and weights alone, its size checked first."""
        from nacosae.hub import RepoRefused, visitor_repo_folder

        if not self.source.visitor:
            return self.source.sae_repo, sae_id
        try:
            root = visitor_repo_folder(self.source.sae_repo, "model", [f"{sae_id}/config.json", f"{sae_id}/model.safetensors"],
                                       MAX_VISITOR_SAE_BYTES, "an SAE")
        except RepoRefused as e:
            raise ServeError(str(e)) from e
        self._roots[str(root)] = self.source.sae_repo
        if not (root / sae_id / "model.safetensors").is_file():  # never the foreign-format loaders on a visitor's files
            raise ServeError(f"SAE {sae_id!r} in {self.source.sae_repo!r} has no model.safetensors")
        return str(root / sae_id), None

    def sae(self, sae_id: str):
        """The SAE's weights (loaded once), checked against the backbone's layer width."""
        from nacosae.sae import SAE, CheckpointError

        cfg = self._need(sae_id)
        if sae_id in self._saes:
            return self._saes[sae_id]
        with self._lock:
            if sae_id not in self._saes:
                bb = self.backbone(sae_id)
                layer = cfg["provenance"]["layer"]
                try:
                    d_layer = bb.d(layer)
                    path, subfolder = self._weights_folder(sae_id)
                    self._saes[sae_id] = SAE.from_pretrained(path, subfolder=subfolder, revision=self.source.revision,
                                                             device=self.device, expected_d_in=d_layer)
                except ServeError:
                    raise
                except (CheckpointError, FileNotFoundError, ValueError) as e:
                    raise ServeError(f"cannot use SAE {sae_id!r} on {bb.name} layer {layer!r}: {self._say(e)}") from e
            return self._saes[sae_id]

    def warm_up(self, sae_id: str | None = None) -> None:
        """Load the backbone and SAE weights now (the app calls this in the background after start-up)."""
        self.sae(sae_id or self.sae_ids[0])

    # ------------------------------------------------------------------------------------------ tables
    def frame(self, sae_id: str) -> pd.DataFrame:
        """Scalar columns of one SAE's features, indexed by feature (built once)."""
        self._need(sae_id)
        if sae_id not in self._frames:
            import pyarrow.compute as pc

            names = self.features.schema.names
            scalar = [c for c in names if c in ("feature", "image_frequency", "token_frequency", "mean_act", "max_act", "dead",
                                                "dense", "name", "name_method", "ms") or c.startswith(("name_", "cosy_auc_", "cosy_mad_"))]
            sub = self.features.filter(pc.equal(self.features.column("sae_id"), sae_id)).select(scalar)
            df = sub.to_pandas().set_index("feature", drop=False).sort_index()
            df.index.name = None
            score = pd.Series(np.nan, index=df.index)
            for m in self.methods:  # the CoSy AUC of the method that gave the published name
                col = f"cosy_auc_{m}"
                if col in df:
                    score = score.where(df["name_method"] != m, df[col])
            df["score"] = score.astype(float)
            df["purity"] = self._purity(sae_id, df.index)
            df["display_name"] = [self._display_name(r) for r in df.to_dict("records")]
            self._frames[sae_id] = df
        return self._frames[sae_id]

    def _purity(self, sae_id: str, index) -> np.ndarray:
        """Share of a feature's top images that carry its most common label (NaN without labels or top images): a
        cheap selectivity score, so "sort by score" orders features usefully before any name has a CoSy score."""
        import pyarrow.compute as pc

        labels = self._image_meta.get("label")
        out = pd.Series(np.nan, index=index, dtype=float)
        if not labels:
            return out.to_numpy()
        sub = self.features.filter(pc.equal(self.features.column("sae_id"), sae_id)).select(["feature", "top_image_ids"])
        for j, ids in zip(sub.column("feature").to_pylist(), sub.column("top_image_ids").to_pylist()):
            labs = [labels[self._image_row[i]] for i in (ids or []) if i in self._image_row and labels[self._image_row[i]]]
            if labs:
                out[j] = max(labs.count(lab) for lab in set(labs)) / len(labs)
        return out.to_numpy()

    @staticmethod
    def _display_name(r: dict[str, Any]) -> str:
        if r.get("name") and r["name"] != UNNAMED:
            return r["name"]
        # no name cleared the held-out threshold: show the best candidate, marked as such
        for method, what in (("mils", "MILS guess"), ("top_label", "top label")):
            guess = r.get(f"name_{method}")
            if isinstance(guess, str) and guess:
                return f"unnamed ({what}: {guess})"
        return UNNAMED

    def row(self, sae_id: str, feature: int) -> dict[str, Any]:
        self._need(sae_id)
        try:
            feature = int(feature)
        except (TypeError, ValueError) as e:
            raise ServeError(f"feature must be a whole number, got {feature!r}") from e
        i = self._row.get((sae_id, feature))
        if i is None:
            d_sae = self.sae_configs[sae_id]["d_sae"]
            raise ServeError(f"SAE {sae_id!r} has no feature {feature} in the results (features 0..{d_sae - 1})")
        return self.features.slice(i, 1).to_pylist()[0]

    def image(self, image_id: str):
        """A dataset image as RGB PIL (decoded once by `nacosae.images.open_image`, LRU-cached)."""
        from nacosae.images import open_image

        with self._cache_lock:
            if image_id in self._image_cache:
                self._image_cache.move_to_end(image_id)
                return self._image_cache[image_id]
        i = self._image_row.get(image_id)
        if i is None:
            raise ServeError(f"image {image_id!r} is not in the results dataset")
        im = open_image(self.images.column("image")[i].as_py(), where=image_id)
        with self._cache_lock:
            self._image_cache[image_id] = im
            if len(self._image_cache) > 2048:
                self._image_cache.popitem(last=False)
        return im

    # ------------------------------------------------------------------------------------------ the browser
    def browse(self, sae_id: str, query: str = "", sort: str = "score", hide_dead: bool = True, hide_dense: bool = False,
               limit: int = 2000) -> pd.DataFrame:
        """Features matching `query` (a substring of any name, or a feature number), sorted, as display rows."""
        if sort not in SORTS:
            raise ServeError(f"sort must be one of {SORTS}, got {sort!r}")
        df = self.frame(sae_id)
        mask = pd.Series(True, index=df.index)
        if hide_dead:
            mask &= ~df["dead"]
        if hide_dense:
            mask &= ~df["dense"]
        q = (query or "").strip().lower()
        if q:
            if q.lstrip("#").isdigit():
                mask &= df["feature"] == int(q.lstrip("#"))
            else:
                hit = df["display_name"].str.lower().str.contains(q, regex=False)
                for c in df.columns:
                    if c.startswith("name_") and c != "name_method":
                        hit |= df[c].fillna("").astype(str).str.lower().str.contains(q, regex=False)
                mask &= hit
        sub = df[mask]
        key = {"score": ["score", "ms", "purity", "image_frequency"], "frequency": ["image_frequency"], "max activation": ["max_act"],
               "monosemanticity": ["ms"], "feature": ["feature"]}[sort]
        key = [k for k in key if k in sub] or ["feature"]
        sub = sub.sort_values(key + (["feature"] if "feature" not in key else []),
                              ascending=[sort == "feature"] * len(key) + ([True] if "feature" not in key else []), na_position="last")
        out = pd.DataFrame({
            "feature": sub["feature"].astype(int),
            "name": sub["display_name"],
            "CoSy AUC": sub["score"].astype(float).round(3),
            "MS": sub["ms"].astype(float).round(3) if "ms" in sub else np.nan,
            "purity": sub["purity"].round(2),
            "frequency": sub["image_frequency"].astype(float),
            "max act": sub["max_act"].astype(float).round(2),
            "flags": np.where(sub["dead"], "dead", np.where(sub["dense"], "dense", "")),
        })
        return out.head(limit).reset_index(drop=True)

    # ------------------------------------------------------------------------------------------ a feature's page
    def feature_page(self, sae_id: str, feature: int) -> FeaturePage:
        key = (sae_id, int(feature) if str(feature).lstrip("-").isdigit() else -1)
        with self._cache_lock:
            if key in self._pages:
                self._pages.move_to_end(key)
                return self._pages[key]
        page = self._feature_page(sae_id, feature)  # outside the lock: two first requests may both build it
        with self._cache_lock:
            self._pages[key] = page
            if len(self._pages) > 256:
                self._pages.popitem(last=False)
        return page

    def token_box(self, sae_id: str, image_size: tuple[int, int]):
        """The pixels of an image of `image_size` that the SAE's backbone saw (`nacosae.backbones.token_box`, from the
        SAE's provenance: no model is loaded); None when the provenance names no backbone whose geometry is known
        (a custom module): heatmaps then span the whole image, as that backbone's default preprocessing does."""
        from nacosae.backbones import token_box

        try:
            return token_box(self._need(sae_id).get("provenance", {}), image_size)
        except ValueError:
            return None

    def _overlay(self, sae_id: str, image_id: str, heat, grid: tuple[int, int], vmax: float):
        """A dataset image with a token heatmap over the pixels the backbone saw (thumbnails are stored as the image
        itself, or as the padded square older datasets stored, over which a padding box is the whole square)."""
        from nacosae.features import heatmap_overlay

        im = self.image(image_id)
        if heat is None:
            return im
        return heatmap_overlay(im, heat, grid, vmax=vmax, box=self.token_box(sae_id, im.size))

    def _feature_page(self, sae_id: str, feature: int) -> FeaturePage:
        r = self.row(sae_id, feature)
        j = r["feature"]
        grid = (r["grid_h"], r["grid_w"])
        vmax = r["max_act"] or None
        labels = self._image_meta.get("label", [])
        gallery = [GalleryItem(self._overlay(sae_id, iid, heat, grid, vmax), float(act),
                               labels[self._image_row[iid]] if labels else None)
                   for iid, act, heat in zip(r["top_image_ids"] or [], r["top_activations"] or [], r["top_heatmaps"] or [])]
        stats = {k: r.get(k) for k in ("image_frequency", "token_frequency", "max_act", "mean_act", "aggregation", "dead",
                                       "dense", "ms", "ms_encoder")}
        histogram = _histogram_frame(r["hist_edges"] or [], r["hist_counts"] or [])
        rows = []
        for m in self.methods:
            nm, auc = r.get(f"name_{m}"), r.get(f"cosy_auc_{m}")
            if nm is None and auc is None:
                continue  # the method did not run on this feature
            mad = r.get(f"cosy_mad_{m}")
            rows.append({"method": m, "name": nm, "cosy_auc": math.nan if auc is None else float(auc),
                         "cosy_mad": math.nan if mad is None else float(mad), "published": r.get("name_method") == m})
        names = pd.DataFrame(rows, columns=["method", "name", "cosy_auc", "cosy_mad", "published"])
        runs, history, mgallery, curve = self._mils_parts(r)
        method = r.get("name_method")
        return FeaturePage(sae_id, j, self._display_name(r), method if method not in (None, "none") else None, stats,
                           gallery, histogram, names, runs, history, mgallery, curve)

    def _mils_parts(self, r: dict[str, Any]):
        """The MILS prompt history of every loop the results hold (`mils_history`, `<variant>_history`): per-loop
        summaries, the history table, renders of the best prompts, the best-score curve."""
        rows, curves, gallery, shown = [], [], [], set()
        for col in self.histories:
            method = col[: -len("_history")]
            hist = r.get(col) or []
            rows += [{"method": method, "iteration": h.get("iteration"), "prompt": h.get("prompt"), "score": h.get("score")}
                     for h in hist]
            scores = r.get(f"{method}_scores_by_iteration") or []
            curves += [{"iteration": i, "best score": float(v), "method": method} for i, v in enumerate(scores)]
            for h in sorted(hist, key=lambda h: -(h.get("score") if h.get("score") is not None else -math.inf)):
                if len(gallery) >= 8:
                    break
                for rid in (h.get("render_ids") or [])[:2]:
                    if rid in self._image_row and rid not in shown:  # retrieval returns the same image for similar prompts
                        shown.add(rid)
                        score = h.get("score")
                        gallery.append(GalleryItem(self.image(rid), math.nan if score is None else float(score),
                                                   h.get("prompt"), method))
        curve = pd.DataFrame(curves, columns=["iteration", "best score", "method"])
        if not rows:
            return [], pd.DataFrame(columns=["method", "iteration", "prompt", "score"]), [], curve
        history = pd.DataFrame(rows, columns=["method", "iteration", "prompt", "score"])
        history["score"] = history["score"].astype(float).round(3)
        history = history.sort_values(["score", "iteration"], ascending=[False, True], na_position="last").reset_index(drop=True)
        runs = []
        for method, h in history.groupby("method", sort=False):
            best = h.iloc[0]
            runs.append(MILSRun(method, len(h), int(h["iteration"].max()), str(best["prompt"]), float(best["score"]),
                                r.get(f"name_{method}") or None))
        return runs, history, gallery, curve

    # ------------------------------------------------------------------------------------------ model-side helpers
    def _codes(self, sae_id: str, image):
        """(T, S) SAE codes of one image at the SAE's layer, the backbone, and the image (at most 256 px a side: the
        heatmaps are 7×7-ish, drawing them over megapixels only costs time) with the box of it the backbone saw."""
        import torch
        from PIL import Image

        image = check_image(image)
        cfg = self._need(sae_id)
        prov = cfg["provenance"]
        bb, sae = self.backbone(sae_id), self.sae(sae_id)
        with torch.no_grad():
            pixels = bb.preprocess_batch([image])
            acts_1TD = bb.activations(pixels, prov["layer"], tokens=prov.get("tokens", "all"))
            codes_TS = sae.encode(acts_1TD.to(sae.W_dec.device))[0].float().cpu()
        box = bb.token_box(image.size)  # on the full-size image: the crop/pad offsets are rounded at that size
        if max(image.size) > 256:
            f = 256 / max(image.size)
            image = image.resize((max(1, round(image.width * f)), max(1, round(image.height * f))), Image.Resampling.BICUBIC)
            box = tuple(v * f for v in box)
        return codes_TS, bb, image, box

    def _aggregate(self, sae_id: str, codes_TS):
        from nacosae.features import aggregate_tokens

        return aggregate_tokens(codes_TS[None], self.frame_aggregation(sae_id))[0]

    def frame_aggregation(self, sae_id: str) -> str:
        """How the results made image-level activations from token codes ('max', 'mean' or 'cls')."""
        if sae_id not in self._aggregation:
            i = next((i for (s, _), i in self._row.items() if s == sae_id), None)
            self._aggregation[sae_id] = self.features.column("aggregation")[i].as_py() if i is not None else "max"
        return self._aggregation[sae_id]

    def max_act(self, sae_id: str):
        """(S,) the probe-set max image-level activation per feature (0 where the results have no row)."""
        import torch

        df = self.frame(sae_id)
        out = torch.zeros(self.sae_configs[sae_id]["d_sae"])
        out[torch.from_numpy(df["feature"].to_numpy(np.int64, copy=True))] = torch.from_numpy(df["max_act"].to_numpy(np.float32, copy=True))
        return out

    # ------------------------------------------------------------------------------------------ what fires on my image
    def what_fires(self, sae_id: str, image, top: int = 8) -> FiresResult:
        """The features most active on `image` relative to their probe-set max, each with its heatmap over the pixels
        of the image the backbone saw (its crop, or the image on its padding)."""
        from nacosae.features import heatmap_overlay

        if not 1 <= int(top) <= 64:
            raise ServeError(f"top must be in 1..64, got {top}")
        codes_TS, bb, small, box = self._codes(sae_id, image)
        act_S = self._aggregate(sae_id, codes_TS)
        max_S = self.max_act(sae_id)
        rel_S = act_S / max_S.clamp(min=1e-12)
        rel_S[max_S <= 0] = 0  # dead on the probe set: no scale to compare with
        order = [int(j) for j in rel_S.argsort(descending=True)[: int(top)] if act_S[j] > 0]
        df = self.frame(sae_id)
        grid = bb.token_grid(self._need(sae_id)["provenance"]["layer"])
        n_grid = grid[0] * grid[1] if grid else 0
        items = []
        for j in order:
            name = df.at[j, "display_name"] if j in df.index else UNNAMED
            if grid and codes_TS.shape[0] >= n_grid > 1:  # the grid's tokens are the last ones (after CLS/registers)
                over = heatmap_overlay(small, codes_TS[-n_grid:, j], grid, vmax=float(max_S[j]), box=box)
            else:  # one token per image (CLS, mean, embedding): nothing to place
                over = small
            items.append(FiringFeature(j, name, float(act_S[j]), float(rel_S[j]), over))
        table = pd.DataFrame([{"feature": it.feature, "name": it.name, "activation": round(it.activation, 3),
                               "relative": round(it.relative, 3)} for it in items],
                             columns=["feature", "name", "activation", "relative"])
        return FiresResult(items, table)

    # ------------------------------------------------------------------------------------------ steering
    def steer(self, sae_id: str, image, feature: int, mode: str = "clamp", value: float = 0.0,
              labels: list[str] | None = None, top: int = 5) -> SteerResult:
        """Intervene on one feature at the SAE's layer and compare the model's outputs (METHODS §5).

        clamp: every token's code f_j := value, decoded, plus the SAE error (h − x̂), so only feature j changes;
        ablate: clamp to 0; add: h + value·s·W_dec[j] at every token (s the SAE's input scale, so `value` is in units
        of the feature's activation). Outputs: class probabilities (classifier) or zero-shot probabilities over
        `labels` (CLIP)."""
        import torch

        if mode not in STEER_MODES:
            raise ServeError(f"mode must be one of {STEER_MODES}, got {mode!r}")
        try:
            value = float(value)
        except (TypeError, ValueError) as e:
            raise ServeError(f"the value must be a number, got {value!r}") from e
        if not math.isfinite(value):
            raise ServeError("the value must be finite")
        row = self.row(sae_id, feature)
        j = row["feature"]
        image = check_image(image)
        prov = self._need(sae_id)["provenance"]
        bb, sae = self.backbone(sae_id), self.sae(sae_id)
        tokens, n_prefix = prov.get("tokens", "all"), int(prov.get("n_prefix_tokens") or 0)
        if tokens not in ("spatial", "all", "patches", "cls"):
            raise ServeError(f"steering needs an SAE on individual tokens; this one reads tokens={tokens!r}")

        def edit(acts_BTD):
            sl = slice(0, 1) if tokens == "cls" else slice(n_prefix, None) if tokens == "patches" else slice(None)
            h = acts_BTD[:, sl]
            if mode == "add":
                new = h + value * sae.cfg.input_scale * sae.W_dec[j].to(h.dtype)
            else:
                codes = sae.encode(h)
                error = h - sae.decode(codes)  # what the SAE misses stays: only feature j changes
                codes[..., j] = 0.0 if mode == "ablate" else value
                new = sae.decode(codes) + error
            out = acts_BTD.clone()
            out[:, sl] = new.to(out.dtype)
            return out

        with torch.no_grad():
            pixels = bb.preprocess_batch([image])
            base = bb.output(pixels)
            edited = bb.forward_with_edit(pixels, prov["layer"], edit)
        names, p0, p1, what = self._probabilities(bb, base, edited, labels)
        delta = p1 - p0
        idx = sorted(set(np.argsort(-p0)[:top]) | set(np.argsort(-p1)[:top]) | set(np.argsort(-np.abs(delta))[:top]),
                     key=lambda i: -abs(delta[i]))
        changes = pd.DataFrame({"label": [names[i] for i in idx], "before": p0[idx].round(4), "after": p1[idx].round(4),
                                "change": delta[idx].round(4)})
        before = {names[i]: float(p0[i]) for i in np.argsort(-p0)[:top]}
        after = {names[i]: float(p1[i]) for i in np.argsort(-p1)[:top]}
        return SteerResult(before, after, changes, j, self._display_name(row), mode, 0.0 if mode == "ablate" else value,
                           prov["layer"], what)

    @staticmethod
    def _probabilities(bb, base, edited, labels):
        import torch

        if bb.class_names is not None and base.shape[-1] == len(bb.class_names):
            p0, p1 = torch.softmax(base[0], -1).numpy(), torch.softmax(edited[0], -1).numpy()
            return list(bb.class_names), p0, p1, f"{bb.output_kind}, softmax over {len(bb.class_names)} classes"
        if callable(getattr(bb, "encode_text", None)):
            labels = [s.strip() for s in (labels or []) if s and s.strip()]
            if len(labels) < 2:
                raise ServeError("this is a CLIP model: give at least two comma-separated labels for zero-shot scores")
            text = bb.encode_text([f"a photo of {s}" for s in labels]).float().cpu()

            def zs(emb):  # CLIP zero-shot: softmax of 100·cosine
                e = torch.nn.functional.normalize(emb.float().cpu(), dim=-1)
                return torch.softmax(100.0 * e @ text.T, -1)[0].numpy()
            return labels, zs(base), zs(edited), f"zero-shot over {len(labels)} labels"
        raise ServeError(f"{bb.name}'s output ({bb.output_kind}) is neither class logits nor a CLIP embedding: nothing to compare")

    # ------------------------------------------------------------------------------------------ live naming (MILS)
    def naming_parts(self, proposer: str = "vocabulary"):
        """(proposer, generator, vocabulary), loaded once per process: the offline proposer and the Open Clip Art
        retrieval generator (METHODS §3.1 on CPU)."""
        if proposer not in PROPOSERS:
            raise ServeError(f"proposer must be one of {PROPOSERS}, got {proposer!r}")
        from nacosae.naming import DescribedImageBank, GGUFProposer, RetrievalGenerator, VocabularyProposer, load_vocabulary
        from nacosae.naming.vocab import OPENCLIPART_DIR

        with _NAMING_LOCK:
            if "vocab" not in _NAMING:
                _NAMING["vocab"] = load_vocabulary()
            if "generator" not in _NAMING:
                if not OPENCLIPART_DIR.is_dir():
                    raise ServeError(f"live naming renders prompts by retrieval from Open Clip Art, which is not installed "
                                     f"here ({OPENCLIPART_DIR}): apt-get install openclipart-png")
                from nacosae.images import OpenClipArtSource

                records = OpenClipArtSource(progress=False).records()
                _NAMING["generator"] = RetrievalGenerator(DescribedImageBank.from_openclipart(paths=[r.path for r in records]))
            if proposer not in _NAMING:
                if proposer == "vocabulary":
                    _NAMING[proposer] = VocabularyProposer(_NAMING["vocab"])
                else:
                    try:
                        _NAMING[proposer] = GGUFProposer()
                    except (ImportError, OSError, ValueError) as e:
                        raise ServeError(f"cannot load the Gemma-3-270M proposer ({e}); use the vocabulary proposer") from e
            return _NAMING[proposer], _NAMING["generator"], _NAMING["vocab"]

    def scorer(self, sae_id: str):
        from nacosae.naming import FeatureScorer

        with self._lock:
            if sae_id not in self._scorers:
                prov = self._need(sae_id)["provenance"]
                self._scorers[sae_id] = FeatureScorer(self.backbone(sae_id), prov["layer"], prov.get("tokens", "all"),
                                                      self.sae(sae_id), aggregation=self.frame_aggregation(sae_id),
                                                      max_act_S=self.max_act(sae_id), device=self.device)
            return self._scorers[sae_id]

    def start_naming(self, sae_id: str, feature: int, n_seeds: int = 12, proposer: str = "vocabulary"):
        """A fresh MILS state for `feature`, seeded with its top images' labels and descriptions plus vocabulary words."""
        from nacosae.naming import new_state, seed_prompts

        r = self.row(sae_id, feature)
        if r["dead"] or not (r["max_act"] or 0) > 0:
            raise ServeError(f"feature #{r['feature']} never fired on the probe set: there is nothing to name")
        _, _, vocab = self.naming_parts(proposer)
        hints = []
        for iid in (r["top_image_ids"] or [])[:8]:
            i = self._image_row[iid]
            hints += [self._image_meta[c][i] for c in ("label", "description") if c in self._image_meta and self._image_meta[c][i]]
        hints = list(dict.fromkeys(hints))[:8]
        return new_state(r["feature"], seed_prompts(vocab, n_seeds, seed=0, hints=hints), hints=hints)

    def naming_step(self, sae_id: str, state, cfg, budget_s: float = 0.0, proposer: str = "vocabulary"):
        """Advance the loop: at least one step, more while `budget_s` allows (0: exactly one, for streaming)."""
        from nacosae.naming import run_mils

        prop, gen, _ = self.naming_parts(proposer)
        return run_mils(state, prop, gen, self.scorer(sae_id), cfg, time_budget_s=budget_s, progress=False)

    def naming_view(self, state, cfg, n_gallery: int = 8) -> NamingView:
        """Where a live naming run stands: its step, every prompt tried, renders of the best ones, the score curve."""
        from nacosae.naming.generators import load_bank_image

        total = cfg.n_iterations + 2
        done_steps = (1 if state.seeded else 0) + state.iteration + (1 if state.done else 0)
        best = (float(state.best[0][0]), str(state.best[0][1])) if state.best else None
        step = "seeding" if not state.seeded else "iteration" if not state.done else "done"
        history = pd.DataFrame([{"iteration": c.iteration, "prompt": c.prompt, "score": round(float(c.score), 3)}
                                for c in state.candidates], columns=["iteration", "prompt", "score"])
        history = history.sort_values(["score", "iteration"], ascending=[False, True]).reset_index(drop=True)
        refs = {c.prompt: c.refs for c in state.candidates}
        gallery, shown = [], set()
        for score, prompt in state.best:
            for ref in refs.get(prompt, [])[:2]:
                if ref in shown:
                    continue
                shown.add(ref)
                try:
                    gallery.append(GalleryItem(load_bank_image(ref, max_side=256), float(score), prompt))
                except (OSError, ValueError):
                    continue
            if len(gallery) >= n_gallery:
                break
        curve = []
        for rec in state.history:
            if rec.get("best"):
                curve.append({"iteration": rec["iteration"], "best score": float(rec["best"][0][0]), "method": "live"})
        return NamingView(step, state.iteration, cfg.n_iterations, done_steps, total, len(state.candidates),
                          float(state.elapsed_s), best, state.name or "", history, gallery,
                          pd.DataFrame(curve, columns=["iteration", "best score", "method"]), state.done)


# ================================================================================================ input checks
def check_image(image):
    """An uploaded image as upright RGB PIL, decoded by `nacosae.images.open_image` (EXIF orientation, 16-bit,
    transparency, first frame): a file path, a PIL image or a numpy array; anything else raises ServeError. Errors
    name an uploaded file by its base name only, never by its path on the server."""
    from PIL import Image

    from nacosae.images import BadImageError, open_image

    if image is None:
        raise ServeError("upload an image first")
    if isinstance(image, (str, Path)):
        where = Path(image).name
    elif isinstance(image, (Image.Image, np.ndarray)):
        where = "the uploaded image"
    else:
        raise ServeError(f"expected an image, got {type(image).__name__}")
    try:
        return open_image(image, where=where)
    except BadImageError as e:
        raise ServeError(f"this image cannot be used: {e}; upload a PNG, JPEG or WebP") from e


def naming_config(iterations: int = 3, candidates: int = 8, best: int = 6, images: int = 3):
    from nacosae.naming import MILSConfig

    try:
        return MILSConfig(n_iterations=int(iterations), n_candidates=int(candidates), n_best=int(best), n_images=int(images))
    except (TypeError, ValueError) as e:
        raise ServeError(f"bad naming settings: {e}") from e


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """(fn(*args, **kwargs), seconds): for benchmarks."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
