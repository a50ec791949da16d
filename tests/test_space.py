"""The Space as it will really run (issue 12): `space_config/deploy.py --out DIR` assembles it, `python app.py` starts
from that folder alone (no network, nothing of this checkout on its path but the installed packages), and every tab
works through Gradio's API, including the Lab and live naming with every proposer of the dropdown; the errors a visitor
sees are readable. The pinned requirements are the installed versions and cover every package the app imports. The
ZeroGPU path runs off Spaces with a stand-in for `spaces.GPU` that does what ZeroGPU does at its boundary (a forked
worker, pickled arguments and results, only `gr.Error` crossing back). Caches stay bounded over 50 loads."""

from __future__ import annotations

import gc
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SID = "efficientnet-lite0/blocks.14"
MAX_BANK = "600"  # a seeded family subset of the naming bank: its pool is encoded in seconds, not minutes


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    out = tmp_path_factory.mktemp("space") / "space"
    res = subprocess.run([sys.executable, str(ROOT / "space_config" / "deploy.py"), "--out", str(out)],
                         capture_output=True, text=True, cwd=out.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "PYTEST"))}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
            "NACOSAE_NAMING_MAX_BANK": MAX_BANK, **extra}


@pytest.fixture(scope="module")
def served(space, tmp_path_factory):
    """`python app.py` in the assembled folder, as the Space starts it; (url, seconds until it answered HTTP)."""
    from conftest import running_app

    with running_app([], space, _env(), tmp_path_factory.mktemp("log") / "app.log", timeout_s=180) as served_:
        yield served_


def test_the_space_folder_is_complete_and_imports_its_own_copy(space):
    meta = (space / "README.md").read_text()
    assert re.search(r"^python_version: \"3\.11\"$", meta, re.M) and "suggested_hardware: cpu-basic" in meta
    assert set((space / "packages.txt").read_text().split()) >= {"openclipart-png", "fonts-noto-color-emoji",
                                                                 "unicode-cldr-core", "wordnet-base", "dataset-fashion-mnist"}
    probe = subprocess.run([sys.executable, "-c", "import nacosae; print(nacosae.__file__)"], cwd=space, env=_env(),
                           capture_output=True, text=True, check=True)
    assert Path(probe.stdout.strip()).resolve().is_relative_to(space.resolve())  # the copy, not this checkout


def test_the_python_version_is_the_tested_one():
    sys.path.insert(0, str(ROOT / "space_config"))
    try:
        import deploy
    finally:
        sys.path.pop(0)
    assert deploy.PYTHON_VERSION == f"{sys.version_info.major}.{sys.version_info.minor}"


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "space_config" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirement not pinned: {line}"
            pins[name] = version
    return pins


def test_requirements_are_pinned_to_the_installed_versions():
    for name, version in _requirements().items():
        assert md.version(name) == version, f"{name}: pinned {version}, installed {md.version(name)}"


def test_every_tab_of_the_assembled_space(served, tmp_path):
    """Through Gradio's API of the running Space: browse, a feature page, what fires, steering, live naming with each
    proposer of the dropdown (the pool built on first use: this bank subset ships none), the Lab; bad input gives
    readable messages."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from nacosae import serve
    from nacosae.images import SkimageSource

    url, startup_s = served
    print(f"start-up of the assembled Space until it answered HTTP: {startup_s:.1f} s")
    assert startup_s < 120
    client = Client(url, verbose=False)
    table = client.predict(SID, "", "frequency", True, True, api_name="/browse")
    features = [row[0] for row in table["data"]]
    assert features
    page = client.predict(SID, features[0], api_name="/feature")
    assert page[0] == features[0] and f"#{features[0]}" in page[1]
    photo = tmp_path / "space-cat.png"
    SkimageSource().load(SkimageSource().records()[2]).save(photo)
    gallery, fires = client.predict(SID, handle_file(str(photo)), 4, api_name="/what_fires")  # (the State is no output)
    feats = [row[0] for row in fires["data"]]
    assert gallery and len(feats) == len(gallery)
    before, after, changes, note = client.predict(SID, handle_file(str(photo)), feats[0], "ablate", 0, "",
                                                  api_name="/steer")
    assert f"#{feats[0]}" in note
    for proposer in serve.PROPOSERS:  # every proposer of the dropdown (none is hidden on this machine)
        assert serve.proposer_problem(proposer) is None, proposer
        job = client.submit(SID, features[0], proposer, 1, 2, 900, api_name="/name_feature")
        outs = job.result(timeout=900)
        status, name = outs[0], outs[1]
        assert "done" in status and "held-out CoSy AUC" in name, (proposer, status, name)
    html = client.predict("cnn", "mean", api_name="/lab_structure")
    assert "<svg" in html
    for call, words in (((SID, None, 4), "upload an image first"),):
        with pytest.raises(AppError, match=words):
            client.predict(*call, api_name="/what_fires")
    with pytest.raises(AppError, match="choose a feature number"):
        client.predict(SID, handle_file(str(photo)), None, "clamp", 1.0, "", api_name="/steer")
    with pytest.raises(AppError, match="has no feature"):
        client.submit(SID, 10**6, "vocabulary", 1, 2, 60, api_name="/name_feature").result(timeout=120)


SCRIPT_IMPORTS = """
import json, sys, importlib.metadata as md
from pathlib import Path
import app
from PIL import Image
key, sid = app.START.source.key, app.START.sae_ids[0]
table = app.browse(key, sid, "", "frequency", True, True)
feature = int(table["feature"].iloc[0])
app.open_feature(key, sid, feature)
Image.new("RGB", (64, 48), (200, 30, 30)).save("probe.png")
app.what_fires(key, sid, {"path": "probe.png"}, 3)
app.steer(key, sid, {"path": "probe.png"}, feature, "ablate", 0, "")
app.lab_structure("mlp", "mean")
for proposer in app.serve.PROPOSERS:
    list(app.live_naming(key, sid, feature, proposer, 1, 2, 900, None))
dists = md.packages_distributions()
used = sorted({d for m in list(sys.modules) for d in dists.get(m.split(".")[0], [])})
print(json.dumps(used))
"""


def _closure(names) -> set[str]:
    """The distributions `names` install, with their dependencies (what pip would bring), normalised."""
    def norm(n):
        return re.sub(r"[-_.]+", "-", n).lower()

    seen, todo = set(), [norm(n) for n in names]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        try:
            reqs = md.requires(n) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" in r:
                continue
            todo.append(norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]))
    return seen


def test_the_pinned_requirements_cover_every_package_the_app_imports(space):
    """Every tab run in the assembled folder; each imported module's distribution must be pinned, installed by a pinned
    one, or installed by gradio (which the Space gets from sdk_version)."""
    res = subprocess.run([sys.executable, "-c", SCRIPT_IMPORTS], cwd=space, env=_env(), capture_output=True, text=True,
                         timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    used = json.loads(res.stdout.strip().splitlines()[-1])
    covered = _closure([*_requirements(), "gradio"]) | {"nacosae"}  # nacosae: the copied source folder
    missing = [d for d in used if re.sub(r"[-_.]+", "-", d).lower() not in covered]
    assert not missing, f"the app imports packages no pinned requirement installs: {missing}"


ZERO_GPU_SCRIPT = """
import multiprocessing, os, pickle, sys, threading, time, traceback
import spaces
calls = []

def fake_gpu(task=None, *, duration=None, size=None):
    # What ZeroGPU does at its boundary: the task runs in a forked worker, arguments and results are pickled, and an
    # exception other than gr.Error comes back as 'ZeroGPU worker error' with its class name only.
    def wrap(fn):
        def handler(*args, **kwargs):
            import gradio as gr
            calls.append((fn.__name__, duration(*args, **kwargs) if callable(duration) else duration))
            r, w = multiprocessing.get_context("fork").Pipe(duplex=False)
            def child():
                try:
                    out = ("ok", fn(*args, **kwargs))
                except gr.Error as e:
                    out = ("gr", e.message)
                except Exception as e:
                    out = ("err", type(e).__name__)
                w.send_bytes(pickle.dumps(out))
            pickle.dumps((args, kwargs))
            p = multiprocessing.get_context("fork").Process(target=child)
            p.start()
            if not r.poll(120):
                p.kill()
                raise RuntimeError("the forked worker hung (a lock inherited from the parent?)")
            kind, value = pickle.loads(r.recv_bytes())
            p.join()
            if kind == "gr":
                raise gr.Error(value)
            if kind == "err":
                raise gr.Error("ZeroGPU worker error: " + value)
            return value
        return handler
    return wrap(task) if callable(task) else wrap

spaces.GPU = fake_gpu
import app
import gradio as gr
from nacosae import serve
assert app.ZERO_GPU and app.gpu_device() == "cpu"
key, sid = app.START.source.key, app.START.sae_ids[0]
from PIL import Image
Image.new("RGB", (64, 48), (30, 200, 30)).save("probe.png")
app.warm_up()
# a fork while another thread holds the locks a worker needs (what the warm-up thread once did: the backbone lock,
# and the backbone's own lock of its first layer read): the worker must not hang
held = threading.Event(); release = threading.Event()
bb = app.START.backbone(sid)
def hold():
    with serve._BACKBONE_LOCK, bb._hook_lock:
        held.set(); release.wait(60)
threading.Thread(target=hold, daemon=True).start(); held.wait()
zero = app.what_fires(key, sid, {"path": "probe.png"}, 3)
release.set()
cpu = app.START.what_fires(sid, "probe.png", 3)
assert zero[2] == cpu.features, (zero[2], cpu.features)
r = app.steer(key, sid, {"path": "probe.png"}, cpu.features[0], "clamp", 3.0, "")
assert r[0] == app.START.steer(sid, "probe.png", cpu.features[0], "clamp", 3.0).before
messages = []
for call in (lambda: app.what_fires(key, sid, None, 3), lambda: app.steer(key, sid, {"path": "probe.png"}, 10**6, "clamp", 1, ""),
             lambda: app.steer(key, sid, {"path": "probe.png"}, 1, "boost", 1, "")):
    try:
        call()
    except gr.Error as e:
        messages.append(e.message)
orig = serve.Explorer.what_fires
serve.Explorer.what_fires = lambda self, *a, **k: 1 / 0  # a failure inside the worker that is no ServeError
try:
    app.what_fires(key, sid, {"path": "probe.png"}, 3)
except gr.Error as e:
    messages.append(e.message)
serve.Explorer.what_fires = orig
print("MESSAGES", messages)
print("CALLS", calls)
"""


def test_the_zero_gpu_path_off_spaces(space):
    """NACOSAE_HARDWARE=zero-a10g with a forking stand-in for spaces.GPU: results equal the CPU explorer's, each call
    asks for a duration computed from its work (≤ 30 s here, not a flat 120 s), bad input gets the words it gets on
    cpu-basic (checked before the GPU function), and a fork while another thread holds a lock does not hang."""
    res = subprocess.run([sys.executable, "-c", ZERO_GPU_SCRIPT], cwd=space, env=_env(NACOSAE_HARDWARE="zero-a10g"),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = res.stdout
    messages = eval(out.split("MESSAGES ", 1)[1].splitlines()[0])
    assert messages[0] == "upload an image first" and "has no feature 1000000" in messages[1]
    assert messages[2].startswith("mode must be one of") and not any("ZeroGPU worker error" in m for m in messages)
    assert messages[3] == "the model failed on this request (ZeroDivisionError); try again, or with another input"
    calls = eval(out.split("CALLS ", 1)[1].splitlines()[0])
    assert {name for name, _ in calls} == {"_gpu_what_fires", "_gpu_steer"}
    assert all(0 < d <= 30 for _, d in calls), calls


def test_caches_stay_bounded_over_50_loads(tmp_path):
    """50 different sources and 50 different backbones loaded one after another: at most the caps stay open, the
    evicted ones are freed (weak references die), and the process's memory is measured (printed)."""
    import resource

    import torch

    from nacosae import serve
    from nacosae.backbones import load_backbone  # noqa: F401  (imported before measuring)

    def rss_mb() -> float:
        import ctypes

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the system, so RSS shows what is still held
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    demo = ROOT / "demo"
    gc.collect()
    rss0 = rss_mb()
    refs = []
    for i in range(50):
        ex = serve.open_explorer(serve.Source(str(demo / "sae"), str(demo / "results"), revision=f"load-{i}"))
        refs.append(weakref.ref(ex))
        ex.feature_page(ex.sae_ids[0], int(ex.browse(ex.sae_ids[0]).iloc[0]["feature"]))
        del ex
    gc.collect()
    alive = sum(r() is not None for r in refs)
    rss_sources = rss_mb()
    cfg = {"model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 512, "patch_size": 8,
                                                         "head_width": 32},
                         "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
           "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    bb_refs = []
    for i in range(50):
        folder = tmp_path / f"oc{i}"
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(json.dumps(cfg))
        bb = serve.backbone_for({"backbone": f"open_clip:local-dir:{folder}", "weights": None})
        bb_refs.append(weakref.ref(bb))
        model_mb = sum(t.numel() * t.element_size() for t in bb.model.state_dict().values()) / 2**20
        with torch.no_grad():
            bb.activations(bb.preprocess_batch([__import__("PIL.Image").Image.new("RGB", (32, 32))]), "resblocks.0", "all")
        del bb
    gc.collect()
    bb_alive = sum(r() is not None for r in bb_refs)
    rss_end = rss_mb()
    print(f"RSS: {rss0:.0f} MB at start, {rss_sources:.0f} MB after 50 sources ({alive} still open), {rss_end:.0f} MB "
          f"after 50 backbones of {model_mb:.0f} MB each ({bb_alive} still loaded; all 50 would hold {50 * model_mb:.0f} MB); "
          f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    assert alive <= serve.MAX_SOURCES and len(serve._EXPLORERS) <= serve.MAX_SOURCES + 1
    assert bb_alive <= serve.MAX_BACKBONES and len(serve._BACKBONES) <= serve.MAX_BACKBONES
    assert rss_sources - rss0 < 50 * 8  # unbounded, 50 demo sources would hold 50 copies of their tables and pages
    assert rss_end - rss_sources < 20 * model_mb  # far from the 50 models an unbounded cache would keep


def test_lru_cache_caps_entries_and_bytes():
    cache = serve_lru(3)
    for i in range(5):
        cache.put(i, i)
    assert sorted(cache._d) == [2, 3, 4]
    cache.get(2)
    cache.put(5, 5)
    assert sorted(cache._d) == [2, 4, 5]  # 3 was the least recently used
    cache.put("pinned", 0, pin=True)
    cache.put(6, 6)
    assert "pinned" in cache and len(cache) == 4
    by_bytes = serve_lru(100, max_bytes=10, sizeof=len)
    for k in "abc":
        by_bytes.put(k, "x" * 4)
    assert sorted(by_bytes._d) == ["b", "c"] and by_bytes.nbytes == 8


def serve_lru(*a, **kw):
    from nacosae.serve import LRUCache

    return LRUCache(*a, **kw)


def test_device_check_script_is_ready():
    """The device-machine script exists, is a bash script that runs the CUDA path offline, and is not run here."""
    script = ROOT / "scripts" / "device_space_check.sh"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "HF_HUB_OFFLINE=1" in text and "NACOSAE_HARDWARE=zero-a10g" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # it parses
