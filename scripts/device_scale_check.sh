#!/usr/bin/env bash
# The GPU rates of docs/scale.md's arithmetic, and how training scales over processes, on the device machine
# (issue 11). Written for the workplace's CUDA image (one H200, 16 CPU cores, no network; python3 with torch, timm,
# safetensors, tqdm, scikit-image, matplotlib, pillow; no open_clip), so it needs only what the image has and the
# three wheels below. Not run by the tests. What it measures, into $OUT/device_scale_check.json:
#   1. extraction: open_clip ViT-B/32 and ViT-B/16 (random weights), on $DEVICE: the pure forward rate of the image
#      tower in float32, under bf16 autocast, and bf16 with benchmarks/bench_extract.py's MHA layout fix; the rate of
#      one 3-layer pass (resblocks.3/7/11, all tokens: the forward extract_many runs) in float32 and bf16, and how far
#      the bf16 activations are from the float32 ones; and extract_many end to end from a folder of synthetic JPEGs
#      (500x375, ImageNet's typical size) with $EXTRACT_WORKERS DataLoader processes decoding, 3 stores written.
#   2. the SAE step (d 768, d_sae 12,288, k 32, batch 4,096): the step train_many takes (nacosae.train.SAETrainer) on
#      $DEVICE with the encoder matmul in float32 and bfloat16, rows/s; and benchmarks/bench_sae_step.py on the CPU
#      with every core (nacosae-fp32, nacosae-bf16).
#   3. training scaling: one SAE (the shape of 2.) for one epoch of a synthetic float16 store (d 768, 197 rows per
#      image: ViT-B/16's shape; the rows of bench_sae_step's SyntheticActivations) with hub_scripts/train_sae.py under
#      torchrun: on the CPU with 1 process x 8 threads, 2 processes x 8 threads (gloo), 1 process x 16 threads; on
#      $DEVICE with 1 process. Wall time of each command, the training loop's rows/s, val FVU.
# (bench_extract.py and bench_sae_step.py time on the CPU only, with no device option and no CUDA synchronisation:
# the GPU timings are taken here, with torch.cuda.synchronize, around the same library calls.)
#
# Here, once (the open_clip wheels, ~2.4 MB, which the device image lacks; untracked files travel with the tree):
#     .venv/bin/pip download --no-deps -d .device_wheels open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
# (wcwidth's wheel is cp310-abi3 manylinux x86_64: it installs on the device's Python 3.12.)
# On the device (the `run` tool; carry .device_wheels: it is git-ignored), about 4-5 minutes:
#     bash scripts/device_scale_check.sh         # timeout_s 480; writes $OUT/device_scale_check.json and .log
# Dry run on a CPU (tiny shapes, ViT-B/32 only, ~2 minutes on 2 busy cores):
#     DEVICE=cpu QUICK=1 nice -n 10 bash scripts/device_scale_check.sh
# Knobs (environment): DEVICE (cuda), QUICK (0), OUT (/tmp/device_scale_check), PYTHON, MODELS ("ViT-B-32 ViT-B-16"),
# N_IMAGES (2048), EXTRACT_WORKERS (cores - 2, at most 14), STORE_IMAGES (2662: 524,414 rows), CPU_RUNS ("1x8 2x8 1x16":
# processes x threads), PARTS ("extraction sae_step training": a subset reruns only those). Every part runs even when
# another fails; the exit status is 1 when any part failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/device_scale_check}"
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

main() {
    if ! "$PY" -c "import open_clip" 2>/dev/null && [ -d .device_wheels ]; then  # into /tmp/site (README's way)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .device_wheels/open_clip_torch-*.whl .device_wheels/ftfy-*.whl .device_wheels/wcwidth-*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$OUT" <<'EOF'
import json, os, shutil, subprocess, sys, tempfile, time, traceback
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
out = Path(sys.argv[1])
DEV = os.environ.get("DEVICE", "cuda")
QUICK = os.environ.get("QUICK", "0") == "1"
CORES = os.cpu_count() or 1
CUDA = DEV.startswith("cuda")
if CUDA:
    assert torch.cuda.is_available(), "DEVICE=cuda but torch sees no CUDA device (DEVICE=cpu for a dry run)"
env = os.environ.get
MODELS = env("MODELS", "ViT-B-32" if QUICK else "ViT-B-32 ViT-B-16").split()
N_IMAGES = int(env("N_IMAGES", 4 if QUICK else 2048))
FWD_BATCH = 2 if QUICK else 256
FWD_WARM, FWD_TIMED = (1, 1) if QUICK else (2, 8)  # batches
WORKERS = int(env("EXTRACT_WORKERS", 1 if QUICK else max(1, min(14, CORES - 2))))
LAYERS = [("resblocks.3", "all"), ("resblocks.7", "all"), ("resblocks.11", "all")]
# the SAE shape of docs/scale.md (README's bench_sae_step default)
D, D_SAE, K, BATCH = (64, 512, 8, 512) if QUICK else (768, 12288, 32, 4096)
STEP_WARM, STEP_TIMED = (2, 8) if QUICK else (10, 200)
T, STORE_IMAGES = (16, 1000) if QUICK else (197, int(env("STORE_IMAGES", 2662)))
CPU_RUNS = [tuple(int(v) for v in r.split("x")) for r in env("CPU_RUNS", "1x1 2x1" if QUICK else "1x8 2x8 1x16").split()]
if not CUDA:
    torch.set_num_threads(1 if QUICK else CORES)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def cpu_model():
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return None


report = {"device": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__, "quick": QUICK,
          "cpu": cpu_model(), "cpu_cores": CORES, "parts": {}, "errors": {}, "seconds": {}}
if CUDA:
    report["cuda_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32


def save():
    tmp = out / "device_scale_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "device_scale_check.json")


PARTS = env("PARTS", "extraction sae_step training").split()


def part(name):
    """Decorator that runs the part at once (if in $PARTS): its result, or its traceback, goes into the report, which
    is saved after each part."""
    def wrap(fn):
        if name not in PARTS:
            return
        t0 = time.perf_counter()
        print(f"\n===== {name} =====", flush=True)
        try:
            report["parts"][name] = fn()
        except Exception:
            report["errors"][name] = traceback.format_exc()
            print(report["errors"][name], flush=True)
        report["seconds"][name] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: report["parts"].get(name), "seconds": report["seconds"][name]}, indent=1), flush=True)
        save()
    return wrap


work = Path(tempfile.mkdtemp(prefix="device_scale_"))


# ---------------------------------------------------------------------------------------------------- 1. extraction
def _jpeg(args):
    i, folder = args
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(i)
    yy, xx = np.mgrid[0:375, 0:500]
    base = np.stack([np.sin(xx / g.uniform(10, 80) + c) * np.cos(yy / g.uniform(10, 80) - c) for c in g.uniform(0, 6, 3)], -1)
    img = (127 + 100 * base + g.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(f"{folder}/{i:05d}.jpg", quality=90)


@part("extraction")
def extraction():
    from concurrent.futures import ThreadPoolExecutor

    from nacosae.backbones import load_backbone, mha_autocast_layout
    from nacosae.extract import Target, _activations, extract_many
    from nacosae.images import FolderSource

    folder = work / "jpegs"
    folder.mkdir()
    with ThreadPoolExecutor(min(CORES, 16)) as pool:  # numpy and PIL's encoder release the GIL
        list(pool.map(_jpeg, [(i, str(folder)) for i in range(N_IMAGES)]))
    source = FolderSource(folder, label_from=None, progress=False)
    res = {"images": f"{N_IMAGES} synthetic JPEGs 500x375 (smooth colour waves + noise), q 90",
           "forward_batch": FWD_BATCH, "timed_batches": FWD_TIMED, "extract_workers": WORKERS,
           "layers": [f"{l}:{t}" for l, t in LAYERS], "models": {}}
    for name in MODELS:
        t0 = time.perf_counter()
        bb = load_backbone(f"open_clip:{name}", device=DEV)
        for hook in bb.mha_hooks:  # first as open_clip runs it; the layout fix is put back below
            hook.remove()
        m = res["models"][name] = {"load_s": round(time.perf_counter() - t0, 1)}
        pics = torch.stack([bb.preprocess(source.load(r)) for r in source.records()[:FWD_BATCH]])
        pics = pics.repeat(-(-FWD_BATCH // len(pics)), 1, 1, 1)[:FWD_BATCH].to(DEV)

        def rate(fn):
            with torch.inference_mode():
                for _ in range(FWD_WARM):
                    fn()
                sync()
                t = time.perf_counter()
                for _ in range(FWD_TIMED):
                    fn()
                sync()
            return round(FWD_TIMED * FWD_BATCH / (time.perf_counter() - t), 1)

        def tower(ac):
            ctx = torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16) if ac else torch.autocast(
                torch.device(DEV).type, enabled=False)
            with ctx:
                return bb.output(pics)

        m["tower_img_per_s"] = {"float32": rate(lambda: tower(False)), "bfloat16": rate(lambda: tower(True))}
        m["layers3_img_per_s"] = {"float32": rate(lambda: _activations(bb, pics, LAYERS)),
                                  "bfloat16": rate(lambda: _activations(bb, pics, LAYERS, "bfloat16"))}
        with torch.inference_mode():
            ref, low = _activations(bb, pics, LAYERS), _activations(bb, pics, LAYERS, "bfloat16")
        m["bf16_rel_error"] = {f"{l}:{t}": float(f"{((y - x).norm() / x.norm()).item():.2e}")
                               for (l, t), x, y in zip(LAYERS, ref, low, strict=True)}
        m["tokens_per_image"] = int(ref[0].shape[1])
        del ref, low
        m["extract_many_img_per_s"] = {}
        for ac in (None, "bfloat16"):
            stores = work / "stores"
            t = time.perf_counter()
            extract_many(source, bb, [Target(l, tk, stores / l) for l, tk in LAYERS], batch_size=FWD_BATCH,
                         num_workers=WORKERS, device=DEV, progress=False, autocast=ac)
            dt = time.perf_counter() - t
            size = sum(f.stat().st_size for f in stores.rglob("*") if f.is_file())
            m["extract_many_img_per_s"][ac or "float32"] = round(N_IMAGES / dt, 1)
            m["extract_many_store_mb"] = round(size / 1e6, 1)
            shutil.rmtree(stores)
        bb.mha_hooks = mha_autocast_layout(bb.model.visual)  # hooks act under autocast only
        m["mha_layout_fix_modules"] = len(bb.mha_hooks)
        m["tower_img_per_s"]["bfloat16_mha_layout_fix"] = rate(lambda: tower(True))
        if CUDA:
            m["cuda_max_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()
        del bb, pics
        if CUDA:
            torch.cuda.empty_cache()
    shutil.rmtree(folder)
    return res


# ---------------------------------------------------------------------------------------------------- 2. SAE step
@part("sae_step")
def sae_step():
    from bench_sae_step import SyntheticActivations
    from nacosae.sae import SAE, SAEConfig
    from nacosae.train import SAETrainer, default_lr

    data = SyntheticActivations(D, 1024 if QUICK else 16384, 8 if QUICK else 24)
    xs = [data.batch(i, BATCH).to(DEV) for i in range(4 if QUICK else 8)]
    res = {"shape": {"d": D, "d_sae": D_SAE, "k": K, "batch": BATCH}, "timed_steps": STEP_TIMED, "device": DEV}
    for mm in ("float32", "bfloat16"):
        torch.manual_seed(0)
        sae = SAE(SAEConfig(d_in=D, d_sae=D_SAE, activation="topk", k=K), device=DEV).init_from_data(xs[0])
        sae.matmul_dtype = mm
        tr = SAETrainer(sae, STEP_WARM + STEP_TIMED, default_lr(D_SAE), warmup_steps=STEP_WARM, log_every=10**9)
        for s in range(STEP_WARM):
            tr.step(xs[s % len(xs)], s)
        sync()
        t = time.perf_counter()
        for s in range(STEP_WARM, STEP_WARM + STEP_TIMED):
            tr.step(xs[s % len(xs)], s)
        sync()
        dt = time.perf_counter() - t
        res[mm] = {"rows_per_s": round(STEP_TIMED * BATCH / dt), "step_ms": round(1e3 * dt / STEP_TIMED, 3),
                   "train_fvu_last": round(tr.last["fvu"], 4)}
        del sae, tr
    if CUDA:
        res["cuda_max_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    # the same step on the CPU, every core: the benchmark's own run (interleaved methods, median step)
    threads = 1 if QUICK else CORES
    cmd = [sys.executable, "benchmarks/bench_sae_step.py", "--json", "--methods", "nacosae-fp32", "nacosae-bf16",
           "--threads", str(threads), "--d", str(D), "--d-sae", str(D_SAE), "--k", str(K), "--batch", str(BATCH),
           "--steps", "4" if QUICK else "15", "--warmup", "1" if QUICK else "3", "--fvu-step", "1", "--max-seconds", "30"]
    if QUICK:
        cmd += ["--n-features", "1024", "--n-active", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    print("$ " + " ".join(cmd) + "\n" + r.stderr[-3000:] + r.stdout[-3000:], flush=True)
    if r.returncode:
        raise RuntimeError(f"bench_sae_step.py failed (exit {r.returncode})")
    b = json.loads(r.stdout.strip().splitlines()[-1])
    res["cpu_bench_sae_step"] = {"threads": b["threads"], "matmul_gflops": {k: round(v) for k, v in b["matmul_gflops"].items()},
                                 **{n: {"rows_per_s": round(v["acts_per_s"]), "steps": v["steps"]} for n, v in b["methods"].items()}}
    return res


# ---------------------------------------------------------------------------------------------------- 3. training
@part("training")
def training():
    from bench_sae_step import SyntheticActivations
    from nacosae.store import StoreWriter, finalize_store

    store = work / "store"
    rows = STORE_IMAGES * T
    data = SyntheticActivations(D, 1024 if QUICK else 16384, 8 if QUICK else 24, seed=1)
    t = time.perf_counter()
    run = {"provenance": {"backbone": "synthetic (bench_sae_step.SyntheticActivations)", "layer": "synthetic",
                          "tokens": "all"}, "dtype": "float16", "n_images_total": STORE_IMAGES,
           "source": {"name": "synthetic"}, "world_size": 1}
    w = StoreWriter(store, run, 0, 0, STORE_IMAGES)
    per = max(1, 2**16 // T)
    for s in range(0, STORE_IMAGES, per):
        ids = list(range(s, min(s + per, STORE_IMAGES)))
        w.write_shard(data.batch(s, len(ids) * T).half(), torch.tensor(ids).repeat_interleave(T),
                      torch.arange(T).repeat(len(ids)), [{"image_idx": i} for i in ids], ids[-1] + 1, [])
    w.mark_done()
    finalize_store(store)
    res = {"store": {"rows": rows, "d": D, "rows_per_image": T, "dtype": "float16",
                     "mb": round(sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6, 1),
                     "write_s": round(time.perf_counter() - t, 1)},
           "sae": {"d_sae": D_SAE, "k": K, "batch": BATCH, "epochs": 1}, "runs": []}
    runs = [("cpu", p, th) for p, th in CPU_RUNS] + ([(DEV, 1, 8)] if CUDA else [("cpu-as-device", 1, 1)])
    for device, procs, threads in runs:
        run_dir = work / f"sae-{device}-{procs}x{threads}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "hub_scripts/train_sae.py", "--store", str(store), "--out-dir", str(run_dir), "--d-sae", str(D_SAE),
               "--k", str(K), "--batch-size", str(BATCH), "--n-epochs", "1", "--warmup-steps", "10",
               "--checkpoint-every", str(10**9), "--log-every", "10", "--device", DEV if device == DEV else "cpu"]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        wall = time.perf_counter() - t
        lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip()]
        bars = [ln for ln in lines if ln.lstrip().startswith("train SAE")]  # tqdm: keep its last state only
        log = "\n".join([ln for ln in lines if ln not in bars] + bars[-1:])
        print(f"$ OMP_NUM_THREADS={threads} " + " ".join(cmd) + f"\n(exit {r.returncode}, {wall:.1f} s)\n"
              + log[-6000:] + "\n" + r.stdout[-2000:], flush=True)
        entry = {"device": device, "processes": procs, "threads_each": threads, "wall_s": round(wall, 1)}
        if r.returncode:
            entry["failed"] = f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}"
        else:
            mt = json.loads((run_dir / "metrics.json").read_text())
            entry.update(loop_rows_per_s=round(mt["rows_per_s"]), step_rows_per_s=round(mt["step_rows_per_s"]),
                         n_steps=mt["n_steps"], val_fvu=round(mt["val_fvu"], 4), val_l0=round(mt["val_l0"], 2),
                         val_dead_fraction=round(mt["val_dead_fraction"], 4))
        res["runs"].append(entry)
        shutil.rmtree(run_dir, ignore_errors=True)
    base = next((r for r in res["runs"] if r["device"] == "cpu" and "failed" not in r), None)
    for r in res["runs"]:
        if base and "failed" not in r:
            r["wall_speedup_vs_first"] = round(base["wall_s"] / r["wall_s"], 2)
    failed = [r for r in res["runs"] if "failed" in r]
    if failed:
        report["parts"]["training"] = res
        raise RuntimeError(f"{len(failed)} training run(s) failed: {failed}")
    return res


shutil.rmtree(work, ignore_errors=True)
report["seconds"]["total"] = round(sum(report["seconds"].values()), 1)
report["ok"] = not report["errors"]
save()
print("\n===== summary =====\n" + json.dumps({k: v for k, v in report.items() if k != "errors"}, indent=1))
print("errors in: " + (", ".join(report["errors"]) or "none"))
sys.exit(0 if report["ok"] else 1)
EOF
}

set -o pipefail
main 2>&1 | tee "$OUT/device_scale_check.log"
