"""The real app under concurrent visitors: `python app.py --demo` on 127.0.0.1, driven by 20 `gradio_client` clients at
once, each asking what fires on its own image and then steering a feature on it. Every answer must equal the answer
to the same request made alone (issue 9: with one backbone shared by 4 request threads, calls failed with "layer did
not run" or returned another visitor's result). Bounded: 20 clients × 2 requests, each within REQUEST_TIMEOUT_S, the
whole test within a few minutes on a busy 2-core machine. Also through the real API: what a visitor types in the
"Load other repos" box never opens a server folder, and the page config holds no server path.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
N_CLIENTS = 20
REQUEST_TIMEOUT_S = 300
SID = "efficientnet-lite0/blocks.14"

pytestmark = [
    pytest.mark.skipif(not (ROOT / "demo" / "results").is_dir(), reason="no bundled demo: run hub_scripts/build_demo.py"),
]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`python app.py --demo` on a free local port; its log is printed when the module's tests end."""
    from conftest import running_app

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with running_app(["--demo"], ROOT, env, tmp_path_factory.mktemp("app") / "app.log") as (url, _):
        yield url


def visitor_images(folder: Path, n: int = N_CLIENTS) -> list[Path]:
    """n different images as PNG files: the scikit-image photos, then generated ones (seeded shapes on colour)."""
    from nacosae.synthetic import distinct_images

    images = distinct_images(n)
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / f"visitor-{i:02d}.png")
        im.save(paths[-1])
    return paths


def what_fires(client, image: Path):
    from gradio_client import handle_file

    return client.submit(SID, handle_file(str(image)), 4, api_name="/what_fires").result(timeout=REQUEST_TIMEOUT_S)


def steer(client, image: Path, feature: int):
    from gradio_client import handle_file

    return client.submit(SID, handle_file(str(image)), feature, "clamp", 5.0, "",
                         api_name="/steer").result(timeout=REQUEST_TIMEOUT_S)


def assert_same_fires(got, want, who: str) -> None:
    gallery, table = got
    w_gallery, w_table = want
    assert table["data"] == w_table["data"], who
    assert [g["caption"] for g in gallery] == [g["caption"] for g in w_gallery], who
    for g, w in zip(gallery, w_gallery):  # the heatmaps themselves, decoded
        a = np.asarray(Image.open(g["image"]).convert("RGB"), dtype=int)
        b = np.asarray(Image.open(w["image"]).convert("RGB"), dtype=int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2, who


def assert_same_steer(got, want, who: str) -> None:
    before, after, changes, note = got
    w_before, w_after, w_changes, w_note = want
    assert note == w_note, who
    for x, y in ((before, w_before), (after, w_after)):
        assert [c["label"] for c in x["confidences"]] == [c["label"] for c in y["confidences"]], who
        assert np.allclose([c["confidence"] for c in x["confidences"]], [c["confidence"] for c in y["confidences"]],
                           atol=1e-5), who
    assert [r[0] for r in changes["data"]] == [r[0] for r in w_changes["data"]], who


def test_twenty_concurrent_visitors_each_get_their_own_answers(app_url, tmp_path):
    from gradio_client import Client

    images = visitor_images(tmp_path)
    # 1. every request alone, one after the other
    solo = Client(app_url, verbose=False)
    alone_fires = [what_fires(solo, im) for im in images]
    features = [int(f[1]["data"][0][0]) for f in alone_fires]
    alone_steer = [steer(solo, im, j) for im, j in zip(images, features)]
    assert len({tuple(r[0] for r in f[1]["data"]) for f in alone_fires}) > N_CLIENTS // 2  # the images really differ

    # 2. the same requests from 20 clients at once, each on its own image
    barrier = threading.Barrier(N_CLIENTS)
    answers: dict[int, tuple] = {}
    errors: list[str] = []
    latencies: list[float] = []

    def visitor(i: int) -> None:
        try:
            client = Client(app_url, verbose=False)
            barrier.wait(timeout=120)
            t0 = time.perf_counter()
            fires = what_fires(client, images[i])
            latencies.append(time.perf_counter() - t0)
            answers[i] = (fires, steer(client, images[i], features[i]))
        except Exception as e:  # noqa: BLE001 - every failure is collected and reported below
            errors.append(f"visitor {i}: {type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=visitor, args=(i,), daemon=True) for i in range(N_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * REQUEST_TIMEOUT_S + 150)
    wall = time.perf_counter() - t0
    assert not any(t.is_alive() for t in threads), "a visitor did not finish in time"
    assert errors == [], errors
    assert sorted(answers) == list(range(N_CLIENTS))
    for i, (fires, steered) in answers.items():
        assert_same_fires(fires, alone_fires[i], f"visitor {i}")
        assert_same_steer(steered, alone_steer[i], f"visitor {i}")
    print(f"{N_CLIENTS} concurrent visitors: all {2 * N_CLIENTS} answers equal to the answers alone in {wall:.1f} s; "
          f"what-fires latency median {np.median(latencies):.2f} s, max {max(latencies):.2f} s")


BAD_REPOS = ["/etc", "/etc/hostname", "..", "../demo/sae", "~/x", str(ROOT / "demo" / "sae"), "demo/sae"]


def test_visitors_cannot_load_server_folders_through_the_api(app_url):
    """The app's own /load_source endpoint: local folders (even the bundled demo's, which hold a valid results
    dataset), '..', '~' and absolute paths are refused; 'demo/sae' is a valid Hub id and goes to the Hub only (offline
    here). No message, and nothing in the page config, shows a server path."""
    import re

    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app_url, verbose=False)
    for repo in BAD_REPOS:
        with pytest.raises(AppError) as info:
            client.predict(repo, "demo/results", "", "score", True, True, api_name="/load_source")
        msg = str(info.value)
        assert not re.search(r"(^|[\s'\"(=])(~|\.{0,2})/[\w.]", msg), msg
        assert str(ROOT) not in msg and "/etc" not in msg and "hostname" not in msg, msg
    assert "cannot download" in msg  # 'demo/sae' went to the (unreachable) Hub, not to the folder of that name
    config = urllib.request.urlopen(app_url + "config", timeout=30).read().decode()
    assert str(ROOT) not in config and "/tmp/" not in config
