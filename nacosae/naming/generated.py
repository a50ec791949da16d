"""The GPU path of the all-feature naming engine: a text-to-image generator renders the prompts (METHODS §3.1b).

    renderer = GeneratorRenderer(generator, pool, encode, seeds_by_split, controls)    # the engine's Renderer
    out = name_features_generated(sae, backbone, layer, tokens, generator, proposer, controls, work_dir, cfg)

`GeneratorRenderer` is the generator twin of the offline `BankRetrieval`: a prompt's renders on a split are the images
the generator makes from it with that split's first `n` seeds. Seeds are fixed and the three splits get disjoint
ranges (search 0.., select 10,000.., eval 20,000..), so selection and CoSy always look at images the loop never saw
(§3.1b splits), and a (prompt, seed) pair is one image whatever else was rendered with it. `rows` renders only the
pairs the pool lacks, batched across prompts (`generator.render_many`), encodes them once (backbone + SAE + token
aggregation: every feature's activation), and adds them to the pool in atomic chunks; a killed run keeps its finished
chunks and a re-run renders nothing twice. The controls (CoSy's natural images, §4.1) are encoded once into the pool
under split "control" and serve every split.

`name_features_generated` mirrors `nacosae.naming.run.name_every_feature` with this renderer: pool and loop state in
`work_dir` (resumable: finished rounds are replayed, pooled renders are not made again), methods `pool_mils` (the
pipeline's), `seeds` (the seed prompts with the same selection and no proposer: the bar the loop must clear), `mils`
(the per-feature loop on a seeded subsample, optional), `top_label` (when the controls carry labels) and `random`.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from nacosae.io import atomic_write_json
from nacosae.naming.bank import SPLITS
from nacosae.naming.engine import EngineConfig, MethodResult, NamingEngine, paired_bootstrap
from nacosae.naming.pool import RenderPool, render_id, sae_fingerprint
from nacosae.naming.run import DENSE_FREQUENCY, NamingOutput, encode_fn, feature_rows, features_hints, method_table

SPLIT_SEEDS: dict[str, range] = {"search": range(0, 10_000), "select": range(10_000, 20_000), "eval": range(20_000, 30_000)}
"""Default seed ranges per split: disjoint, so no eval render is ever made for search or selection."""
CONTROL_SPLIT = "control"
"""The pool split of the control images (natural images, the same for every split)."""
METHODS = ("pool_mils", "seeds", "mils", "top_label", "random")


def _control_items(controls) -> list[tuple[str, str, str | None, Callable[[], Image.Image]]]:
    """(id, description, label, loader) per control image. `controls`: PIL images (id = pixel hash) or an
    `nacosae.images.ImageSource` (id, description and label from its records; loaded lazily)."""
    from nacosae.images import pixel_digest

    if hasattr(controls, "records") and hasattr(controls, "load"):
        return [(r.image_id, r.description or r.label or "", r.label, (lambda r=r: controls.load(r)))
                for r in controls.records()]
    out = []
    for im in controls:
        if not isinstance(im, Image.Image):
            raise TypeError(f"controls must be PIL images or an ImageSource, got a {type(im).__name__}")
        out.append((f"pil:{pixel_digest(im)}", "", None, (lambda im=im: im)))
    return out


class GeneratorRenderer:
    """The engine's `Renderer` with a real text-to-image generator (module docstring).

    generator: `.id` and `render_many(prompts, seeds)` (one image per pair; `DiffusersGenerator`), or only
        `render(prompt, seeds)` (called once per prompt).
    pool: the `RenderPool` the renders go to (its meta should name the generator: `name_features_generated` does).
    encode: images → (n, d_sae) image-level codes (`nacosae.naming.run.encode_fn`).
    seeds_by_split: split → its seeds, in order (a prompt's renders on a split use the first n); the three sets must
        be disjoint. Default `SPLIT_SEEDS`.
    controls: the natural control images (PIL images or an ImageSource; at least 2). Unreadable files
        (`BadImageError`) are skipped and listed in `skipped_controls`.
    template: how a prompt becomes the generator's text ("{}": as is; CoSy used "realistic photo of a close up of {}").
    chunk_size: renders per atomic pool chunk (a kill loses at most one chunk of work).
    Raises ValueError on overlapping or missing seed splits, a bad template, or fewer than 2 usable controls.
    """

    def __init__(self, generator, pool: RenderPool, encode: Callable[[list], Tensor],
                 seeds_by_split: Mapping[str, Sequence[int]] | None = None, controls=(), template: str = "{}",
                 chunk_size: int = 64, progress: bool = False):
        seeds_by_split = dict(seeds_by_split if seeds_by_split is not None else SPLIT_SEEDS)
        if set(seeds_by_split) != set(SPLITS):
            raise ValueError(f"seeds_by_split needs exactly the splits {SPLITS}, got {sorted(seeds_by_split)}")
        sets = {s: set(map(int, v)) for s, v in seeds_by_split.items()}
        for a in SPLITS:
            for b in SPLITS:
                if a < b and sets[a] & sets[b]:
                    raise ValueError(f"the {a} and {b} seeds overlap (e.g. {sorted(sets[a] & sets[b])[:3]}): an image "
                                     "would be both searched on and held out; give disjoint ranges")
        if template.count("{}") != 1:
            raise ValueError(f"template must contain '{{}}' exactly once, got {template!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
        self.generator, self.pool, self.encode, self.template = generator, pool, encode, template
        self.seeds_by_split = {s: list(map(int, v)) for s, v in seeds_by_split.items()}
        self.chunk_size, self.progress = chunk_size, progress
        self.source = f"{generator.id}|{template}"
        self.id = f"generated:{self.source}"
        self.n_rendered, self.render_seconds, self.n_encoded, self.encode_seconds = 0, 0.0, 0, 0.0
        self.skipped_controls: list[tuple[str, str]] = []
        self._controls = self._encode_controls(_control_items(controls))
        if len(self._controls) < 2:
            raise ValueError(f"need at least 2 readable control images, got {len(self._controls)}")

    def _timed_encode(self, images: list) -> Tensor:
        t0 = time.perf_counter()
        codes = self.encode(images)
        self.encode_seconds += time.perf_counter() - t0
        self.n_encoded += len(images)
        return codes

    def _encode_controls(self, items) -> Tensor:
        from nacosae.images import BadImageError

        unique: dict[str, tuple] = {}
        for it in items:
            unique.setdefault(it[0], it)  # the same picture twice is one control
        ids = {cid: render_id(CONTROL_SPLIT, cid, 0) for cid in unique}
        todo = [it for cid, it in unique.items() if ids[cid] not in self.pool]
        for start in range(0, len(todo), self.chunk_size):
            rows, images = [], []
            for cid, desc, label, load in todo[start:start + self.chunk_size]:
                try:
                    images.append(load())
                except BadImageError as e:
                    self.skipped_controls.append((cid, e.reason))
                    continue
                rows.append({"render_id": ids[cid], "prompt": desc, "seed": 0, "split": CONTROL_SPLIT, "item": cid,
                             "label": label})
            if rows:
                self.pool.add(rows, self._timed_encode(images))
        present = [self.pool.row_of(rid) for rid in ids.values() if rid in self.pool]
        return torch.tensor(present, dtype=torch.long)

    def seeds(self, split: str, n: int) -> list[int]:
        """The first `n` seeds of `split` (ValueError if it has fewer or the split is unknown)."""
        if split not in self.seeds_by_split:
            raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
        seeds = self.seeds_by_split[split][:n]
        if len(seeds) < n:
            raise ValueError(f"the {split} split has {len(self.seeds_by_split[split])} seeds; {n} renders asked")
        return seeds

    def _render(self, pairs: list[tuple[str, int]]) -> list:
        texts = [self.template.format(p) for p, _ in pairs]
        t0 = time.perf_counter()
        if hasattr(self.generator, "render_many"):
            renders = self.generator.render_many(texts, [s for _, s in pairs])
        else:  # one call per prompt, its seeds together
            by_text: dict[str, list[int]] = {}
            for t, (_, s) in zip(texts, pairs):
                by_text.setdefault(t, []).append(s)
            made = {(t, s): r for t, ss in by_text.items() for s, r in zip(ss, self.generator.render(t, ss))}
            renders = [made[(t, s)] for t, (_, s) in zip(texts, pairs)]
        self.render_seconds += time.perf_counter() - t0
        self.n_rendered += len(pairs)
        return renders

    def rows(self, prompts: Sequence[str], split: str, n: int) -> Tensor:
        """(P, n) pool rows: each prompt's renders with the split's first `n` seeds; missing pairs are rendered (batched
        across prompts), encoded and pooled first, `chunk_size` per atomic chunk."""
        seeds = self.seeds(split, n)
        prompts = list(prompts)
        ids = [[render_id(self.source, p, s) for s in seeds] for p in prompts]
        todo = list(dict.fromkeys((p, s) for p, row in zip(prompts, ids) for s, rid in zip(seeds, row)
                                  if rid not in self.pool))
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"rendering ({split})", unit="img", disable=not self.progress or not todo,
                   leave=False)
        for start in range(0, len(todo), self.chunk_size):
            part = todo[start:start + self.chunk_size]
            renders = self._render(part)
            codes = self._timed_encode([r.image for r in renders])
            self.pool.add([{"render_id": render_id(self.source, p, s), "prompt": p, "seed": s, "split": split,
                            "ref": r.ref} for (p, s), r in zip(part, renders)], codes)
            bar.update(len(part))
        bar.close()
        return torch.tensor([[self.pool.row_of(rid) for rid in row] for row in ids], dtype=torch.long).reshape(len(prompts), n)

    def control_rows(self, split: str) -> Tensor:
        """The control images' pool rows: the same for every split (they are never a render of any split)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
        return self._controls


class _CountingProposer:
    """Counts and times the engine's calls to a proposer (its batched calls count once)."""

    def __init__(self, inner):
        self.inner = inner
        self.id = getattr(inner, "id", type(inner).__name__)
        self.n_calls, self.seconds = 0, 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.n_calls += 1
            self.seconds += time.perf_counter() - t0

    def propose(self, best, n, context):
        return self._timed(self.inner.propose, best, n, context)

    def summarise(self, best):
        return self.inner.summarise(best)


class _CountingBatchProposer(_CountingProposer):
    def propose_many(self, requests):
        return self._timed(self.inner.propose_many, requests)


def name_features_generated(sae, backbone, layer: str, tokens: str, generator, proposer, controls, work_dir,
                            cfg: EngineConfig = EngineConfig(), *, seeds_by_split: Mapping[str, Sequence[int]] | None = None,
                            seed_prompts: Sequence[str] | None = None, vocabulary: Sequence[str] | None = None,
                            n_seed_prompts: int = 32, template: str = "{}", aggregation: str = "max",
                            features: Sequence[int] | None = None, n_per_feature_mils: int = 0,
                            encode_batch_size: int = 64, chunk_size: int = 64, progress: bool = True) -> NamingOutput:
    """Name all live features of `sae` with a text-to-image `generator` and a `proposer` (module docstring).

    controls: natural images (PIL images or an ImageSource, e.g. the probe set's held-out part): CoSy's controls, the
        source of seed hints (their descriptions) and of the dead/dense verdicts (a feature that never fires on them
        is dead; one firing on more than `DENSE_FREQUENCY` of them is dense).
    work_dir: `pool/` (every render's code, atomic chunks) and `state/` (each round's proposals): a re-run resumes.
    seed_prompts: the shared seed list; default the controls' descriptions plus `n_seed_prompts` words drawn from
        `vocabulary` (default the WordNet/ImageNet concept vocabulary). `vocabulary` also gives the random-word floor.
    features: a subset of feature ids (default all). n_per_feature_mils: features of the per-feature loop (0: off).
    Returns a `NamingOutput` (rows as `name_every_feature`'s; `bank` is None); writes `work_dir/summary.json`.
    """
    t0 = time.perf_counter()
    work = Path(work_dir)
    counting = _CountingBatchProposer(proposer) if hasattr(proposer, "propose_many") else _CountingProposer(proposer)
    llm_calls0, fallbacks0 = getattr(proposer, "n_calls", None), getattr(proposer, "n_fallbacks", None)
    meta = {"d_sae": sae.cfg.d_sae, "sae": sae_fingerprint(sae), "layer": layer, "tokens": tokens,
            "aggregation": aggregation, "source": f"generated:{generator.id}|{template}"}
    pool = RenderPool.open(work / "pool", meta)
    encode = encode_fn(backbone, layer, tokens, sae, aggregation, batch_size=encode_batch_size)
    renderer = GeneratorRenderer(generator, pool, encode, seeds_by_split, controls, template, chunk_size, progress)
    engine = NamingEngine(renderer, cfg)
    t_setup = time.perf_counter() - t0

    ctrl_CS = pool.codes(renderer.control_rows("eval"))
    dead = set(torch.nonzero(ctrl_CS.amax(0) <= 0).flatten().tolist())
    dense = set(torch.nonzero((ctrl_CS > 0).float().mean(0) > DENSE_FREQUENCY).flatten().tolist())
    all_feats = list(features) if features is not None else list(range(sae.cfg.d_sae))
    live = [j for j in all_feats if j not in dead]
    hints = {j: [h for h in hs if h] for j, hs in features_hints(pool, live, split=CONTROL_SPLIT).items()}
    if vocabulary is None:
        from nacosae.naming.vocab import load_vocabulary

        vocabulary = load_vocabulary().words
    words = list(vocabulary)
    if seed_prompts is None:
        descs = [r["prompt"] for r in (pool.rows[i] for i in renderer.control_rows("eval").tolist()) if r["prompt"]]
        sample = random.Random(cfg.seed).sample(words, min(n_seed_prompts, len(words)))
        seed_prompts = list(dict.fromkeys(descs + sample))
    seed_prompts = list(dict.fromkeys(seed_prompts))
    if not seed_prompts:
        raise ValueError("no seed prompts: give seed_prompts, a vocabulary or controls with descriptions")
    if not live:
        raise ValueError(f"none of the {len(all_feats)} features fires on the {len(renderer.control_rows('eval'))} "
                         "control images: nothing to name (is the SAE on this backbone layer?)")

    timings: dict[str, float] = {}
    results: dict[str, MethodResult] = {}
    t = time.perf_counter()
    results["pool_mils"] = engine.mils(live, seed_prompts, counting, work / "state" / "pool_mils", shared=True,
                                       hints=hints, progress=progress)
    timings["pool_mils"] = time.perf_counter() - t
    t = time.perf_counter()
    results["seeds"] = engine.retrieval(live, seed_prompts)  # the seed round and the same selection, no proposer
    timings["seeds"] = time.perf_counter() - t
    if n_per_feature_mils:
        sub = sorted(random.Random(cfg.seed).sample(live, min(n_per_feature_mils, len(live))))
        own = {}
        for j in sub:  # as the offline run: top-control hints, then vocabulary words, 12 in all
            h = hints[j][:6]
            own[j] = list(dict.fromkeys(h + random.Random(cfg.seed + j).sample(words, min(12, len(words)))))[:12]
        t = time.perf_counter()
        results["mils"] = engine.mils(sub, own, counting, work / "state" / "mils", shared=False, hints=hints,
                                      progress=progress)
        timings["mils"] = time.perf_counter() - t
    t = time.perf_counter()
    ctrl_rows = renderer.control_rows("eval").tolist()
    labels = [pool.rows[i].get("label") for i in ctrl_rows]
    if any(labels):
        top_label = {}
        for j in live:
            top = torch.argsort(-ctrl_CS[:, j], stable=True)[:16].tolist()
            found = [labels[i] for i in top if ctrl_CS[i, j] > 0 and labels[i]]
            top_label[j] = Counter(found).most_common(1)[0][0].replace("_", " ") if found else None
        results["top_label"] = engine.fixed(top_label)
    rng = random.Random(cfg.seed)
    results["random"] = engine.fixed({j: rng.choice(words) for j in live})
    timings["baselines"] = time.perf_counter() - t
    total = time.perf_counter() - t0

    rows = feature_rows(all_feats, results, dead, dense, cfg.threshold, pool)
    pm = results["pool_mils"]
    pairs = {}
    for other, res in results.items():
        if other != "pool_mils":
            common = [j for j in live if j in pm.auc and j in res.auc]
            pairs[f"pool_mils - {other}"] = paired_bootstrap([pm.auc[j] for j in common], [res.auc[j] for j in common])
    all_live = np.array([pm.auc.get(j, 0.5) for j in live])
    llm_calls, fallbacks = getattr(proposer, "n_calls", None), getattr(proposer, "n_fallbacks", None)
    summary = {
        "engine_config": asdict(cfg), "renderer": renderer.id, "generator": generator.id, "proposer": counting.id,
        "template": template, "pool_rows": len(pool), "pool_bytes": pool.nbytes(),
        "n_controls": len(ctrl_rows), "skipped_controls": renderer.skipped_controls,
        "seeds_by_split": {s: [v[0], v[-1], len(v)] for s, v in renderer.seeds_by_split.items()},
        "n_seed_prompts": len(seed_prompts),
        "table": method_table(results, live, cfg.threshold), "paired": pairs,
        "loop_gain_over_seeds": pairs["pool_mils - seeds"],
        "mean_auc_all_live": float(all_live.mean()) if all_live.size else None,
        "n_features": len(all_feats), "n_dead": len(dead & set(all_feats)), "n_dense": len(dense & set(all_feats)),
        "n_live": len(live), "n_named": sum(1 for r in rows if r["name_method"]),
        "timings_s": {"setup": round(t_setup, 3), **{k: round(v, 3) for k, v in timings.items()}, "total": round(total, 3)},
        "throughput": {
            "renders": renderer.n_rendered, "render_s": round(renderer.render_seconds, 3),
            "renders_per_s": renderer.n_rendered / renderer.render_seconds if renderer.render_seconds else None,
            "encoded": renderer.n_encoded, "encode_s": round(renderer.encode_seconds, 3),
            "encoded_per_s": renderer.n_encoded / renderer.encode_seconds if renderer.encode_seconds else None,
            "proposer_calls": counting.n_calls, "proposer_s": round(counting.seconds, 3),
            "proposer_calls_per_s": counting.n_calls / counting.seconds if counting.seconds else None,
            "llm_generations": (llm_calls - llm_calls0) if llm_calls is not None else None,
            "llm_fallbacks": (fallbacks - fallbacks0) if fallbacks is not None else None,
        },
    }
    atomic_write_json(work / "summary.json", summary)
    return NamingOutput(rows, summary, results, pool, None)
