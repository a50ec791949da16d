"""App latency on CPU with the bundled demo: cold start, switching features, "what fires on my image".

    python benchmarks/bench_app.py                       # all three, 1 torch thread (the app's default)
    python benchmarks/bench_app.py --skip-browser --threads 2 --out runs/bench_app.json

1. Cold start (target ≤ 10 s): `python app.py --demo` from process start until the server answers HTTP, and (with
   Chromium) until the first feature's gallery images have loaded in a browser.
2. Switching features (target ≤ 0.3 s server time): `Explorer.feature_page` for features not seen before (gallery
   heatmaps, histogram, names, MILS history); app.py's handler + Gradio's postprocessing of every output (server
   time); a cached revisit; and the round trip through the running app's API with gradio_client (`/feature`,
   including the queue and the client downloading the gallery images).
3. "What fires on my image": `Explorer.what_fires` on the scikit-image photos (backbone + SAE + heatmaps), warm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"n": len(xs), "median_s": round(statistics.median(xs), 4), "p90_s": round(xs[int(0.9 * (len(xs) - 1))], 4),
            "max_s": round(xs[-1], 4)}


def cold_start(threads: int, browser: bool, n_features: int) -> tuple[dict, dict | None]:
    port = _port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "NACOSAE_TORCH_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--demo", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    out: dict = {}
    api: dict | None = None
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("app.py exited during start-up")
                time.sleep(0.05)
        out["http_ready_s"] = round(time.perf_counter() - t0, 2)
        if browser and Path("/usr/bin/chromium").exists():
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=FLAGS)
                page = b.new_page(viewport={"width": 1400, "height": 1300})
                page.goto(url)
                page.wait_for_function("document.querySelectorAll('#top-images img').length >= 3 && "
                                       "[...document.querySelectorAll('#top-images img')].every(i => i.complete && i.naturalWidth > 0)",
                                       timeout=120_000)
                out["first_feature_rendered_s"] = round(time.perf_counter() - t0, 2)
                b.close()
        api = api_switch(url, n_features)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return out, api


def api_switch(url: str, n: int) -> dict:
    """Round trip of the `/feature` endpoint (handler + Gradio encoding the gallery) through gradio_client."""
    from gradio_client import Client

    from nacosae.publish import read_results_folder

    t = read_results_folder(ROOT / "demo" / "results", columns={"features": ["sae_id", "feature", "dead"]})["features"]
    sid = t.column("sae_id")[0].as_py()
    feats = [j for j, d in zip(t.column("feature").to_pylist(), t.column("dead").to_pylist()) if not d]
    picks = feats[len(feats) // 3:][:: max(1, len(feats) // (3 * n))][:n]
    client = Client(url, verbose=False)
    times = []
    for j in picks:
        t0 = time.perf_counter()
        client.predict(sid, j, api_name="/feature")
        times.append(time.perf_counter() - t0)
    return summary(times)


def in_process(n_features: int, n_images: int) -> dict:
    from nacosae import serve
    from nacosae.images import SkimageSource

    demo = ROOT / "demo"
    t0 = time.perf_counter()
    ex = serve.open_explorer(serve.Source(str(demo / "sae"), str(demo / "results")))
    res = {"open_explorer_s": round(time.perf_counter() - t0, 3)}
    sid = ex.sae_ids[0]
    t0 = time.perf_counter()
    ex.browse(sid)
    res["first_browse_s"] = round(time.perf_counter() - t0, 3)
    feats = ex.browse(sid, sort="frequency", hide_dense=False)["feature"].tolist()
    t0 = time.perf_counter()
    ex.feature_page(sid, feats[0])  # first page: imports the heatmap code (torch, matplotlib)
    res["first_feature_page_s"] = round(time.perf_counter() - t0, 3)
    picks = feats[1:][:: max(1, len(feats) // n_features)][:n_features]
    times = []
    for j in picks:
        t0 = time.perf_counter()
        ex.feature_page(sid, j)
        times.append(time.perf_counter() - t0)
    res["switch_feature_new"] = summary(times)
    times = []
    for j in picks:
        t0 = time.perf_counter()
        ex.feature_page(sid, j)
        times.append(time.perf_counter() - t0)
    res["switch_feature_cached"] = summary(times)
    # the same through app.py's handler plus Gradio's postprocessing of each output (the gallery images are encoded
    # and written to Gradio's cache here): the server time of a feature switch, without the network
    os.environ["NACOSAE_DEMO"] = "1"
    sys.path.insert(0, str(ROOT))
    import app

    outputs = next(fn.outputs for fn in app.demo.fns.values() if fn.api_name == "feature")
    others = [j for j in feats[1:] if j not in set(picks)][:: max(1, len(feats) // n_features)][:n_features]
    times = []
    for j in others:
        t0 = time.perf_counter()
        for comp, value in zip(outputs, app.open_feature(app.START.source.key, sid, j)):
            comp.postprocess(value)
        times.append(time.perf_counter() - t0)
    res["switch_feature_server"] = summary(times)
    for q, s in (("", "score"), ("a", "frequency")):
        t0 = time.perf_counter()
        ex.browse(sid, q, s)
        res[f"browse_{s}_s"] = round(time.perf_counter() - t0, 4)

    t0 = time.perf_counter()
    ex.warm_up(sid)
    res["load_backbone_and_sae_s"] = round(time.perf_counter() - t0, 2)
    src = SkimageSource()
    photos = [src.load(r) for r in src.records()][:n_images]
    ex.what_fires(sid, photos[0])  # warm
    times = []
    for im in photos:
        t0 = time.perf_counter()
        ex.what_fires(sid, im, top=8)
        times.append(time.perf_counter() - t0)
    res["what_fires"] = summary(times)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (in-process and the app; the app's default is 1)")
    ap.add_argument("--features", type=int, default=30, help="features to switch between")
    ap.add_argument("--images", type=int, default=19, help="photos for what-fires")
    ap.add_argument("--skip-browser", action="store_true", help="no Chromium: cold start measured to HTTP only")
    ap.add_argument("--skip-cold", action="store_true", help="no app process: in-process numbers only")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(args.threads)
    result = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                          "load_avg_1min": round(os.getloadavg()[0], 2)}}
    if not args.skip_cold:
        result["cold_start"], result["switch_feature_api"] = cold_start(args.threads, not args.skip_browser, args.features)
    result["in_process"] = in_process(args.features, args.images)
    result["machine"]["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
