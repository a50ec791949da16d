"""The lab experiment: plant a cue, train, find what detects it, switch it off, and train with what was found.

Per seed:
  1. `baseline`: a small CNN trained on the biased set (the cue marks most target-class images).
  2. Analysis of the baseline: cue sites / units / SAE features (cue.py), interventions and steering (intervene.py).
  3. The other training methods, each measured the same way:
       l2_dropout    L2 (weight decay) + dropout: the generic regulariser
       act_l1        L1 on the penultimate activations: a sparsity regulariser (sparser codes, often higher MS)
       ft_control    the baseline fine-tuned `ft_epochs` more on the same data: the compute-matched control for the next two
       prune_cue     baseline → detect cue sites → zero them for good (a persistent mask) → fine-tune; every
                     `redetect_every` steps the sites are searched again and new ones join the mask
       prune_region  the same loop, but the mask takes *every* channel at the positions where cue sites were found
       penalize_cue  the same loop, but the detected sites get an activation penalty λ·(per-image sum of their
                     activations) instead of a mask
       cue_augment   reference, not interpretability: blank the mark's square and paste the mark on random images of
                     every class while training (possible once the tool has told you what and where the mark is,
                     and only when you can retrain from scratch)
Measured: accuracy on the iid / clean / flipped / cued test sets, the target class's recall on clean images, the
hijack rate (non-target images with the mark predicted as the target class), density and dead fraction of the
penultimate layer, its units' Monosemanticity Score, and how much cue detection is left in the trained model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from nacosae.io import atomic_save_safetensors, atomic_write_json
from nacosae.lab.cue import CueUnit, find_cue_features, find_cue_units, layer_tokens, paired_probe, sae_codes
from nacosae.lab.data import CLASSES, CueData, CueDataConfig, CueSpec, apply_cue, make_cue_data, remove_cue
from nacosae.lab.intervene import Edit, clamp_sites, evaluate, hooked, sae_clamp, sae_clamp_sites, sae_steer_sites, zero_units
from nacosae.lab.models import ModelConfig, SmallMLP, build_model
from nacosae.lab.probe import activation_density, dead_fraction, monosemanticity, record_activations

METHODS = ("baseline", "l2_dropout", "act_l1", "ft_control", "prune_cue", "prune_region", "penalize_cue", "cue_augment")
FINE_TUNED = ("ft_control", "prune_cue", "prune_region", "penalize_cue")
SCHEMA = 1


@dataclass(frozen=True)
class LabConfig:
    """Everything the experiment does; saved next to its results."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """Model seeds (init + batch order). The data (subset, which images carry the cue) is fixed by `data.seed`."""
    methods: tuple[str, ...] = METHODS
    """Training methods to run (see the module docstring); 'baseline' is always run first."""
    data: CueDataConfig = CueDataConfig()
    """The biased training set and test sets."""
    model: ModelConfig = ModelConfig(kind="cnn", width=8, hidden=64)
    """The analysed network."""
    epochs: int = 4
    """Training epochs of every from-scratch method."""
    ft_epochs: int = 1
    """Extra epochs of the fine-tuned methods (ft_control, prune_cue, penalize_cue)."""
    batch_size: int = 128
    """Training batch size."""
    lr: float = 2e-3
    """Adam learning rate."""
    weight_decay: float = 5e-4
    """l2_dropout: L2 penalty (Adam weight_decay)."""
    dropout: float = 0.3
    """l2_dropout: dropout before the classifier."""
    l1_coeff: float = 0.02
    """act_l1: weight of mean |a| of the penultimate layer."""
    cue_penalty: float = 0.5
    """penalize_cue: weight of the per-image sum of the detected cue sites' activations (batch mean)."""
    augment_rate: float = 0.5
    """cue_augment: probability that a training image gets the mark pasted (any class)."""
    redetect_every: int = 40
    """prune_cue / penalize_cue: steps between searches for new cue sites."""
    detect_layer: str = "act2"
    """Layer whose sites are detected, masked and penalised (the CNN's second ReLU, (2w, 14, 14))."""
    analyse_layers: tuple[str, ...] = ("act1", "act2", "act3")
    """Layers searched for cue units/sites in the analysis."""
    min_effect: float = 1.0
    """Detector threshold on Cohen's d (cue.py)."""
    min_auc: float = 0.9
    """Detector threshold on the AUC."""
    max_control_ratio: float = 0.5
    """Detector specificity: effect of the control mark ≤ this × effect of the cue."""
    control: CueSpec = CueSpec(row=24, col=24)
    """The control mark: the same square in the opposite corner, never correlated with a class."""
    n_probe: int = 2000
    """Clean held-out training-split images used to detect, describe and score units (never used for accuracy)."""
    n_redetect: int = 500
    """Probe images used by each re-detection inside the fine-tuning loops."""
    n_ref: int = 10000
    """Held-out images for the reference MLP whose embeddings the Monosemanticity Score uses."""
    sae_layer: str = "act2"
    """Layer the SAE reads (as tokens: one channel vector per position)."""
    sae_width: int = 64
    """SAE latents."""
    sae_k: int = 4
    """TopK of the SAE."""
    sae_steps: int = 1500
    """SAE training steps (batches of 1024 tokens)."""
    sae_lr: float = 2e-3
    """SAE learning rate."""
    steer_alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    """Steering strengths: multiples of the cue's mean code change at the detected SAE sites (METHODS §5 steer)."""
    n_sae_probe: int = 1000
    """Probe images for the per-position SAE search (codes of every feature at every position are held in memory)."""
    threads: int = 1
    """torch CPU threads (1 is fastest for these small convolutions and leaves a core free on a 2-core machine)."""

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("give at least one seed")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
        object.__setattr__(self, "methods", tuple(m for m in METHODS if m in self.methods or m == "baseline"))
        for name in ("epochs", "ft_epochs", "batch_size", "n_probe", "n_redetect", "sae_steps", "sae_width", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.n_redetect > self.n_probe:
            raise ValueError(f"n_redetect ({self.n_redetect}) cannot exceed n_probe ({self.n_probe})")
        if self.data.n_train == 0 or self.data.n_train + self.n_probe + self.n_ref > 60000:
            raise ValueError(
                f"n_train + n_probe + n_ref = {self.data.n_train + self.n_probe + self.n_ref} must be ≤ 60000 with n_train > 0: "
                "the probe and reference images come from the training split's unused part"
            )
        if self.model.kind != "cnn":
            raise ValueError("the experiment's layer names (act1/act2/act3) are those of the CNN: use model.kind='cnn'")
        if not 0 < self.sae_k <= self.sae_width:
            raise ValueError(f"sae_k must be in 1..sae_width, got {self.sae_k}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- training
def train_classifier(
    model: nn.Module,
    x_N: Tensor,
    y_N: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    penalty: Callable[[dict[str, Tensor]], Tensor] | None = None,
    penalty_layers: Sequence[str] = (),
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Adam on cross-entropy (+ `penalty(recorded activations of penalty_layers)`). Returns the mean loss per epoch.

    `on_step(step)` runs after every optimiser step (e.g. to re-detect cue sites); `augment(x_B, gen)` edits a batch.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = x_N.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    history, step = [], 0
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            xb = x_N[idx] if augment is None else augment(x_N[idx], gen)
            with hooked(model, {}, record=list(penalty_layers), keep_graph=True) as rec:
                loss = F.cross_entropy(model(xb), y_N[idx])
            if penalty is not None:
                loss = loss + penalty(rec)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
            step += 1
            bar.update(1)
            if on_step is not None:
                on_step(step)
        history.append(total / n)
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    bar.close()
    model.eval()
    return history


class SiteMask:
    """A persistent forward hook that zeroes a growing set of sites of one layer (the 'switched off' cue sites)."""

    def __init__(self, model: nn.Module, layer: str):
        self.layer, self.sites = layer, set()
        module = dict(model.named_modules())[layer]
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, mod, args, out):
        if not self.sites:
            return out
        return clamp_sites(sorted(self.sites), 0.0)(out)

    def remove(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------- measuring
def reference_embedder(data: CueData, cfg: LabConfig, progress: bool = True) -> SmallMLP:
    """The 'other encoder' for the Monosemanticity Score (METHODS §4.2 wants a different network than the one analysed):
    a small MLP trained on clean held-out images (never on the cue), seed 12345."""
    torch.manual_seed(12345)
    mlp = SmallMLP(ModelConfig(kind="mlp", width=16, hidden=64))
    x = data.extra_x[cfg.n_probe : cfg.n_probe + cfg.n_ref]
    y = data.extra_y[cfg.n_probe : cfg.n_probe + cfg.n_ref]
    train_classifier(mlp, x, y, epochs=2, lr=2e-3, batch_size=128, seed=12345, desc="reference MLP", progress=progress)
    return mlp


@torch.no_grad()
def reference_embeddings(ref: SmallMLP, x_N: Tensor) -> Tensor:
    """(N, 64) embeddings of `x_N` from the reference MLP, centred over these images. The MLP's features are
    post-ReLU, hence non-negative: uncentred, every pair of images has a clearly positive cosine and the
    Monosemanticity Score of every unit sits near that common floor; centred, an unrelated pair has cosine ≈ 0 as
    with the DINOv2 embeddings METHODS §4.2 assumes."""
    emb_NE = ref.eval().embed(x_N)
    return emb_NE - emb_NE.mean(0)


def detect_sites(model: nn.Module, probe_x: Tensor, cfg: LabConfig, layers: Sequence[str] | None = None) -> tuple[list[CueUnit], dict]:
    """Cue *sites* (channel × position) of `layers` (default: the detect layer), with the control-mark specificity test."""
    return find_cue_units(
        model, probe_x, cfg.data.cue, list(layers or [cfg.detect_layer]), reduce="none", min_effect=cfg.min_effect,
        min_auc=cfg.min_auc, control=cfg.control, max_control_ratio=cfg.max_control_ratio,
    )


def _finite_mean(t: Tensor) -> float:
    t = t[torch.isfinite(t)]
    return t.mean().item() if t.numel() else float("nan")


@torch.no_grad()
def measure(model: nn.Module, data: CueData, probe_x: Tensor, emb_NE: Tensor, cfg: LabConfig) -> dict[str, Any]:
    """Accuracy on the four test sets, target recall / hijack, penultimate density / dead / MS, leftover cue detection."""
    t = cfg.data.target_class
    out: dict[str, Any] = {}
    for name in ("iid", "clean", "flipped"):
        x, y = data.test_set(name)
        r = evaluate(model, x, y, n_classes=len(CLASSES))
        out[f"acc_{name}"] = r.accuracy
        if name == "clean":
            out["target_recall_clean"] = r.recall()[t].item()
        if name == "flipped":
            out["hijack"] = r.predicted_rate(t, y != t)
            out["target_recall_flipped"] = r.recall()[t].item()
    acts, _ = record_activations(model, probe_x, ["act3"])
    a = acts["act3"]
    out["density"] = activation_density(a)
    out["dead_fraction"] = dead_fraction(a)
    out["ms_mean"] = _finite_mean(monosemanticity(a, emb_NE))
    sites, _ = detect_sites(model, probe_x, cfg)
    out["n_cue_sites"] = len(sites)
    _, unit_scores = find_cue_units(model, probe_x, cfg.data.cue, ["act3"], reduce="max")
    out["max_act3_effect"] = unit_scores["act3"]["effect"].max().item()
    return out


# ---------------------------------------------------------------------------------------------------- one seed
def train_method(method: str, seed: int, data: CueData, probe_x: Tensor, cfg: LabConfig, baseline_state: dict[str, Tensor] | None,
                 progress: bool = True) -> tuple[nn.Module, dict[str, Any], SiteMask | None]:
    """Train one method for one seed. Fine-tuned methods start from `baseline_state`. Returns (model, info, mask)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mcfg = replace(cfg.model, dropout=cfg.dropout) if method == "l2_dropout" else cfg.model
    torch.manual_seed(seed)
    model = build_model(mcfg)
    common = dict(lr=cfg.lr, batch_size=cfg.batch_size, progress=progress, desc=f"{method} seed {seed}")
    info: dict[str, Any] = {"method": method, "seed": seed}
    x, y = data.train_x, data.train_y
    if method in FINE_TUNED:
        if baseline_state is None:
            raise ValueError(f"{method} fine-tunes the baseline: train 'baseline' first")
        model.load_state_dict(baseline_state)
        common["epochs"], common["seed"] = cfg.ft_epochs, seed + 1000
    else:
        common["epochs"], common["seed"] = cfg.epochs, seed

    mask = None
    t0 = time.perf_counter()
    if method in ("baseline", "ft_control"):
        info["loss"] = train_classifier(model, x, y, **common)
    elif method == "l2_dropout":
        info["loss"] = train_classifier(model, x, y, weight_decay=cfg.weight_decay, **common)
    elif method == "act_l1":
        info["loss"] = train_classifier(model, x, y, penalty=lambda rec: cfg.l1_coeff * rec["act3"].abs().mean(), penalty_layers=["act3"], **common)
    elif method == "cue_augment":
        def augment(xb, gen):
            clean = remove_cue(xb, cfg.data.cue)  # the mark's square blanked on every image, then the mark re-drawn at random
            return apply_cue(clean, cfg.data.cue, torch.rand(xb.shape[0], generator=gen) < cfg.augment_rate)

        info["loss"] = train_classifier(model, x, y, augment=augment, **common)
    else:  # prune_cue / prune_region / penalize_cue: the detection loop
        redetect_x = probe_x[: cfg.n_redetect]
        found, scores = detect_sites(model, probe_x, cfg)
        shape = tuple(scores[cfg.detect_layer]["shape"].tolist())
        sites = set()

        def add(new: list[CueUnit]) -> None:
            if method == "prune_region":  # every channel at each position where a cue site was found
                C = shape[0]
                per_channel = int(torch.tensor(shape[1:]).prod())
                sites.update(c * per_channel + u.flat % per_channel for u in new for c in range(C))
            else:
                sites.update(u.flat for u in new)
            if mask is not None:
                mask.sites |= sites

        if method in ("prune_cue", "prune_region"):
            mask = SiteMask(model, cfg.detect_layer)
        add(found)
        info["sites_initial"] = len(sites)

        def on_step(step):
            if step % cfg.redetect_every == 0:
                new, _ = detect_sites(model, redetect_x, cfg)  # with the mask in place: finds what the mask misses
                add(new)
                model.train()

        penalty, layers = None, ()
        if method == "penalize_cue":
            def penalty(rec):
                if not sites:
                    return rec[cfg.detect_layer].new_zeros(())
                a = rec[cfg.detect_layer].flatten(1)[:, sorted(sites)]
                return cfg.cue_penalty * a.sum(1).mean()

            layers = (cfg.detect_layer,)
        info["loss"] = train_classifier(model, x, y, penalty=penalty, penalty_layers=layers, on_step=on_step, **common)
        info["sites_final"] = len(sites)
        info["sites"] = sorted(sites)
    info["train_s"] = time.perf_counter() - t0
    return model, info, mask


def train_sae(model: nn.Module, data: CueData, cfg: LabConfig, seed: int, progress: bool = True):
    """A TopK SAE on the tokens (channel vectors per position) of `cfg.sae_layer` over 5,000 biased training images."""
    from nacosae.sae import SAE, SAEConfig
    from nacosae.train import fit

    acts, _ = record_activations(model, data.train_x[:5000], [cfg.sae_layer], reduce="none")
    tok_ND = layer_tokens(acts[cfg.sae_layer]).reshape(-1, acts[cfg.sae_layer].shape[1])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=tok_ND.shape[1], d_sae=cfg.sae_width, k=cfg.sae_k,
                        provenance={"model": "lab SmallCNN", "layer": cfg.sae_layer, "tokens": "spatial", "seed": seed}))
    sae.init_from_data(tok_ND[torch.randperm(tok_ND.shape[0], generator=gen)[:8192]])

    def batches():
        while True:
            perm = torch.randperm(tok_ND.shape[0], generator=gen)
            for i in range(0, perm.numel() - 1023, 1024):
                yield tok_ND[perm[i : i + 1024]]

    history = fit(sae, batches(), cfg.sae_steps, cfg.sae_lr, warmup_steps=50, progress=progress)
    return sae.eval(), history[-1]


@torch.no_grad()
def _eval_edit(model, data: CueData, cfg: LabConfig, edits) -> dict[str, Any]:
    t = cfg.data.target_class
    row: dict[str, Any] = {}
    for name in ("iid", "clean", "flipped"):
        x, y = data.test_set(name)
        r = evaluate(model, x, y, edits, n_classes=len(CLASSES))
        row[f"acc_{name}"] = r.accuracy
        if name == "clean":
            row["target_recall_clean"] = r.recall()[t].item()
            row["hijack_clean"] = r.predicted_rate(t, y != t)
        if name == "flipped":
            row["hijack"] = r.predicted_rate(t, y != t)
            row["confusion_flipped"] = r.confusion.tolist()
    return row


def analyse_baseline(model: nn.Module, data: CueData, probe_x: Tensor, emb_NE: Tensor, cfg: LabConfig, seed: int, progress: bool = True):
    """Detection (sites, channel units, SAE features), interventions and steering on one trained baseline."""
    gen = torch.Generator().manual_seed(seed + 7)
    t = cfg.data.target_class
    out: dict[str, Any] = {"seed": seed}
    sites, site_scores = find_cue_units(model, probe_x, cfg.data.cue, list(cfg.analyse_layers[:2]), reduce="none", min_effect=cfg.min_effect,
                                        min_auc=cfg.min_auc, control=cfg.control, max_control_ratio=cfg.max_control_ratio)
    units, unit_scores = find_cue_units(model, probe_x, cfg.data.cue, list(cfg.analyse_layers), reduce="max", min_effect=cfg.min_effect,
                                        min_auc=cfg.min_auc, control=cfg.control, max_control_ratio=cfg.max_control_ratio, full_auc=True)
    out["sites"] = [u.to_dict() for u in sites]
    out["units"] = [u.to_dict() for u in units]
    out["top_units"] = {
        layer: [
            {"unit": int(i), "effect": float(s["effect"][i]), "auc": float(s["auc"][i]), "control_effect": float(s["control_effect"][i]),
             "mean_off": float(s["mean_off"][i]), "mean_on": float(s["mean_on"][i])}
            for i in s["effect"].argsort(descending=True)[:5]
        ]
        for layer, s in unit_scores.items()
    }
    sae, sae_log = train_sae(model, data, cfg, seed, progress)
    feats, feat_scores = find_cue_features(model, sae, cfg.sae_layer, probe_x, cfg.data.cue, min_effect=cfg.min_effect, min_auc=cfg.min_auc,
                                           control=cfg.control, max_control_ratio=cfg.max_control_ratio)
    sae_sites, _ = find_cue_features(model, sae, cfg.sae_layer, probe_x[: cfg.n_sae_probe], cfg.data.cue, min_effect=cfg.min_effect,
                                     min_auc=cfg.min_auc, control=cfg.control, max_control_ratio=cfg.max_control_ratio, per_position=True)
    out["sae"] = {"fvu": sae_log["fvu"], "l0": sae_log["l0"], "dead_fraction": sae_log["dead_fraction"]}
    out["features"] = [f.to_dict() for f in feats]
    out["sae_sites"] = [f.to_dict() for f in sae_sites]
    codes = sae_codes(model, sae, cfg.sae_layer, probe_x).amax(1)
    out["sae"]["ms_mean"] = _finite_mean(monosemanticity(codes, emb_NE))
    acts, _ = record_activations(model, probe_x, ["act3", "act2"])
    out["ms_act3_mean"] = _finite_mean(monosemanticity(acts["act3"], emb_NE))
    out["ms_act2_channels_mean"] = _finite_mean(monosemanticity(acts["act2"], emb_NE))

    # ---- interventions: switch the detected things off, and random controls of the same size
    det = {layer: [u.flat for u in sites if u.layer == layer] for layer in cfg.analyse_layers[:2]}
    C2, H2, W2 = site_scores[cfg.detect_layer]["shape"].tolist()
    cue_pos = sorted({f % (H2 * W2) for f in det[cfg.detect_layer]})
    region = [c * H2 * W2 + p for c in range(C2) for p in cue_pos]
    out["cue_positions"] = [list(divmod(p, W2)) for p in cue_pos]
    n_sites2 = site_scores[cfg.detect_layer]["auc"].numel()
    others = torch.tensor(sorted(set(range(n_sites2)) - set(det[cfg.detect_layer])))
    rand_sites = others[torch.randperm(others.numel(), generator=gen)[: len(det[cfg.detect_layer])]].tolist()
    top3 = [r["unit"] for r in out["top_units"]["act3"][:3]]
    feat_ids = [f.unit for f in feats]
    rand_feats = torch.randperm(cfg.sae_width, generator=gen)[: max(1, len(feat_ids))].tolist()
    # SAE sites, and a control: at each detected (feature, position), another feature at the same position
    HW = H2 * W2
    s_flat = [f.flat for f in sae_sites]
    cue_feats = {f.unit for f in sae_sites}
    pool = [j for j in range(cfg.sae_width) if j not in cue_feats] or list(range(cfg.sae_width))
    picks = torch.randint(len(pool), (len(s_flat),), generator=gen).tolist()
    rand_sites_sae = [pool[i] * HW + f % HW for i, f in zip(picks, s_flat)]
    interventions: dict[str, dict[str, Edit]] = {
        "none": {},
        f"ablate {len(det['act2'])} cue sites of act2": {"act2": clamp_sites(det["act2"])},
        f"ablate {len(det['act1'])} cue sites of act1": {"act1": clamp_sites(det["act1"])},
        f"ablate all act2 channels at the {len(cue_pos)} cue positions": {"act2": clamp_sites(region)},
        f"ablate {len(rand_sites)} random sites of act2 (control)": {"act2": clamp_sites(rand_sites)},
        "ablate top-3 act3 units by cue effect": {"act3": zero_units(top3)},
        f"SAE: ablate {len(feat_ids)} cue features": {cfg.sae_layer: sae_clamp(sae, feat_ids, 0.0)},
        f"SAE: ablate {len(rand_feats)} random features (control)": {cfg.sae_layer: sae_clamp(sae, rand_feats, 0.0)},
        f"SAE: ablate {len(s_flat)} cue (feature, position) pairs": {cfg.sae_layer: sae_clamp_sites(sae, s_flat, 0.0)},
        f"SAE: ablate {len(s_flat)} other features at those positions (control)": {cfg.sae_layer: sae_clamp_sites(sae, rand_sites_sae, 0.0)},
    }
    out["interventions"] = {name: _eval_edit(model, data, cfg, edits) for name, edits in
                            tqdm(interventions.items(), desc="interventions", disable=not progress, leave=False)}

    # ---- steering: put the cue's internal signature into clean images, without touching the pixels
    x_clean, y_clean = data.test_set("clean")
    nontarget = y_clean != t
    steer: dict[str, Any] = {}
    if det["act2"]:
        on_x, _ = paired_probe(probe_x, cfg.data.cue)
        acts_on, _ = record_activations(model, on_x, ["act2"], reduce="none")
        v = acts_on["act2"].flatten(1)[:, det["act2"]].mean(0)
        r = evaluate(model, x_clean, y_clean, {"act2": clamp_sites(det["act2"], v)}, n_classes=len(CLASSES))
        steer["clamp cue sites to their cued mean"] = {"hijack_clean": r.predicted_rate(t, nontarget), "acc_clean": r.accuracy}
    if sae_sites:
        v = torch.tensor([f.mean_on for f in sae_sites])
        r = evaluate(model, x_clean, y_clean, {cfg.sae_layer: sae_clamp_sites(sae, s_flat, v)}, n_classes=len(CLASSES))
        steer["clamp SAE cue sites to their cued mean"] = {"hijack_clean": r.predicted_rate(t, nontarget), "acc_clean": r.accuracy}
        gap = torch.tensor([f.gap for f in sae_sites])
        curve = []
        for alpha in cfg.steer_alphas:  # h + α Σ gap_{j,p} W_dec,j at p: push the cue's average code change in
            r = evaluate(model, x_clean, y_clean, {cfg.sae_layer: sae_steer_sites(sae, s_flat, alpha * gap)}, n_classes=len(CLASSES))
            curve.append({"alpha": alpha, "hijack_clean": r.predicted_rate(t, nontarget), "acc_clean": r.accuracy})
        steer["sae_curve"] = curve
        steer["n_sae_sites"] = len(s_flat)
    out["steering"] = steer
    return out, sae


# ---------------------------------------------------------------------------------------------------- whole experiment
def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _print(msg: str) -> None:
    print(msg, flush=True)


def run_experiment(cfg: LabConfig, out_dir: str | Path, progress: bool = True, log: Callable[[str], None] = _print) -> dict[str, Any]:
    """Run every seed × method; each finished piece is written atomically and skipped on a re-run (resume)."""
    from safetensors.torch import load_file

    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    cfg_dict = json.loads(json.dumps(cfg.to_dict(), default=list))
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != cfg_dict:
        raise ValueError(f"{out} holds a run with another configuration: use a new --out folder or delete {out}")
    atomic_write_json(cfg_path, cfg_dict)
    t0 = time.perf_counter()
    data = make_cue_data(cfg.data)
    probe_x = data.extra_x[: cfg.n_probe]
    n_cue = int(data.train_cue.sum())
    log(f"data: {data.train_x.shape[0]} training images ({n_cue} with the cue), {data.test_x.shape[0]} test, {probe_x.shape[0]} probe")

    ref_path = out / "reference_mlp.safetensors"
    ref = SmallMLP(ModelConfig(kind="mlp", width=16, hidden=64))
    if ref_path.exists():
        ref.load_state_dict(load_file(ref_path))
    else:
        ref = reference_embedder(data, cfg, progress)
        atomic_save_safetensors(ref_path, ref.state_dict())
    emb_NE = reference_embeddings(ref, probe_x)

    runs: list[dict[str, Any]] = []
    analyses: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        sdir = out / f"seed{seed}"
        base_w = sdir / "baseline.safetensors"
        baseline_state = load_file(base_w) if base_w.exists() else None
        for method in cfg.methods:
            res_path = sdir / f"{method}.json"
            if res_path.exists():
                runs.append(json.loads(res_path.read_text()))
                continue
            model, info, mask = train_method(method, seed, data, probe_x, cfg, baseline_state, progress)
            if method == "baseline":
                baseline_state = _state(model)
                atomic_save_safetensors(base_w, baseline_state)
            info.update(measure(model, data, probe_x, emb_NE, cfg))
            if mask is not None:
                mask.remove()
            atomic_write_json(res_path, info)
            runs.append(info)
            log(f"seed {seed} {method:<13} clean {info['acc_clean']:.3f} flipped {info['acc_flipped']:.3f} hijack {info['hijack']:.3f} "
                f"target recall {info['target_recall_clean']:.3f} ({info['train_s']:.0f} s)")
        ana_path = sdir / "analysis.json"
        if ana_path.exists():
            analyses.append(json.loads(ana_path.read_text()))
        else:
            torch.manual_seed(seed)
            model = build_model(cfg.model)
            model.load_state_dict(baseline_state)
            model.eval()
            ana, sae = analyse_baseline(model, data, probe_x, emb_NE, cfg, seed, progress)
            sae.save_pretrained(sdir / "sae")
            atomic_write_json(ana_path, ana)
            analyses.append(ana)
            log(f"seed {seed} analysis: {len(ana['sites'])} cue sites, {len(ana['units'])} cue channels/units, "
                f"{len(ana['features'])} SAE cue features, {len(ana['sae_sites'])} SAE cue (feature, position) pairs")
    summary = summarise(runs, analyses, cfg)
    summary["wall_s"] = time.perf_counter() - t0
    atomic_write_json(out / "results.json", {"schema": SCHEMA, "config": cfg_dict, "summary": summary, "runs": runs, "analyses": analyses})
    return summary


METRICS = ("acc_iid", "acc_clean", "acc_flipped", "target_recall_clean", "hijack", "density", "dead_fraction", "ms_mean",
           "n_cue_sites", "max_act3_effect")


def _mean_std(vals: list[float]) -> dict[str, float]:
    t = torch.tensor([v for v in vals if v is not None and not math.isnan(v)], dtype=torch.float64)
    if t.numel() == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": t.mean().item(), "std": t.std().item() if t.numel() > 1 else 0.0, "n": t.numel()}


def summarise(runs: list[dict], analyses: list[dict], cfg: LabConfig) -> dict[str, Any]:
    """Mean ± std over seeds per method and metric; intervention effects averaged over the seeds' analyses."""
    methods: dict[str, dict[str, Any]] = {}
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        if rs:
            methods[m] = {k: _mean_std([r.get(k) for r in rs]) for k in METRICS}
    inter: dict[str, dict[str, Any]] = {}
    for a in analyses:
        for name, row in a["interventions"].items():
            key = _generic(name)
            inter.setdefault(key, {k: [] for k in ("acc_iid", "acc_clean", "acc_flipped", "hijack", "target_recall_clean")})
            for k in inter[key]:
                inter[key][k].append(row[k])
    inter_s = {name: {k: _mean_std(v) for k, v in d.items()} for name, d in inter.items()}
    return {
        "methods": methods,
        "interventions": inter_s,
        "n_sites": _mean_std([len([s for s in a["sites"] if s["layer"] == cfg.detect_layer]) for a in analyses]),
        "n_sae_features": _mean_std([len(a["features"]) for a in analyses]),
        "n_sae_sites": _mean_std([len(a["sae_sites"]) for a in analyses]),
        "n_units": _mean_std([len(a["units"]) for a in analyses]),
    }


def _generic(name: str) -> str:
    """Intervention names carry counts that differ between seeds ('ablate 12 cue sites'): drop the numbers to group."""
    return " ".join("N" if w.isdigit() else w for w in name.split())
