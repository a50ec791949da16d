"""The app end to end in headless Chromium: `python app.py` with no network falls back to the bundled demo; the test
opens a feature and waits for its gallery images to load, uploads an image to "what fires", and runs live naming to
completion. Screenshots go to the test's tmp_path; with NACOSAE_UPDATE_SCREENSHOT=1 the feature page is
also copied to docs/figures/app.png (the README's picture).

Needs Debian `chromium` and the Python package `playwright` (never `playwright install`: the system browser is used).
"""

import os
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (scripts/setup.sh installs it)"),
    pytest.mark.skipif(not (ROOT / "demo" / "results").is_dir(), reason="no bundled demo: run hub_scripts/build_demo.py"),
    pytest.mark.skipif(not Path("/usr/share/openclipart/png").is_dir(), reason="live naming needs Debian openclipart-png"),
]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from conftest import running_app

    # offline, as here: the configured Hub repos fail fast and the app must fall back to the bundled demo
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "NACOSAE_SAE_REPO": "", "NACOSAE_RESULTS_REPO": "",
           "NACOSAE_NAMING_MAX_BANK": os.environ.get("NACOSAE_NAMING_MAX_BANK", "600")}  # a bank subset: its pool in seconds
    env.pop("NACOSAE_SAE_REPO"), env.pop("NACOSAE_RESULTS_REPO"), env.pop("NACOSAE_DEMO", None)
    with running_app([], ROOT, env, tmp_path_factory.mktemp("app") / "app.log", timeout_s=90) as (url, _):
        yield url


@pytest.fixture(scope="module")
def page(app_url, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        # a persistent context is how Playwright takes a fresh --user-data-dir; headless=True adds --headless
        context = p.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), headless=True,
                                                       args=[f for f in FLAGS if f != "--headless"],
                                                       viewport={"width": 1400, "height": 1300})
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(app_url)
        yield pg
        context.close()


def _loaded_images(page, selector: str) -> int:
    """How many <img> under `selector` finished loading with real pixels."""
    return page.eval_on_selector_all(f"{selector} img", "els => els.filter(e => e.complete && e.naturalWidth > 0).length")


def _wait_images(page, selector: str, n: int = 1, timeout_s: float = 60) -> int:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        k = _loaded_images(page, selector)
        if k >= n:
            return k
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} images loaded under {selector}")


def _first_feature(page) -> int:
    """The feature of the browser's first row (alive and not dense: those are hidden by default)."""
    return _browser_cell(page, 0)


def _browser_cell(page, row: int) -> int:
    return int(page.inner_text(f'#browser [data-testid="cell-{row}-0"]').strip())


def test_feature_upload_and_live_naming(page, tmp_path):
    from PIL import Image

    # 1. the start page: the demo notice, the browser, and the first feature's gallery with loaded images
    page.wait_for_selector("#notice")
    assert "bundled demo" in page.inner_text("#notice")
    _wait_images(page, "#top-images", 3)
    feature = _first_feature(page)

    # 2. open a feature by clicking its row in the browser, then another by number; its gallery images load
    third = _browser_cell(page, 2)
    page.click('#browser [data-testid="cell-2-1"]')
    page.wait_for_function(f"document.querySelector('#feature-title').innerText.includes('#{third}')")
    second = _browser_cell(page, 1)
    page.fill("#feature-number input", str(second))
    page.click("#open-feature")
    page.wait_for_function(f"document.querySelector('#feature-title').innerText.includes('#{second}')")
    time.sleep(0.5)  # the gallery re-renders after the title
    assert _wait_images(page, "#top-images", 3) >= 3
    shot = tmp_path / "feature.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("NACOSAE_UPDATE_SCREENSHOT"):  # refresh the README's picture on request, never by default
        shutil.copyfile(shot, ROOT / "docs" / "figures" / "app.png")

    # 3. upload an image: which features fire on it
    import skimage.data

    upload = tmp_path / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(upload)
    page.get_by_role("tab", name="What fires on my image").click()
    page.set_input_files("#fires-image input[type=file]", str(upload))
    time.sleep(1.0)  # the upload finishes before the button reads the image
    page.click("#fires-run")
    assert _wait_images(page, "#fires-gallery", 3, timeout_s=90) >= 3
    page.screenshot(path=str(tmp_path / "fires.png"), full_page=True)
    # an unreadable upload: a clear message, and the app keeps serving
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.click("#fires-image button[aria-label='Clear']") if page.locator("#fires-image button[aria-label='Clear']").count() else None
    page.set_input_files("#fires-image input[type=file]", str(bad))
    time.sleep(1.0)
    page.click("#fires-run")
    page.get_by_text("this image cannot be used").first.wait_for(timeout=30_000)

    # 4. live naming of the first feature, small settings, to completion
    page.get_by_role("tab", name="Live naming").click()
    page.fill("#naming-feature input", str(feature))
    page.fill("#naming-iterations input[type=number]", "1")
    page.press("#naming-iterations input[type=number]", "Enter")
    page.fill("#naming-candidates input[type=number]", "4")
    page.press("#naming-candidates input[type=number]", "Enter")
    page.click("#naming-run")
    page.wait_for_function("document.querySelector('#naming-status').innerText.includes('done')", timeout=180_000)
    name = page.inner_text("#naming-name").strip()
    status = page.inner_text("#naming-status")
    page.screenshot(path=str(tmp_path / "naming.png"), full_page=True)
    assert name and "held-out CoSy AUC" in name, status  # the selected name and its score on the evaluation split
    assert "done" in status, status
