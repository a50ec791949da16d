"""SAE training step on CPU: nacosae against a plain PyTorch TopK SAE and the peer libraries, same data, one run.

    python benchmarks/bench_sae_step.py                      # d 768, d_sae 12288, k 32, batch 4096, 2 threads
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python benchmarks/bench_sae_step.py
    python benchmarks/bench_sae_step.py --allocator-ab /usr/lib/x86_64-linux-gnu/libjemalloc.so.2

Every method trains on the same synthetic batches (a planted dictionary with Zipf-distributed feature
frequencies, see `SyntheticActivations`), and the methods take their steps interleaved, one step each per
round in a rotating order, so a neighbour's load on the machine hits all of them alike: compare the ratios,
not the absolute numbers. Each method uses its own library's default training recipe:

    plain-dense      a straightforward TopK SAE: dense codes, dense decoder matmul, autograd, Adam
    plain-embbag     the same with an `F.embedding_bag` sparse decoder
    nacosae-plain    nacosae's `SAE` with the fast path off (`fast_topk = False`): the dense reference path
    nacosae-fp32     nacosae's `SAE` + `fit`'s step, fast TopK kernel, float32 encoder matmul
    nacosae-bf16     the same with a bfloat16 encoder matmul (fp32 accumulation and master weights)
    nacosae-bf16-noreuse   nacosae-bf16 with a fresh workspace every step: what buffer reuse buys
    nacosae-bf16-foreach   nacosae-bf16 with Adam(foreach=True) instead of the fused CPU Adam
    (the default run leaves out the last four, which are ablations: pass --methods to add them)
    sparsify         EleutherAI sparsify (`eai-sparsify`): SparseCoder + its default SignSGD/ScheduleFree recipe
    sae-lens         SAELens (`sae-lens`): TopKTrainingSAE + its trainer's step (Adam 3e-4, grad-norm clip 1)

Reported per method: activations per second (median step), the training-batch FVU at a fixed step (the
same batch for every method), time and steps to reach each FVU target on the training batches, and the FVU
on held-out batches after the steps it ran (methods stop after --max-seconds of step time, so slow ones run
fewer steps). No latent dies within such a run, so AuxK is idle everywhere. The encoder's dense matmul
(B × D by D × S) is the floor of any TopK step: its rate is measured in the same run, in float32 and in
bfloat16, and the table gives each step's "encoder GFLOP/s" (2·B·D·S per step) as a fraction of it.
Install the peers with `pip install -r benchmarks/requirements.txt`; missing ones are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder is CUDA-only

import torch
import torch.nn.functional as F

from nacosae.kernels import TopKWorkspace
from nacosae.sae import SAE, SAEConfig
from nacosae.train import DeadLatentTracker, default_lr, make_optimizer

ALL_METHODS = (
    "plain-dense", "plain-embbag", "nacosae-plain", "nacosae-fp32", "nacosae-bf16", "nacosae-bf16-noreuse",
    "nacosae-bf16-foreach", "sparsify", "sae-lens",
)
DEFAULT_METHODS = ("plain-dense", "plain-embbag", "sparsify", "sae-lens", "nacosae-fp32", "nacosae-bf16")


# ---------------------------------------------------------------------------- data
class SyntheticActivations:
    """x = m + Σ_{i ∈ active} c_i d_i + σ ε: `n_features` unit directions used with Zipf(α) frequencies,
    `n_active` draws per row, c ~ 0.5 + Exp(1), a shared mean m, then scaled so E‖x‖² ≈ d.

    Batch `i` depends only on (seed, i), so every method sees the same rows in the same order.
    """

    def __init__(self, d: int, n_features: int, n_active: int, zipf: float = 0.7, noise: float = 0.05, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        dirs_FD = torch.randn(n_features, d, generator=g)
        self.dirs_FD = dirs_FD / dirs_FD.norm(dim=1, keepdim=True)
        self.freq_F = (torch.arange(1, n_features + 1, dtype=torch.float64) ** -zipf).float()
        self.mean_D = 0.5 * torch.randn(d, generator=g)
        self.n_active, self.noise, self.seed, self.d = n_active, noise, seed, d
        self.scale = 1.0
        self.scale = self.batch(10**6, 4096).pow(2).sum(-1).mean().sqrt().item() / math.sqrt(d)

    def batch(self, i: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        idx_NA = torch.multinomial(self.freq_F, n * self.n_active, replacement=True, generator=g).view(n, self.n_active)
        coef_NA = 0.5 + torch.empty(n, self.n_active).exponential_(generator=g)
        x_ND = F.embedding_bag(idx_NA, self.dirs_FD, per_sample_weights=coef_NA, mode="sum")
        x_ND += self.mean_D + self.noise * torch.randn(n, self.d, generator=g)
        return x_ND / self.scale


def fvu_of(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    return ((x_BD - x_hat_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()).item()


# ---------------------------------------------------------------------------- methods
@dataclass
class Shape:
    d: int
    d_sae: int
    k: int
    batch: int


class Method:
    name = ""

    def step(self, x_BD: torch.Tensor) -> float:
        """One optimizer step; returns the FVU of this training batch (before the update)."""
        raise NotImplementedError

    def eval_fvu(self, x_BD: torch.Tensor) -> float:
        raise NotImplementedError


class PlainTopK(Method):
    """A straightforward TopK SAE in plain PyTorch, with the same recipe as nacosae (Adam, unit-norm decoder)."""

    def __init__(self, shape: Shape, x0_BD: torch.Tensor, lr: float, embbag: bool):
        self.name = "plain-embbag" if embbag else "plain-dense"
        S, D = shape.d_sae, shape.d
        W_dec = torch.randn(S, D)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = torch.nn.Parameter(W_dec.clone())
        self.W_dec = torch.nn.Parameter(W_dec)
        self.b_enc = torch.nn.Parameter(torch.zeros(S))
        self.b_dec = torch.nn.Parameter(x0_BD.mean(0).clone())
        self.k, self.embbag = shape.k, embbag
        self.opt = torch.optim.Adam([self.W_enc, self.b_enc, self.W_dec, self.b_dec], lr=lr)

    def forward(self, x_BD):
        pre_BS = F.linear(x_BD - self.b_dec, self.W_enc, self.b_enc)
        vals_BK, idx_BK = pre_BS.topk(self.k, dim=-1, sorted=False)
        vals_BK = F.relu(vals_BK)
        if self.embbag:
            return F.embedding_bag(idx_BK, self.W_dec, per_sample_weights=vals_BK, mode="sum") + self.b_dec
        codes_BS = torch.zeros_like(pre_BS).scatter(-1, idx_BK, vals_BK)
        return codes_BS @ self.W_dec + self.b_dec

    def step(self, x_BD):
        x_hat = self.forward(x_BD)
        loss = (x_BD - x_hat).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec
            self.opt.step()
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        return loss.item()

    @torch.no_grad()
    def eval_fvu(self, x_BD):
        return fvu_of(x_BD, self.forward(x_BD))


class Nacosae(Method):
    """nacosae's SAE with exactly the per-step work of `nacosae.train.fit` (constant learning rate)."""

    def __init__(self, shape: Shape, x0_BD: torch.Tensor, lr: float, matmul_dtype: str, fast: bool = True, reuse: bool = True,
                 foreach_adam: bool = False):
        cfg = SAEConfig(d_in=shape.d, d_sae=shape.d_sae, activation="topk", k=shape.k)
        self.sae = SAE(cfg).init_from_data(x0_BD)
        self.sae.fast_topk, self.sae.matmul_dtype, self.reuse = fast, matmul_dtype, reuse
        self.opt = make_optimizer(self.sae, lr)
        if foreach_adam:
            self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr, foreach=True)
        self.dead = DeadLatentTracker(shape.d_sae, 10_000_000)
        self.name = "nacosae-plain" if not fast else f"nacosae-{'bf16' if matmul_dtype == 'bfloat16' else 'fp32'}"
        self.name += ("" if reuse else "-noreuse") + ("-foreach" if foreach_adam else "")

    def step(self, x_BD):
        sae = self.sae
        if not self.reuse:
            sae._workspace = TopKWorkspace()
        out = sae(x_BD, dead_mask_S=self.dead.dead_mask_S)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad()
        self.opt.step()
        sae.normalize_decoder()
        if out.codes is not None:
            self.dead.update(out.codes.detach())
        else:
            self.dead.update_from_topk(out.top_idx, out.top_vals.detach())
        return out.fvu.item()

    @torch.no_grad()
    def eval_fvu(self, x_BD):
        return fvu_of(x_BD, self.sae.reconstruct(x_BD))


class Sparsify(Method):
    """EleutherAI sparsify's SparseCoder with the per-step work of its Trainer (default `signum` optimizer)."""

    name = "sparsify"

    def __init__(self, shape: Shape, x0_BD: torch.Tensor):
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD

        self.sae = SparseCoder(shape.d, SparseCoderConfig(num_latents=shape.d_sae, k=shape.k), device="cpu", dtype=torch.float32)
        self.sae.b_dec.data = x0_BD.mean(0).clone()  # the Trainer sets b_dec to the first batch's mean
        lr = 5e-3 / (shape.d_sae / 2**14) ** 0.5  # its default for signum
        self.opt = ScheduleFreeWrapper(SignSGD([dict(params=self.sae.parameters(), lr=lr)]), momentum=0.95)
        self.opt.train()

    def step(self, x_BD):
        self.sae.set_decoder_norm_to_unit_norm()
        out = self.sae(x_BD)
        out.fvu.backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        return out.fvu.item()

    @torch.no_grad()
    def eval_fvu(self, x_BD):
        self.opt.eval()  # schedule-free: evaluate at the averaged weights, as its Trainer does
        try:
            return self.sae(x_BD).fvu.item()
        finally:
            self.opt.train()


class SAELens(Method):
    """SAELens' TopKTrainingSAE with the per-step work of its SAETrainer._train_step (default config)."""

    name = "sae-lens"

    def __init__(self, shape: Shape, x0_BD: torch.Tensor):
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        cfg = TopKTrainingSAEConfig(d_in=shape.d, d_sae=shape.d_sae, k=shape.k, device="cpu", dtype="float32")
        self.sae = TopKTrainingSAE(cfg)
        with torch.no_grad():
            self.sae.b_dec.copy_(x0_BD.mean(0))  # its `b_dec_init_method="mean"` option; the default is zeros
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
        self.dead_S = torch.zeros(shape.d_sae, dtype=torch.bool)
        self.n_steps = 0

    def step(self, x_BD):
        from sae_lens.saes.sae import TrainStepInput

        self.sae.train()
        out = self.sae.training_forward_pass(TrainStepInput(
            sae_in=x_BD, coefficients={}, dead_neuron_mask=self.dead_S, n_training_steps=self.n_steps, is_logging_step=False))
        with torch.no_grad():
            did_fire_S = out.feature_acts.bool().float().sum(-2).bool()  # its trainer's dead-latent bookkeeping
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.n_steps += 1
        del did_fire_S
        return fvu_of(x_BD, out.sae_out.detach())

    @torch.no_grad()
    def eval_fvu(self, x_BD):
        return fvu_of(x_BD, self.sae(x_BD))


def build(name: str, shape: Shape, x0_BD: torch.Tensor) -> Method:
    lr = default_lr(shape.d_sae)
    if name in ("plain-dense", "plain-embbag"):
        return PlainTopK(shape, x0_BD, lr, embbag=name == "plain-embbag")
    if name == "nacosae-plain":
        return Nacosae(shape, x0_BD, lr, "float32", fast=False)
    if name.startswith("nacosae-"):
        dtype = "bfloat16" if "bf16" in name else "float32"
        return Nacosae(shape, x0_BD, lr, dtype, reuse=not name.endswith("-noreuse"), foreach_adam=name.endswith("-foreach"))
    if name == "sparsify":
        return Sparsify(shape, x0_BD)
    if name == "sae-lens":
        return SAELens(shape, x0_BD)
    raise ValueError(f"unknown method {name!r}; choose from {ALL_METHODS}")


# ---------------------------------------------------------------------------- measurement
def matmul_seconds(shape: Shape, dtype: torch.dtype, bufs: dict) -> float:
    """One (B × D) @ (D × S) matmul into a reused output, as the fast path runs it."""
    key = str(dtype)
    if key not in bufs:
        g = torch.Generator().manual_seed(0)
        bufs[key] = (torch.randn(shape.batch, shape.d, generator=g).to(dtype),
                     torch.randn(shape.d_sae, shape.d, generator=g).to(dtype),
                     torch.empty(shape.batch, shape.d_sae, dtype=dtype))
        torch.mm(bufs[key][0], bufs[key][1].t(), out=bufs[key][2])  # warm-up
    a, b, out = bufs[key]
    t0 = time.perf_counter()
    torch.mm(a, b.t(), out=out)
    return time.perf_counter() - t0


def allocator() -> str:
    with open("/proc/self/maps") as f:
        return "jemalloc" if "jemalloc" in f.read() else "glibc malloc"


def run(args) -> dict:
    torch.manual_seed(args.seed)
    shape = Shape(args.d, args.d_sae, args.k, args.batch)
    data = SyntheticActivations(args.d, args.n_features, args.n_active, seed=args.seed)
    x0_BD = data.batch(-1, args.batch)
    eval_batches = [data.batch(-2 - i, args.batch) for i in range(2)]
    methods, skipped = [], {}
    for name in args.methods:
        torch.manual_seed(args.seed)
        try:
            methods.append(build(name, shape, x0_BD))
        except ImportError as e:
            skipped[name] = f"not installed ({e.name}): pip install -r benchmarks/requirements.txt"
    rec = {m.name: {"times": [], "fvus": [], "stopped": None} for m in methods}
    mm = {"float32": [], "bfloat16": []}
    bufs: dict = {}
    t_start = time.perf_counter()
    for rnd in range(args.steps):
        x_BD = data.batch(rnd, args.batch)
        order = methods[rnd % len(methods):] + methods[: rnd % len(methods)]  # rotate who goes first
        active = 0
        for m in order:
            r = rec[m.name]
            if r["stopped"]:
                continue
            t0 = time.perf_counter()
            fvu = m.step(x_BD)
            r["times"].append(time.perf_counter() - t0)
            r["fvus"].append(fvu)
            active += 1
            if sum(r["times"]) > args.max_seconds and len(r["times"]) < args.steps:
                r["stopped"] = f"time budget after {len(r['times'])} steps"
        if rnd % args.matmul_every == 0:
            for dt in mm:
                mm[dt].append(matmul_seconds(shape, getattr(torch, dt), bufs))
        if args.progress:
            done = " ".join(f"{m.name}={rec[m.name]['fvus'][-1]:.3f}" for m in methods if rec[m.name]["fvus"])
            print(f"[{time.perf_counter() - t_start:6.0f}s] round {rnd + 1}/{args.steps} FVU {done}", file=sys.stderr, flush=True)
        if not active:
            break
    flop = 2 * args.batch * args.d * args.d_sae
    result = {
        "shape": vars(shape), "fvu_step": args.fvu_step, "threads": torch.get_num_threads(), "allocator": allocator(), "torch": torch.__version__,
        "matmul_gflops": {dt: flop / statistics.median(v) / 1e9 for dt, v in mm.items()},
        "skipped": skipped, "methods": {},
    }
    for m in methods:
        r = rec[m.name]
        times = r["times"][args.warmup:] or r["times"]
        step_s = statistics.median(times)
        cum = [sum(r["times"][: i + 1]) for i in range(len(r["times"]))]
        to_target = {}
        for target in args.fvu_targets:
            hit = next((i for i, f in enumerate(r["fvus"]) if f <= target), None)
            to_target[str(target)] = None if hit is None else {"steps": hit + 1, "seconds": cum[hit]}
        with torch.no_grad():
            eval_fvu = statistics.mean(m.eval_fvu(x) for x in eval_batches)
        result["methods"][m.name] = {
            "steps": len(r["times"]), "step_s": step_s, "acts_per_s": args.batch / step_s,
            "encoder_gflops": flop / step_s / 1e9, "train_fvu_last": r["fvus"][-1], "eval_fvu": eval_fvu,
            "fvu_at_step": r["fvus"][args.fvu_step - 1] if len(r["fvus"]) >= args.fvu_step else None,
            "to_target": to_target, "stopped": r["stopped"], "total_s": sum(r["times"]),
        }
    return result


def sum_s(m: dict) -> float:
    return m["total_s"]


def print_table(res: dict, baseline: str | None) -> None:
    mmr = res["matmul_gflops"]
    print(f"\nd={res['shape']['d']}, d_sae={res['shape']['d_sae']}, k={res['shape']['k']}, batch={res['shape']['batch']}, "
          f"{res['threads']} threads, {res['allocator']}, torch {res['torch']}")
    print(f"encoder matmul alone ({res['shape']['batch']}×{res['shape']['d']} @ {res['shape']['d']}×{res['shape']['d_sae']}): "
          f"{mmr['float32']:.0f} GFLOP/s float32, {mmr['bfloat16']:.0f} GFLOP/s bfloat16\n")
    targets = list(next(iter(res["methods"].values()))["to_target"]) if res["methods"] else []
    peers = [n for n in ("sparsify", "sae-lens") if n in res["methods"]]
    fastest_peer = max(peers, key=lambda n: res["methods"][n]["acts_per_s"]) if peers else None
    base = baseline or fastest_peer or next(iter(res["methods"]), None)
    head = ["method", "steps", "act/s", f"× {base}" if base else "×", "enc. GFLOP/s (% of matmul)"]
    head += [f"FVU at step {res['fvu_step']}"] + [f"time to FVU≤{t}" for t in targets] + ["held-out FVU after its steps"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, m in res["methods"].items():
        ref = mmr["bfloat16"] if "bf16" in name else mmr["float32"]
        ratio = m["acts_per_s"] / res["methods"][base]["acts_per_s"] if base in res["methods"] else float("nan")
        cells = [name, str(m["steps"]), f"{m['acts_per_s']:,.0f}", f"{ratio:.2f}", f"{m['encoder_gflops']:.0f} ({100 * m['encoder_gflops'] / ref:.0f} %)"]
        cells.append("—" if m["fvu_at_step"] is None else f"{m['fvu_at_step']:.3f}")
        for t in targets:
            hit = m["to_target"][t]
            cells.append(f"not in {sum_s(m):.0f} s" if hit is None else f"{hit['seconds']:.0f} s ({hit['steps']} steps)")
        cells.append(f"{m['eval_fvu']:.3f}")
        print("| " + " | ".join(cells) + " |")
    for name, why in res["skipped"].items():
        print(f"skipped {name}: {why}")


def allocator_ab(args) -> None:
    """Alternate child runs with and without LD_PRELOAD=<jemalloc>; report act/s per allocator."""
    rows: dict[str, dict[str, list[float]]] = {}
    base = [sys.executable, __file__, "--json", "--steps", str(args.steps), "--methods", *args.methods,
            "--threads", str(args.threads), "--max-seconds", str(args.max_seconds), "--fvu-step", "1",
            "--d", str(args.d), "--d-sae", str(args.d_sae), "--k", str(args.k), "--batch", str(args.batch),
            "--n-features", str(args.n_features), "--n-active", str(args.n_active), "--seed", str(args.seed),
            "--warmup", str(args.warmup)]
    for rep in range(args.repeats):
        for label, preload in (("glibc malloc", None), ("jemalloc", args.allocator_ab)):
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
            if preload:
                env["LD_PRELOAD"] = preload
            out = subprocess.run(base, env=env, capture_output=True, text=True, check=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            assert res["allocator"] == label, (res["allocator"], label)
            for name, m in res["methods"].items():
                rows.setdefault(name, {}).setdefault(label, []).append(m["acts_per_s"])
            print(f"repeat {rep + 1}: {label} done", file=sys.stderr, flush=True)
    print("| method | act/s glibc malloc | act/s jemalloc | jemalloc / glibc |\n|---|---|---|---|")
    for name, by in rows.items():
        g, j = statistics.median(by["glibc malloc"]), statistics.median(by["jemalloc"])
        print(f"| {name} | {g:,.0f} | {j:,.0f} | {j / g:.2f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=12288)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--n-features", type=int, default=16384, help="planted directions in the synthetic data")
    p.add_argument("--n-active", type=int, default=24, help="planted directions drawn per row")
    p.add_argument("--steps", type=int, default=30, help="rounds: every method takes at most this many steps")
    p.add_argument("--max-seconds", type=float, default=80.0, help="a method stops after this much step time")
    p.add_argument("--fvu-step", type=int, default=10, help="the table compares the training FVU at this step")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the act/s median")
    p.add_argument("--fvu-targets", type=float, nargs="+", default=[0.4, 0.35])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=ALL_METHODS)
    p.add_argument("--baseline", default=None, help="method the × column divides by (default: the fastest peer library)")
    p.add_argument("--matmul-every", type=int, default=3, help="rounds between two timings of the bare matmul")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line instead of the table")
    p.add_argument("--allocator-ab", metavar="LIBJEMALLOC", default=None,
                   help="alternate child runs with and without LD_PRELOAD of this library and compare act/s")
    p.add_argument("--repeats", type=int, default=2, help="with --allocator-ab: pairs of child runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.allocator_ab:
        allocator_ab(args)
        return
    args.progress = not args.json
    res = run(args)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res, args.baseline)


if __name__ == "__main__":
    main()
