"""SAE training: `fit` is the loop over any stream of activation batches; `train` runs it from an activation
store with checkpoints, resume after a kill, validation metrics and a PNG of the curves."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from nacosae.io import atomic_save_safetensors, atomic_write_json, atomic_write_text
from nacosae.kernels import MATMUL_DTYPES
from nacosae.sae import SAE, SAEConfig, matryoshka_fractions


@dataclass(frozen=True)
class TrainConfig:
    store: str
    """Activation store folder (written by hub_scripts/extract.py)."""
    out_dir: str
    """Where the run writes sae/, checkpoint/, metrics.json, history.jsonl and curves.png."""
    expansion: int = 8
    """d_sae = expansion × d_in (ignored when d_sae is given)."""
    d_sae: int | None = None
    """Number of latents; overrides expansion."""
    activation: str = "topk"
    """'topk', 'batchtopk' or 'relu' (L1)."""
    k: int = 32
    """Active latents per input (topk/batchtopk)."""
    l1_coeff: float = 1e-3
    """L1 weight for 'relu'."""
    matryoshka: bool = False
    """Nested prefixes of 1/16, 1/8, 1/4, 9/16 of d_sae (METHODS §1)."""
    aux_k: int | None = None
    """Dead latents for AuxK (None: d_in // 2, 0: off)."""
    lr: float | None = None
    """Adam learning rate; None: 2e-4 / sqrt(d_sae / 2**14), the scaling rule of Gao et al. 2024."""
    batch_size: int = 4096
    """Activation rows per step."""
    n_epochs: float = 10.0
    """Passes over the training rows (fractional allowed)."""
    dead_after_rows: int | None = None
    """A latent that has not fired for this many rows is dead; None: min(10M, 1 epoch)."""
    val_fraction: float = 0.05
    """Share of the store's images held out for the validation metrics (split by image, not by row)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up; the last 20 % of steps decay linearly to 0."""
    checkpoint_every: int = 200
    """Steps between checkpoints (model + optimizer + trainer state, each written atomically)."""
    log_every: int = 20
    """Steps between history rows."""
    seed: int = 0
    """Seeds the SAE init and the data order."""
    device: str = "cpu"
    """'cpu', 'cuda', 'cuda:1', ..."""
    matmul_dtype: str = "auto"
    """TopK encoder matmul precision: 'float32', 'bfloat16' (bf16 inputs, fp32 accumulation and master weights)
    or 'auto' (bfloat16 where the hardware multiplies bf16 natively: CUDA, CPUs with AVX512-BF16/AMX)."""

    def __post_init__(self):
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {self.matmul_dtype!r}")
        if self.n_epochs <= 0 or self.batch_size <= 0:
            raise ValueError("n_epochs and batch_size must be positive")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def lr_at(step: int, n_steps: int, lr: float, warmup_steps: int) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_start = int(0.8 * n_steps)
    if step >= decay_start:
        return lr * max(0.0, (n_steps - step) / max(1, n_steps - decay_start))
    return lr


class DeadLatentTracker:
    """Counts rows since each latent last fired (METHODS §1: dead = silent for N inputs)."""

    def __init__(self, d_sae: int, dead_after_rows: int, device="cpu"):
        self.dead_after_rows = dead_after_rows
        self.rows_since_fire_S = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, codes_BS: torch.Tensor) -> None:
        self.rows_since_fire_S += codes_BS.shape[0]
        self.rows_since_fire_S[(codes_BS > 0).any(0)] = 0

    def update_from_topk(self, top_idx_BK: torch.Tensor, top_vals_BK: torch.Tensor) -> None:
        """Same as `update` from the (B, K) selection of the fast TopK path: no dense code needed."""
        self.rows_since_fire_S += top_idx_BK.shape[0]
        self.rows_since_fire_S[top_idx_BK[top_vals_BK > 0]] = 0

    @property
    def dead_mask_S(self) -> torch.Tensor:
        return self.rows_since_fire_S >= self.dead_after_rows


def fit(
    sae: SAE,
    batches: Iterable[torch.Tensor],
    n_steps: int,
    lr: float,
    *,
    start_step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    dead: DeadLatentTracker | None = None,
    warmup_steps: int = 50,
    log_every: int = 20,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Adam on the SAE objective for steps start_step..n_steps-1. Returns the logged history rows."""
    device = sae.W_dec.device
    optimizer = optimizer or make_optimizer(sae, lr)
    dead = dead or DeadLatentTracker(sae.cfg.d_sae, 10_000_000, device)
    history, t0, rows_done = [], time.perf_counter(), 0
    it: Iterator[torch.Tensor] = iter(batches)
    bar = tqdm(range(start_step, n_steps), initial=start_step, total=n_steps, desc="train SAE", disable=not progress, dynamic_ncols=True)
    for step in bar:
        x_BD = next(it).to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, n_steps, lr, warmup_steps)
        out = sae(x_BD, dead_mask_S=dead.dead_mask_S)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        # Project out the radial gradient, step, then renormalise: decoder rows stay unit-norm (METHODS §1).
        sae.remove_parallel_grad()
        optimizer.step()
        sae.normalize_decoder()
        if out.codes is not None:
            dead.update(out.codes.detach())
        else:
            dead.update_from_topk(out.top_idx, out.top_vals.detach())
        rows_done += x_BD.shape[0]

        if step % log_every == 0 or step == n_steps - 1:
            elapsed = time.perf_counter() - t0
            row = {
                "step": step,
                "fvu": out.fvu.item(),
                "aux_loss": out.aux_loss.item(),
                "loss": out.loss.item(),
                "l0": out.l0.item(),
                "dead_fraction": dead.dead_mask_S.float().mean().item(),
                "lr": optimizer.param_groups[0]["lr"],
                "rows_per_s": rows_done / max(elapsed, 1e-9),
            }
            history.append(row)
            bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.2f}")
            if on_log:
                on_log(row)
        if on_step:
            on_step(step)
    return history


def make_optimizer(sae: SAE, lr: float) -> torch.optim.Adam:
    # On CPU the fused kernel does the whole update in one pass over each tensor: ~5× faster than foreach,
    # which runs ~10 passes (benchmarks/bench_sae_step.py). Elsewhere foreach, as a checkpoint's `step`
    # tensors are loaded onto the CPU, which CUDA's fused kernel refuses.
    fused = sae.W_dec.device.type == "cpu"
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=fused, foreach=None if fused else True)


# ---------------------------------------------------------------------------- training from a store
def default_lr(d_sae: int) -> float:
    return 2e-4 / math.sqrt(d_sae / 2**14)


def train(cfg: TrainConfig, progress: bool = True) -> tuple[SAE, dict[str, Any]]:
    """Train an SAE on an activation store; resumes from `out_dir/checkpoint` when it exists."""
    from nacosae.metrics import evaluate_sae
    from nacosae.store import ActivationStore

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = ActivationStore(cfg.store)
    train_rows, val_rows = store.split(cfg.val_fraction, seed=cfg.seed)
    n_train_rows = store.n_rows_in(train_rows)
    n_steps = max(1, int(cfg.n_epochs * n_train_rows / cfg.batch_size))
    d_sae = cfg.d_sae or cfg.expansion * store.d
    lr = cfg.lr or default_lr(d_sae)
    ckpt = out / "checkpoint"

    _check_run_config(out, cfg)
    if (out / "metrics.json").exists() and (out / "sae" / "config.json").exists():  # finished before: nothing to redo
        if progress:
            print(f"{out} is already trained; delete metrics.json to train again")
        return SAE.from_pretrained(out / "sae", device=cfg.device), json.loads((out / "metrics.json").read_text())
    torch.manual_seed(cfg.seed)
    if (ckpt / "trainer_state.json").exists():
        sae, optimizer, dead, start_step = _load_checkpoint(ckpt, lr, cfg.device)
        if progress:
            print(f"resuming {out} at step {start_step}/{n_steps}")
    else:
        sae_cfg = SAEConfig(
            d_in=store.d, d_sae=d_sae, activation=cfg.activation, k=cfg.k, l1_coeff=cfg.l1_coeff,
            matryoshka_sizes=matryoshka_fractions(d_sae) if cfg.matryoshka else (), aux_k=cfg.aux_k,
            provenance={**store.meta.get("provenance", {}), "store": str(Path(cfg.store).resolve().name), "n_train_rows": n_train_rows},
        )
        sae = SAE(sae_cfg, device=cfg.device).init_from_data(store.sample(min(n_train_rows, 65_536), seed=cfg.seed, rows=train_rows))
        optimizer = make_optimizer(sae, lr)
        dead_after = cfg.dead_after_rows or min(10_000_000, n_train_rows)
        dead, start_step = DeadLatentTracker(d_sae, dead_after, cfg.device), 0

    sae.matmul_dtype = cfg.matmul_dtype
    history_path = out / "history.jsonl"
    history = _read_history(history_path, upto_step=start_step)

    def on_log(row):
        history.append(row)

    def on_step(step):
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < n_steps:
            _save_checkpoint(ckpt, sae, optimizer, dead, step + 1)
            _write_history(history_path, history)

    # A resumed run draws a fresh, seeded data order from its step on: batches are not replayed.
    batches = store.iter_batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 1_000_003 + start_step, rows=train_rows, device=cfg.device)
    t0 = time.perf_counter()
    fit(sae, batches, n_steps, lr, start_step=start_step, optimizer=optimizer, dead=dead, warmup_steps=cfg.warmup_steps,
        log_every=cfg.log_every, on_log=on_log, on_step=on_step, progress=progress)
    train_seconds = time.perf_counter() - t0

    sae.eval()
    with torch.no_grad():
        val = evaluate_sae(sae, store.iter_batches(cfg.batch_size, shuffle=False, n_epochs=1, rows=val_rows, device=cfg.device))
    metrics = {
        **{f"val_{k}": v for k, v in val.items()},
        "train_fvu_last": history[-1]["fvu"] if history else None,
        "dead_fraction_train": dead.dead_mask_S.float().mean().item(),
        "n_steps": n_steps,
        "n_train_rows": n_train_rows,
        "rows_per_s": (n_steps - start_step) * cfg.batch_size / max(train_seconds, 1e-9),
        "d_in": store.d,
        "d_sae": d_sae,
        "activation": cfg.activation,
        "k": cfg.k,
        "lr": lr,
    }
    sae.save_pretrained(out / "sae")
    _write_history(history_path, history)
    plot_curves(history, out / "curves.png", title=f"{Path(cfg.store).name} · {cfg.activation} k={cfg.k} · d_sae={d_sae}")
    atomic_write_json(out / "metrics.json", metrics)  # last: its presence marks the run finished
    shutil.rmtree(ckpt, ignore_errors=True)
    return sae, metrics


def _check_run_config(out: Path, cfg: TrainConfig) -> None:
    """A resumed run must be the same run: refuse to continue a checkpoint made with another config."""
    path = out / "train_config.json"
    mine = dataclasses.asdict(cfg)
    if path.exists():
        theirs = json.loads(path.read_text())
        keep = {"device", "checkpoint_every", "log_every", "matmul_dtype"}  # may change between a run and its resume
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if k not in keep and theirs.get(k) != v}
        if diff and ((out / "checkpoint").exists() or (out / "metrics.json").exists()):
            raise ValueError(f"{out} holds a run with another config {diff} (was, now): use another --out-dir")
    atomic_write_json(path, mine)


def _save_checkpoint(ckpt: Path, sae: SAE, optimizer: torch.optim.Optimizer, dead: DeadLatentTracker, step: int) -> None:
    # Order matters for crash safety: trainer_state.json is written last and names the step the others belong to.
    sae.save_pretrained(ckpt)
    opt_tensors = {}
    for i, p in enumerate(sae.parameters()):
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                opt_tensors[f"{i}.{key}"] = torch.as_tensor(state[key]).float()
    opt_tensors["dead.rows_since_fire"] = dead.rows_since_fire_S
    atomic_save_safetensors(ckpt / "optimizer.safetensors", opt_tensors)
    atomic_write_json(ckpt / "trainer_state.json", {"step": step, "dead_after_rows": dead.dead_after_rows})


def _load_checkpoint(ckpt: Path, lr: float, device: str):
    state = json.loads((ckpt / "trainer_state.json").read_text())
    sae = SAE.from_pretrained(ckpt, device=device).train()
    optimizer = make_optimizer(sae, lr)
    tensors = load_file(ckpt / "optimizer.safetensors", device=str(device))
    for i, p in enumerate(sae.parameters()):
        if f"{i}.exp_avg" in tensors:
            optimizer.state[p] = {
                "step": tensors[f"{i}.step"].cpu(),
                "exp_avg": tensors[f"{i}.exp_avg"],
                "exp_avg_sq": tensors[f"{i}.exp_avg_sq"],
            }
    dead = DeadLatentTracker(sae.cfg.d_sae, state["dead_after_rows"], device)
    dead.rows_since_fire_S.copy_(tensors["dead.rows_since_fire"].long())
    return sae, optimizer, dead, int(state["step"])


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def _read_history(path: Path, upto_step: int) -> list[dict[str, Any]]:
    if not path.exists() or upto_step == 0:
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] < upto_step]


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("fvu", "l0", "dead_fraction"), ("FVU (train batch)", "L0", "dead fraction")):
        ax.plot(steps, [r[key] for r in history], lw=1.5)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
