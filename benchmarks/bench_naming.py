"""Naming time per feature on CPU for the offline path (METHODS §3.1): Open Clip Art retrieval as the generator,
EfficientNet-Lite0 + an SAE as the scorer, and the VocabularyProposer (no model) or the Gemma-3-270M few-shot proposer.

The SAE has random weights (scale and probe maxima set from real activations): the timing of a naming run does not
depend on what the features mean, only on T (iterations), n (candidates per iteration), G (renders per prompt) and
the proposer. Reported per feature: total seconds, and the split between proposing, rendering (retrieval + image
decoding) and scoring (backbone + SAE).

    python benchmarks/bench_naming.py --proposer vocabulary --features 3 --iterations 5 --candidates 10
    python benchmarks/bench_naming.py --proposer gemma --features 1 --iterations 3 --candidates 8
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


class Timed:
    """Wraps a proposer / generator / scorer and adds up the seconds spent in its calls."""

    def __init__(self, inner, methods):
        self.inner, self.seconds = inner, 0.0
        for m in methods:
            setattr(self, m, self._wrap(getattr(inner, m)))
        self.id = getattr(inner, "id", "timed")

    def _wrap(self, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return call


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proposer", choices=["vocabulary", "gemma"], default="vocabulary")
    ap.add_argument("--features", type=int, default=3, help="features to name (the most frequent non-dead ones)")
    ap.add_argument("--iterations", type=int, default=5, help="T")
    ap.add_argument("--candidates", type=int, default=10, help="n new prompts per iteration")
    ap.add_argument("--best", type=int, default=8, help="m best kept")
    ap.add_argument("--images", type=int, default=3, help="G renders per prompt")
    ap.add_argument("--seeds", type=int, default=20, help="seed prompts")
    ap.add_argument("--probe", type=int, default=256, help="probe images for the SAE's scale and the feature maxima")
    ap.add_argument("--categories", nargs="*", default=None, help="Open Clip Art categories in the bank (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from nacosae.backbones import load_backbone
    from nacosae.features import FeatureStatsConfig, backbone_blocks, compute_feature_stats
    from nacosae.images import OpenClipArtSource
    from nacosae.naming import (
        DescribedImageBank,
        FeatureScorer,
        GGUFProposer,
        MILSConfig,
        RetrievalGenerator,
        VocabularyProposer,
        load_vocabulary,
        new_state,
        run_mils,
        seed_prompts,
    )
    from nacosae.sae import SAE, SAEConfig

    t0 = time.perf_counter()
    records = OpenClipArtSource(categories=args.categories, progress=False).records()
    bank = DescribedImageBank.from_openclipart(paths=[r.path for r in records])
    setup = {"bank_images": len(bank), "bank_seconds": time.perf_counter() - t0}

    layer, tokens = "blocks.14", "spatial"
    bb = load_backbone("efficientnet-lite0")
    probe_idx = list(range(0, len(bank), max(1, len(bank) // args.probe)))[: args.probe]
    probe = [bank.load_image(i) for i in probe_idx]
    t1 = time.perf_counter()
    acts = torch.cat([a for _, a in backbone_blocks(bb, probe[:64], layer, tokens)]).flatten(0, 1)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=acts.shape[-1], d_sae=8 * acts.shape[-1], k=24)).init_from_data(acts)
    stats = compute_feature_stats(sae, backbone_blocks(bb, probe, layer, tokens), FeatureStatsConfig(top_n=8), progress=False)
    setup["probe_seconds"] = time.perf_counter() - t1
    alive = torch.nonzero(stats.act_max_S > 0).flatten()
    features = alive[stats.image_frequency_S[alive].argsort(descending=True)][: args.features].tolist()

    t2 = time.perf_counter()
    if args.proposer == "vocabulary":
        proposer = VocabularyProposer(load_vocabulary())
    else:
        proposer = GGUFProposer(max_new_tokens=12 * args.candidates)
    setup["proposer_load_seconds"] = time.perf_counter() - t2
    cfg = MILSConfig(n_iterations=args.iterations, n_candidates=args.candidates, n_best=args.best, n_images=args.images)
    vocab = load_vocabulary()
    scorer = Timed(FeatureScorer.from_stats(bb, layer, tokens, sae, stats), ["score"])
    generator = Timed(RetrievalGenerator(bank), ["render"])
    timed_proposer = Timed(proposer, ["propose", "summarise"])

    rows = []
    for j in features:
        scorer.seconds = generator.seconds = timed_proposer.seconds = 0.0
        # seeds: the descriptions of the feature's top probe images, then a vocabulary sample (METHODS §3.1 step 1)
        hints = [bank.descriptions[probe_idx[i]].split(";")[0] for i, _ in stats.top_images(j)[:3]]
        state = new_state(j, seed_prompts(vocab, args.seeds, seed=j, hints=hints))
        t = time.perf_counter()
        state = run_mils(state, timed_proposer, generator, scorer, cfg, progress=False)
        total = time.perf_counter() - t
        n_prompts = len(state.candidates)
        n_distinct = len({ref for c in state.candidates for ref in c.refs})  # the loop scores each bank image once
        rows.append({"feature": j, "seconds": round(total, 2), "propose_s": round(timed_proposer.seconds, 2),
                     "render_s": round(generator.seconds, 2), "score_s": round(scorer.seconds, 2), "prompts": n_prompts,
                     "renders": n_prompts * cfg.n_images, "images_scored": n_distinct, "best": round(state.best[0][0], 3),
                     "name": state.name})
        print(json.dumps(rows[-1]))

    result = {
        "proposer": args.proposer, "T": cfg.n_iterations, "n": cfg.n_candidates, "m": cfg.n_best, "G": cfg.n_images,
        "seed_prompts": args.seeds, "threads": args.threads, "backbone": f"efficientnet-lite0 {layer} {tokens}",
        "setup": {k: round(v, 2) if isinstance(v, float) else v for k, v in setup.items()},
        "per_feature": rows,
        "mean_seconds_per_feature": round(sum(r["seconds"] for r in rows) / len(rows), 2),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
    }
    if args.proposer == "gemma":
        result["gemma_tokens_per_second"] = round(proposer.tokens_per_second, 2)
    print(json.dumps(result, indent=2))
    if args.out:
        from nacosae.io import atomic_write_json

        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
