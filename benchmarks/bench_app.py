"""App latency on CPU with the bundled demo: cold start, switching features, "what fires on my image" (alone and
with 20 concurrent visitors), and the cost of the backbones' thread-safe layer reads.

    python benchmarks/bench_app.py                       # everything, 1 torch thread (the app's default)
    python benchmarks/bench_app.py --skip-browser --threads 2 --out runs/bench_app.json
    python benchmarks/bench_app.py --skip-browser --only-concurrency --clients 1 20

1. Cold start (target ≤ 10 s): `python app.py --demo` from process start until the server answers HTTP, and (with
   Chromium) until the first feature's gallery images have loaded in a browser.
2. Switching features (target ≤ 0.3 s server time): `Explorer.feature_page` for features not seen before (gallery
   heatmaps, histogram, names, MILS history); app.py's handler + Gradio's postprocessing of every output (server
   time); a cached revisit; and the round trip through the running app's API with gradio_client (`/feature`,
   including the queue and the client downloading the gallery images).
3. "What fires on my image": `Explorer.what_fires` on the scikit-image photos (backbone + SAE + heatmaps), warm.
4. "What fires" through the running app's API (`/what_fires`, gradio_client: upload, queue, handler, the gallery's
   download) with 1 client, then with 20 clients at once, each on its own image (the app runs 4 requests at a time):
   latency per request, and requests per second. Every concurrent answer is checked against the one given alone.
5. The thread-safe layer read (`nacosae.backbones`: one dispatch hook per layer, the call in a context variable, no
   lock): CPU time of `activations(x, "features")` over the bare `model(x)` forward on EfficientNet-Lite0, batch 1
   and 16, and of `forward_with_edit` (identity edit) over `output`.
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


def cold_start(threads: int, browser: bool, n_features: int, clients: list[int] | None = None,
               requests_per_client: int = 2) -> tuple[dict, dict | None, dict | None]:
    port = _port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "NACOSAE_TORCH_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--demo", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    out: dict = {}
    api: dict | None = None
    concurrency: dict | None = None
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
        if n_features:
            api = api_switch(url, n_features)
        if clients:
            concurrency = api_what_fires(url, clients, requests_per_client)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return out, api, concurrency


def api_switch(url: str, n: int) -> dict:
    """Round trip of the `/feature` endpoint (handler + Gradio encoding the gallery) through gradio_client."""
    from gradio_client import Client

    from nacosae.results import read_results_folder

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


def _bench_images(n: int) -> list[Path]:
    """n different PNG files: the scikit-image photos, then seeded generated ones."""
    import tempfile

    from nacosae.synthetic import distinct_images

    images = distinct_images(n)
    folder = Path(tempfile.mkdtemp(prefix="bench_app_"))
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / f"image-{i:02d}.png")
        im.save(paths[-1])
    return paths


def api_what_fires(url: str, clients: list[int], per_client: int) -> dict:
    """`/what_fires` round trips with n clients at once (each on its own images), for each n in `clients`."""
    import threading

    from gradio_client import Client, handle_file

    from nacosae.results import read_results_folder

    sid = read_results_folder(ROOT / "demo" / "results", columns={"runs": ["sae_id"]}, tables=("runs",))["runs"].column("sae_id")[0].as_py()
    images = _bench_images(max(clients) * per_client)

    def ask(client, path):
        t0 = time.perf_counter()
        gallery, table = client.predict(sid, handle_file(str(path)), 8, api_name="/what_fires")
        return time.perf_counter() - t0, [row[0] for row in table["data"]]

    warm = Client(url, verbose=False)
    alone = {}
    for p in images:  # warm-up (backbone, SAE) and the answers alone, to check the concurrent ones against
        alone[p] = ask(warm, p)[1]
    out = {}
    for n in clients:
        barrier, lat, wrong, errors = threading.Barrier(n), [], [], []
        each = max(per_client, -(-10 // n))  # at least 10 requests in all, so one client gives a median too

        def visitor(i):
            try:
                client = Client(url, verbose=False)
                barrier.wait(timeout=120)
                for r in range(each):
                    p = images[(i * each + r) % len(images)]
                    dt, feats = ask(client, p)
                    lat.append(dt)
                    if feats != alone[p]:
                        wrong.append(p.name)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=visitor, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        out[f"{n}_clients"] = {**summary(lat), "requests": len(lat), "wall_s": round(wall, 2),
                               "requests_per_s": round(len(lat) / wall, 2), "errors": len(errors),
                               "answers_not_equal_to_alone": len(wrong)}
    return out


def dispatch_overhead(threads: int, repeats: int = 7) -> dict:
    """CPU time of the thread-safe layer read over the bare model (min over interleaved repeats)."""
    import torch

    from nacosae.backbones import load_backbone

    torch.set_num_threads(threads)
    bb = load_backbone("efficientnet-lite0")
    out = {}
    with torch.no_grad():
        for B in (1, 16):
            x = torch.randn(B, 3, 224, 224)
            bb.model(x), bb.activations(x, "features"), bb.forward_with_edit(x, "blocks.14", lambda a: a)
            bare, read, plain, edited = [], [], [], []
            for _ in range(repeats):
                for fn, acc in ((lambda: bb.model(x), bare), (lambda: bb.activations(x, "features"), read),
                                (lambda: bb.output(x), plain),
                                (lambda: bb.forward_with_edit(x, "blocks.14", lambda a: a), edited)):
                    t0 = time.process_time()
                    fn()
                    acc.append(time.process_time() - t0)
            out[f"batch_{B}"] = {"model_forward_s": round(min(bare), 4), "activations_features_s": round(min(read), 4),
                                 "activations_over_forward": round(min(read) / min(bare), 3),
                                 "forward_with_edit_over_output": round(min(edited) / min(plain), 3)}
    out["lock"] = "none: each call lives in a context variable of its thread; the hooks are installed once"
    return out


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
    ap.add_argument("--clients", type=int, nargs="*", default=[1, 20],
                    help="concurrent gradio clients for the what-fires round trips (default: 1 then 20; none: skip)")
    ap.add_argument("--requests-per-client", type=int, default=2, help="what-fires requests each client sends")
    ap.add_argument("--only-concurrency", action="store_true",
                    help="only the app's what-fires round trips and the layer-read overhead")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(args.threads)
    result = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                          "load_avg_1min": round(os.getloadavg()[0], 2)}}
    if not args.skip_cold:
        result["cold_start"], result["switch_feature_api"], result["what_fires_api"] = cold_start(
            args.threads, not args.skip_browser and not args.only_concurrency, 0 if args.only_concurrency else args.features,
            args.clients, args.requests_per_client)
    if not args.only_concurrency:
        result["in_process"] = in_process(args.features, args.images)
    result["layer_read_overhead"] = dispatch_overhead(args.threads)
    result["machine"]["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
