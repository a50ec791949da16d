"""The MILS-style naming loop for one SAE feature (METHODS §3.1), resumable in chunks.

    cfg = MILSConfig(n_iterations=10, n_candidates=20, n_best=10, n_images=4)
    state = new_state(feature=j, seeds=seed_prompts(vocab, 30, seed=0, hints=top_image_labels))
    while not state.done:                         # e.g. one ZeroGPU call (≤ 300 s) per chunk
        state = run_mils(state, proposer, generator, scorer, cfg, time_budget_s=240)
        state.save(path)
    state.name, state.best, state.history

Steps: (0) score the seed prompts; (1..T) show the proposer the best m as "{score:.3f}: {prompt}", ask for n new
prompts, drop duplicates and already-tried ones, render each with G fixed seeds (`cfg.loop_seeds`), score = mean
normalised activation over its G renders, keep the best m; (T+1) the proposer summarises the best into the name.
A step is atomic: the state only changes when a step completes, so a chunked run equals an uninterrupted one.
Evaluation renders must use `cfg.eval_seeds(n)`, which the loop never uses (METHODS §3.1, last line).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nacosae import __version__
from nacosae.io import atomic_write_json
from nacosae.naming.proposers import ProposalContext, Proposer
from nacosae.naming.vocab import ConceptVocabulary, normalise

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class MILSConfig:
    n_iterations: int = 10
    """T: proposal rounds after seeding (MILS: 10-19; LINE: 10)."""
    n_candidates: int = 20
    """n: new prompts asked for per round (MILS: 50)."""
    n_best: int = 10
    """m: best candidates kept and shown to the proposer."""
    n_images: int = 4
    """G: renders per prompt; the prompt's score is their mean (LINE: 5)."""
    render_template: str = "{}"
    """How a prompt is sent to the generator, e.g. "a photo of {}"; '{}' is the prompt."""
    max_words: int = 12
    """Longer proposals are dropped (runaway generations)."""
    seed: int = 0
    """Base seed of the proposers' sampling (they sample from (seed, feature, iteration))."""

    def __post_init__(self):
        for name in ("n_iterations", "n_candidates", "n_best", "n_images", "max_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.render_template.count("{}") != 1:
            raise ValueError(f"render_template must contain '{{}}' exactly once, got {self.render_template!r}")

    @property
    def loop_seeds(self) -> tuple[int, ...]:
        """The render seeds of the loop: 0..G-1."""
        return tuple(range(self.n_images))

    def eval_seeds(self, n: int) -> tuple[int, ...]:
        """`n` render seeds disjoint from `loop_seeds` (G..G+n-1), for evaluating names on images the loop never saw.
        With the retrieval generator they are the next-best matches after the loop's."""
        return tuple(range(self.n_images, self.n_images + n))


@dataclass
class Candidate:
    prompt: str
    score: float
    """Mean over the prompt's renders of the normalised activation."""
    iteration: int
    """0 for seeds, else the round that proposed it."""
    image_scores: list[float]
    refs: list[str]
    """Where each render is (render-cache file or bank image)."""


@dataclass
class MILSState:
    feature: int
    seeds: list[str]
    """The seed prompts (vocabulary sample and top-image hints)."""
    hints: list[str] = field(default_factory=list)
    """Labels/descriptions of the feature's top probe images, shown to proposers that use them."""
    iteration: int = 0
    """Completed proposal rounds."""
    seeded: bool = False
    candidates: list[Candidate] = field(default_factory=list)
    """Every scored prompt, in the order scored."""
    best: list[tuple[float, str]] = field(default_factory=list)
    """The best m as (score, prompt), descending."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per step: iteration, proposals, new prompts with scores, best after the step, seconds."""
    name: str | None = None
    """The final concept name (set by the last step)."""
    elapsed_s: float = 0.0
    """Wall time spent in steps, over all chunks."""
    config: dict[str, Any] = field(default_factory=dict)
    """The MILSConfig the state was run with (a resumed run must use the same)."""

    @property
    def done(self) -> bool:
        return self.name is not None

    @property
    def tried(self) -> frozenset[str]:
        return frozenset(normalise(c.prompt) for c in self.candidates)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["best"] = [[s, p] for s, p in self.best]
        return {"schema_version": SCHEMA_VERSION, "nacosae_version": __version__, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MILSState":
        d = dict(d)
        version = d.pop("schema_version", None)
        d.pop("nacosae_version", None)
        if version != SCHEMA_VERSION:
            raise ValueError(f"MILS state schema {version} is not {SCHEMA_VERSION}: re-run naming for this feature")
        d["candidates"] = [Candidate(**c) for c in d.get("candidates", [])]
        d["best"] = [(float(s), p) for s, p in d.get("best", [])]
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MILSState":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def seed_prompts(vocabulary: ConceptVocabulary, n: int, seed: int = 0, hints: Sequence[str] = ()) -> list[str]:
    """Seeds of the loop (METHODS §3.1 step 1): the top-image hints first, then a vocabulary sample, `n` distinct in all
    (the hints are always all kept)."""
    out = list(dict.fromkeys(normalise(h) for h in hints if normalise(h)))
    pool = vocabulary.sample(min(len(vocabulary), n + len(out)), seed)
    out += [w for w in pool if w not in out][: max(0, n - len(out))]
    return out


def new_state(feature: int, seeds: Sequence[str], hints: Sequence[str] = ()) -> MILSState:
    seeds = list(dict.fromkeys(s for s in (normalise(x) for x in seeds) if s))
    if not seeds:
        raise ValueError("the MILS loop needs at least one seed prompt (see seed_prompts)")
    return MILSState(feature=int(feature), seeds=seeds, hints=[normalise(h) for h in hints])


def _score_prompts(prompts: Sequence[str], state: MILSState, generator, scorer, cfg: MILSConfig,
                   iteration: int) -> list[Candidate]:
    renders = [generator.render(cfg.render_template.format(p), cfg.loop_seeds) for p in prompts]
    # A retrieval generator returns the same bank image for many prompts: an image the state has scored already keeps
    # its score (read from the state itself, so chunked and uninterrupted runs reuse exactly the same numbers).
    known = {ref: s for c in state.candidates for ref, s in zip(c.refs, c.image_scores)}
    todo = list(dict.fromkeys(r.ref for rs in renders for r in rs if r.ref not in known))
    if todo:
        image_of = {r.ref: r.image for rs in renders for r in rs}
        scores_N = scorer.score([image_of[ref] for ref in todo], [state.feature])[:, 0].tolist()
        known.update(zip(todo, map(float, scores_N)))
    out = []
    for p, rs in zip(prompts, renders):
        per_image = [known[r.ref] for r in rs]
        out.append(Candidate(p, sum(per_image) / len(per_image), iteration, per_image, [r.ref for r in rs]))
    return out


def _update_best(state: MILSState, m: int) -> None:
    # ties: the shorter prompt (the simpler explanation), then the earlier-scored one; nothing else decides the order
    cands = state.candidates
    order = sorted(range(len(cands)), key=lambda i: (-cands[i].score, len(cands[i].prompt.split()), i))
    state.best = [(state.candidates[i].score, state.candidates[i].prompt) for i in order[:m]]


def run_mils(state: MILSState, proposer: Proposer, generator, scorer, cfg: MILSConfig, time_budget_s: float | None = None,
             progress: bool = True) -> MILSState:
    """Advance `state` (in place, and returned) until it is done or the time budget would be exceeded.

    Always completes at least one step, so repeated calls make progress even with a tiny budget; a step is not started
    when the time used so far plus the last step's duration would pass `time_budget_s`.
    """
    cfg_dict = dataclasses.asdict(cfg)
    if state.config and state.config != cfg_dict:
        raise ValueError(f"this state was run with {state.config}, not {cfg_dict}: resume with the same MILSConfig")
    state.config = cfg_dict
    t_start, last_step, n_steps = time.perf_counter(), 0.0, 0
    total = cfg.n_iterations + 2
    done_steps = (1 if state.seeded else 0) + state.iteration + (1 if state.done else 0)
    bar = tqdm(total=total, initial=done_steps, desc=f"MILS feature {state.feature}", disable=not progress, leave=False)
    while not state.done:
        used = time.perf_counter() - t_start
        if time_budget_s is not None and n_steps > 0 and used + last_step > time_budget_s:
            break
        t0 = time.perf_counter()
        if not state.seeded:
            new = _score_prompts(state.seeds, state, generator, scorer, cfg, iteration=0)
            state.candidates.extend(new)
            _update_best(state, cfg.n_best)
            record = {"step": "seed", "iteration": 0, "proposed": list(state.seeds)}
            state.seeded = True
        elif state.iteration < cfg.n_iterations:
            it = state.iteration + 1
            ctx = ProposalContext(state.feature, it, state.tried, cfg.seed, tuple(state.hints))
            proposed = proposer.propose(list(state.best), cfg.n_candidates, ctx)
            fresh, seen = [], set(state.tried)
            for p in proposed:
                key = normalise(p)
                if key and key not in seen and len(key.split()) <= cfg.max_words:
                    seen.add(key)
                    fresh.append(p.strip())
            new = _score_prompts(fresh[: cfg.n_candidates], state, generator, scorer, cfg, iteration=it)
            state.candidates.extend(new)
            _update_best(state, cfg.n_best)
            record = {"step": "propose", "iteration": it, "proposed": list(proposed)}
            state.iteration = it
        else:
            new = []
            # a proposer that cannot name (an LLM writing noise) falls back on the best prompt: the loop always ends named
            state.name = proposer.summarise(list(state.best)).strip() or (state.best[0][1] if state.best else "")
            record = {"step": "summarise", "iteration": state.iteration, "name": state.name}
        last_step = time.perf_counter() - t0
        state.elapsed_s += last_step
        record.update(new=[[c.prompt, c.score] for c in new], best=[[s, p] for s, p in state.best], seconds=last_step)
        state.history.append(record)
        n_steps += 1
        bar.update(1)
        bar.set_postfix(best=f"{state.best[0][0]:.3f}" if state.best else "-")
    bar.close()
    return state
