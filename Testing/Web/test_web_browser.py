"""End to end in a real browser: ``fastsam3d web`` on loopback, headless Chromium
(Debian ``chromium``) driven by playwright. Click on the axial view, wait for
the overlay, screenshot, right click, undo, download the labelmap.

Skipped, with the reason, when Chromium or playwright is not installed
(scripts/test.sh installs both). Never downloads a browser.

Environment:
  FASTSAM3D_WEB_TEST_MODEL   --model for the server (default: a tiny random model file)
  FASTSAM3D_WEB_SCREENSHOT   also save the screenshot after the first click here
  FASTSAM3D_WEB_TIMINGS      append the measured click-to-overlay times (JSON lines) here
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from web_server import running_server

pytest.importorskip("trame_slicer", reason="the web extra is not installed: pip install -e .[web]")

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

# Times each new frame of a watched view image and counts the pixels that differ
# from the frame shown when the watch was armed (just before the click). Only frames
# that arrive once the page knows the click was applied (#fs3d-revision) count, so a
# hover or low-quality interactive frame is never taken for the overlay.
WATCH_FRAMES = """
(() => {
  const canvas = document.createElement('canvas');
  const pixels = (img) => {
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const ctx = canvas.getContext('2d', {willReadFrequently: true});
    ctx.drawImage(img, 0, 0);
    return ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  };
  window.__fs3d = {watch: null, hit: null, frames: [], lastFrame: performance.now()};
  document.addEventListener('load', (event) => {
    const st = window.__fs3d, img = event.target;
    if (img.tagName === 'IMG') st.lastFrame = performance.now();
    if (!st.watch || img !== st.watch.img || st.hit !== null) return;
    const t = performance.now() - st.watch.t0;
    const now = pixels(img), ref = st.watch.ref;
    let changed = -1;
    if (now.length === ref.length) {
      changed = 0;
      for (let i = 0; i < now.length; i += 4) {
        if (Math.abs(now[i] - ref[i]) + Math.abs(now[i+1] - ref[i+1]) + Math.abs(now[i+2] - ref[i+2]) > 60) changed++;
      }
    }
    const applied = document.querySelector('#fs3d-revision').textContent.trim() === st.watch.revision;
    st.frames.push([Math.round(t), changed, applied]);
    if (applied && changed > st.watch.minPixels) st.hit = t;
  }, true);
  window.__fs3dArm = (img, minPixels, revision) => {
    window.__fs3d.watch = {img, ref: pixels(img), t0: performance.now(), minPixels, revision: String(revision)};
    window.__fs3d.hit = null; window.__fs3d.frames = [];
  };
})();
"""


def _chromium() -> str:
    path = os.environ.get("FASTSAM3D_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("headless browser test: Debian 'chromium' is not installed "
                    "(scripts/test.sh installs it with apt-get when it runs as root)")
    return path


def _listening_addresses(port) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and fields[3] == "0A":            # LISTEN
                if width == 8:
                    found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
                else:
                    raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8))
                    found.add(socket.inet_ntop(socket.AF_INET6, raw))
    return found


def _needs_browser() -> None:
    _chromium()
    pytest.importorskip("playwright.sync_api", reason="headless browser test: the 'playwright' "
                        "Python package is not installed (pip install -e .[webtest])")


@pytest.fixture(scope="module")
def server(ct_path, tiny_model_file, tmp_path_factory):
    _needs_browser()
    model = os.environ.get("FASTSAM3D_WEB_TEST_MODEL") or str(tiny_model_file)
    with running_server(ct_path, model, tmp_path_factory.mktemp("server")) as (url, port, log):
        yield {"url": url, "port": port, "model": model, "log": log}


@pytest.fixture(scope="module")
def playwright():
    """One playwright driver for every page of the module (it allows one per thread)."""
    _needs_browser()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        yield p


@contextlib.contextmanager
def browser_page(playwright, url, profile):
    """Headless Chromium on ``url`` with a fresh profile and the frame watch installed."""
    context = playwright.chromium.launch_persistent_context(
        str(profile), executable_path=_chromium(), headless=True, args=CHROMIUM_FLAGS,
        viewport={"width": 1400, "height": 900}, accept_downloads=True)
    try:
        page = context.pages[0] if context.pages else context.new_page()
        page.add_init_script(WATCH_FRAMES)
        page.goto(url)
        yield page
    finally:
        context.close()


@pytest.fixture(scope="module")
def page(server, playwright, tmp_path_factory):
    with browser_page(playwright, server["url"], tmp_path_factory.mktemp("chromium-profile")) as page:
        yield page


@pytest.fixture(scope="module")
def bundled_page(ct_path, playwright, tmp_path_factory):
    """A server with the bundled model (it has box prompts), and its page."""
    with running_server(ct_path, "default", tmp_path_factory.mktemp("bundled-server")) as (url, _, _), \
            browser_page(playwright, url, tmp_path_factory.mktemp("chromium-profile")) as page:
        yield page


def _text(page, element_id) -> str:
    return page.inner_text(f"#{element_id}").strip()


def _wait_revision(page, revision, timeout_ms=60000):
    page.wait_for_function(f"document.querySelector('#fs3d-revision').textContent.trim() === '{revision}'",
                           timeout=timeout_ms)


def _click_and_time(page, index, x, y, revision, button="left", min_pixels=200) -> dict:
    """Click on view ``index``; ms until that view shows a frame with > min_pixels changed pixels.
    Armed once no view has received a frame for 0.8 s (a late frame of the previous
    action, e.g. the full-quality frame after an interactive one, must not count)."""
    page.wait_for_function("performance.now() - window.__fs3d.lastFrame > 800", timeout=30000)
    page.evaluate("([i, n, r]) => window.__fs3dArm(document.querySelectorAll('img.image-display-area')[i], n, r)",
                  [index, min_pixels, revision])
    started = time.perf_counter()
    page.mouse.click(x, y, button=button)
    page.wait_for_function("window.__fs3d.hit !== null", timeout=60000)
    watch = page.evaluate("({hit: window.__fs3d.hit, frames: window.__fs3d.frames})")
    return {"overlay_ms": round(watch["hit"], 1), "wall_ms": round(1000 * (time.perf_counter() - started), 1),
            "frames": watch["frames"]}


def _server_ms(page) -> float:
    """The server's own latency of the last click (engine + write), as the page shows it."""
    return float(_text(page, "fs3d-latency").split()[-2])


def _changed_pixels(before_png, after_png, box) -> int:
    from PIL import Image
    a = np.asarray(Image.open(io.BytesIO(before_png)).convert("RGB"), dtype=int)
    b = np.asarray(Image.open(io.BytesIO(after_png)).convert("RGB"), dtype=int)
    x0, y0, x1, y1 = (int(v) for v in (box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"]))
    return int((np.abs(a[y0:y1, x0:x1] - b[y0:y1, x0:x1]).sum(axis=2) > 60).sum())


def _axial_view(page):
    """Once the four views show and the model is loaded: (index, bounding box) of the axial view."""
    page.wait_for_function("document.querySelectorAll('img.image-display-area').length >= 4 && "
                           "Array.from(document.querySelectorAll('img.image-display-area'))"
                           ".every(i => i.naturalWidth > 0)", timeout=60000)
    page.wait_for_function("!document.querySelector('#fs3d-device').textContent.includes('loading')",
                           timeout=120000)
    time.sleep(1.0)                                       # let the first frames settle
    views = page.query_selector_all("img.image-display-area")
    boxes = [v.bounding_box() for v in views]
    axial = min(range(len(boxes)), key=lambda i: (round(boxes[i]["y"]), boxes[i]["x"]))   # top left
    return axial, boxes[axial]


def test_click_in_the_browser_segments(server, page, tmp_path):
    import SimpleITK as sitk
    # Loopback only
    assert _listening_addresses(server["port"]) <= {"127.0.0.1", "::1"}, _listening_addresses(server["port"])

    axial, box = _axial_view(page)
    assert _text(page, "fs3d-revision") == "0" and _text(page, "fs3d-voxels") == "0"
    before = page.screenshot()

    # Left click on the axial view: a positive point; the overlay appears
    x, y = box["x"] + 0.5 * box["width"], box["y"] + 0.55 * box["height"]
    first = _click_and_time(page, axial, x, y, 1)
    _wait_revision(page, 1)
    voxels_1 = int(_text(page, "fs3d-voxels"))
    assert voxels_1 > 0
    # the screenshot once every view is up to date (the 3D surfaces come a moment later)
    page.wait_for_function("document.querySelector('#fs3d-surfaces').textContent.trim() === 'done'",
                           timeout=60000)
    page.wait_for_function("performance.now() - window.__fs3d.lastFrame > 800", timeout=30000)
    shot = tmp_path / "web.png"
    after = page.screenshot(path=str(shot))
    assert _changed_pixels(before, after, box) > 200, "the axial view shows no overlay"
    if os.environ.get("FASTSAM3D_WEB_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["FASTSAM3D_WEB_SCREENSHOT"])
    assert "last click" in _text(page, "fs3d-latency") and "CPU" in _text(page, "fs3d-device")

    # A second positive click (decoder only: the region is already encoded)
    first["server_ms"] = _server_ms(page)
    second = _click_and_time(page, axial, x + 0.03 * box["width"], y, 2)
    _wait_revision(page, 2)
    second["server_ms"] = _server_ms(page)
    voxels_2 = int(_text(page, "fs3d-voxels"))

    # Right click: a negative point removes voxels
    _click_and_time(page, axial, x + 0.012 * box["width"], y, 3, button="right", min_pixels=20)
    _wait_revision(page, 3)
    voxels_3 = int(_text(page, "fs3d-voxels"))
    if os.environ.get("FASTSAM3D_WEB_TEST_MODEL"):     # another (e.g. random full-size) model: it changed
        assert voxels_3 != voxels_2
    else:                                              # the tiny test model removes voxels there
        assert voxels_3 < voxels_2

    # Undo restores the segment as it was
    page.click("#fs3d-undo")
    _wait_revision(page, 4)
    assert int(_text(page, "fs3d-voxels")) == voxels_2

    # Download the labelmap: the scan's grid, the segment's voxels
    with page.expect_download() as download:
        page.click("#fs3d-export")
    assert download.value.suggested_filename == "example_ct-segmentation.nii.gz"
    saved = tmp_path / "labels.nii.gz"
    download.value.save_as(str(saved))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(saved)))
    assert labels.shape == (112, 101, 122) and int((labels == 1).sum()) == voxels_2

    timings = {"model": Path(server["model"]).name, "first_click": first, "second_click": second,
               "voxels": [voxels_1, voxels_2, voxels_3]}
    print("\nclick-to-overlay in the browser (CPU):", json.dumps(
        {k: ({kk: vv for kk, vv in v.items() if kk != "frames"} if isinstance(v, dict) else v)
         for k, v in timings.items()}))
    if os.environ.get("FASTSAM3D_WEB_TIMINGS"):
        with open(os.environ["FASTSAM3D_WEB_TIMINGS"], "a") as f:
            f.write(json.dumps(timings) + "\n")


def test_upload_in_the_browser(server, page, ct_path):
    """A file picked in the page becomes a second scan (name sanitised, generated file name)."""
    with tempfile.TemporaryDirectory() as tmp:
        odd = Path(tmp) / "my scan (copy).nii.gz"
        shutil.copyfile(ct_path, odd)
        page.set_input_files("input[type=file]", str(odd))
        page.wait_for_function("document.querySelector('#fs3d-volume-name').textContent.trim() === 'my_scan_copy'",
                               timeout=60000)
    assert _text(page, "fs3d-voxels") == "0"


def _drag(page, points):
    page.mouse.move(*points[0])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(x, y, steps=4)
    page.mouse.up()


def test_box_scribble_and_lasso_in_the_browser(bundled_page):
    """The bundled model: drag a box on the axial view (the overlay appears),
    scribble next to it, then a negative lasso; each is one undo step."""
    page = bundled_page
    axial, view = _axial_view(page)
    x, y = view["x"] + 0.5 * view["width"], view["y"] + 0.55 * view["height"]
    w = 0.04 * view["width"]
    before = page.screenshot()

    page.click("#fs3d-tool-box")
    _drag(page, [(x - w, y - w), (x, y), (x + w, y + w)])
    _wait_revision(page, 1)
    assert _text(page, "fs3d-latency").startswith("last box"), _text(page, "fs3d-latency")
    voxels_box = int(_text(page, "fs3d-voxels"))
    assert voxels_box > 0
    page.wait_for_function("performance.now() - window.__fs3d.lastFrame > 800", timeout=30000)
    assert _changed_pixels(before, page.screenshot(), view) > 100, "the axial view shows no box result"

    page.click("#fs3d-tool-scribble")
    _drag(page, [(x + w, y - w), (x + 1.5 * w, y), (x + 2 * w, y + w)])
    _wait_revision(page, 2)
    assert _text(page, "fs3d-latency").startswith("last scribble")
    voxels_scribble = int(_text(page, "fs3d-voxels"))

    page.click("#fs3d-tool-lasso")
    page.mouse.move(x - w / 2, y - w / 2)
    page.mouse.down(button="right")
    for px, py in [(x + w / 2, y - w / 2), (x + w / 2, y + w / 2), (x - w / 2, y + w / 2), (x - w / 2, y - w / 3)]:
        page.mouse.move(px, py, steps=4)
    page.mouse.up(button="right")
    _wait_revision(page, 3)
    assert _text(page, "fs3d-latency").startswith("last lasso")
    assert int(_text(page, "fs3d-voxels")) != voxels_scribble

    page.click("#fs3d-undo")
    _wait_revision(page, 4)
    assert int(_text(page, "fs3d-voxels")) == voxels_scribble
    page.click("#fs3d-undo")
    _wait_revision(page, 5)
    assert int(_text(page, "fs3d-voxels")) == voxels_box
