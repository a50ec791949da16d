"""Naming every feature at once on a shared render pool (METHODS §3.1b), with selection and evaluation on held-out
renders (§3.1b splits, §4.1 CoSy).

    renderer = BankRetrieval(bank, pool, embedder, cfg)       # offline: "rendering" = retrieving bank pictures
    engine = NamingEngine(renderer, cfg)
    out = engine.run(features, seed_prompts, proposer, state_dir)   # every method, every feature

How a prompt is scored: its renders on a split (offline: the `n_images` bank pictures of that split whose
descriptions are nearest to the prompt; with a generator: the split's seeds) are looked up in the pool, and each
render's activation is turned into its mid-rank among the split's control images, per feature. The mean of those
ranks is exactly the ROC-AUC of the renders against the controls, the quantity CoSy reports (§4.1), so the loop,
the selection and the evaluation all optimise and measure one thing, on three disjoint sets of renders.

The loop (pool-MILS). Seed: every seed prompt is scored for every feature. Each round, each feature that is still
improving shows the proposer its `n_best` best prompts *from the whole pool* and gets `n_proposals` new ones
(batched: `features_per_call` features per proposer call); the union of new prompts is rendered once, encoded once
and scored for all features, so a prompt proposed for one feature can become another's best. A feature stops when a
round raises its best search score by less than `min_gain`. Selection: each feature's `n_select` best search prompts
are scored on the select split and the best is its name (`selection="pooled"` adds the search evidence). CoSy: the
name's renders on the eval split against the eval controls.

`shared=False` runs the classic per-feature loop on the same pool (each feature sees only its own seeds and
proposals, and pays for its own renders), for the renders-per-feature comparison.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from nacosae.io import atomic_write_json
from nacosae.naming.bank import SPLITS
from nacosae.naming.proposers import ProposalContext
from nacosae.naming.vocab import normalise


@dataclass(frozen=True)
class EngineConfig:
    n_images: int = 20
    """Renders per prompt for search and selection scores (seeds, or nearest bank pictures). 20 beat 10 and 5 on the
    blocks.14 SAE (held-out AUC 0.605 vs 0.596 vs 0.591, docs/naming.md)."""
    n_eval_images: int = 20
    """Renders per name for CoSy on the eval split."""
    n_controls: int = 500
    """Control images per split (a seeded sample of the split; never returned as a render of that split)."""
    n_rounds: int = 3
    """T: proposal rounds after the seed round."""
    n_proposals: int = 4
    """New prompts asked per feature per round (fewer, more diverse proposals: 4 did as well as 6 offline)."""
    n_best: int = 8
    """m: best prompts shown to the proposer."""
    n_select: int = 32
    """Best search prompts per feature re-scored on the select split (32 beat 16, 8 and 4 offline)."""
    selection: str = "pooled"
    """"select": the select-split score alone chooses the name; "pooled": the mean of search and select scores (pooled
    measured slightly better offline: 0.605 vs 0.603 held-out AUC)."""
    min_gain: float = 0.002
    """A feature stops proposing when a round raises its best search score by less than this."""
    features_per_call: int = 8
    """Features per proposer call (an LLM proposer answers for several features in one generation)."""
    threshold: float = 0.6
    """Held-out CoSy AUC a name needs to be published; below it the feature is `unnamed`."""
    seed: int = 0
    """Seeds the controls, the proposers' sampling and the random-word baseline."""

    def __post_init__(self):
        for name in ("n_images", "n_eval_images", "n_controls", "n_best", "n_select", "features_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.n_rounds < 0 or self.n_proposals < 0:
            raise ValueError("n_rounds and n_proposals must be ≥ 0")
        if self.selection not in ("select", "pooled"):
            raise ValueError(f"selection must be 'select' or 'pooled', got {self.selection!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


class Renderer(Protocol):
    """Gives pool rows for prompts on a split (rendering and encoding what the pool lacks)."""

    id: str
    pool: Any

    def rows(self, prompts: Sequence[str], split: str, n: int) -> Tensor:
        """(P, n) pool row numbers: the renders of each prompt on `split`."""
        ...

    def control_rows(self, split: str) -> Tensor:
        """Pool row numbers of the split's control images."""
        ...


# ----------------------------------------------------------------------------------------------------------------
# Scores


class SplitScorer:
    """Per-feature AUC and MAD of renders against one split's controls, for all features at once."""

    def __init__(self, controls_CS: Tensor):
        if controls_CS.ndim != 2 or controls_CS.shape[0] < 2:
            raise ValueError(f"controls must be (n ≥ 2, d_sae), got {tuple(controls_CS.shape)}")
        if not torch.isfinite(controls_CS).all():
            raise ValueError("control activations hold NaN or inf")
        self.sorted_SC = controls_CS.T.contiguous().sort(dim=1).values
        self.n_controls = controls_CS.shape[0]
        self.mean_S = controls_CS.mean(0)
        self.std_S = controls_CS.std(0, unbiased=True)

    def ranks(self, acts_MS: Tensor) -> Tensor:
        """(M, S) mid-rank of each activation among the controls of its feature, in [0, 1] (ties count half)."""
        vals_SM = acts_MS.T.contiguous()
        lo = torch.searchsorted(self.sorted_SC, vals_SM, right=False)
        hi = torch.searchsorted(self.sorted_SC, vals_SM, right=True)
        return ((lo + hi).float() / (2 * self.n_controls)).T

    def auc(self, acts_PNS: Tensor) -> Tensor:
        """(P, S): ROC-AUC of each prompt's N renders against the controls = their mean mid-rank (METHODS §4.1)."""
        P, N, S = acts_PNS.shape
        return self.ranks(acts_PNS.reshape(P * N, S)).reshape(P, N, S).mean(1)

    def mad(self, acts_PNS: Tensor) -> Tensor:
        """(P, S): (mean(renders) − mean(controls)) / std(controls); 0 where the controls are constant (METHODS §4.1)."""
        diff = acts_PNS.mean(1) - self.mean_S
        return torch.where(self.std_S > 0, diff / self.std_S.clamp_min(1e-12), torch.zeros_like(diff))


# ----------------------------------------------------------------------------------------------------------------
# Offline renderer: retrieval from the bank pool


class TextEmbeddingCache:
    """Sentence embeddings computed once per text: in memory, and on disk at `path` (one safetensors file, rewritten
    atomically when new texts were embedded) so re-runs and the app skip the embedder for known prompts."""

    def __init__(self, embedder, path: str | os.PathLike | None = None):
        self.embedder, self.path = embedder, Path(path) if path is not None else None
        self._emb: dict[str, Tensor] = {}
        if self.path is not None and self.path.is_file():
            from safetensors import safe_open

            with safe_open(str(self.path), "pt") as f:
                if f.metadata().get("embedder") == embedder.id:
                    texts = json.loads(f.metadata()["texts"])
                    self._emb = dict(zip(texts, f.get_tensor("embeddings")))

    def encode(self, texts: Sequence[str]) -> Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self._emb]
        if new:
            self._emb.update(zip(new, self.embedder.encode(new)))
            if self.path is not None:
                from nacosae.io import atomic_save_safetensors

                keys = list(self._emb)
                atomic_save_safetensors(self.path, {"embeddings": torch.stack([self._emb[k] for k in keys])},
                                        metadata={"embedder": self.embedder.id, "texts": json.dumps(keys)})
        return torch.stack([self._emb[t] for t in texts])


class BankRetrieval:
    """Offline "rendering": a prompt's renders on a split are the split's bank pictures (controls excluded) whose
    descriptions are nearest to it in sentence-embedding space (ties: lower bank index). Every bank picture is a pool
    row already (`pool.rows[i]["item"]` = bank index), so nothing is encoded here."""

    def __init__(self, bank, pool, embedder, n_controls: int = 500, seed: int = 0,
                 cache_path: str | os.PathLike | None = None):
        self.bank, self.pool, self.embedder = bank, pool, embedder
        self.cache = TextEmbeddingCache(embedder, cache_path)
        self.id = f"retrieval:{bank.id}:{embedder.id}"
        row_of_item = {r["item"]: i for i, r in enumerate(pool.rows) if "item" in r}
        missing = [it.item_id for it in bank.items if it.item_id not in row_of_item]
        if missing:
            raise ValueError(f"{len(missing)} bank pictures are not in the pool (e.g. {missing[:3]}): fill the pool first")
        self.desc_NE = self.cache.encode([it.description for it in bank.items])
        self._rows, self._controls = {}, {}
        rng = np.random.default_rng(seed)
        for split in SPLITS:
            idx = bank.indices(split)
            n_c = min(n_controls, len(idx) // 2)
            ctrl = np.sort(rng.choice(idx, size=n_c, replace=False)) if n_c >= 2 else np.zeros(0, dtype=np.int64)
            rest = np.setdiff1d(idx, ctrl)
            self._controls[split] = torch.tensor([row_of_item[bank.items[i].item_id] for i in ctrl], dtype=torch.long)
            self._rows[split] = (torch.as_tensor(rest, dtype=torch.long),
                                 torch.tensor([row_of_item[bank.items[i].item_id] for i in rest], dtype=torch.long))

    def embed(self, prompts: Sequence[str]) -> Tensor:
        return self.cache.encode(list(prompts)) if prompts else torch.zeros(0, self.desc_NE.shape[1])

    def rows(self, prompts: Sequence[str], split: str, n: int) -> Tensor:
        items, rows = self._rows[split]
        if len(items) < n:
            raise ValueError(f"the {split} split has {len(items)} pictures besides its controls; {n} renders asked")
        sims_PN = self.embed(list(prompts)) @ self.desc_NE[items].T
        # stable order: BLAS noise must not reorder exact ties (identical descriptions)
        order = torch.sort(-torch.round(sims_PN, decimals=5), dim=1, stable=True).indices[:, :n]
        return rows[order]

    def control_rows(self, split: str) -> Tensor:
        return self._controls[split]


# ----------------------------------------------------------------------------------------------------------------
# The engine


@dataclass
class MethodResult:
    """One method's names for the features it ran on."""

    names: dict[int, str] = field(default_factory=dict)
    split_score: dict[int, float] = field(default_factory=dict)
    """The score that chose the name (select split, or pooled), per feature."""
    auc: dict[int, float] = field(default_factory=dict)
    """Held-out CoSy AUC on the eval split."""
    mad: dict[int, float] = field(default_factory=dict)
    eval_rows: dict[int, list[int]] = field(default_factory=dict)
    """Pool rows of the eval renders CoSy used."""
    renders: dict[int, int] = field(default_factory=dict)
    """Generator calls (prompt × seed on search + select) charged to each feature."""
    history: dict[int, list[dict]] = field(default_factory=dict)
    """pool-MILS: per feature, the best search prompts after each round ({"iteration", "prompt", "score"})."""


class NamingEngine:
    """The all-feature naming loop, selection and CoSy (module docstring)."""

    def __init__(self, renderer: Renderer, cfg: EngineConfig = EngineConfig()):
        self.renderer, self.cfg = renderer, cfg
        pool = renderer.pool
        self.scorers = {s: SplitScorer(pool.codes(renderer.control_rows(s))) for s in SPLITS}
        self._scores: dict[str, dict[str, Tensor]] = {s: {} for s in SPLITS}  # split → prompt → (S,) AUC

    # -- scores -----------------------------------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], split: str, n: int | None = None, chunk: int = 256) -> Tensor:
        """(P, S) AUC of each prompt on `split` for every feature (cached per prompt)."""
        n = n or self.cfg.n_images
        cache = self._scores[split]
        todo = [p for p in dict.fromkeys(prompts) if p not in cache]
        for i in range(0, len(todo), chunk):
            part = todo[i:i + chunk]
            rows_PN = self.renderer.rows(part, split, n)
            acts_PNS = self.renderer.pool.codes(rows_PN.reshape(-1)).reshape(len(part), n, -1)
            for p, s in zip(part, self.scorers[split].auc(acts_PNS)):
                cache[p] = s
        return torch.stack([cache[p] for p in prompts]) if prompts else torch.zeros(0, self.renderer.pool.d_sae)

    def cosy(self, names: dict[int, str]) -> tuple[dict[int, float], dict[int, float], dict[int, list[int]]]:
        """Held-out CoSy AUC and MAD of each feature's name on the eval split, and the eval rows used (METHODS §4.1)."""
        feats = [j for j, nm in names.items() if nm]
        prompts = list(dict.fromkeys(names[j] for j in feats))
        if not prompts:
            return {}, {}, {}
        n = self.cfg.n_eval_images
        rows_PN = self.renderer.rows(prompts, "eval", n)
        acts_PNS = self.renderer.pool.codes(rows_PN.reshape(-1)).reshape(len(prompts), n, -1)
        sc = self.scorers["eval"]
        auc_PS, mad_PS = sc.auc(acts_PNS), sc.mad(acts_PNS)
        at = {p: i for i, p in enumerate(prompts)}
        auc = {j: float(auc_PS[at[names[j]], j]) for j in feats}
        mad = {j: float(mad_PS[at[names[j]], j]) for j in feats}
        rows = {j: rows_PN[at[names[j]]].tolist() for j in feats}
        return auc, mad, rows

    def select(self, features: Sequence[int], candidates: dict[int, list[str]]) -> tuple[dict[int, str], dict[int, float]]:
        """Each feature's name among its candidates (best first by search score), chosen on the select split."""
        prompts = list(dict.fromkeys(p for j in features for p in candidates[j]))
        sel = self.score(prompts, "select")
        srch = self.score(prompts, "search")
        at = {p: i for i, p in enumerate(prompts)}
        names, scores = {}, {}
        for j in features:
            cands = candidates[j]
            if not cands:
                continue
            idx = torch.tensor([at[p] for p in cands])
            s = sel[idx, j] if self.cfg.selection == "select" else (sel[idx, j] + srch[idx, j]) / 2
            best = int(torch.argmax(s))  # ties: the better search rank (candidates are in search order)
            names[j], scores[j] = cands[best], float(s[best])
        return names, scores

    def _top_prompts(self, prompts: list[str], scores_PS: Tensor, features: Sequence[int], k: int) -> dict[int, list[str]]:
        if not prompts:
            return {j: [] for j in features}
        kk = min(k, len(prompts))
        top = torch.topk(scores_PS[:, torch.as_tensor(list(features))], kk, dim=0).indices.T  # (F, kk)
        return {j: [prompts[i] for i in top[f].tolist()] for f, j in enumerate(features)}

    def finish(self, features: Sequence[int], candidates: dict[int, list[str]], result: MethodResult) -> MethodResult:
        """Selection on the select split, then CoSy on the eval split."""
        names, scores = self.select(features, candidates)
        result.names.update(names)
        result.split_score.update(scores)
        auc, mad, rows = self.cosy(names)
        result.auc.update(auc)
        result.mad.update(mad)
        result.eval_rows.update(rows)
        return result

    # -- methods ----------------------------------------------------------------------------------------------------
    def retrieval(self, features: Sequence[int], prompts: Sequence[str]) -> MethodResult:
        """The retrieval-only baseline: the candidate prompts are `prompts` (the bank's own descriptions and keywords of
        the search split), no proposer; the best search prompts go to selection."""
        prompts = list(dict.fromkeys(prompts))
        s_PS = self.score(prompts, "search")
        cands = self._top_prompts(prompts, s_PS, features, self.cfg.n_select)
        res = MethodResult()
        res.renders = {j: 0 for j in features}  # the bank was encoded once; no prompt was rendered for a feature
        return self.finish(features, cands, res)

    def fixed(self, names: dict[int, str | None]) -> MethodResult:
        """A baseline that gives one name per feature (top label, random word): only CoSy."""
        res = MethodResult(names={j: n for j, n in names.items() if n})
        auc, mad, rows = self.cosy(res.names)
        res.auc, res.mad, res.eval_rows = auc, mad, rows
        return res

    def mils(self, features: Sequence[int], seed_prompts: Sequence[str] | dict[int, Sequence[str]], proposer,
             state_dir: str | os.PathLike | None = None, shared: bool = True, hints: dict[int, Sequence[str]] | None = None,
             progress: bool = True) -> MethodResult:
        """The MILS loop over all `features` together (module docstring). `seed_prompts`: one list for all features
        (shared) or one per feature. `state_dir`: each round's proposals are saved there (atomic) and a re-run replays
        them instead of asking the proposer again, so a killed run resumes after its last finished round."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        features = list(features)
        hints = hints or {}
        per_feature = isinstance(seed_prompts, dict)
        own: dict[int, list[str]] = {j: list(dict.fromkeys(seed_prompts[j] if per_feature else seed_prompts)) for j in features}
        all_prompts = list(dict.fromkeys(p for j in features for p in own[j]))
        renders = {j: (len(own[j]) * cfg.n_images if not shared else 0) for j in features}
        n_rendered_shared = len(all_prompts) * cfg.n_images
        self.score(all_prompts, "search")
        state_path = Path(state_dir) / "rounds.json" if state_dir is not None else None
        saved = json.loads(state_path.read_text(encoding="utf-8")) if state_path and state_path.is_file() else {"rounds": []}
        best_score = {j: -1.0 for j in features}
        history: dict[int, list[dict]] = {j: [] for j in features}
        active = list(features)
        bar = tqdm(total=cfg.n_rounds, desc="pool-MILS rounds" if shared else "per-feature MILS rounds",
                   disable=not progress)
        for it in range(cfg.n_rounds + 1):
            # best lists: from the whole pool (shared) or from the feature's own prompts
            best: dict[int, list[tuple[float, str]]] = {}
            if shared:
                s_PS = self.score(all_prompts, "search")
                tops = self._top_prompts(all_prompts, s_PS, active, cfg.n_best)
                for j in active:
                    best[j] = [(float(self._scores["search"][p][j]), p) for p in tops[j]]
            else:
                for j in active:
                    s = self.score(own[j], "search")[:, j]
                    order = torch.argsort(-s, stable=True)[: cfg.n_best].tolist()
                    best[j] = [(float(s[i]), own[j][i]) for i in order]
            still = []
            for j in active:
                top = best[j][0][0] if best[j] else -1.0
                history[j].append({"iteration": it, "prompt": best[j][0][1] if best[j] else "", "score": top})
                if it == 0 or top - best_score[j] >= cfg.min_gain:
                    still.append(j)
                best_score[j] = max(best_score[j], top)
            active = still
            if it == cfg.n_rounds or not active or cfg.n_proposals == 0:
                break
            # proposals: replayed from the state file, or asked (features_per_call per call) and saved
            if it < len(saved["rounds"]):
                # pairs, not a dict: the JSON writer sorts keys, and the replay must add prompts in the live order
                proposals = {int(j): ps for j, ps in saved["rounds"][it]}
            else:
                proposals = propose_batched(proposer, {j: best[j] for j in active}, cfg.n_proposals, it + 1,
                                            {j: frozenset(map(normalise, own[j])) for j in active}, hints,
                                            cfg.features_per_call, cfg.seed)
                if state_path is not None:
                    saved["rounds"].append([[j, ps] for j, ps in proposals.items()])
                    state_path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(state_path, saved)
            new = []
            for j, ps in proposals.items():
                if j not in own:
                    continue
                fresh = [p for p in ps if p not in own[j]]
                own[j].extend(fresh)
                renders[j] += len(fresh) * cfg.n_images if not shared else 0
                new.extend(fresh)
            known = set(all_prompts)
            new = [p for p in dict.fromkeys(new) if p not in known]
            n_rendered_shared += len(new) * cfg.n_images
            all_prompts.extend(new)
            self.score(new, "search")
            bar.update(1)
        bar.close()
        # candidates for selection: the feature's n_select best seed prompts *and* its n_select best loop prompts (from
        # the whole pool when shared). With many more prompts on the search split, the best search scores go to
        # prompts that fit the search pictures by chance (winner's curse); taking loop prompts only *beside* the seeds'
        # best means the loop can add a candidate but never push a good seed prompt out of the unbiased selection.
        if shared:
            n_seed = len(dict.fromkeys(p for j in features for p in (seed_prompts[j] if per_feature else seed_prompts)))
            seed_list, loop_list = all_prompts[:n_seed], all_prompts[n_seed:]
            top_seed = self._top_prompts(seed_list, self.score(seed_list, "search"), features, cfg.n_select)
            top_loop = self._top_prompts(loop_list, self.score(loop_list, "search"), features, cfg.n_select)
            cands = {j: list(dict.fromkeys(top_seed[j] + top_loop[j])) for j in features}
            renders = {j: n_rendered_shared / max(len(features), 1) for j in features}
        else:
            cands = {}
            for j in features:
                n_seed = len(dict.fromkeys(seed_prompts[j] if per_feature else seed_prompts))
                parts = []
                for part in (own[j][:n_seed], own[j][n_seed:]):
                    if part:
                        s = self.score(part, "search")[:, j]
                        parts += [part[i] for i in torch.argsort(-s, stable=True)[: cfg.n_select].tolist()]
                cands[j] = list(dict.fromkeys(parts))
        # selection renders: n_select prompts × n_images per feature, shared ones counted once
        sel_prompts = {p for j in features for p in cands[j]}
        for j in features:
            renders[j] += (len(sel_prompts) * cfg.n_images / len(features)) if shared else len(cands[j]) * cfg.n_images
        res = MethodResult(renders=renders, history=history)
        return self.finish(features, cands, res)


def propose_batched(proposer, best: dict[int, list[tuple[float, str]]], n: int, iteration: int,
                    tried: dict[int, frozenset[str]], hints: dict[int, Sequence[str]], per_call: int, seed: int
                    ) -> dict[int, list[str]]:
    """New prompts per feature. A proposer with `propose_many(requests)` answers `per_call` features per call (one LLM
    generation for several features); others are asked one feature at a time."""
    feats = list(best)
    contexts = {j: ProposalContext(feature=j, iteration=iteration, tried=tried[j], seed=seed, hints=tuple(hints.get(j, ())))
                for j in feats}
    out: dict[int, list[str]] = {}
    if hasattr(proposer, "propose_many"):
        for i in range(0, len(feats), per_call):
            part = feats[i:i + per_call]
            answers = proposer.propose_many([(best[j], n, contexts[j]) for j in part])
            out.update({j: list(a) for j, a in zip(part, answers)})
    else:
        for j in feats:
            out[j] = list(proposer.propose(best[j], n, contexts[j]))
    return out


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 10000, seed: int = 0) -> dict[str, float]:
    """Mean of a − b over paired items with a 95 % percentile bootstrap interval."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1)
    return {"mean": float(d.mean()), "lo": float(np.percentile(means, 2.5)), "hi": float(np.percentile(means, 97.5)),
            "n": int(d.size)}
