"""Name every feature of an SAE with one call: bank → pool → all methods → held-out CoSy → results rows.

    out = name_every_feature(sae, backbone, layer, tokens, work_dir=run.naming(layer))
    out.rows                      # one dict per feature: name, method, held-out CoSy, why unnamed
    out.summary                   # the comparison table, the loop's gain, renders per feature, timings

Methods (METHODS §3): `pool_mils` (the all-feature MILS loop on the shared pool; its name is the pipeline's),
`retrieval` (the bank's own descriptions and keywords as the only prompts: the bar the loop must clear offline),
`mils` (the classic per-feature loop on a seeded subsample: the cost comparison), `top_label` (majority category of
the feature's top search-split pictures), `random` (a random vocabulary word: the floor). Names are chosen without
looking at the eval split; the eval split is touched once, by CoSy.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nacosae.io import atomic_write_json
from nacosae.naming.bank import Bank, offline_bank
from nacosae.naming.engine import BankRetrieval, EngineConfig, MethodResult, NamingEngine, paired_bootstrap
from nacosae.naming.pool import RenderPool, fill_pool, sae_fingerprint

METHODS = ("pool_mils", "retrieval", "mils", "top_label", "random")
DENSE_FREQUENCY = 0.5
"""A feature firing on more than this share of the bank's pictures is dense (as in the feature statistics)."""
N_HINTS = 16
OFFLINE_PROPOSER_OPS = (0.6, 0.0, 0.2, 0.0, 0.2)
"""`VocabularyProposer` op weights (neighbour, attribute, head, combine, explore) of the offline run."""
THUMB_PX, THUMB_FORMAT = 112, "webp"
"""Thumbnails stored with each pool render (the results dataset and the app show these)."""


@dataclass
class NamingOutput:
    rows: list[dict[str, Any]]
    """One per feature: feature, name, name_method, candidate_name, name_cosy_auc, name_cosy_mad, name_split_score,
    unnamed_reason, and name_/cosy_auc_/cosy_mad_/cosy_render_ids_ per method."""
    summary: dict[str, Any]
    results: dict[str, MethodResult] = field(default_factory=dict)
    pool: RenderPool | None = None
    bank: Bank | None = None


def encode_fn(backbone, layer: str, tokens: str, sae, aggregation: str = "max", batch_size: int = 64):
    """images → (n, d_sae) image-level codes: the backbone layer, the SAE on every token, the token aggregation."""
    from nacosae.naming.scorer import FeatureScorer

    scorer = FeatureScorer(backbone, layer, tokens, sae, aggregation, batch_size=batch_size)
    every = list(range(sae.cfg.d_sae))
    return lambda images: scorer.activations(images, every)


def feature_hints(bank: Bank | None, pool: RenderPool, feature: int, split: str = "search", n: int = N_HINTS) -> list[str]:
    """Descriptions of the feature's top `n` pictures of a split, best first, each once: the seed hints of the naming
    loop, offline and live (METHODS §3.1 step 1). `bank` is not needed (the pool rows carry the prompts)."""
    return features_hints(pool, [feature], split, n)[feature]


def features_hints(pool: RenderPool, features: Sequence[int], split: str = "search", n: int = N_HINTS
                   ) -> dict[int, list[str]]:
    """`feature_hints` for many features at once: the split's codes are read and sorted once, not once a feature.
    Ties go to the earlier pool row (a stable sort), as for a single feature."""
    rows = pool.rows_where(split=split)
    features = list(features)
    if not rows or not features:
        return {j: [] for j in features}
    acts_RF = pool.codes(rows)[:, torch.as_tensor(features, dtype=torch.long)]
    order_RF = torch.sort(-acts_RF, dim=0, stable=True).indices[:n]
    out = {}
    for f, j in enumerate(features):
        top = order_RF[:, f].tolist()
        out[j] = list(dict.fromkeys(pool.rows[rows[i]]["prompt"] for i in top if acts_RF[i, f] > 0))
    return out


def bank_pool_meta(bank: Bank, sae, layer: str, tokens: str, aggregation: str = "max") -> dict[str, Any]:
    """What identifies a bank pool: a pool folder with other meta is refused (`PoolMismatchError`)."""
    return {"d_sae": sae.cfg.d_sae, "sae": sae_fingerprint(sae), "layer": layer, "tokens": tokens,
            "aggregation": aggregation, "source": bank.id}


def bank_pool_rows(bank: Bank) -> list[dict[str, Any]]:
    """One pool row per bank picture: its id, description (as the render's prompt) and split."""
    return [{"render_id": it.item_id, "item": it.item_id, "prompt": it.description, "seed": 0, "split": it.split}
            for it in bank.items]


def bank_pool(bank: Bank, backbone, layer: str, tokens: str, sae, folder, aggregation: str = "max",
              progress: bool = True) -> RenderPool:
    """The pool of every bank picture's image-level code (encoded once; resumes after a kill; refuses a folder made
    with another SAE, layer or bank)."""
    pool = RenderPool.open(folder, bank_pool_meta(bank, sae, layer, tokens, aggregation))
    rows = bank_pool_rows(bank)
    from nacosae.results import thumbnail_bytes

    fill_pool(pool, rows, bank.load_image, encode_fn(backbone, layer, tokens, sae, aggregation), progress=progress,
              desc="encoding the bank", thumbnail=lambda im: thumbnail_bytes(im, THUMB_PX, THUMB_FORMAT))
    return pool


def name_every_feature(sae, backbone, layer: str, tokens: str, work_dir, bank: Bank | None = None,
                       cfg: EngineConfig = EngineConfig(), proposer=None, aggregation: str = "max",
                       n_per_feature_mils: int = 48, progress: bool = True, features: Sequence[int] | None = None,
                       embedder=None) -> NamingOutput:
    """Name all live features (module docstring). `work_dir` keeps the pool and the loop's state (resumable).
    `proposer`: default the offline WordNet `VocabularyProposer`. `features`: a subset (tests)."""
    from nacosae.naming.generators import TextEmbedder
    from nacosae.naming.proposers import VocabularyProposer
    from nacosae.naming.vocab import load_vocabulary

    t0 = time.perf_counter()
    work = Path(work_dir)
    bank = bank if bank is not None else offline_bank(progress=progress)
    pool = bank_pool(bank, backbone, layer, tokens, sae, work / "pool", aggregation, progress)
    t_pool = time.perf_counter() - t0
    embedder = embedder if embedder is not None else TextEmbedder()
    renderer = BankRetrieval(bank, pool, embedder, cfg.n_controls, cfg.seed, cache_path=work / "text_embeddings.safetensors")
    engine = NamingEngine(renderer, cfg)
    t_setup = time.perf_counter() - t0

    codes = pool.dense()
    freq_S = (codes > 0).float().mean(0)
    dead = set(torch.nonzero(codes.amax(0) <= 0).flatten().tolist())
    dense = set(torch.nonzero(freq_S > DENSE_FREQUENCY).flatten().tolist())
    all_feats = list(features) if features is not None else list(range(sae.cfg.d_sae))
    live = [j for j in all_feats if j not in dead]
    vocab = load_vocabulary()
    # no attribute edits offline: they win search scores with odd phrases ("scaly flag") that read badly and held
    # out no better (docs/naming.md)
    proposer = proposer if proposer is not None else VocabularyProposer(vocab, op_weights=OFFLINE_PROPOSER_OPS)
    hints = features_hints(pool, live)

    timings = {}
    t = time.perf_counter()
    bank_prompts = bank.prompts("search")
    results = {"retrieval": engine.retrieval(live, bank_prompts)}
    timings["retrieval"] = time.perf_counter() - t
    t = time.perf_counter()
    results["pool_mils"] = engine.mils(live, bank_prompts, proposer, work / "state" / "pool_mils", shared=True,
                                       hints=hints, progress=progress)
    timings["pool_mils"] = time.perf_counter() - t
    # the classic per-feature loop on a seeded subsample: 12 seeds each (top-picture hints + vocabulary)
    from nacosae.naming.mils import seed_prompts

    sub = sorted(random.Random(cfg.seed).sample(live, min(n_per_feature_mils, len(live))))
    t = time.perf_counter()
    seeds = {j: seed_prompts(vocab, 12, seed=cfg.seed + j, hints=hints[j][:6]) for j in sub}
    results["mils"] = engine.mils(sub, seeds, proposer, work / "state" / "mils", shared=False, hints=hints,
                                  progress=progress)
    timings["mils"] = time.perf_counter() - t
    # baselines
    top_label = {}
    search_rows = pool.rows_where(split="search")
    label_of = {it.item_id: it.label for it in bank.items}
    acts = pool.codes(search_rows)
    for j in live:
        top = torch.argsort(-acts[:, j], stable=True)[:16].tolist()
        labels = [label_of[pool.rows[search_rows[i]]["item"]] for i in top if acts[i, j] > 0]
        top_label[j] = Counter(labels).most_common(1)[0][0].replace("_", " ") if labels else None
    results["top_label"] = engine.fixed(top_label)
    rng = random.Random(cfg.seed)
    results["random"] = engine.fixed({j: rng.choice(vocab.words) for j in live})
    timings["total"] = time.perf_counter() - t0

    rows = feature_rows(all_feats, results, dead, dense, cfg.threshold, pool)
    summary = summarise(rows, results, live, cfg, bank, pool)
    summary["timings_s"] = {"pool": round(t_pool, 1), "setup": round(t_setup, 1),
                            **{k: round(v, 2) for k, v in timings.items()}}
    summary["n_features"], summary["n_dead"], summary["n_dense"] = len(all_feats), len(dead & set(all_feats)), len(dense & set(all_feats))
    atomic_write_json(work / "summary.json", summary)
    return NamingOutput(rows, summary, results, pool, bank)


def feature_rows(features: Sequence[int], results: dict[str, MethodResult], dead: set[int], dense: set[int],
                 threshold: float, pool: RenderPool) -> list[dict[str, Any]]:
    """The naming columns of the results `features` table, one row per feature (docs/RESULTS_SCHEMA.md)."""
    rows = []
    chosen = results["pool_mils"]
    for j in features:
        r: dict[str, Any] = {"feature": int(j)}
        for m, res in results.items():
            r[f"name_{m}"] = res.names.get(j)
            r[f"cosy_auc_{m}"] = res.auc.get(j)
            r[f"cosy_mad_{m}"] = res.mad.get(j)
            # the eval renders of the published method only: the others' would fill the images table for little use
            keep = m == "pool_mils" and j in res.eval_rows
            r[f"cosy_render_ids_{m}"] = [pool.rows[i]["render_id"] for i in res.eval_rows[j]] if keep else None
        if j in dead:
            r.update(name="unnamed", name_method=None, candidate_name=None, name_cosy_auc=None, name_cosy_mad=None,
                     name_split_score=None, unnamed_reason="dead")
        else:
            auc = chosen.auc.get(j)
            ok = auc is not None and auc >= threshold
            r.update(candidate_name=chosen.names.get(j), name_cosy_auc=auc, name_cosy_mad=chosen.mad.get(j),
                     name_split_score=chosen.split_score.get(j),
                     name=chosen.names[j] if ok else "unnamed", name_method="pool_mils" if ok else None,
                     unnamed_reason=None if ok else ("dense" if j in dense else "below_threshold"))
        r["pool_mils_history"] = chosen.history.get(j)
        rows.append(r)
    return rows


def method_table(results: dict[str, MethodResult], live: Sequence[int], threshold: float) -> list[dict[str, Any]]:
    """Per method over the live features it ran on: n, held-out CoSy AUC and MAD (mean, std), share at AUC ≥
    threshold, renders per feature."""
    table = []
    for m, res in results.items():
        a = np.array([res.auc[j] for j in live if j in res.auc])
        d = np.array([res.mad[j] for j in live if j in res.mad])
        table.append({"method": m, "n": int(a.size), "auc_mean": float(a.mean()) if a.size else None,
                      "auc_std": float(a.std()) if a.size else None, "mad_mean": float(d.mean()) if d.size else None,
                      "mad_std": float(d.std()) if d.size else None,
                      "share_auc_ge_threshold": float((a >= threshold).mean()) if a.size else None,
                      "renders_per_feature": float(np.mean(list(res.renders.values()))) if res.renders else None})
    return table


def summarise(rows, results: dict[str, MethodResult], live: Sequence[int], cfg: EngineConfig, bank: Bank,
              pool: RenderPool) -> dict[str, Any]:
    """The comparison table (every method over the features it ran on), paired intervals, the loop's gain over its
    best seed prompt, renders per feature, and the emoji keyword check."""
    table = method_table(results, live, cfg.threshold)
    pm = results["pool_mils"]
    # every live feature counts: its chosen name's held-out AUC, named or not
    all_live = np.array([pm.auc.get(j, 0.5) for j in live])
    pairs = {}
    for other in ("retrieval", "top_label", "random", "mils"):
        common = [j for j in live if j in pm.auc and j in results[other].auc]
        pairs[f"pool_mils - {other}"] = paired_bootstrap([pm.auc[j] for j in common], [results[other].auc[j] for j in common])
    # the loop's gain over its best seed prompt: the retrieval method *is* the seed round followed by the same selection
    named = [r for r in rows if r["name_method"]]
    return {
        "engine_config": asdict(cfg), "bank": bank.id, "pool_rows": len(pool), "pool_bytes": pool.nbytes(),
        "table": table, "paired": pairs, "loop_gain_over_seeds": pairs["pool_mils - retrieval"],
        "mean_auc_all_live": float(all_live.mean()) if all_live.size else None,
        "n_live": len(live), "n_named": len(named),
        "emoji_keyword_check": emoji_keyword_check(results, live, bank, pool),
        "split_sizes": {s: int(len(bank.indices(s))) for s in ("search", "select", "eval")},
    }


def emoji_keyword_check(results: dict[str, MethodResult], live: Sequence[int], bank: Bank, pool: RenderPool,
                        top: int = 16) -> dict[str, Any]:
    """For features whose top pictures (whole bank) are mostly emoji: the share whose name shares a CLDR keyword with
    the majority of those pictures, per method (the random word is the floor)."""
    item = {it.item_id: it for it in bank.items}
    codes = pool.dense()
    out: dict[str, Any] = {}
    feats = []
    kw_sets = {}
    for j in live:
        idx = torch.argsort(-codes[:, j], stable=True)[:top].tolist()
        its = [item[pool.rows[i]["item"]] for i in idx if codes[i, j] > 0]
        emo = [it for it in its if it.source == "emoji"]
        if len(its) >= 4 and len(emo) > len(its) / 2:
            counts = Counter(k for it in emo for k in set(it.keywords))
            kw_sets[j] = {k for k, c in counts.items() if c > len(emo) / 2}
            feats.append(j)
    out["n_features"] = len(feats)
    for m, res in results.items():
        hit = [bool(set((res.names.get(j) or "").split()) & kw_sets[j]) for j in feats if j in res.names]
        out[m] = float(np.mean(hit)) if hit else None
    return out


# ----------------------------------------------------------------------------------------------------------------
# The results dataset


def _bank_image_row(bank: Bank, pool: RenderPool, item_id: str, split_of: dict[str, str], max_px: int,
                    image_format: str) -> dict:
    from nacosae.results import thumbnail_bytes

    i = bank.index_of(item_id)
    it = bank.items[i]
    thumb = pool.thumbnail(pool.row_of(item_id)) or thumbnail_bytes(bank.load_image(i), max_px, image_format)
    return {"image_id": item_id, "image": {"bytes": thumb, "path": None},
            "kind": "emoji" if it.source == "emoji" else "bank", "label": it.label, "description": it.description,
            "source": it.source, "split": split_of.get(item_id, it.split), "family": it.family}


def pool_stats_rows(out: NamingOutput, sae_id: str, features: Sequence[int], top_n: int = 9, n_bins: int = 24) -> list[dict]:
    """Feature-page columns from the bank pool alone, for an SAE with no feature statistics (someone else's SAE):
    image-level frequency, mean and max over the bank, a histogram of nonzero activations, the top bank pictures.
    Token frequency and heatmaps need per-token codes, which the pool does not keep: NaN and empty."""
    codes = out.pool.dense()
    rows = []
    for j in features:
        a = codes[:, j]
        nz = a[a > 0]
        top = torch.argsort(-a, stable=True)[:top_n]
        top = [int(i) for i in top if a[i] > 0]
        counts, edges = (np.histogram(nz.numpy(), bins=n_bins) if nz.numel() else (np.zeros(0, int), np.zeros(0)))
        rows.append({"sae_id": sae_id, "feature": int(j), "image_frequency": float((a > 0).float().mean()),
                     "token_frequency": float("nan"), "mean_act": float(a.mean()), "max_act": float(a.max()),
                     "aggregation": "max", "dead": bool(nz.numel() == 0), "dense": bool((a > 0).float().mean() > DENSE_FREQUENCY),
                     "hist_edges": edges.astype(np.float32).tolist(), "hist_counts": counts.astype(np.int64).tolist(),
                     "top_image_ids": [out.pool.rows[i]["item"] for i in top], "top_activations": [float(a[i]) for i in top],
                     "top_heatmaps": [[] for _ in top], "grid_h": 0, "grid_w": 0})
    return rows


def results_tables(out: NamingOutput, sae_id: str, sae_config: dict[str, Any], metrics: dict[str, Any],
                   base: dict | None = None, max_px: int = 112, image_format: str = "webp") -> dict:
    """The results dataset (nacosae.results schema) of a naming run: the naming columns of every feature over `base`
    (tables with the feature statistics, e.g. `tables_from_stats` or an earlier dataset), or over feature pages made
    from the pool (`pool_stats_rows`) when there is none. Images: the bank pictures the rows refer to."""
    from nacosae.results import overlay_results, rows_to_table, runs_row

    feats = [r["feature"] for r in out.rows]
    rows = []
    for r in out.rows:
        row = {k: v for k, v in r.items() if k != "pool_mils_history"}
        hist = r.get("pool_mils_history")
        row["pool_mils_history"] = ([{"iteration": h["iteration"], "prompt": h["prompt"], "score": h["score"],
                                      "render_ids": []} for h in hist] if hist else None)
        row["pool_mils_scores_by_iteration"] = [h["score"] for h in hist] if hist else None
        row["sae_id"] = sae_id
        rows.append(row)
    if base is None:
        stats = {s["feature"]: s for s in pool_stats_rows(out, sae_id, feats)}
        rows = [{**stats[r["feature"]], **r} for r in rows]
    # cosy render ids are pool render ids = bank item ids offline; keep them as image ids
    used = dict.fromkeys(i for r in rows for m in METHODS for i in (r.get(f"cosy_render_ids_{m}") or []))
    if base is None:
        used.update(dict.fromkeys(i for r in rows for i in r["top_image_ids"]))
    split_of = {}
    images = [_bank_image_row(out.bank, out.pool, i, split_of, max_px, image_format) for i in used]
    evaluation = {k: v for k, v in out.summary.items() if k != "table"} | {"table": out.summary["table"]}
    extra = {"features": rows_to_table("features", rows), "images": rows_to_table("images", images),
             "runs": rows_to_table("runs", [runs_row(sae_id, sae_config, metrics, evaluation)])}
    return extra if base is None else overlay_results(base, extra)


def write_naming_results(out: NamingOutput, sae_id: str, sae_config: dict[str, Any], metrics: dict[str, Any],
                         out_dir, base: dict | None = None, carried: dict[str, str] | None = None,
                         figures_dir=None) -> Path:
    """Write the results dataset of a naming run (atomically, `nacosae.results`), its card with the evaluation
    protocol section, and the loop-gain figure (`figures_dir`); returns the figure's path."""
    from nacosae.naming.report import plot_loop_gain, protocol_markdown
    from nacosae.results import results_card, write_results_folder

    live = [r["feature"] for r in out.rows if r["unnamed_reason"] != "dead"]
    fig = plot_loop_gain(out.results, live, Path(figures_dir or out_dir) / "loop_gain.png")
    tables = results_tables(out, sae_id, sae_config, metrics, base)
    carried = {**(carried or {}), "evaluation-protocol": protocol_markdown(out.summary)}
    write_results_folder(tables, out_dir, results_card(tables, repo_id=str(out_dir), existing=None, carried=carried))
    return fig


# ----------------------------------------------------------------------------------------------------------------
# `nacosae name`


def load_backbone_for(provenance: dict[str, Any], device: str = "cpu"):
    """The backbone an SAE's activations came from, rebuilt from its provenance (backbone spec and weights tag)."""
    from nacosae.backbones import load_backbone

    name, weights = str(provenance.get("backbone") or ""), provenance.get("weights")
    if not name:
        raise ValueError("the SAE's config has no provenance.backbone: say which backbone made its activations "
                         "(nacosae import --backbone ...)")
    kwargs: dict[str, Any] = {}
    if name.startswith("open_clip:") and not name.startswith(("open_clip:hf-hub:", "open_clip:local-dir:")):
        kwargs["pretrained"] = weights
    return load_backbone(name, device=device, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """`nacosae name`: name every live feature of an SAE and write the results dataset."""
    import argparse

    from nacosae.cli import add_dataclass_args, dataclass_from_args
    from nacosae.results import CARD, carried_sections, read_results_folder
    from nacosae.sae import SAE

    ap = argparse.ArgumentParser(prog="nacosae name", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", required=True, help="SAE folder (model.safetensors + config.json) or Hub repo id")
    ap.add_argument("--subfolder", default=None, help="subfolder of a Hub repo holding the SAE (e.g. efficientnet-lite0/blocks.14)")
    ap.add_argument("--sae-id", default=None, help="the SAE's id in the results (default: <backbone>/<layer>)")
    ap.add_argument("--out", required=True, help="results dataset folder to write (replaced atomically)")
    ap.add_argument("--work", default=None, help="work folder: the render pool and the loop's state, reused by re-runs "
                    "(default: OUT.naming next to --out)")
    ap.add_argument("--base-results", default=None, help="a results folder of the same SAE with its feature statistics "
                    "(e.g. built by `nacosae stats`); default: feature pages from the bank pool")
    ap.add_argument("--per-feature-mils", type=int, default=48, help="features in the per-feature MILS comparison "
                    "(seeded subsample; 0 skips it) (default: %(default)s)")
    ap.add_argument("--max-bank", type=int, default=None, help="a seeded family subset of the bank (quick runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--figures", default=None, help="folder for the loop-gain figure (default: the work folder)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    add_dataclass_args(ap, EngineConfig)
    args = ap.parse_args(None if argv is None else list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dataclass_from_args(EngineConfig, args)
    out_dir = Path(args.out)
    work = Path(args.work) if args.work else out_dir.with_name(out_dir.name + ".naming")
    sae = SAE.from_pretrained(args.sae, subfolder=args.subfolder) if args.subfolder else SAE.from_pretrained(args.sae)
    sae.eval()
    prov = sae.cfg.provenance or {}
    layer, tokens = prov.get("layer"), prov.get("tokens")
    if not layer or not tokens:
        raise ValueError("the SAE's config.json has no provenance layer/tokens, so nacosae cannot tell which activations "
                         "it reads: write it again with `nacosae import THEIR_SAE --backbone ... --layer ... --tokens ... --out ...`")
    sae_id = args.sae_id or f"{prov.get('backbone')}/{layer}".replace(":", "_")
    base = read_results_folder(args.base_results) if args.base_results else None  # a bad folder fails before the work
    backbone = load_backbone_for(prov)
    bank = offline_bank(progress=not args.quiet, max_items=args.max_bank, seed=cfg.seed)
    out = name_every_feature(sae, backbone, layer, tokens, work, bank=bank, cfg=cfg,
                             n_per_feature_mils=args.per_feature_mils, progress=not args.quiet)
    sae_folder = Path(args.sae) / (args.subfolder or "")
    config = json.loads((sae_folder / "config.json").read_text()) if (sae_folder / "config.json").is_file() else sae.cfg.to_dict()
    metrics = json.loads((sae_folder / "metrics.json").read_text()) if (sae_folder / "metrics.json").is_file() else {}
    base_card = Path(args.base_results or "") / CARD
    carried = carried_sections(base_card.read_text(encoding="utf-8")) if args.base_results and base_card.is_file() else {}
    fig = write_naming_results(out, sae_id, config, metrics, out_dir, base, carried, Path(args.figures or work))
    from nacosae.naming.report import protocol_markdown

    s = out.summary
    print(protocol_markdown(s))
    print(f"results: {out_dir}  (datasets.load_dataset({str(out_dir)!r}, split='train'))  figure: {fig}")
    print(f"time: {s['timings_s']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
