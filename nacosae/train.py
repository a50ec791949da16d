"""SAE training: `SAETrainer` is one SAE's optimisation step, `fit` loops it over any stream of activation batches,
`train` runs it from an activation store with checkpoints, resume after a kill, validation metrics and a PNG of the
curves, and `train_many` trains a list of SAEs (layers, widths, k, activations) from ONE read of their stores.

Many SAEs per read: SAEs on the same store share its batch stream (so they must agree on batch_size, seed and
val_fraction, which fix the stream and the split); each store is read once per step for all of its SAEs. Every
SAE keeps its own run folder, learning-rate schedule (its own n_steps), checkpoints, history and curves, so one SAE
of a `train_many` run is the SAE a `train` run of its config gives, bit for bit, when both start from scratch: the
batches, the init and the steps are the same (tests/test_train_store.py). Checkpoints are per SAE and crash-safe
(a step folder, then the state file that names it), so a kill loses at most `checkpoint_every` steps of each SAE;
on resume each SAE continues from its own step, the stream from the earliest of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
    """Activation store folder (written by hub_scripts/extract.py), or the label of a backbone stream passed to
    `train_many(..., sources=)` (no-store mode, nacosae.stream)."""
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


class SAETrainer:
    """One SAE's training state and step: Adam on the SAE objective with the learning-rate schedule of `lr_at`, the
    decoder kept at unit norm (METHODS §1), the dead-latent tracker (for AuxK), and the logged history rows.

    `step(x_BD, step)` runs one optimisation step on a (B, d_in) batch; `fit` and `train_many` call it, so one SAE
    trained alone and one trained next to others take the same steps.

    Data parallel (`distributed=True`, inside an initialised `torch.distributed` group): every rank holds the same SAE
    and passes its own part of the global batch; the update is the one of the whole batch. Each rank's loss terms are
    reweighted so that the SUM of the ranks' gradients is the gradient of the global-batch objective: the FVU by
    V_r / V (its share of the global batch's total variance, from one all-reduce of (n, Σx, within-rank variance)),
    the AuxK term likewise with the residual's variance, the L1 term by n_r / N. Gradients are then summed
    (all-reduce), and every rank takes the same Adam step on the same numbers, so the ranks stay identical; the
    dead-latent counts use every rank's codes. Exact (to float rounding) for topk and relu, with or without Matryoshka;
    batchtopk selects its k·B_r entries per rank and averages its inference threshold over ranks (as sparsify does).
    """

    def __init__(self, sae: SAE, n_steps: int, lr: float, *, optimizer: torch.optim.Optimizer | None = None,
                 dead: DeadLatentTracker | None = None, warmup_steps: int = 50, log_every: int = 20,
                 on_log: Callable[[dict[str, Any]], None] | None = None, distributed: bool = False):
        self.sae, self.n_steps, self.lr = sae, n_steps, lr
        self.device = sae.W_dec.device
        self.optimizer = optimizer or make_optimizer(sae, lr)
        self.dead = dead or DeadLatentTracker(sae.cfg.d_sae, 10_000_000, self.device)
        self.warmup_steps, self.log_every, self.on_log = warmup_steps, log_every, on_log
        self.history: list[dict[str, Any]] = []
        self.rows_done, self.seconds = 0, 0.0  # this session's rows (over all ranks) and time spent in `step`
        self.last: dict[str, Any] | None = None  # the last logged row
        self.distributed = distributed
        if distributed:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("distributed=True needs an initialised torch.distributed process group (torchrun + "
                                   "init_process_group)")
            self._dist = dist
            for t in sae.state_dict().values():  # the ranks start from rank 0's SAE (they should already agree)
                dist.broadcast(t, src=0)

    def step(self, x_BD: torch.Tensor, step: int) -> None:
        t0 = time.perf_counter()
        x_BD = x_BD.to(self.device, non_blocking=True)
        sae, optimizer, dead = self.sae, self.optimizer, self.dead
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, self.n_steps, self.lr, self.warmup_steps)
        if self.distributed:
            out, n_rows, fvu = self._distributed_backward(x_BD)
        else:
            out = sae(x_BD, dead_mask_S=dead.dead_mask_S)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            n_rows, fvu = x_BD.shape[0], out.fvu.detach()
        # Project out the radial gradient, step, then renormalise: decoder rows stay unit-norm (METHODS §1).
        sae.remove_parallel_grad()
        optimizer.step()
        sae.normalize_decoder()
        if self.distributed:
            # A latent is alive if it fired on any rank's rows.
            if out.codes is not None:
                fired_S = (out.codes.detach() > 0).any(0).to(torch.int32)
            else:
                fired_S = torch.zeros(sae.cfg.d_sae, dtype=torch.int32, device=self.device)
                fired_S[out.top_idx[out.top_vals.detach() > 0]] = 1
            self._dist.all_reduce(fired_S, op=self._dist.ReduceOp.MAX)
            dead.rows_since_fire_S += n_rows
            dead.rows_since_fire_S[fired_S.bool()] = 0
            if sae.cfg.activation == "batchtopk":
                self._dist.all_reduce(sae.threshold.data)
                sae.threshold.data /= self._dist.get_world_size()
        elif out.codes is not None:
            dead.update(out.codes.detach())
        else:
            dead.update_from_topk(out.top_idx, out.top_vals.detach())
        self.rows_done += n_rows
        if step % self.log_every == 0 or step == self.n_steps - 1:
            row = {
                "step": step,
                "fvu": float(fvu),
                "aux_loss": out.aux_loss.item(),
                "loss": out.loss.item(),
                "l0": out.l0.item(),
                "dead_fraction": dead.dead_mask_S.float().mean().item(),
                "lr": optimizer.param_groups[0]["lr"],
                "rows_per_s": self.rows_done / max(self.seconds + time.perf_counter() - t0, 1e-9),
            }
            self.history.append(row)
            self.last = row
            if self.on_log:
                self.on_log(row)
        self.seconds += time.perf_counter() - t0

    def _distributed_backward(self, x_BD: torch.Tensor):
        """Forward on this rank's rows, backward of the reweighted loss, gradients summed over ranks. Returns the
        output, the global batch's row count and its FVU (a float)."""
        dist, sae = self._dist, self.sae
        scale = sae.cfg.input_scale
        xs_BD = x_BD.double() / scale  # the SAE's scaled space, where its losses are computed
        V, V_r, N = _global_variance(dist, xs_BD)
        out = sae(x_BD, dead_mask_S=self.dead.dead_mask_S)
        recon = out.loss - out.aux_loss - out.sparsity_loss  # (mean over Matryoshka prefixes of) Σ‖x − x̂‖² / V_r
        loss = recon * (V_r / V) + out.sparsity_loss * (x_BD.shape[0] / N)
        if out.aux_loss.requires_grad:  # the same on every rank: the dead mask is shared
            Vres, Vres_r, _ = _global_variance(dist, xs_BD - out.x_hat.detach().double())
            loss = loss + out.aux_loss * (Vres_r / Vres)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in sae.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
        sse = torch.tensor([out.fvu.item() * V_r], dtype=torch.float64)
        dist.all_reduce(sse)
        return out, N, sse.item() / V


def _global_variance(dist, xs_BD: torch.Tensor) -> tuple[float, float, int]:
    """(V, V_r, N): the total variance Σ‖x − x̄‖² of the global batch (all ranks' rows, around their common mean),
    this rank's own Σ‖x − x̄_r‖², and the global row count; float64, one all-reduce of (n, Σx, V_r, n‖x̄_r‖²)."""
    n = xs_BD.shape[0]
    sum_D = xs_BD.sum(0)
    V_r = (xs_BD - sum_D / n).pow(2).sum()
    stats = torch.cat([torch.tensor([n, V_r.item(), sum_D.pow(2).sum().item() / n], dtype=torch.float64), sum_D.cpu()])
    dist.all_reduce(stats)
    N, sum_V, sum_nm2, S_D = int(stats[0].item()), stats[1].item(), stats[2].item(), stats[3:]
    # Σ‖x − x̄‖² = Σ_r V_r + Σ_r n_r‖x̄_r‖² − N‖x̄‖² (the between-rank term of the decomposition of variance)
    V = sum_V + sum_nm2 - S_D.pow(2).sum().item() / N
    return max(V, 1e-12), max(V_r.item(), 1e-12), N


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
    trainer = SAETrainer(sae, n_steps, lr, optimizer=optimizer, dead=dead, warmup_steps=warmup_steps, log_every=log_every,
                         on_log=on_log)
    it: Iterator[torch.Tensor] = iter(batches)
    bar = tqdm(range(start_step, n_steps), initial=start_step, total=n_steps, desc="train SAE", disable=not progress, dynamic_ncols=True)
    for step in bar:
        trainer.step(next(it), step)
        if trainer.last is not None and trainer.last["step"] == step:
            row = trainer.last
            bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.2f}")
        if on_step:
            on_step(step)
    return trainer.history


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
    """Train an SAE on an activation store; resumes from `out_dir/checkpoint` when it exists (`train_many` of one)."""
    return train_many([cfg], progress=progress)[0]


# What SAEs reading one store must share: these fix its batch stream (order, batch size) and its train/val split.
SHARED_PER_STORE = ("batch_size", "seed", "val_fraction")


class _Run:
    """One SAE of a `train_many` run: its config, folder, step count, trainer (None once trained) and result."""

    def __init__(self, cfg: TrainConfig, store, train_rows, n_train_rows: int, stream_rows=None, lead: bool = True,
                 store_name: str | None = None):
        self.cfg, self.store, self.train_rows, self.n_train_rows = cfg, store, train_rows, n_train_rows
        self.store_name = store_name or Path(cfg.store).resolve().name  # what its provenance and curves call its data
        self.stream_rows = train_rows if stream_rows is None else stream_rows  # the images this process reads
        self.lead = lead  # the process that writes the run's files (rank 0)
        self.out = Path(cfg.out_dir)
        self.ckpt = self.out / "checkpoint"
        self.n_steps = max(1, int(cfg.n_epochs * n_train_rows / cfg.batch_size))
        if cfg.warmup_steps >= int(0.8 * self.n_steps) and lead:
            warnings.warn(f"{cfg.out_dir}: the learning-rate warm-up ({cfg.warmup_steps} steps) does not end before the "
                          f"decay starts (step {int(0.8 * self.n_steps)} of {self.n_steps}): the peak lr is never reached; "
                          "lower warmup_steps or train longer", stacklevel=3)
        self.d_sae = cfg.d_sae or cfg.expansion * store.d
        self.lr = cfg.lr or default_lr(self.d_sae)
        self.start_step = 0
        self.trainer: SAETrainer | None = None
        self.result: tuple[SAE, dict[str, Any]] | None = None
        self.wall_seconds: float | None = None  # of the whole training loop this SAE was part of

    @property
    def finished(self) -> bool:
        return (self.out / "metrics.json").exists() and (self.out / "sae" / "config.json").exists()

    def checkpoint(self, step: int) -> None:
        if not self.lead:  # data-parallel ranks hold the same state: rank 0 writes it
            return
        t = self.trainer
        _save_checkpoint(self.ckpt, t.sae, t.optimizer, t.dead, step, history=(self.out / "history.jsonl", t.history))


def train_many(cfgs: Sequence[TrainConfig], progress: bool = True,
               sources: Mapping[str, Any] | None = None) -> list[tuple[SAE, dict[str, Any]]]:
    """Train every SAE of `cfgs` from one read of their stores: each step draws one batch from each store and steps
    every SAE of that store on it. Returns (SAE, metrics) per config, in order; each run folder gets what `train`
    writes (sae/, metrics.json, history.jsonl, curves.png, checkpoint/ while running).

    Configs on the same store must agree on `SHARED_PER_STORE` (ValueError otherwise); widths, k, activations,
    learning rates, epochs (each SAE stops at its own n_steps) and devices may differ. Re-running the same list resumes
    every SAE from its own checkpoint; finished SAEs are loaded, not retrained.

    Under torchrun (an initialised `torch.distributed` group of W > 1 processes): data parallel. Process r reads its
    own share of every store's training images, the contiguous image range rank r of a W-process extraction wrote
    (`nacosae.extract.rank_slice`: its training stream touches only those shards), in batches of batch_size / W rows; every SAE
    takes the steps of the global batch on every process (`SAETrainer`, distributed); rank 0 writes checkpoints,
    history, validation metrics and the SAE. A resume may use another number of processes.

    No-store mode: `sources` maps a `store` string to a ready reader that stands in for `ActivationStore(store)`,
    a `nacosae.stream.BackboneStream` (the backbone's activations as they are produced, through a shuffle buffer);
    configs whose `store` is a key of `sources` read it (grouped by that key: its SAEs share one stream), the others
    open their store folders. Everything else is the same: checkpoints, resume, curves, validation (every token of
    the held-out images), data parallel (each rank runs its own image range through the backbone). A resume draws
    a fresh seeded order from its step on, as with a store (which images the cut epoch had covered is not kept);
    the shuffle buffer's contents are not checkpointed either: the up to `buffer_rows` rows it held are dropped.
    """
    import torch.distributed as dist

    from nacosae.extract import rank_slice
    from nacosae.store import ActivationStore

    if not cfgs:
        raise ValueError("no configs to train")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    progress = progress and rank == 0
    bad = [c.batch_size for c in cfgs if c.batch_size % world]
    if bad:
        raise ValueError(f"batch sizes {bad} do not split evenly over {world} processes: use multiples of {world}")
    outs = [Path(c.out_dir).resolve() for c in cfgs]
    if len(set(outs)) != len(outs):
        raise ValueError(f"two configs share an out_dir ({[str(o) for o in outs]}): give each SAE its own folder")
    sources = dict(sources or {})
    groups: dict[Path | str, list[int]] = {}  # a store folder, or a key of `sources`
    for i, c in enumerate(cfgs):
        groups.setdefault(c.store if c.store in sources else Path(c.store).resolve(), []).append(i)
    for path, idx in groups.items():
        for key in SHARED_PER_STORE:
            values = {getattr(cfgs[i], key) for i in idx}
            if len(values) > 1:
                raise ValueError(f"the SAEs on store {path} read one batch stream, so they need one {key}; got "
                                 f"{sorted(values)}: set it the same, or train them in separate runs")

    runs: list[_Run] = [None] * len(cfgs)  # type: ignore[list-item]
    streams = []  # per store: (store, runs, val_rows)
    for path, idx in groups.items():
        store, c0 = sources[path] if isinstance(path, str) else ActivationStore(path), cfgs[idx[0]]
        train_rows, val_rows = store.split(c0.val_fraction, seed=c0.seed)
        n_train_rows = store.n_rows_in(train_rows)
        rank_rows = None
        if world > 1:
            lo, hi = rank_slice(store.meta["n_images_total"], rank, world)
            rank_rows = train_rows[(train_rows >= lo) & (train_rows < hi)]
            if not len(rank_rows):
                raise ValueError(f"rank {rank} of {world} has no training image of {path}: use fewer processes")
        init_sample = None  # one seeded sample initialises every SAE of this store, read once
        for i in idx:
            run = runs[i] = _Run(cfgs[i], store, train_rows, n_train_rows, lead=rank == 0, stream_rows=rank_rows,
                                 store_name=path if isinstance(path, str) else path.name)  # a `sources` key, or the folder's
            run.out.mkdir(parents=True, exist_ok=True)
            _check_run_config(run.out, run.cfg)
            if run.finished:  # finished before: nothing to redo
                if progress:
                    print(f"{run.out} is already trained; delete metrics.json to train again")
                run.result = (SAE.from_pretrained(run.out / "sae", device=run.cfg.device),
                              json.loads((run.out / "metrics.json").read_text()))
                continue
            if (run.ckpt / "trainer_state.json").exists():
                sae, optimizer, dead, run.start_step = _load_checkpoint(run.ckpt, run.lr, run.cfg.device)
                if progress:
                    print(f"resuming {run.out} at step {run.start_step}/{run.n_steps}")
            else:
                cfg = run.cfg
                sae_cfg = SAEConfig(
                    d_in=store.d, d_sae=run.d_sae, activation=cfg.activation, k=cfg.k, l1_coeff=cfg.l1_coeff,
                    matryoshka_sizes=matryoshka_fractions(run.d_sae) if cfg.matryoshka else (), aux_k=cfg.aux_k,
                    provenance={**store.meta.get("provenance", {}), "store": run.store_name, "n_train_rows": n_train_rows},
                )
                if init_sample is None:
                    init_sample = store.sample(min(n_train_rows, 65_536), seed=cfg.seed, rows=train_rows)
                torch.manual_seed(cfg.seed)  # per SAE: its init does not depend on the other SAEs of the run
                sae = SAE(sae_cfg, device=cfg.device).init_from_data(init_sample)
                optimizer = make_optimizer(sae, run.lr)
                dead = DeadLatentTracker(run.d_sae, cfg.dead_after_rows or min(10_000_000, n_train_rows), cfg.device)
            sae.matmul_dtype = run.cfg.matmul_dtype
            run.trainer = SAETrainer(sae, run.n_steps, run.lr, optimizer=optimizer, dead=dead,
                                     warmup_steps=run.cfg.warmup_steps, log_every=run.cfg.log_every,
                                     distributed=world > 1)
            run.trainer.history = _read_history(run.out / "history.jsonl", upto_step=run.start_step)
        live = [runs[i] for i in idx if runs[i].trainer is not None]
        streams.append((store, live, val_rows))
        del init_sample

    active = [(store, live) for store, live, _ in streams if live]
    if active:
        _train_loop(active, progress, world)
    for store, live, val_rows in streams:
        if live and rank == 0:
            _finish(store, live, val_rows)
    if world > 1:  # the other ranks hold the same SAEs; their metrics are rank 0's
        dist.barrier()
        for run in runs:
            if run.result is None:
                run.trainer.sae.eval()
                run.result = (run.trainer.sae, json.loads((run.out / "metrics.json").read_text()))
    return [run.result for run in runs]


def _train_loop(active: list, progress: bool, world: int = 1) -> None:
    """Steps from the earliest resume point to the last SAE's end: each store's stream yields one batch per step while
    any of its SAEs trains, and every SAE of that store that is within [its start, its n_steps) steps on it."""
    loops = []
    for store, live in active:
        c0 = live[0].cfg
        start, end = min(r.start_step for r in live), max(r.n_steps for r in live)
        devices = {str(r.cfg.device) for r in live}
        # A resumed run draws a fresh, seeded data order from its step on: batches are not replayed.
        batches = store.iter_batches(c0.batch_size // world, shuffle=True, seed=c0.seed * 1_000_003 + start, rows=live[0].stream_rows,
                                     device=devices.pop() if len(devices) == 1 else "cpu")
        loops.append((iter(batches), live, start, end))
    first, last = min(lp[2] for lp in loops), max(lp[3] for lp in loops)
    all_runs = [run for _, live, _, _ in loops for run in live]
    n_saes = len(all_runs)
    bar = tqdm(range(first, last), initial=first, total=last, dynamic_ncols=True, disable=not progress,
               desc="train SAE" if n_saes == 1 else f"train {n_saes} SAEs")
    t0 = time.perf_counter()
    for step in bar:
        for it, live, start, end in loops:
            if not start <= step < end:
                continue
            x_BD = next(it)
            for run in live:
                if not run.start_step <= step < run.n_steps:
                    continue
                run.trainer.step(x_BD, step)
                every = run.cfg.checkpoint_every
                if (step + 1) % every == 0 and step + 1 < run.n_steps:
                    run.checkpoint(step + 1)
                elif step + 1 == run.n_steps and step + 1 < last:
                    run.checkpoint(step + 1)  # done while others train on: a kill must not lose its last steps
        rows = [run.trainer.last for run in all_runs if run.trainer.last is not None]
        if n_saes == 1 and rows:
            bar.set_postfix(fvu=f"{rows[0]['fvu']:.3f}", l0=f"{rows[0]['l0']:.1f}", dead=f"{rows[0]['dead_fraction']:.2f}")
        elif rows:
            bar.set_postfix(fvu=" ".join(f"{row['fvu']:.2f}" for row in rows))
    bar.close()
    wall = time.perf_counter() - t0
    for run in all_runs:
        run.wall_seconds = wall


def _finish(store, live: list[_Run], val_rows) -> None:
    """Validation of every SAE of one store from one pass over its held-out images; then each SAE's files."""
    from nacosae.metrics import RunningSAEMetrics

    c0 = live[0].cfg
    for run in live:
        run.trainer.sae.eval()
    metrics = [RunningSAEMetrics() for _ in live]
    with torch.no_grad():
        for x_BD in store.iter_batches(c0.batch_size, shuffle=False, n_epochs=1, rows=val_rows):
            for run, m in zip(live, metrics, strict=True):
                sae = run.trainer.sae
                x = x_BD.to(sae.W_dec.device, torch.float32)
                codes_BS = sae.encode(x)
                m.update(x, sae.decode(codes_BS), codes_BS)
    for run, m in zip(live, metrics, strict=True):
        t, cfg = run.trainer, run.cfg
        val = m.compute()
        history = t.history
        result = {
            **{f"val_{k}": v for k, v in val.items()},
            "train_fvu_last": history[-1]["fvu"] if history else None,
            "dead_fraction_train": t.dead.dead_mask_S.float().mean().item(),
            "n_steps": run.n_steps,
            "n_train_rows": run.n_train_rows,
            # What this SAE got in this session: its rows per second of the run's wall time (shared with the other
            # SAEs of the run and the reads), and per second of its own steps.
            "rows_per_s": t.rows_done / max(run.wall_seconds or t.seconds, 1e-9),
            "step_rows_per_s": t.rows_done / max(t.seconds, 1e-9),
            "n_saes_in_run": len(live),
            "d_in": run.store.d,
            "d_sae": run.d_sae,
            "activation": cfg.activation,
            "k": cfg.k,
            "lr": run.lr,
        }
        t.sae.save_pretrained(run.out / "sae")
        _write_history(run.out / "history.jsonl", history)
        plot_curves(history, run.out / "curves.png", title=f"{run.store_name} · {cfg.activation} k={cfg.k} · d_sae={run.d_sae}")
        atomic_write_json(run.out / "metrics.json", result)  # last: its presence marks the run finished
        shutil.rmtree(run.ckpt, ignore_errors=True)
        run.result = (t.sae, result)


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


def _save_checkpoint(ckpt: Path, sae: SAE, optimizer: torch.optim.Optimizer, dead: DeadLatentTracker, step: int,
                     history: tuple[Path, list[dict[str, Any]]] | None = None) -> None:
    """Crash-safe: the step's files go to a fresh folder ckpt/step-NNNNNNNNN/, then the history, and last
    trainer_state.json, which names that folder; a kill at any point leaves the previous state file naming complete
    files (history rows past a checkpoint's step are dropped on resume). Older step folders are removed after."""
    folder = ckpt / f"step-{step:09d}"
    sae.save_pretrained(folder)
    opt_tensors = {}
    for i, p in enumerate(sae.parameters()):
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                opt_tensors[f"{i}.{key}"] = torch.as_tensor(state[key]).float()
    opt_tensors["dead.rows_since_fire"] = dead.rows_since_fire_S
    atomic_save_safetensors(folder / "optimizer.safetensors", opt_tensors)
    if history is not None:
        _write_history(*history)
    atomic_write_json(ckpt / "trainer_state.json", {"step": step, "dead_after_rows": dead.dead_after_rows,
                                                    "dir": folder.name})
    for old in ckpt.glob("step-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt: Path, lr: float, device: str):
    state = json.loads((ckpt / "trainer_state.json").read_text())
    folder = ckpt / state["dir"] if "dir" in state else ckpt  # checkpoints before step folders: files in ckpt itself
    sae = SAE.from_pretrained(folder, device=device).train()
    optimizer = make_optimizer(sae, lr)
    tensors = load_file(folder / "optimizer.safetensors", device=str(device))
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
