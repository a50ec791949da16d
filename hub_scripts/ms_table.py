r"""Monosemanticity Score (METHODS §4.2) of an SAE's features and of its layer's raw channels, with several image
encoders side by side on the same images: does the score depend on which network embeds them?

    python hub_scripts/ms_table.py --store runs/offline_default/acts/blocks.14 \
        --sae demo/sae/efficientnet-lite0/blocks.14 --encoders own,efficientnet-lite2 --out runs/offline_default/ms/blocks.14
    nacosae ms --store ... (the same flags)

Images: a seeded sample of the store's file images (`nacosae.evaluate.ms_sample`, the one a naming run scores),
decoded by `nacosae.images.open_image`. Image-level activations: the store's rows of those images
(`ImageActivationTable.from_store` over those images, as a naming run builds it): SAE codes and raw channels
aggregated over tokens by `nacosae.features.aggregate_tokens` (max, as the feature statistics). Embeddings: `nacosae.evaluate.ms_embeddings` with
each encoder `nacosae.backbones.ms_encoder` names ('own' = the SAE's backbone at --own-layer, not independent).

Writes OUT/ms.json (per encoder: `monosemanticity_report` plus the encoder and its caveat; the Spearman correlation of
per-feature MS between encoders), OUT/ms.md (the table) and OUT/emb_<encoder>.safetensors (each encoder's embeddings,
keyed by the encoder and the images: a re-run only recomputes the activations and the scores).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nacosae.backbones import MS_ENCODER_CHOICES, load_backbone, ms_encoder
from nacosae.evaluate import ms_embeddings, ms_sample
from nacosae.features import AGGREGATIONS
from nacosae.images import open_image
from nacosae.io import atomic_save_safetensors, atomic_write_json, atomic_write_text
from nacosae.metrics import monosemanticity_report
from nacosae.naming.scorer import ImageActivationTable, store_ref
from nacosae.sae import SAE
from nacosae.store import ActivationStore

SCHEMA_VERSION = 1
EMB_SCHEMA_VERSION = "1"


def parse_encoders(text: str, sae_backbone: str, own_layer: str) -> dict[str, tuple[str, str, str]]:
    """'own,efficientnet-lite2' → {choice: (spec, layer, caveat)} in the order given, every name checked before any work
    (ValueError naming the valid choices, a repeated name, or an encoder that is the SAE's own backbone)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--encoders is empty; give one or more of {list(MS_ENCODER_CHOICES)}, comma-separated")
    if len(set(names)) != len(names):
        raise ValueError(f"--encoders repeats a name: {names}")
    return {n: ms_encoder(sae_backbone, n, own_layer) for n in names}


def check_sae_fits_store(sae: SAE, store: ActivationStore) -> None:
    """ValueError unless the SAE reads this store's activations: same width, and the same backbone and layer where
    both record them."""
    if sae.cfg.d_in != store.d:
        raise ValueError(f"the SAE reads {sae.cfg.d_in}-d inputs but the store at {store.path} holds {store.d}-d rows: "
                         "give the store of the layer the SAE was trained on")
    for key in ("backbone", "layer"):
        a, b = sae.cfg.provenance.get(key), store.provenance.get(key)
        if a and b and a != b:
            raise ValueError(f"the SAE was trained on {key} {a!r} but the store at {store.path} holds {key} {b!r}")


def cached_embeddings(path: Path, spec: str, layer: str, paths: list[str], batch_size: int = 32,
                      device: str = "cpu", progress: bool = True) -> tuple[Tensor, float | None]:
    """(emb_NE, seconds spent embedding; None when read from the cache at `path`). The cache holds the embeddings of
    exactly these image files by this encoder (its key: spec, layer and the paths); anything else is recomputed."""
    from safetensors import safe_open

    key = hashlib.sha1(json.dumps([spec, layer, paths]).encode()).hexdigest()
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") == key and meta.get("schema_version") == EMB_SCHEMA_VERSION:
                return f.get_tensor("emb_NE"), None
    t0 = time.perf_counter()
    encoder = load_backbone(spec, device=device)
    emb_NE = ms_embeddings(encoder, layer, (open_image(p) for p in paths), batch_size, progress, total=len(paths))
    seconds = time.perf_counter() - t0
    atomic_save_safetensors(path, {"emb_NE": emb_NE.contiguous()},
                            metadata={"key": key, "encoder": f"{spec}/{layer}", "n_images": str(len(paths)),
                                      "schema_version": EMB_SCHEMA_VERSION})
    return emb_NE, seconds


def spearman(a: list, b: list) -> dict[str, Any]:
    """Spearman ρ of two per-feature MS lists over the features finite in both (None: NaN MS); rho None under 3."""
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if len(pairs) < 3:
        return {"rho": None, "n": len(pairs)}
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return {"rho": None if math.isnan(rho) else float(rho), "n": len(pairs)}


def ms_table(store: ActivationStore, sae: SAE, encoders: str, out: str | Path, n_images: int = 1000, seed: int = 0,
             aggregation: str = "max", cls_token: int = 0, own_layer: str = "pooled", batch_size: int = 32,
             device: str = "cpu", progress: bool = True, sae_ref: str | None = None) -> dict[str, Any]:
    """MS of the SAE's features and of the store's raw channels with each encoder of `encoders` (comma-separated
    `ms_encoder` choices) on one seeded sample of the store's images; writes OUT/ms.json, OUT/ms.md and the embedding
    caches, and returns what ms.json holds. 'Alive' SAE features: those that fire on at least one sampled image.
    `sae_ref` (where the SAE came from) is only recorded. ValueError for an unknown encoder or aggregation, or an SAE
    that does not read this store."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    check_sae_fits_store(sae, store)
    if aggregation == "cls":
        tokens, n_prefix = store.provenance.get("tokens"), store.provenance.get("n_prefix_tokens")
        if tokens in ("spatial", "patches") or (tokens == "all" and n_prefix == 0):
            raise ValueError(f"aggregation 'cls' needs a CLS token, but the store at {store.path} holds "
                             f"{tokens!r} tokens of {store.provenance.get('layer')!r}, none of them a CLS token "
                             "(token 0 would be one patch): use max or mean")
        if tokens == "all" and n_prefix and not 0 <= cls_token < n_prefix:
            raise ValueError(f"cls_token={cls_token} is not a prefix token of the store's 'all' tokens "
                             f"(the first {n_prefix} are): token {cls_token} is a patch")
    sae_backbone = sae.cfg.provenance.get("backbone") or store.provenance.get("backbone")
    if not sae_backbone:
        raise ValueError("neither the SAE nor the store records its backbone: cannot tell which encoder is independent")
    chosen = parse_encoders(encoders, sae_backbone, own_layer)
    out = Path(out)
    if n_images < 2:
        raise ValueError(f"n_images must be ≥ 2 (the MS sums over pairs of images), got {n_images}")
    recs = ms_sample(store.images, n_images, seed)
    if len(recs) < 2:
        raise ValueError(f"the store at {store.path} holds {len(recs)} image with a file to embed; the MS sums over "
                         "pairs of images, so it needs at least 2")
    idx = [int(r["image_idx"]) for r in recs]
    paths = [str(r["path"]) for r in recs]
    with torch.no_grad():
        table = ImageActivationTable.from_store(store, sae, aggregation, cls_token, progress=progress, rows=idx)
    refs = [store_ref(r) for r in recs]  # the sample's order
    acts_NS, raw_ND = table.rows(refs), table.raw_rows(refs)
    alive_S = acts_NS.amax(0) > 0
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "store": str(store.path), "sae": sae_ref,
        "backbone": sae_backbone, "layer": store.provenance.get("layer"), "d": store.d, "d_sae": sae.cfg.d_sae,
        "n_images": len(recs), "seed": seed, "aggregation": aggregation, "n_alive_on_sample": int(alive_S.sum()),
        "image_idx": idx, "encoders": {}}
    for choice, (spec, layer, caveat) in chosen.items():
        emb_NE, seconds = cached_embeddings(out / f"emb_{choice}.safetensors", spec, layer, paths, batch_size, device, progress)
        report = monosemanticity_report(acts_NS, raw_ND, emb_NE, alive_S=alive_S)
        result["encoders"][choice] = {"encoder": f"{spec}/{layer}", "caveat": caveat, "embed_seconds": seconds,
                                      "d_embedding": emb_NE.shape[1], **report}
    result["spearman"] = {f"{a} vs {b}": {"sae": spearman(result["encoders"][a]["ms_S"], result["encoders"][b]["ms_S"]),
                                          "raw": spearman(result["encoders"][a]["ms_raw_D"], result["encoders"][b]["ms_raw_D"])}
                          for a, b in itertools.combinations(chosen, 2)}
    atomic_write_json(out / "ms.json", result)
    atomic_write_text(out / "ms.md", markdown(result))
    return result


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f} %" if pct else f"{x:.3f}"


def markdown(result: dict[str, Any]) -> str:
    """The side-by-side table of `ms_table`'s result (a markdown string)."""
    lines = [f"MS (METHODS §4.2) over {result['n_images']} images of the store (seed {result['seed']}), "
             f"{result['aggregation']} over tokens; {result['n_alive_on_sample']} of {result['d_sae']} SAE features "
             f"fire on them, {result['d']} raw channels of `{result['layer']}`.", "",
             "| encoder | caveat | SAE alive: mean / median / ≥ 0.5 | raw channels: mean / median / ≥ 0.5 | "
             "uniform-weights floor |", "|---|---|---|---|---|"]
    for choice, e in result["encoders"].items():
        s, r = e["summary_sae_alive"], e["summary_raw"]
        lines.append(f"| {choice} (`{e['encoder']}`) | {e['caveat']} | "
                     f"{_fmt(s['mean'])} / {_fmt(s['median'])} / {_fmt(s.get('share_ge_0.5'), True)} | "
                     f"{_fmt(r['mean'])} / {_fmt(r['median'])} / {_fmt(r.get('share_ge_0.5'), True)} | "
                     f"{_fmt(e['uniform_weights_ms'])} |")
    for pair, sp in result["spearman"].items():
        lines.append("")
        lines.append(f"Spearman ρ of per-feature MS, {pair}: SAE features {_fmt(sp['sae']['rho'])} "
                     f"(n = {sp['sae']['n']}), raw channels {_fmt(sp['raw']['rho'])} (n = {sp['raw']['n']}).")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="activation store folder the SAE was trained on (hub_scripts/extract.py)")
    p.add_argument("--sae", required=True, help="SAE folder (config.json + model.safetensors) or Hub repo id")
    p.add_argument("--sae-subfolder", default=None, help="subfolder of the SAE in a Hub repo")
    p.add_argument("--encoders", default="own,efficientnet-lite2",
                   help=f"comma-separated MS image encoders, each one of {list(MS_ENCODER_CHOICES)} "
                        "('own': the SAE's backbone at --own-layer) (default: own,efficientnet-lite2)")
    p.add_argument("--own-layer", default="pooled", help="layer of the SAE's own backbone for 'own' (default: pooled)")
    p.add_argument("--n-images", type=int, default=1000, help="images in the seeded sample (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image sample (default: 0, as a naming run's ms_seed)")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default="max",
                   help="token → image aggregation, as the feature statistics (default: max)")
    p.add_argument("--cls-token", type=int, default=0, help="'cls' aggregation only: index of the CLS token (default: 0)")
    p.add_argument("--out", required=True, help="output folder: ms.json, ms.md and the embedding caches")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder batch (default: 32)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    store = ActivationStore(args.store)
    sae = SAE.from_pretrained(args.sae, subfolder=args.sae_subfolder, device=args.device)
    result = ms_table(store, sae, args.encoders, args.out, args.n_images, args.seed, args.aggregation, args.cls_token,
                      args.own_layer, args.batch_size, args.device, progress=not args.no_progress, sae_ref=args.sae)
    print(markdown(result), end="")
    print(f"wrote {Path(args.out) / 'ms.json'} and ms.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
